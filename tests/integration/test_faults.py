"""Fault-injection suite, fast part: bad config, hostile or damaged files, logs, data prep.

Each test names its row of the README's "what happens when" table (``@row``). Trainer launches
here fail before torch is imported (about half a second each); the training ones are in
``test_faults_train.py`` (slow).
"""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fault_rows import readme_section, row, table
from trainer_utils import REPO, env
from train import checkpoint as ckpt
from core.ports import free_port
from train.resume import changes, trajectory_settings
from rundir.locks import LOCK_NAME, process_start, stamp_lock_owner, try_lock
from rundir.schema import ConfigError, check
from train.tracking import Progress, Tracker


def launch(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train/main.py", f"run_dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    return lines[0]


BAD_CONFIG = [
    ("+train.max_stepz=3", "unknown config key train.max_stepz; did you mean train.max_steps?"),
    ("optim.schedule=foo", "optim.schedule='foo' is not one of cosine, wsd, constant"),
    ("train.eval_tokens=10", "train.eval_tokens=10 is less than one 256-token window"),
    ("train.log_interval=0", "train.log_interval=0 must be positive"),
    ("train.eval_interval=0", "train.eval_interval=0 must be positive"),
    ("train.ckpt_interval=0", "train.ckpt_interval=0 must be positive"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0 must be positive"),
    ("logging.wandb.mode=bogus", "logging.wandb.mode='bogus' is not one of offline, online, disabled"),
    ("train.log_interval=ten", "train.log_interval=ten"),
]


@row("a typo'd key (`+train.max_stepz=3`), `optim.schedule=foo`, `train.eval_tokens=10`, an interval or "
     "micro batch of 0, `logging.wandb.mode=bogus`",
     "one `error:` line naming the key, exit 2, in under a second: nothing imported, nothing written")
@pytest.mark.parametrize("override,message", BAD_CONFIG, ids=[o for o, _ in BAD_CONFIG])
def test_bad_config_is_refused_before_compute(tmp_path, override, message):
    msg = one_line_error(launch(tmp_path, override))
    assert message in msg
    assert not (tmp_path / "run").exists()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_fits_the_schema(experiment):
    check(_compose(f"+experiment={experiment}", "memory=engram_tiny"))


def test_schema_rejects_a_force_added_key_in_a_nested_section():
    with pytest.raises(ConfigError, match=r"optim\.groups\.matrix\.lr_mul; did you mean optim\.groups\.matrix\.lr_mult"):
        check(_compose("+optim.groups.matrix.lr_mul=2"))


@row("a second launch into a run directory whose trainer is alive",
     "refused in one line naming the lock; nothing in the directory is touched")
def test_second_launch_into_a_live_run_dir_is_refused(tmp_path):
    fd = try_lock(tmp_path / "run")  # stands in for the live trainer
    try:
        before = sorted(p.name for p in (tmp_path / "run").iterdir())
        msg = one_line_error(launch(tmp_path))
        assert "in use by another live trainer" in msg and ".run.lock" in msg
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    finally:
        os.close(fd)


def _files(run_dir: Path) -> dict[str, float]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime for p in run_dir.rglob("*") if p.name != LOCK_NAME}


@row("a second torchrun / DeepSpeed launch into a live run: its ranks other than 0",
     "wait, writing nothing (no Hydra files, no rank log), until their own rank 0 holds the lock; "
     "the refused rank 0's exit makes the launcher stop them")
@pytest.mark.parametrize("node", ["rank 0's node", "another node"])
def test_peer_rank_writes_nothing_until_its_own_rank0_holds_the_lock(tmp_path, node):
    run_dir = tmp_path / "run"
    fd = try_lock(run_dir, owner="10.0.0.9:29500 run=none world=2 launcher=7@7")  # the live run's rank 0
    (run_dir / "hydra").mkdir()
    (run_dir / "hydra" / "config.yaml").write_text("the live run's\n")
    (run_dir / "rank1.log").write_text("the live run's\n")
    before = _files(run_dir)
    port = free_port()
    remote = node == "another node"  # then it matches the rendezvous only: its launcher is not rank 0's
    rank1 = {**env(), "RANK": "1", "LOCAL_RANK": "0" if remote else "1", "WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    rank1.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "train/main.py", f"run_dir={run_dir}", f"data.dir={tmp_path / 'data'}"],
                            cwd=REPO, env=rank1, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6.0)  # composing the config takes about a second; Hydra would write right after
        assert proc.poll() is None, proc.stderr.read()
        assert _files(run_dir) == before
        # its own rank 0 takes the lock (this process is the peer's launcher; on another node, another one)
        launcher = "1@1" if remote else f"{os.getpid()}@{process_start(os.getpid())}"
        stamp_lock_owner(run_dir, f"127.0.0.1:{port} run= world=2 launcher={launcher}")
        deadline = time.time() + 60
        while time.time() < deadline and "hydra/overrides.yaml" not in _files(run_dir):
            time.sleep(0.2)  # Hydra writes config.yaml, hydra.yaml, then overrides.yaml: wait for the last
        assert "hydra/overrides.yaml" in _files(run_dir)  # Hydra's job started: the peer went on
    finally:
        proc.kill()
        proc.wait()
        os.close(fd)


@row("a half-written last line in `metrics.jsonl` (killed mid-write)",
     "dropped on resume with a warning naming the file; a bad line before the last is an error naming file and line")
def test_half_written_metrics_line_is_dropped_naming_the_file(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(1, 6))
                       + '{"step": 6, "train/lo')
    with caplog.at_level(logging.WARNING, logger="train"):
        Tracker(tmp_path, {"mode": "disabled"}, {}, None, True, resume_step=3)
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1, 2, 3]
    assert str(metrics) in caplog.text and "half-written" in caplog.text
    metrics.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        Tracker(tmp_path, {"mode": "disabled"}, {}, None, True, resume_step=3)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@row("training with stderr not a terminal (a log file, a pipe, Slurm)",
     "no progress-bar frames: one `step N/M loss ... tok/s` log line every `train.log_interval` steps")
