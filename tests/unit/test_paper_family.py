"""The paper family's recipe and its data contract: sequence-wise aux loss beside the expert bias,
`data_dir` required to launch (never to plan), and data/model tokenizer mismatches refused by the
trainer before anything is built."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_prep.prepare import prepare
from data_prep.reader import DataError, data_tokenizer_id, load_manifest
from data_prep.tokenization import tokenizer_id
from models.config import ModelConfig
from models.moe.config import MoEConfig
from sweeps.planning.families import load_family
from train.trainer import resolve_model_config

def _quiet(_msg: str) -> None:
    pass


def _docs(path: Path, seed: int, n: int = 200) -> Path:
    """n small JSONL documents of seeded pseudo-words (different seeds: different BPE merges)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(60)]
    lines = [json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(20)) + f" #{i}"}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two BPE data dirs of the same vocabulary size from different texts (different tokenizers)."""
    root = tmp_path_factory.mktemp("bpe")
    out = []
    for seed in (0, 1):
        d = root / f"bpe{seed}"
        prepare("files", "bpe", d, inputs=[_docs(root / f"docs{seed}.jsonl", seed)], vocab_size=300,
                val_fraction=0.2, log=_quiet)
        out.append(d)
    assert load_manifest(out[0])["tokenizer"]["vocab_size"] == load_manifest(out[1])["tokenizer"]["vocab_size"]
    return out[0], out[1]


def _cfg(vocab: int, tokenizer) -> OmegaConf:
    engram = {"layer_ids": [1], "max_ngram": 3, "heads_per_ngram": 2, "embed_dim_per_ngram": 16,
              "table_sizes": [101, 101], "tokenizer": tokenizer}
    model = {"vocab_size": vocab, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64,
             "max_seq_len": 32, "engram": engram}
    return OmegaConf.create({"model": model, "train": {"seq_len": 32}})


# ---- the recipe ---------------------------------------------------------------------------------
def test_paper_family_balances_with_bias_and_sequence_aux_loss():
    fam = load_family("paper")
    moe = MoEConfig(n_routed_experts=8, **fam.moe)
    assert moe.uses_bias and moe.uses_aux_loss and moe.aux_loss_coef == 1e-4
    for i in range(len(fam.rungs)):  # what the solver hands every run of every rung
        assert fam.rung_moe(i)["balance"] == "both" and fam.rung_moe(i)["aux_loss_coef"] == 1e-4


def test_paper_runs_train_with_the_whole_muon_recipe():
    """A planned paper run's trainer config is conf/optim/muon.yaml (groups, Muon settings, table
    update) with only the family's own optim keys changed, not adamw.yaml with kind flipped; its
    Engram follows the backbone's branch count and it trains unclipped (the documented departure)."""
    from hydra import compose, initialize_config_dir

    from sweeps.planning.budget import solve_plan
    from sweeps.planning.runconfig import resolve_run_config

    run = solve_plan(load_family("paper"), 2e20, [0.8]).runs[0]
    planned = OmegaConf.create(resolve_run_config(run.config()))  # what its config.yaml holds
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        muon = compose("config", overrides=["optim=muon", *(f"optim.{k}={v}" for k, v in run.optim.items())])
    assert planned.optim.kind == "muon" and run.config()["optim"]["kind"] == "muon"  # the group, not just the key
    assert (planned.optim.lr, planned.optim.weight_decay) == (4e-4, 0.1)  # the paper's Muon lr and wd
    assert OmegaConf.to_container(planned.optim, resolve=True) == OmegaConf.to_container(muon.optim, resolve=True)
    assert planned.model.engram.n_branches is None and planned.model.get("n_branches") in (None, 1)  # null = 1
    assert ModelConfig.from_dict(planned.model).n_branches == 1
    assert planned.train.grad_clip == 0.0 and planned.train.zero_stage == 2
    text = (Path(__file__).resolve().parents[2] / "conf/family/paper.yaml").read_text()
    assert "DEPARTURE from the DeepSeek recipe (clip at 1.0)" in text


