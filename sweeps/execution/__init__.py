"""Execution: sweeps of run directories, launchers (local, GPUs, Slurm through submitit), the run loop,
progress and the results table."""