def test_progress_bar_only_on_a_tty(caplog):
    pipe = io.StringIO()
    with caplog.at_level(logging.INFO, logger="train"):
        bar = Progress(True, total=25, initial=0, every=10, stream=pipe)
        for step in range(1, 26):
            bar.update(step)
            bar.report(step, 2.0, 1e-3, 1000.0)
        bar.close()
    assert pipe.getvalue() == ""
    assert [r.getMessage().split(" loss")[0] for r in caplog.records] == ["step 10/25", "step 20/25", "step 25/25"]
    tty = _Tty()
    bar = Progress(True, total=3, initial=0, every=10, stream=tty)
    bar.update(1)
    bar.report(1, 2.0, 1e-3)
    bar.close()
    assert "\r" in tty.getvalue()


@row("one plain-text file as the corpus (a book, `corpus.txt`)",
     "one error naming the fix, `--split-paragraphs`")
def test_one_file_corpus_names_split_paragraphs(tmp_path):
    book = tmp_path / "corpus.txt"
    book.write_text("\n\n".join(f"paragraph {i} of a book about cats and dogs." for i in range(200)))
    p = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--source", "files", "--inputs", str(book),
                        "--tokenizer", "bpe", "--vocab-size", "300", "--out", str(tmp_path / "out")],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--split-paragraphs" in p.stderr.strip().splitlines()[-1]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@row("a checkpoint file that would run code when unpickled (a run directory from elsewhere)",
     "not executed: checkpoints load with `torch.load(weights_only=True)` and a DeepSpeed-class allowlist")
def test_checkpoint_loader_does_not_execute_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "x": _Exploit()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.safe_load(str(bad))
    assert not (tmp_path / "pwned").exists()


@row("resuming with another world size or ZeRO stage",
     "refused in one line naming both layouts (ZeRO-0 may change world size: its states are whole; a checkpoint of an EP > 1 run may change EP and world size at its own ZeRO stage)")
def test_layout_change_rules():
    ckpt.check_layout({"world_size": 2, "zero_stage": 0}, ckpt.layout(1, 0), Path("c"))
    ckpt.check_layout({"world_size": 2, "zero_stage": 2}, ckpt.layout(2, 2), Path("c"))
    for now in (ckpt.layout(1, 2), ckpt.layout(2, 1), ckpt.layout(2, 0)):
        with pytest.raises(ckpt.CheckpointError, match="world_size=2 zero_stage=2; this launch has"):
            ckpt.check_layout({"world_size": 2, "zero_stage": 2}, now, Path("c"))


def test_trajectory_settings_cover_optimizer_schedule_budget_data_and_model_only():
    base = trajectory_settings(_compose())
    for override, key in [("optim.lr=0.3", "optim.lr"), ("optim.schedule=wsd", "optim.schedule"),
                          ("train.max_steps=7", "train.max_steps"), ("train.train_tokens=1e6", "train.train_tokens"),
                          ("train.seed=1", "train.seed"), ("data.dir=x", "data.dir"),
                          ("model.d_model=96", "model.d_model"), ("train.precision=bf16", "train.precision"),
                          ("optim.groups.embed.lr_mult=2", "optim.groups.embed.lr_mult")]:
        assert [c.split(":")[0] for c in changes(base, trajectory_settings(_compose(override)))] == [key], override
    for override in ("train.eval_interval=7", "train.log_interval=3", "train.micro_batch_size=2",
                     "logging.wandb.mode=disabled", "train.keep_checkpoints=5", "train.allow_config_change=true"):
        assert changes(base, trajectory_settings(_compose(override))) == [], override


class _Engine:
    """Stands in for a DeepSpeed engine: writes a checkpoint's files as it would (a rank's shards)."""
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(save_dir) / tag).mkdir(parents=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            (Path(save_dir) / tag / name).write_bytes(b"x" * 64)


@row("a power loss right after a checkpoint save",
     "`latest.json` never names bytes not on disk: every checkpoint file and directory is fsynced before it moves")
def test_checkpoint_files_are_fsynced_before_latest_json_moves(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt.save(_Engine(), tmp_path, 6, {"step": 6}, is_main=True, keep=2)
    moved = events.index(("replace", str(tmp_path / "latest.json")))
    synced = {path for what, path in events[:moved] if what == "fsync"}
    tag = tmp_path / "step_00000006"
    assert {str(f) for f in tag.iterdir()} | {str(tag)} <= synced, events
    assert json.loads((tmp_path / "latest.json").read_text())["tag"] == "step_00000006"


def test_candidates_fall_back_to_directories_when_the_index_is_corrupt(tmp_path, caplog):
    for step in (10, 20):
        (tmp_path / ckpt.tag_for(step)).mkdir()
    (tmp_path / "latest.json").write_text('{"tag": "step_000')
    with caplog.at_level(logging.WARNING, logger="train"):
        latest = ckpt.read_latest(tmp_path)
    assert "latest.json is unreadable" in caplog.text
    assert ckpt.candidates(tmp_path, latest) == ["step_00000020", "step_00000010"]
    good = {"tag": "step_00000020", "history": ["step_00000010", "step_00000020"]}
    assert ckpt.candidates(tmp_path, good) == ["step_00000020", "step_00000010"]


def test_readme_fault_table_is_generated_from_the_suite():
    assert readme_section() == table(), "README fault table is stale: run python tests/fault_rows.py"
