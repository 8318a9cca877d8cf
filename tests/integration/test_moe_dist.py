"""DeepSeekMoE across processes: the bias update all-reduces the counts of 2 gloo ranks; two processes give bit-identical logits and gradients."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_utils import make_layer

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # two processes each


def _dist_worker(rank: int, world: int, init_file: str, q):
    import traceback

    import torch.distributed as dist
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        layer = make_layer(seed=0, balance="aux_free", bias_update_rate=0.01)
        torch.manual_seed(100 + rank)  # different data per rank
        x = torch.randn(2, 16, 32) + 0.5 * rank
        layer(x)
        local = torch.bincount(layer.router(x.reshape(-1, 32)).expert_ids.reshape(-1), minlength=8).float()
        layer.on_optimizer_step()
        # plain lists: a tensor in a queue is shared by file descriptor, which dies with this process
        q.put((rank, local.tolist(), layer.router.expert_bias.tolist(), layer.metrics()))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        q.put((rank, traceback.format_exc()))
        raise


def test_bias_update_all_reduces_counts_over_ranks(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, str(tmp_path / "init"), q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted([q.get(timeout=120) for _ in procs], key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    for r in res:
        assert len(r) == 4, f"rank {r[0]} failed:\n{r[1]}"
    res = [(rank, torch.tensor(local), torch.tensor(bias), metrics) for rank, local, bias, metrics in res]
    assert all(p.exitcode == 0 for p in procs)
    total = res[0][1] + res[1][1]
    assert not torch.equal(res[0][1], res[1][1])
    sign = torch.sign(total.mean() - total)
    for _, _, bias, metrics in res:
        torch.testing.assert_close(bias, 0.01 * (sign - sign.mean()))
        assert metrics["moe/layer1/load_max_over_mean"] == pytest.approx((total.max() / total.mean()).item())


_DETERMINISM_SCRIPT = textwrap.dedent("""
    import hashlib, torch
    from models.config import ModelConfig
    from models.moe.config import MoEConfig
    from models.transformer import Transformer
    torch.set_num_threads(1)
    torch.manual_seed(0)
    moe = dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32, n_dense_layers=1,
               balance='both')
    model = Transformer(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_hidden=96,
                                    max_seq_len=64, moe=MoEConfig(**moe)))
    idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    out = model(idx, idx.roll(-1, 1), return_logits=True)
    out.loss.backward()
    h = hashlib.sha256(out.logits.detach().numpy().tobytes())
    for p in model.parameters():
        h.update(p.grad.numpy().tobytes())
    print(h.hexdigest())
""")


def test_two_processes_give_bit_identical_logits_and_gradients():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    digests = [subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT], cwd=REPO, env=env, check=True,
                              capture_output=True, text=True).stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]

