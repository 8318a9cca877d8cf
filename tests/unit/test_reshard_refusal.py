"""A ZeRO 1/2 expert-parallel checkpoint without fragments (optimizer state not split like the partition)
resumes at its own layout only: another EP or world size is refused in one line, and the load stops there
instead of falling back through older checkpoints (they share the layout)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from train import checkpoint as ckpt
from train.expert_checkpoint import ExpertCheckpoint
from train.zero_state import NotReshardable

RECORD = {"expert": 2, "n_experts": 8, "zero_stage": 2, "world_size": 2, "fragments": False, "files": []}


def test_a_checkpoint_without_fragments_resumes_at_its_own_layout_only():
    at_ep1 = ExpertCheckpoint(engine=None, model=torch.nn.Linear(2, 2), optimizer=None, layout=None, zero_stage=2,
                              rank=0, world_size=2)
    with pytest.raises(NotReshardable, match="parallel.expert=2 on 2 ranks .* it resumes at that layout only"):
        at_ep1.load_kwargs(RECORD)
    assert at_ep1.load_kwargs({**RECORD, "fragments": True})["load_optimizer_states"] is False  # fragments
    # at the saved layout: DeepSpeed's partition files without fragments, the fragment files when they
    # replaced them, DeepSpeed's again in a checkpoint written before that (it holds both)
    at_ep2 = ExpertCheckpoint(engine=None, model=torch.nn.Linear(2, 2), optimizer=None, layout=SimpleNamespace(size=2),
                              zero_stage=2, rank=0, world_size=2)
    assert at_ep2.load_kwargs(RECORD)["load_optimizer_states"] is True
    assert at_ep2.load_kwargs({**RECORD, "fragments": True, "partition_files": False})["load_optimizer_states"] is False
    assert at_ep2.load_kwargs({**RECORD, "fragments": True})["load_optimizer_states"] is True
    assert at_ep1.load_kwargs({**RECORD, "fragments": True})["load_optimizer_states"] is False  # resharded: fragments


def test_the_load_stops_at_a_layout_error_instead_of_falling_back(monkeypatch, tmp_path):
    tried = []

    def load_one(engine, ckpt_dir, tag, hooks=None, experts=None):
        tried.append(tag)
        raise NotReshardable("it resumes at that layout only")

    monkeypatch.setattr(ckpt, "_load_one", load_one)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000020: it resumes at that layout only"):
        ckpt.load(None, Path(tmp_path), [ckpt.tag_for(20), ckpt.tag_for(10)], torch.device("cpu"), lambda m, w: None)
    assert tried == [ckpt.tag_for(20)]
