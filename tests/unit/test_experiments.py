"""Shipped experiment files are the solver's output, and they compose into the planned model."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from assembly import build_model
from models import ModelConfig
from sweeps.planning.budget import solve_plan
from sweeps.planning.experiments import CONF_EXPERIMENTS, SHIPPED, render
from sweeps.planning.families import load_family
from train.trainer import total_steps


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_experiment_equals_solver_output(name):
    family, budget, rho = SHIPPED[name]
    assert (CONF_EXPERIMENTS / f"{name}.yaml").read_text() == render(family, budget, rho, name), (
        f"conf/experiment/{name}.yaml is stale: regenerate it with python -m sweeps.planning.experiments")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_experiment_composes_into_the_planned_model(name):
    family, budget, rho = SHIPPED[name]
    spec = solve_plan(load_family(family), budget, [rho]).runs[0]
    with initialize_config_dir(config_dir=str(CONF_EXPERIMENTS.parent), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={name}"])
    model_dict = OmegaConf.to_container(cfg.model, resolve=True)
    if model_dict.get("engram"):  # 'data' is resolved by the trainer; counts do not depend on it
        model_dict["engram"]["tokenizer"] = None
    with torch.device("meta"):
        counts = build_model(ModelConfig.from_dict(model_dict)).model_counts(cfg.train.seq_len)
    assert (counts.total_params, counts.active_params) == (spec.total_params, spec.active_params)
    assert total_steps(cfg) == spec.steps
    assert cfg.run_dir == f"runs/{name}-seed{cfg.train.seed}"
