"""The trainer's side of sharded Engram tables (``parallel.engram_tables=sharded``, memory/sharded.py).

Each rank's table shards are parameters outside the DeepSpeed engine: the engine neither all-reduces
them (their gradient already sums every rank's lookups, scaled to the data-parallel mean) nor
partitions or casts them, so they need their own optimizer (the ``engram_tables`` group's settings,
built by train/optim.py, its state only for this rank's rows), their own clipping (the global norm
of engine and shard gradients, as DeepSpeed's ZeRO-0 fp32 clip computes it over replicated tables)
and their own checkpoint files: ``<tag>/engram_tables/rank<r>.pt`` with the rows, their optimizer
state and the layout they were saved under, so a run resumes at another world size (rows re-dealt
to their new owners) or replicated (:func:`unshard_engine_state`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from memory.build import shard_tables
from memory.layers import MultiHeadTable
from memory.sharded import RowLayout, TableShard, reshard_rows
from train import checkpoint as ckpt
from train.optim import TABLE_GROUP, build_optimizer, describe_optimizer
from rundir.schema import OptimConfig

log = logging.getLogger("train")
SHARD_DIR = "engram_tables"


class TableShards(nn.Module):
    """This rank's shard parameters (``tables.<i>``), the module the table optimizer's group is built from."""


class ShardedTables:
    """This rank's shards of every Engram table, their optimizer, clipping and checkpoint files."""

    def __init__(self, model: nn.Module, optim: OptimConfig, rank: int, world: int, device: torch.device):
        group = dist.new_group(list(range(world))) if world > 1 else None  # the lookups' own collectives
        replicated_floats = sum(m.num_params for m in model.modules() if isinstance(m, MultiHeadTable))
        self.shards: dict[str, TableShard] = shard_tables(model, rank, world, group, device)
        self.rank, self.world, self.replicated_params = rank, world, replicated_floats
        holder = TableShards()
        holder.tables = nn.ParameterList([s.weight for s in self.shards.values()])
        self.optimizer = build_optimizer(holder, optim)
        self.params = list(holder.tables)

    # ---- the step ------------------------------------------------------------------------
    def grad_sq_norm(self) -> torch.Tensor:
        """Squared L2 norm of every rank's shard gradients (all-reduced: the same on every rank)."""
        sq = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for p in self.params:
            if p.grad is not None:
                sq = sq + p.grad.float().pow(2).sum()
        if self.world > 1:
            dist.all_reduce(sq)
        return sq

    def clip_(self, engine_params, engine_norm: Optional[torch.Tensor], max_norm: float) -> torch.Tensor:
        """At the accumulation boundary: completes the shards' gradients (:meth:`TableShard.flush`), joins the
        shards' norm to ``engine_norm`` (the global norm of ``engine_params``' already reduced gradients, expert-
        parallel shards summed over their group: train.expert_parallel.grad_norm; None: not counted), and if
        ``max_norm`` > 0 scales every gradient by min(1, max_norm / (norm + 1e-6)), as DeepSpeed's ZeRO-0 fp32
        clip does. Returns the norm before clipping (a device tensor, no host read)."""
        for s in self.shards.values():  # the accumulation boundary: the owners' row sums
            s.flush()
        sq = self.grad_sq_norm()
        if engine_norm is not None:
            sq = sq + engine_norm.to(sq.device, torch.float32) ** 2
        norm = sq.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            grads = [p.grad for p in engine_params if p.grad is not None]
            for g in grads + [p.grad for p in self.params if p.grad is not None]:
                g.mul_(coef.to(g.dtype))
        return norm

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- start-up lines ----------------------------------------------------------------------
    def describe(self) -> list[str]:
        note = f"  (this rank's shard, 1/{self.world} of the rows)"
        return [line + note for line in describe_optimizer(self.optimizer)]

    def memory(self, base: Mapping[str, int]) -> dict:
        """``base`` (train.optim.optimizer_memory of the engine's optimizer, which holds no table) with this
        rank's table rows and their Adam state in place of the replicated ones."""
        local = sum(p.numel() for p in self.params)
        return {**base, "table_params": local, "table_bytes_fp32": 4 * local,
                "table_optimizer_state_bytes": 4 * 2 * local,
                "optimizer_state_bytes": base["optimizer_state_bytes"] + 4 * 2 * local,
                "table_params_replicated": self.replicated_params, "engram_tables": "sharded",
                "world_size": self.world}

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, tag_dir: Path) -> None:
        """This rank's rows and their optimizer state, with the layout they were saved under."""
        out = Path(tag_dir) / SHARD_DIR
        out.mkdir(parents=True, exist_ok=True)
        tables = {}
        for name, s in self.shards.items():
            state = self.optimizer.state.get(s.weight, {})
            tables[name] = {"rows": s.layout.rows, "weight": s.weight.detach().cpu(),
                            **{k: v.detach().cpu() for k, v in state.items()}}
        torch.save({"world": self.world, "rank": self.rank, "tables": tables}, out / f"rank{self.rank}.pt")

    def load(self, tag_dir: Path, load) -> None:
        """Rebuild this rank's rows and optimizer state from the shard files of any world size."""
        for saved in _shard_files(Path(tag_dir), load, only=None if self._needs_all(tag_dir) else self.rank):
            lay = {n: RowLayout(t["rows"], saved["rank"], saved["world"]) for n, t in saved["tables"].items()}
            for name, s in self.shards.items():
                if name not in saved["tables"]:
                    raise ValueError(f"{tag_dir / SHARD_DIR} holds no rows of {name}")
                t, state = saved["tables"][name], self.optimizer.state[s.weight]
                with torch.no_grad():
                    reshard_rows(t["weight"], lay[name], s.weight.data, s.layout)
                for k, v in t.items():
                    if k in ("rows", "weight"):
                        continue
                    if v.ndim == 0:
                        state[k] = v.clone()
                        continue
                    state.setdefault(k, torch.zeros_like(s.weight))
                    reshard_rows(v, lay[name], state[k], s.layout)

    def _needs_all(self, tag_dir: Path) -> bool:
        return len(list((Path(tag_dir) / SHARD_DIR).glob("rank*.pt"))) != self.world


