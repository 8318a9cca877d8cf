"""sweeps.study: a study folder is validated, run through sweeps.run, logged, reported, and a re-run of the
committed folder (checkpoints, W&B files and locks removed, as .gitignore does) trains nothing.

The runs use tests/sweep_contract_trainer.py (the run-directory contract with a known U-curve), so the
whole study (allocation at two budgets with the ablation arm, and a memory sweep) takes seconds.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from sweeps import run as sweep_run  # noqa: E402
from sweeps import study  # noqa: E402
from sweeps.study_report import BEGIN, END, write_all  # noqa: E402

STUDY_YAML = """\
name: tiny
family: cpu
description: contract-trainer study
allocation:
  budgets: [3.0e12, 6.0e12]
  rhos: [1.0, 0.6, 0.2]
  seeds: 2
  ablate_memory: true
memory:
  budget: 3.0e12
  slots: [1000, 10000, 100000, 1000000]
  seeds: 1
"""


@pytest.fixture()
def contract_launcher(monkeypatch):
    """sweeps.run's launcher, pointed at the contract trainer instead of train/main.py."""
    from sweeps.execution.launchers import LocalLauncher

    starts = []

    def make(args, out_dir):
        starts.append(out_dir)
        return LocalLauncher(None, 1, "python", args.parallel, 1, script=str(ROOT / "tests/sweep_contract_trainer.py"),
                             cwd=ROOT)

    monkeypatch.setattr(sweep_run, "make_launcher", make)
    return starts


def _write(folder: Path, text: str = STUDY_YAML) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / study.STUDY_FILE).write_text(text)
    return folder


def _strip_uncommitted(folder: Path) -> None:
    """What `git add studies/` keeps: no checkpoints, W&B files or locks (see .gitignore)."""
    for pattern in ("**/checkpoints", "**/wandb"):
        for d in list(folder.glob(pattern)):
            shutil.rmtree(d)
    for lock in folder.glob("**/.*.lock"):
        lock.unlink()


def test_study_definition_is_validated(tmp_path):
    with pytest.raises(ValueError, match="no study definition"):
        study.load_study(tmp_path)
    bad = _write(tmp_path / "a", STUDY_YAML.replace("  seeds: 2\n", "  seeds: 2\n  seedz: 3\n"))
    with pytest.raises(ValueError, match="unknown key.*seedz"):
        study.load_study(bad)
    bad = _write(tmp_path / "b", STUDY_YAML.replace("seeds: 2", "seeds: 0"))
    with pytest.raises(ValueError, match="allocation.seeds must be a positive whole number"):
        study.load_study(bad)
    bad = _write(tmp_path / "c", "family: cpu\n")
    with pytest.raises(ValueError, match="needs `family` and an `allocation`"):
        study.load_study(bad)
    assert study.main([str(tmp_path / "a")]) == 2  # one line on stderr, no traceback


def test_study_commands_are_the_sweep_commands(tmp_path):
    s = study.load_study(_write(tmp_path / "s"))
    alloc, memory = study.sweep_commands(s, tmp_path / "s", parallel=2, threads=1)
    assert alloc[:9] == ["--budget", "3e12", "6e12", "--rho", "1", "0.6", "0.2", "--seeds", "2"]
    assert "--ablate-memory" in alloc
    assert memory[:9] == ["--budget", "3e12", "--mode", "memory", "--slots", "1000", "10000", "100000", "1000000"]
    for argv in (alloc, memory):
        sweep_run.parser().parse_args(argv)  # every command is one sweeps.run accepts


@pytest.mark.slow
def test_study_runs_logs_reports_and_rerun_trains_nothing(tmp_path, contract_launcher, monkeypatch):
    folder = _write(tmp_path / "studies" / "tiny")
    readme = tmp_path / "README.md"
    readme.write_text(f"# project\n\n{BEGIN}\nPLACEHOLDER-TEXT\n{END}\n\nrest\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("CONTRACT_STEP_S", "0")  # planned cpu runs have ~100s of steps: no need to wait on them
    assert study.run_study(folder, parallel=2, threads=1, dry_run=False) == 0
    log = json.loads((folder / study.LOG_FILE).read_text())
    assert log[-1]["runs_trained"] == {"cpu-3e12": 10, "cpu-6e12": 10, "cpu-3e12-memory": 4}, log[-1]
    assert log[-1]["commands"][0][:3] == ["python", "-m", "sweeps.run"]
    results = (folder / "RESULTS.md").read_text()
    for sweep in ("cpu-3e12", "cpu-6e12", "cpu-3e12-memory"):
        assert (folder / sweep / "results.csv").exists()
        assert f"| {sweep} |" in results
    assert "memory ablation" in results and "[" in results  # verdicts come with intervals
    text = readme.read_text()
    assert "PLACEHOLDER-TEXT" not in text and "rest" in text and "studies/tiny/RESULTS.md" in text

    _strip_uncommitted(folder)  # what a clone of the committed study holds
    starts_before = sorted((p, p.read_text()) for p in folder.glob("*/*/starts.jsonl"))
    assert study.run_study(folder, parallel=2, threads=1, dry_run=False) == 0
    log = json.loads((folder / study.LOG_FILE).read_text())
    assert len(log) == 2 and log[-1]["runs_trained"] == {}, log[-1]
    assert sorted((p, p.read_text()) for p in folder.glob("*/*/starts.jsonl")) == starts_before


def test_report_without_runs_says_so(tmp_path):
    folder = _write(tmp_path / "s")
    written = write_all(folder, readme=tmp_path / "README.md")
    text = (folder / "RESULTS.md").read_text()
    assert written == [folder / "RESULTS.md"]
    assert "no invocation logged yet" in text
