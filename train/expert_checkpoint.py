"""Checkpoints of expert-parallel runs: the expert layout on disk, and experts that land where they belong.

DeepSpeed's own MoE checkpoint format belongs to its MoE layer (one file per ``deepspeed_experts.<i>``
key), and its dense format keeps one rank's view. Under EP each rank holds other experts, so next to
DeepSpeed's files (written in its dense layout) a checkpoint of an EP run holds:

* ``expert_layout.json`` (rank 0): EP size, routed expert count, which file holds which experts;
* ``experts_ep<j>_of_<N>.pt`` (one writer per EP rank j: global rank j, the first rank of its
  expert-data-parallel group): every routed expert weight of the experts j holds, by parameter name,
  and at ZeRO 0 their optimizer state (rank 0's file also the replicated parameters' state, by name).

Loading reads DeepSpeed's files for everything but the experts, then fills each rank's experts (and at
ZeRO 0 the whole optimizer state) from the expert files, slicing rows by global expert id: a run saved
at EP = 2 resumes at EP = 1 or 4 (ZeRO 0, whose optimizer state is whole; ZeRO 1/2 partition it by
layout, so there the EP size is part of the layout that must not change: train/checkpoint.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from models.moe import RoutedExperts
from train.expert_parallel import ExpertLayout, exact_fp32_clipping, expert_group, is_expert_param

LAYOUT_FILE = "expert_layout.json"
WEIGHTS = ("w1", "w2", "w3")  # models.moe.experts.RoutedExperts' stacked expert weights


def expert_file(tag_dir: Path, ep_rank: int, size: int) -> Path:
    return Path(tag_dir) / f"experts_ep{ep_rank:03d}_of_{size:03d}.pt"


def saved_layout(tag_dir: Path) -> Optional[dict]:
    """The expert layout a checkpoint was written under (None: replicated experts, EP = 1)."""
    p = Path(tag_dir) / LAYOUT_FILE
    return json.loads(p.read_text()) if p.exists() else None


def _named_state(optimizer: torch.optim.Optimizer, named: list) -> dict:
    """Optimizer state by parameter name (a torch optimizer's own ``state_dict`` numbers them by group
    position, and the groups differ between EP layouts: sharded experts have groups of their own)."""
    return {n: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for n, p in named if p in optimizer.state}


def save_experts(model: nn.Module, optimizer: torch.optim.Optimizer, tag_dir: Path, layout: Optional[ExpertLayout],
                 zero_stage: int, rank: int) -> None:
    """Write this rank's part of the expert checkpoint (nothing without EP). Call on every rank."""
    if layout is None or rank >= layout.size:  # DeepSpeed's layout: ranks 0..N-1 are EP ranks 0..N-1
        return
    named = list(model.named_parameters())
    experts = [(n, p) for n, p in named if is_expert_param(p)]
    local = experts[0][1].shape[0]
    blob = {"first": layout.rank * local, "local": local, "params": {n: p.detach().cpu().clone() for n, p in experts}}
    if zero_stage == 0:
        blob["state"] = _named_state(optimizer, experts)
        if rank == 0:
            blob["replicated_state"] = _named_state(optimizer, [(n, p) for n, p in named if not is_expert_param(p)])
    torch.save(blob, expert_file(tag_dir, layout.rank, layout.size))
    if rank == 0:
        record = {"expert": layout.size, "n_experts": local * layout.size, "zero_stage": zero_stage,
                  "files": [expert_file(tag_dir, j, layout.size).name for j in range(layout.size)]}
        (Path(tag_dir) / LAYOUT_FILE).write_text(json.dumps(record, indent=1))


def skip_experts_load(names: set):
    """DeepSpeed ``custom_load_fn``: load every saved tensor but the routed experts (their rows depend on
    the saving rank's layout; :func:`restore_experts` fills them), strictly otherwise."""
    def load(src: dict, dst: nn.Module) -> None:
        missing, unexpected = dst.load_state_dict({k: v for k, v in src.items() if k not in names}, strict=False)
        missing = [k for k in missing if k not in names]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return load