def _shard_files(tag_dir: Path, load, only: Optional[int] = None):
    """The saved shard files of a checkpoint (one per saving rank), each loaded in turn."""
    folder = tag_dir / SHARD_DIR
    files = sorted(folder.glob("rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no Engram table shards")
    first = load(str(files[0]), map_location="cpu")
    if len(files) != first["world"]:
        raise ValueError(f"{folder} holds {len(files)} shard files, saved by {first['world']} ranks")
    for f in files:
        if only is None or f.name == f"rank{only}.pt":
            yield first if f == files[0] else load(str(f), map_location="cpu")


def unshard_engine_state(state: dict, tag_dir: Path, model: nn.Module, optimizer, load) -> dict:
    """A sharded run's ZeRO-0 model-states file, made loadable by a replicated engine: the full tables
    (assembled from every shard file) go into ``module`` and their optimizer state into ``optimizer``
    as the ``engram_tables`` group, at the position this run's optimizer has it."""
    groups = getattr(optimizer, "param_groups", [])
    at = [i for i, g in enumerate(groups) if g.get("name") == TABLE_GROUP]
    saved_opt = state.get("optimizer")
    if not at or not isinstance(saved_opt, dict) or "param_groups" not in saved_opt:
        raise ValueError(f"checkpoint {tag_dir} has sharded Engram tables; only an fp32 ZeRO-0 run can resume it "
                         f"with replicated tables")
    names = {id(p): n for n, p in model.named_parameters()}
    table_names = [names[id(p)] for p in groups[at[0]]["params"]]
    full: dict[str, dict] = {}
    for saved in _shard_files(tag_dir, load):
        for name, t in saved["tables"].items():
            one = RowLayout(t["rows"], 0, 1)
            dst = full.setdefault(name, {})
            for k, v in t.items():
                if k == "rows":
                    continue
                if v.ndim == 0:
                    dst[k] = v.clone()
                    continue
                dst.setdefault(k, torch.empty((t["rows"],) + tuple(v.shape[1:]), dtype=v.dtype))
                reshard_rows(v, RowLayout(t["rows"], saved["rank"], saved["world"]), dst[k], one)
    for n in table_names:
        state["module"][n] = full[n].pop("weight")
    start, k = sum(len(g["params"]) for g in groups[:at[0]]), len(table_names)
    moved = {(i + k if i >= start else i): v for i, v in saved_opt["state"].items()}
    for g in saved_opt["param_groups"]:
        g["params"] = [i + k if i >= start else i for i in g["params"]]
    table_group = {key: v for key, v in groups[at[0]].items() if key != "params"}
    saved_opt["param_groups"].insert(at[0], {**table_group, "params": list(range(start, start + k))})
    for j, n in enumerate(table_names):
        if full[n]:  # no optimizer state before the first step
            moved[start + j] = full[n]
    saved_opt["state"] = moved
    return state


def load_hooks(tables: Optional[ShardedTables], model: nn.Module, optimizer) -> ckpt.LoadHooks:
    """Sharded run: read this rank's rows after the engine. Replicated run: a sharded checkpoint's
    model-states file gets the full tables (:func:`unshard_engine_state`) before the engine sees it."""
    if tables is not None:
        return ckpt.LoadHooks(after=lambda tag_dir: tables.load(tag_dir, ckpt.safe_load))

    def adapt(state: dict, tag_dir: Path) -> dict:
        saved = ((state.get("meta") or {}).get("layout") or {}).get("engram_tables")
        if "module" not in state or saved != "sharded":
            return state
        return unshard_engine_state(state, tag_dir, model, optimizer, ckpt.safe_load)
    return ckpt.LoadHooks(adapt=adapt)