# ---- data_dir: required to launch, not to plan ----------------------------------------------------
def test_paper_family_without_data_dir_refuses_to_launch_in_one_line(tmp_path, capsys):
    from sweeps.run import main

    fam = load_family("paper")
    assert fam.data_dir is None
    with pytest.raises(ValueError, match="family paper: data_dir is required"):
        fam.launch_data_dir()
    assert fam.launch_data_dir("/data/ds") == "/data/ds"
    assert load_family("cpu").launch_data_dir() == "data/stdlib_bpe8k"
    assert main(["--budget", "2e20", "--family", "paper", "--rho", "1.0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "family paper" in err and "data_dir" in err
    assert not any(tmp_path.iterdir())  # refused before writing a plan or a run dir
    assert main(["--budget", "2e20", "--family", "paper", "--rho", "1.0", "--out", str(tmp_path), "--dry-run"]) == 0


# ---- data/model tokenizer contract in the trainer ---------------------------------------------------
def test_manifest_records_a_comparable_tokenizer_id(bpe_dirs):
    a, b = bpe_dirs
    ids = [load_manifest(d)["tokenizer"]["id"] for d in (a, b)]
    assert ids[0].startswith("sha256-") and ids[0] != ids[1]
    # The id is what the ids mean, not the file's formatting (the data dir keeps a pretty-printed copy).
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(a / "tokenizer.json"))
    assert tokenizer_id(Tokenizer.from_str(tok.to_str())) == ids[0]
    # A data dir prepared before manifests recorded an id: computed from its tokenizer.json.
    manifest = json.loads((a / "manifest.json").read_text())
    del manifest["tokenizer"]["id"]
    old = a.parent / "old"
    old.mkdir()
    for f in a.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert data_tokenizer_id(old) == ids[0]
    manifest["tokenizer"]["id"] = 7
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="invalid 'id'"):
        data_tokenizer_id(old)


def test_vocab_mismatch_is_an_error_not_a_fallback(bpe_dirs):
    a, _ = bpe_dirs
    vocab = load_manifest(a)["tokenizer"]["vocab_size"]
    # The paper family's model on a BPE corpus: refused (it used to pass because 300 < 129280).
    with pytest.raises(ValueError, match="different tokenizers"):
        resolve_model_config(_cfg(129280, None), a, vocab)
    with pytest.raises(ValueError, match="different tokenizers"):
        resolve_model_config(_cfg(vocab - 1, None), a, vocab)
    padded = -(-vocab // 128) * 128
    assert resolve_model_config(_cfg(padded, None), a, vocab).vocab_size == padded  # embedding padding
    with pytest.raises(ValueError, match="different tokenizers"):
        resolve_model_config(_cfg(padded + 1, None), a, vocab)


def test_engram_tokenizer_must_be_the_datas(bpe_dirs):
    a, b = bpe_dirs
    vocab = load_manifest(a)["tokenizer"]["vocab_size"]
    mcfg = resolve_model_config(_cfg(vocab, "data"), a, vocab)
    assert mcfg.engram.tokenizer == str((a / "tokenizer.json").resolve())
    assert resolve_model_config(_cfg(vocab, str(a)), a, vocab).engram.tokenizer == str(a)
    with pytest.raises(ValueError, match="is not the tokenizer the data .* was made with"):
        resolve_model_config(_cfg(vocab, str(b / "tokenizer.json")), a, vocab)
    with pytest.raises(ValueError, match="is not the tokenizer the data"):
        resolve_model_config(_cfg(vocab, "deepseek"), a, vocab)


def test_paper_model_on_deepseek_data_passes(tmp_path):
    """The paper family's contract end to end: DeepSeek-tokenized data, vocab 129280, Engram
    compressing for 'deepseek' (the package's tokenizer.json, copied into the data dir)."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"Dokument {i}: Größe — 日本語 café."}) + "\n" for i in range(12)))
    d = tmp_path / "ds"
    prepare("files", "deepseek", d, inputs=[src], val_fraction=0.3, seed=1, log=_quiet)
    tok = load_manifest(d)["tokenizer"]
    assert tok["vocab_size"] == 129280
    mcfg = resolve_model_config(_cfg(129280, "deepseek"), d, tok["vocab_size"])
    assert mcfg.vocab_size == 129280 and mcfg.engram.tokenizer == "deepseek"
