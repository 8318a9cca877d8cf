"""The one typed config tree (rundir/schema.py with models/config.py's model section): unknown keys and
wrong types refused at every level in one line, defaults from the dataclasses, a YAML round trip, and
the model built from the one typed section (no re-parsing per layer)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from core.config_utils import ConfigError, load
from memory.config import EngramConfig
from models.config import ModelConfig
from models.moe.config import MoEConfig
from rundir.schema import Config, check

REPO = Path(__file__).resolve().parents[2]
ENGRAM = {"layer_ids": [1], "heads_per_ngram": 2, "embed_dim_per_ngram": 16, "table_sizes": [31, 37]}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("override, message", [
    ("+train.max_stepz=3", "unknown config key train.max_stepz; did you mean train.max_steps?"),
    ("+optim.muon.momentumm=0.9", "unknown config key optim.muon.momentumm; did you mean optim.muon.momentum?"),
    ("+logging.wandb.projct=x", "unknown config key logging.wandb.projct; did you mean logging.wandb.project?"),
    ("+data.dirr=x", "unknown config key data.dirr; did you mean data.dir?"),
    ("+model.d_modle=64", "unknown config key model.d_modle; did you mean model.d_model?"),
    ("+model.moe.top_kk=2", "unknown config key model.moe.top_kk; did you mean model.moe.top_k?"),
    ("+model.engram.layer_idz=[1]", "unknown config key model.engram.layer_idz; did you mean model.engram.layer_ids?"),
    ("+parallell=1", "unknown config key parallell"),
])
def test_force_added_unknown_keys_are_refused_at_every_level(override, message):
    extra = ["model=moe"] if ".moe." in override else ["memory=engram_tiny"] if ".engram." in override else []
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("?", r"\?")) as e:
        check(_compose(*extra, override))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [["+train.max_stepz=3"], ["model=moe", "model.moe.top_kk=2"],
                                       ["memory=engram_tiny", "model.engram.colour=red"]])
def test_unknown_keys_are_refused_by_hydra_or_the_schema(overrides):
    """Without ``+`` Hydra's own struct check refuses the key (main.py prints its first lines as one)."""
    with pytest.raises((ConfigError, ConfigCompositionException)):
        check(_compose(*overrides))


@pytest.mark.parametrize("overrides, message", [
    (["model=moe", "model.moe.top_k=two"], "model.moe.top_k"),
    (["memory=engram_tiny", "model.engram.layer_ids=[a]"], "model.engram.layer_ids"),
    (["train.max_steps=many"], "train.max_steps"),
    (["model.d_model=wide"], "model.d_model"),
])
def test_wrong_types_are_refused_naming_the_key(overrides, message):
    with pytest.raises((ConfigError, ConfigCompositionException), match=message):
        check(_compose(*overrides))


@pytest.mark.parametrize("raw, message", [
    ({"model": {"moe": {"top_kk": 2}}}, r"model\.moe\.top_kk; did you mean model\.moe\.top_k\?"),
    ({"model": {"engram": {**ENGRAM, "colour": 1}}}, r"unknown config key model\.engram\.colour"),
    ({"model": {"moe": {"top_k": "two"}}}, r"config key model\.moe\.top_k: Value 'two'"),
    ({"model": {"moe": {"top_k": 99}}}, r"moe\.top_k=99 exceeds moe\.n_routed_experts=16"),
    ({"model": {"engram": {**ENGRAM, "table_params": 10}}}, "exactly one of table_sizes"),
    ({"model": {}, "train": {"seq_len": 0}}, r"train\.seq_len=0 must be positive"),
    ({"model": {}, "optim": {"groups": {"matrix": {"lr_mul": 2}}}}, r"optim\.groups\.matrix\.lr_mul; did you mean"),
    ({"model": {}, "optim": {"kind": "muon"}, "train": {"precision": "bf16"}}, "needs train.zero_stage 1 or 2"),
    ({"train": {}}, "missing mandatory value: model"),
    ({"model": 3}, r"config key model: expected a mapping of ModelConfig fields, got int 3"),
    ({"optim": {"groups": {"matrix": 1.0}}}, r"config key optim\.groups\.matrix: expected a mapping of ParamGroupConfig"),
])
def test_plain_mappings_load_through_the_same_checks(raw, message):
    with pytest.raises(ConfigError, match=message):
        load(Config, raw)