def _rows(files: list[dict], first: int, count: int, per_file: int, pick) -> torch.Tensor:
    """Rows ``first .. first+count-1`` (global expert ids) of a tensor split over the saved files."""
    parts = [pick(files[j]) for j in range(first // per_file, (first + count - 1) // per_file + 1)]
    start = first - (first // per_file) * per_file
    return torch.cat(parts, dim=0)[start:start + count]


def _load_files(tag_dir: Path, record: dict, first: int, count: int) -> dict[int, dict]:
    from train.safe_load import safe_load

    per = record["n_experts"] // record["expert"]
    wanted = range(first // per, (first + count - 1) // per + 1)
    return {j: safe_load(str(Path(tag_dir) / record["files"][j]), map_location="cpu") for j in wanted}


def restore_experts(model: nn.Module, optimizer: torch.optim.Optimizer, tag_dir: Path, record: dict,
                    layout: Optional[ExpertLayout], zero_stage: int) -> None:
    """After DeepSpeed loaded everything else: this rank's experts (and at ZeRO 0 every parameter's
    optimizer state) from the files of ``record`` (:func:`saved_layout`), whatever EP size wrote them."""
    n_experts, per = record["n_experts"], record["n_experts"] // record["expert"]
    local = n_experts // (layout.size if layout else 1)
    first = layout.rank * local if layout else 0
    files = _load_files(tag_dir, record, first, local)
    order = [files[j] for j in sorted(files)]
    offset = min(files) * per
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in order[0]["params"]:
            params[name].copy_(_rows(order, first - offset, local, per, lambda f: f["params"][name]))
    if zero_stage != 0:
        return
    for name in order[0]["params"]:
        state = {}
        for k, v in order[0]["state"].get(name, {}).items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == per:
                v = _rows(order, first - offset, local, per, lambda f: f["state"][name][k])
            state[k] = v.to(params[name].device) if torch.is_tensor(v) else v
        optimizer.state[params[name]] = state
    head = files.get(0) or _load_files(tag_dir, record, 0, 1)[0]  # rank 0's file: the replicated parameters' state
    for name, st in head["replicated_state"].items():
        optimizer.state[params[name]] = {k: v.to(params[name].device) if torch.is_tensor(v) else v
                                         for k, v in st.items()}


class ExpertCheckpoint:
    """One run's expert checkpoint hooks (train/checkpoint.py calls them around DeepSpeed's save and load)."""

    def __init__(self, engine, model: nn.Module, optimizer: torch.optim.Optimizer, layout: Optional[ExpertLayout],
                 zero_stage: int, rank: int):
        self.engine, self.model, self.optimizer = engine, model, optimizer
        self.layout, self.zero_stage, self.rank = layout, zero_stage, rank

    def save(self, tag_dir: Path) -> None:
        save_experts(self.model, self.optimizer, tag_dir, self.layout, self.zero_stage, self.rank)

    def load_kwargs(self, record: Optional[dict]) -> dict:
        """DeepSpeed ``load_checkpoint`` arguments: without expert files, its own load; with them, the
        experts are skipped there, and at ZeRO 0 the optimizer state too (restored by name)."""
        if record is None:
            return {"load_optimizer_states": True}
        names = {f"{n}.{w}" for n, m in self.model.named_modules() if isinstance(m, RoutedExperts) for w in WEIGHTS}
        return {"load_optimizer_states": self.zero_stage != 0, "custom_load_fn": skip_experts_load(names)}

    def restore(self, tag_dir: Path, record: dict) -> None:
        restore_experts(self.model, self.optimizer, tag_dir, record, self.layout, self.zero_stage)
        if self.zero_stage != 0:  # ZeRO 1/2: the fp32 master partitions follow the restored weights
            self.engine.optimizer.refresh_fp32_params()


def engine_hooks(engine, model: nn.Module, optimizer: torch.optim.Optimizer, layout: Optional[ExpertLayout],
                 train_cfg, rank: int) -> ExpertCheckpoint:
    """What an expert-parallel run changes on the built engine: exact clipping at ZeRO 0 (fp32; bf16 is
    refused there) and the expert checkpoint hooks (also for EP = 1 runs, which may resume EP > 1 files)."""
    zero_stage = int(train_cfg.zero_stage)
    if layout is not None and zero_stage == 0 and train_cfg.precision == "fp32":
        exact_fp32_clipping(engine, expert_group(model))
    return ExpertCheckpoint(engine, model, optimizer, layout, zero_stage, rank)
