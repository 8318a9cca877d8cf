"""Checkpoints of expert-parallel runs: the expert layout on disk, and experts that land where they belong.

DeepSpeed's own MoE checkpoint format belongs to its MoE layer (one file per ``deepspeed_experts.<i>``
key), and its dense format keeps one rank's view. Under EP each rank holds other experts, so next to
DeepSpeed's files (written in its dense layout) a checkpoint of an EP run holds:

* ``expert_layout.json`` (rank 0): EP size, routed expert count, which file holds which experts;
* ``experts_ep<j>_of_<N>.pt`` (one writer per EP rank j: global rank j, the first rank of its
  expert-data-parallel group): every routed expert weight of the experts j holds, by parameter name,
  and at ZeRO 0 their optimizer state (rank 0's file also the replicated parameters' state, by name).

Loading reads DeepSpeed's files for everything but the experts, then fills each rank's experts from the
expert files, slicing rows by global expert id: a run saved at EP = 2 resumes at EP = 1 or 4. Optimizer
state: ZeRO 0 keeps it whole per parameter, and the files carry it by name; ZeRO 1/2 partition it by
layout, so there every rank writes its partitions as fragments of whole tensors by name instead of
DeepSpeed's partition files (train/zero_state.py: the same fp32 masters and moments, so writing both
would double the checkpoint's largest part), and every resume, at the saved layout or another, reads
them (DeepSpeed's Muon momentum, kept per whole parameter, included). Optimizer state of another shape
has no fragment form: such a checkpoint keeps DeepSpeed's partition files and resumes at its own layout
only.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from models.moe import RoutedExperts
from train.expert_parallel import ExpertLayout, exact_fp32_clipping, expert_group, is_expert_param
from train.safe_load import safe_load
from train.zero_state import NotReshardable, agreed_split, load_fragments, save_fragments

log = logging.getLogger("train")
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


def _offset(layout: Optional[ExpertLayout]):
    """Where a parameter's elements start in its whole tensor: routed experts at EP rank x local size."""
    ep_rank = layout.rank if layout is not None else 0
    return lambda name, p: ep_rank * p.numel() if is_expert_param(p) else 0