def test_sections_are_typed_and_defaults_come_from_the_dataclasses():
    cfg = check(_compose("model=moe", "memory=engram_tiny"))
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.model.moe, MoEConfig)
    assert isinstance(cfg.model.engram, EngramConfig)
    assert check(_compose()).model.moe is None and check(_compose()).model.engram is None
    assert check(_compose("+model.n_branches=4")).model.n_branches == 4  # README's command: `+` adds it
    assert check(_compose()).model.n_branches == 1
    bare = load(Config, {"model": {}})
    assert bare.optim.decay_frac == 0.2 and bare.train.train_tokens is None  # no .get(key, default) at use sites
    # a group without weight_decay takes optim.weight_decay (one rule, in OptimConfig)
    groups = load(Config, {"model": {}, "optim": {"weight_decay": 0.05, "groups": {"matrix": {}}}}).optim.groups
    assert groups["matrix"].weight_decay == 0.05


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_resolved_config_round_trips_through_yaml(experiment):
    """What a run directory's config.yaml holds: the typed tree as YAML, loaded back to the same tree."""
    cfg = check(_compose(f"+experiment={experiment}"))
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    back = load(Config, OmegaConf.create(text))
    assert back == cfg
    assert OmegaConf.to_yaml(OmegaConf.structured(back)) == text
    assert back.model.fingerprint() == cfg.model.fingerprint()


def test_every_moe_layer_shares_the_one_typed_section():
    import torch

    from assembly import build_model
    from models.moe.layer import MoEFFN

    cfg = check(_compose("model=moe", "memory=engram_tiny"))
    with torch.device("meta"):
        net = build_model(cfg.model)
    moe_layers = [b.ffn for b in net.layers if isinstance(b.ffn, MoEFFN)]
    assert len(moe_layers) == 3 and all(layer.cfg is cfg.model.moe for layer in moe_layers)


def test_config_modules_import_without_torch():
    """The trainer refuses a bad config before torch is imported (README's fault table)."""
    code = ("import sys, rundir.schema, sweeps.planning.families; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize("overrides, message", [
    (["model=moe", "model.moe.top_kk=2"], "model.moe.top_kk"),
    (["model=moe", "+model.moe.top_kk=2"], "unknown config key model.moe.top_kk; did you mean model.moe.top_k?"),
    (["memory=engram_tiny", "model.engram.table_sizes=[5]"], "engram.table_sizes needs one base size per order"),
    (["+model.moe.top_k=2"], "model.moe is null in this config: +model.moe.top_k=2 has nothing to set"),  # dense
])
def test_trainer_refuses_a_bad_model_section_in_one_line(tmp_path, overrides, message):
    from trainer_utils import env

    p = subprocess.run([sys.executable, "train/main.py", f"run_dir={tmp_path / 'run'}", *overrides], cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert message in lines[0]
    assert not (tmp_path / "run").exists()


def test_load_of_the_same_mapping_is_a_fresh_equal_object_and_errors_repeat():
    """core.config_utils.load memoises plain mappings (the solver loads the same model configs many times):
    each call still returns its own object, and a bad mapping fails every time."""
    from core.config_utils import load
    from models.config import ModelConfig

    raw = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16}
    a, b = load(ModelConfig, raw, "model"), load(ModelConfig, dict(raw), "model")
    assert a == b and a is not b
    a.d_model = 999  # a caller's change reaches neither the memo nor the next load
    assert load(ModelConfig, raw, "model").d_model == 32
    for _ in range(2):
        with pytest.raises(ConfigError, match="unknown config key model.d_modle; did you mean model.d_model"):
            load(ModelConfig, {**raw, "d_modle": 8}, "model")
