"""What a Slurm sweep starts on each node, read without a cluster: ``--procs-per-run`` counts one node's
processes and defaults to ``--gpus-per-node`` (one process per GPU, as the README's commands assume);
the dry run prints node 0's command, and the DeepSpeed launcher's hostfile names every GPU."""
from __future__ import annotations

import pytest

from sweeps.execution.submitit_launcher import NodeTask

PAPER = ["--budget", "2e20", "--family", "paper", "--rho", "1", "--launcher", "slurm", "--nodes", "2",
         "--dry-run", "--data-dir", "/data/tokens"]


@pytest.mark.parametrize("extra, nproc", [(["--gpus-per-node", "8"], 8),
                                          (["--gpus-per-node", "8", "--procs-per-run", "4"], 4),
                                          ([], 1)])
def test_slurm_runs_one_process_per_gpu_unless_told(tmp_path, capsys, extra, nproc):
    from sweeps.run import main

    assert main([*PAPER, *extra, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (f"-m torch.distributed.run --nproc_per_node={nproc} --nnodes=2 --node_rank=0 '--master_addr=<node0>'"
            in out), out[-1500:]
    assert not (tmp_path / "paper-2e20").exists()  # a dry run writes nothing


def test_ep_size_is_checked_against_every_gpu_of_the_job(tmp_path, capsys):
    from sweeps.run import main

    argv = [*PAPER, "--gpus-per-node", "8", "--ep-size", "16", "--round-experts-to-ep", "--out", str(tmp_path)]
    assert main(argv) == 0  # 2 nodes x 8 GPUs: EP 16 divides the run's 16 ranks
    assert "--nproc_per_node=8 --nnodes=2" in capsys.readouterr().out


def test_deepspeed_runner_names_every_gpu_in_the_hostfile(tmp_path):
    task = NodeTask(str(tmp_path), str(tmp_path / "log"), runner="deepspeed", procs_per_node=8)
    cmd, hostfile = task.command(["gpu-a", "gpu-b"], 2, 1, 23456)
    assert hostfile == tmp_path / "hostfile"
    assert task.hostfile_text(["gpu-a", "gpu-b"]) == "gpu-a slots=8\ngpu-b slots=8\n"
    assert {"--num_nodes=2", "--num_gpus=8", "--node_rank=1", "--master_addr=gpu-a", "--master_port=23456",
            f"--hostfile={hostfile}"} <= set(cmd)