def save_experts(model: nn.Module, optimizer: torch.optim.Optimizer, tag_dir: Path, layout: Optional[ExpertLayout],
                 zero_stage: int, rank: int, world_size: int = 1, zero_opt=None, split: Optional[dict] = None) -> None:
    """Write this rank's part of the expert checkpoint (nothing without EP). Call on every rank: at
    ZeRO 1/2 (``zero_opt``: the engine's ZeRO optimizer; ``split``: its agreed :func:`agreed_split`, None
    when the state does not split) every rank writes its partitions' fragments."""
    if layout is None:
        return
    named = list(model.named_parameters())
    experts = [(n, p) for n, p in named if is_expert_param(p)]
    fragments = zero_stage == 0 or split is not None
    if zero_stage != 0 and split is not None:
        save_fragments(zero_opt, named, _offset(layout), tag_dir, rank, split)
    if rank >= layout.size:  # DeepSpeed's layout: ranks 0..N-1 are EP ranks 0..N-1
        return
    local = experts[0][1].shape[0]
    blob = {"first": layout.rank * local, "local": local, "params": {n: p.detach().cpu().clone() for n, p in experts}}
    if zero_stage == 0:
        blob["state"] = _named_state(optimizer, experts)
        if rank == 0:
            blob["replicated_state"] = _named_state(optimizer, [(n, p) for n, p in named if not is_expert_param(p)])
    torch.save(blob, expert_file(tag_dir, layout.rank, layout.size))
    if rank == 0:
        record = {"expert": layout.size, "n_experts": local * layout.size, "zero_stage": zero_stage,
                  "world_size": world_size, "fragments": fragments,
                  "partition_files": zero_stage != 0 and not fragments,  # DeepSpeed's, written only without fragments
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
    per = record["n_experts"] // record["expert"]
    wanted = range(first // per, (first + count - 1) // per + 1)
    return {j: safe_load(str(Path(tag_dir) / record["files"][j]), map_location="cpu") for j in wanted}


def _this_rank(order: list[dict], first: int, local: int, per: int, section: str) -> dict:
    """``section`` ("params", "state") of this rank's experts: rows ``first .. first+local-1`` of every
    tensor with one row per expert (scalars such as ``step`` as saved)."""
    out = {}
    for name, value in order[0].get(section, {}).items():
        if section != "state":
            out[name] = _rows(order, first, local, per, lambda f: f[section][name])
            continue
        out[name] = {k: _rows(order, first, local, per, lambda f: f["state"][name][k])
                     if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == per else v for k, v in value.items()}
    return out


def restore_experts(model: nn.Module, optimizer: torch.optim.Optimizer, tag_dir: Path, record: dict,
                    layout: Optional[ExpertLayout], zero_stage: int, zero_opt=None) -> None:
    """After DeepSpeed loaded everything else: this rank's experts from the files of ``record``
    (:func:`saved_layout`), whatever EP size wrote them; then the optimizer state: at ZeRO 0 every
    parameter's, by name; at ZeRO 1/2 (``zero_opt`` given: the layout changed) this engine's fp32
    partitions and state from the saved ranks' fragments."""
    n_experts, per = record["n_experts"], record["n_experts"] // record["expert"]
    local = n_experts // (layout.size if layout else 1)
    first = layout.rank * local if layout else 0
    files = _load_files(tag_dir, record, first, local)
    order = [files[j] for j in sorted(files)]
    offset = min(files) * per
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in _this_rank(order, first - offset, local, per, "params").items():
            params[name].copy_(value)
    if zero_stage != 0:
        if zero_opt is not None:
            load_fragments(zero_opt, list(params.items()), _offset(layout), tag_dir, int(record["world_size"]),
                           lambda path: safe_load(path, map_location="cpu", mmap=True))
        return
    head = files.get(0) or _load_files(tag_dir, record, 0, 1)[0]  # rank 0's file: the replicated parameters' state
    state = {**_this_rank(order, first - offset, local, per, "state"), **head["replicated_state"]}
    for name, st in state.items():
        optimizer.state[params[name]] = {k: v.to(params[name].device) if torch.is_tensor(v) else v
                                         for k, v in st.items()}


@dataclass(frozen=True)
class SavePlan:
    """split: the agreed fragment split (train.zero_state.agreed_split) when fragment files replace
    DeepSpeed's partition files; None when DeepSpeed's files carry the optimizer state."""

    split: Optional[dict]

    @property
    def partition_files(self) -> bool:
        return self.split is None


class ExpertCheckpoint:
    """One run's expert checkpoint hooks (train/checkpoint.py calls them around DeepSpeed's save and load)."""

    def __init__(self, engine, model: nn.Module, optimizer: torch.optim.Optimizer, layout: Optional[ExpertLayout],
                 zero_stage: int, rank: int, world_size: int = 1):
        self.engine, self.model, self.optimizer = engine, model, optimizer
        self.layout, self.zero_stage, self.rank, self.world_size = layout, zero_stage, rank, world_size

    def plan_save(self) -> SavePlan:
        """How the checkpoint about to be saved holds this run's ZeRO 1/2 state: in fragment files written
        by :meth:`save` (an EP run that can reshard: the split agreed by one all-reduce) or in DeepSpeed's
        own partition files. Call on every rank before the engine's save."""
        if self.layout is None or self.zero_stage == 0:
            return SavePlan(None)
        try:
            return SavePlan(agreed_split(self.engine.optimizer))
        except NotReshardable as e:
            log.warning("expert checkpoint: %s; it resumes at its own EP and world size only", e)
            return SavePlan(None)

    def save(self, tag_dir: Path, plan: SavePlan) -> None:
        """This rank's expert files, as ``plan`` (:meth:`plan_save`) says."""
        zero_opt = self.engine.optimizer if self.zero_stage != 0 else None
        save_experts(self.model, self.optimizer, tag_dir, self.layout, self.zero_stage, self.rank,
                     self.world_size, zero_opt, plan.split)

    def resharded(self, record: dict) -> bool:
        """Whether this launch's EP or world size differs from the checkpoint's."""
        ep = self.layout.size if self.layout else 1
        return record["expert"] != ep or record.get("world_size", self.world_size) != self.world_size

    def load_kwargs(self, record: Optional[dict]) -> dict:
        """DeepSpeed ``load_checkpoint`` arguments: without expert files, its own load; with them, the
        experts are skipped there, and the optimizer state too at ZeRO 0 (restored by name) and at
        ZeRO 1/2 with fragment files (restored from them)."""
        if record is None:
            return {"load_optimizer_states": True}
        if self.zero_stage != 0 and self.resharded(record) and not record.get("fragments", False):
            raise NotReshardable(f"this checkpoint was written at parallel.expert={record['expert']} on "
                                  f"{record.get('world_size', '?')} ranks without fragment files (ZeRO "
                                  f"{record['zero_stage']}): it resumes at that layout only")
        names = {f"{n}.{w}" for n, m in self.model.named_modules() if isinstance(m, RoutedExperts) for w in WEIGHTS}
        return {"load_optimizer_states": self._own_files(record), "custom_load_fn": skip_experts_load(names)}

    def _own_files(self, record: dict) -> bool:
        """Whether DeepSpeed's partition files carry the ZeRO 1/2 state: without fragments, or at the saved
        layout of a checkpoint written before fragments replaced them (it has both)."""
        if self.zero_stage == 0:
            return False
        return not record.get("fragments", False) or (record.get("partition_files", True)
                                                       and not self.resharded(record))

    def restore(self, tag_dir: Path, record: dict) -> None:
        zero_opt = self.engine.optimizer if self.zero_stage != 0 and not self._own_files(record) else None
        restore_experts(self.model, self.optimizer, tag_dir, record, self.layout, self.zero_stage, zero_opt)


def engine_hooks(engine, model: nn.Module, optimizer: torch.optim.Optimizer, layout: Optional[ExpertLayout],
                 train_cfg, rank: int, world_size: int) -> ExpertCheckpoint:
    """What an expert-parallel run changes on the built engine: exact clipping at ZeRO 0 (fp32; bf16 is
    refused there) and the expert checkpoint hooks (also for EP = 1 runs, which may resume EP > 1 files)."""
    zero_stage = int(train_cfg.zero_stage)
    if layout is not None and zero_stage == 0 and train_cfg.precision == "fp32":
        exact_fp32_clipping(engine, expert_group(model))
    return ExpertCheckpoint(engine, model, optimizer, layout, zero_stage, rank, world_size)
