"""The run directory's contract, one owner for every side of it.

A training run lives in one directory that several programs read and write: the trainer
(train/main.py), the sweep driver that launches it as a process (sweeps/), the results reader and
the tests' fake trainer. This package is below all of them (it imports nothing of the project and no
torch), so each side uses the same file names, writers, locks and readers instead of its own copy.

- :mod:`rundir.files`: the file names, all-or-nothing JSON writes, fingerprints, W&B-style run ids.
- :mod:`rundir.locks`: the ``.run.lock`` flock that at most one live trainer holds, and launch ids.
- :mod:`rundir.outcome`: what a directory says about its run (completed, failed, interrupted, ...).
- :mod:`rundir.config`: the run's resolved ``config.yaml`` (written by the sweep, read by the trainer)
  and the comparison of two resolved configs.
"""
