"""Sweep driver against a trainer that honours the run-directory contract (tests/sweep_contract_trainer.py):
skip / resume / failure handling, kill and re-run, timeouts, locks, submitit's local executor."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fault_rows import row
from sweep_contract_trainer import RHO_STAR, ContractSpec, MemoryContractSpec, contract_loss, contract_memory_loss
from sweeps.execution.driver import build_sweep
from sweeps.execution.runloop import run_sweep, run_sweeps
from sweeps.analysis.summary import summarize
from rundir.config import read_run_config, write_run_config
from sweeps.execution.launchers import Handle, LocalLauncher, spawn_locked, trainer_command
from sweeps.execution.submitit_launcher import SubmititLauncher
from sweeps.planning.runconfig import hydra_block
from sweeps.execution.results import read_results

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "tests/sweep_contract_trainer.py"
RHOS = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25)


def make_sweep(out, rhos=RHOS, seeds=(0,), steps=6, extra=()):
    return build_sweep([ContractSpec(r, steps) for r in rhos], out=out, family="contract", budget=1e9, seeds=seeds,
                       settings=["+contract.step_s=0.02", *extra], wandb_mode="disabled")


def starts(run_dir) -> list[dict]:
    p = Path(run_dir) / "starts.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines()] if p.exists() else []


def quiet(_msg):
    pass


def test_failures_are_recorded_and_the_fit_uses_the_other_runs(tmp_path):
    sweep = make_sweep(tmp_path, extra=["+contract.fail_rho=0.55", "+contract.crash_rho=0.25"])
    lines = []
    records = run_sweep(sweep, LocalLauncher(script=SCRIPT, parallel=2, threads=1), poll_s=0.05, emit=lines.append)
    status = {r.rho: r for r in records}
    assert status[0.55].status == "failed" and status[0.55].reason == "injected failure"
    assert status[0.25].status == "failed"
    assert status[0.25].reason.startswith("exit code 1") and "injected crash" in status[0.25].reason
    done = [r for r in records if r.status == "completed"]
    assert len(done) == 4
    for r in done:
        assert r.val_loss == pytest.approx(contract_loss(r.rho, 0))
    assert any("FAILED" in ln and "rho0.55" in ln for ln in lines)
    for run in sweep.runs:  # each run's config.yaml is its whole config: the trainer got nothing else
        assert read_run_config(run.run_dir) == run.config
        assert {tuple(s["argv"]) for s in starts(run.run_dir)} == {
            ("--config-dir", str(run.run_dir), "--config-name", "config")}
    # the driver wrote failed.json for the silent crash, with the step of its last checkpoint
    crash = json.loads((Path(status[0.25].run_dir) / "failed.json").read_text())
    assert crash["source"] == "sweep driver"

    summary = summarize(sweep, records, n_boot=200, wandb_mode="disabled", emit=quiet)
    saved = json.loads((sweep.dir / "summary.json").read_text())
    assert saved["budget"] == 1e9 and len(saved["points"]) == len(RHOS)
    assert {(p["rho"], p["status"]) for p in saved["points"]} >= {(0.55, "failed"), (0.25, "failed")}
    assert all(set(p) >= {"rho", "seed", "val_loss", "status"} for p in saved["points"])
    fit = saved["fit"]
    assert fit["verdict"] in ("U", "flat", "monotone") and fit["mde"] > 0 and fit["reason"]
    assert fit["n_points"] == 4 and fit["rho_star"] == pytest.approx(RHO_STAR, abs=0.02)
    lo, hi = fit["rho_star_ci"]
    assert lo <= fit["rho_star"] <= hi
    assert fit["gain_vs_moe"] == pytest.approx(contract_loss(1.0, 0) - contract_loss(RHO_STAR, 0), abs=0.005)
    assert summary["counts"] == {"completed": 4, "failed": 2, "diverged": 0, "pending": 0, "interrupted": 0,
                                 "running": 0}
    table = pq.read_table(sweep.dir / "results.parquet").to_pylist()
    assert len(table) == len(RHOS) and {r["status"] for r in table} == {"completed", "failed"}
    assert (sweep.dir / "u_curve.png").stat().st_size > 10_000


def test_second_invocation_runs_nothing_and_retry_relaunches_only_failures(tmp_path):
    sweep = make_sweep(tmp_path, rhos=(1.0, 0.7, 0.4), extra=["+contract.fail_rho=0.4"])
    run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), poll_s=0.05, emit=quiet)
    before = {r.rho: len(starts(r.run_dir)) for r in sweep.runs}
    assert before == {1.0: 1, 0.7: 1, 0.4: 1}
    t0 = time.time()
    again = make_sweep(tmp_path, rhos=(1.0, 0.7, 0.4), extra=["+contract.fail_rho=0.4"])
    records = run_sweep(again, LocalLauncher(script=SCRIPT, threads=1), poll_s=0.05, emit=quiet)
    assert time.time() - t0 < 3.0
    assert {r.rho: len(starts(r.run_dir)) for r in sweep.runs} == before  # nothing launched
    assert [r.status for r in records] == ["completed", "completed", "failed"]
    # the failure was fixed (here: the injection removed); --retry-failed relaunches only that run
    fixed = make_sweep(tmp_path, rhos=(1.0, 0.7, 0.4))
    records = run_sweep(fixed, LocalLauncher(script=SCRIPT, threads=1), retry_failed=True, poll_s=0.05, emit=quiet)
    assert [r.status for r in records] == ["completed"] * 3
    assert {r.rho: len(starts(r.run_dir)) for r in sweep.runs} == {1.0: 1, 0.7: 1, 0.4: 2}
    assert records[2].attempts == 2


DRIVER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from sweep_contract_trainer import ContractSpec
from sweeps.execution.driver import build_sweep
from sweeps.execution.launchers import LocalLauncher
from sweeps.execution.runloop import run_sweep
sweep = build_sweep([ContractSpec(r, 12) for r in {rhos!r}], out={out!r}, family="contract", budget=1e9, seeds=[0],
                    settings=["+contract.step_s=0.1", "+contract.ckpt_every=3"], wandb_mode="disabled")
run_sweep(sweep, LocalLauncher(script={script!r}, threads=1), poll_s=0.05)
"""


def start_driver(out: Path, rhos) -> subprocess.Popen:
    code = DRIVER.format(repo=str(REPO), tests=str(REPO / "tests"), rhos=tuple(rhos), out=str(out), script=SCRIPT)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(pred, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_changed_plan_is_refused_and_finished_results_are_kept(tmp_path):
    sweep = make_sweep(tmp_path, rhos=(1.0, 0.5), steps=4)
    run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), poll_s=0.05, emit=quiet)
    finals = {r.run_dir: (r.run_dir / "final.json").read_bytes() for r in sweep.runs}
    changed = make_sweep(tmp_path, rhos=(1.0, 0.5), steps=6)  # e.g. the family config was edited
    with pytest.raises(ValueError, match=r"plan changed since these runs were launched: rho1.00-seed0 \(train.max_steps\)"):
        run_sweep(changed, LocalLauncher(script=SCRIPT, threads=1), poll_s=0.05, emit=quiet)
    assert {d: (d / "final.json").read_bytes() for d in finals} == finals
    # settings that do not change what a run computes (here the W&B mode) are not a new plan
    relabelled = build_sweep([ContractSpec(r, 4) for r in (1.0, 0.5)], out=tmp_path, family="contract", budget=1e9,
                             seeds=(0,), settings=["+contract.step_s=0.02"], wandb_mode="offline")
    assert [r.status for r in run_sweep(relabelled, LocalLauncher(script=SCRIPT, threads=1), poll_s=0.05,
                                        emit=quiet)] == ["completed"] * 2


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_sweep_resumes_without_rerunning_finished_runs(tmp_path, sig):
    rhos = (1.0, 0.7, 0.4, 0.2)
    sweep = build_sweep([ContractSpec(r, 12) for r in rhos], out=tmp_path, family="contract", budget=1e9, seeds=[0],
                        settings=["+contract.step_s=0.1", "+contract.ckpt_every=3"], wandb_mode="disabled")
    first, second, third, _ = (r.run_dir for r in sweep.runs)
    driver = start_driver(tmp_path, rhos)
    ckpt = third / "checkpoints" / "latest.json"
    assert wait_for(lambda: (first / "final.json").exists() and (second / "final.json").exists()
                    and ckpt.exists() and json.loads(ckpt.read_text())["step"] >= 3), driver.stderr.read()
    driver.send_signal(sig)
    driver.wait(timeout=30)
    # the orphaned trainer does not run on: it gets SIGTERM when the driver dies, which frees the run's lock
    from sweeps.execution.launchers import is_locked

    assert wait_for(lambda: not is_locked(third), timeout=20)
    assert not (third / "final.json").exists()
    killed_at = json.loads(ckpt.read_text())["step"]
    if sig == signal.SIGTERM:  # a graceful stop leaves a results table that says so
        assert driver.returncode != 0
        rows = {r.rho: r.status for r in read_results(sweep.dir / "results.parquet")}
        assert rows == {1.0: "completed", 0.7: "completed", 0.4: "interrupted", 0.2: "pending"}

    records = run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), poll_s=0.05, emit=quiet)
    assert [r.status for r in records] == ["completed"] * 4
    assert len(starts(first)) == 1 and len(starts(second)) == 1  # finished runs were not re-run
    resumed = starts(third)
    assert len(resumed) == 2 and resumed[0]["resume_step"] == 0 and resumed[1]["resume_step"] == killed_at >= 3
    assert [s["resume_step"] for s in starts(sweep.runs[3].run_dir)] == [0]


def test_run_held_by_another_process_is_waited_for_not_launched_twice(tmp_path):
    sweep = make_sweep(tmp_path, rhos=(1.0, 0.6, 0.3))
    held = sweep.runs[1]
    write_run_config(held.run_dir, {**held.config, "contract": {"step_s": 0.3}}, hydra_block())
    proc = spawn_locked(trainer_command(held.run_dir, script=SCRIPT), held.run_dir, held.run_dir / "other.log", {}, REPO)
    assert proc is not None
    lines = []
    records = run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), poll_s=0.05, emit=lines.append)
    proc.wait()
    assert [r.status for r in records] == ["completed"] * 3
    assert len(starts(held.run_dir)) == 1  # only the other process's start
    assert any("already running" in ln for ln in lines)
    assert read_run_config(held.run_dir)["contract"] == {"step_s": 0.3}  # the live trainer's file left alone


def test_timed_out_run_is_recorded_and_resumable(tmp_path):
    sweep = build_sweep([ContractSpec(0.5, 80)], out=tmp_path, family="contract", budget=1e9, seeds=[0],
                        settings=["+contract.step_s=0.05", "+contract.ckpt_every=2"], wandb_mode="disabled")
    # 2 s: time for the fake trainer to start and checkpoint on a loaded machine, half its 4 s of steps
    records = run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), run_timeout_s=2.0, poll_s=0.05, emit=quiet)
    assert records[0].status == "failed" and "timed out" in records[0].reason
    records = run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), retry_failed=True, poll_s=0.05, emit=quiet)
    assert records[0].status == "completed"
    assert starts(sweep.runs[0].run_dir)[1]["resume_step"] > 0


def test_second_driver_on_the_same_sweep_is_refused(tmp_path):
    from sweeps.execution.runloop import SweepLocked, _SweepLock

    sweep = make_sweep(tmp_path, rhos=(1.0, 0.5, 0.2))
    lock = _SweepLock(sweep.dir)
    try:
        with pytest.raises(SweepLocked, match="another driver"):
            run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), emit=quiet)
    finally:
        lock.release()


def test_submitit_local_executor_runs_a_two_point_sweep(tmp_path):
    sweep = make_sweep(tmp_path, rhos=(1.0, 0.5))
    launcher = SubmititLauncher(tmp_path / "submitit", cluster="local", runner="python", timeout_min=5,
                                max_parallel=2, threads=1, script=SCRIPT)
    lines = []
    records = run_sweep(sweep, launcher, poll_s=0.2, emit=lines.append)
    assert [r.status for r in records] == ["completed", "completed"]
    for r in records:
        assert r.val_loss == pytest.approx(contract_loss(r.rho, 0))
        rec = json.loads((Path(r.run_dir) / "launcher.json").read_text())
        assert rec["cluster"] == "local" and rec["job_id"]
    assert any("local job" in ln for ln in lines)


def test_seeds_give_separate_runs_and_the_fit_uses_all_of_them(tmp_path):
    sweep = make_sweep(tmp_path, rhos=(1.0, 0.7, 0.4), seeds=(0, 1, 2))
    assert [r.run_dir.name for r in sweep.runs[:3]] == ["rho1.00-seed0", "rho1.00-seed1", "rho1.00-seed2"]
    records = run_sweep(sweep, LocalLauncher(script=SCRIPT, parallel=2, threads=1), poll_s=0.05, emit=quiet)
    assert len({r.val_loss for r in records}) == 9
    summary = summarize(sweep, records, n_boot=200, wandb_mode="disabled", emit=quiet)
    fit = summary["fit"]
    assert fit["n_points"] == 9 and fit["n_seeds"] == 3 and fit["seeds_per_rho"] == [3, 3, 3]
    assert fit["sigma_source"] == "pure_error" and fit["sigma_dof"] == 4  # (3 rho - 1) x (3 seeds - 1)
    assert all(p["seeds_at_rho"] == 3 and p["noise_sd"] == fit["sigma"] for p in summary["points"])


def test_memory_sweep_fits_a_power_law_in_slots(tmp_path):
    slots = (10_000, 30_000, 100_000, 300_000, 1_000_000)
    sweep = build_sweep([MemoryContractSpec(s) for s in slots], out=tmp_path, family="contract", budget=1e9,
                        seeds=[0], mode="memory", settings=["+contract.step_s=0.01"], wandb_mode="disabled")
    assert sweep.name == "contract-1e9-memory" and sweep.runs[0].run_dir.name == "slots10000-seed0"
    assert sweep.runs[0].config["sweep"]["slots"] == 10000
    records = run_sweep(sweep, LocalLauncher(script=SCRIPT, parallel=2, threads=1), poll_s=0.05, emit=quiet)
    assert [r.slots for r in records] == list(slots)
    assert [r.val_loss for r in records] == pytest.approx([contract_memory_loss(s, 0) for s in slots])
    summary = summarize(sweep, records, n_boot=200, wandb_mode="disabled", emit=quiet)
    fit = summary["fit"]
    assert fit["c"] == pytest.approx(0.3, abs=0.05) and fit["beta"] < 0 and fit["decreasing"]
    assert (sweep.dir / "memory_scaling.png").exists()
    assert [p["slots"] for p in summary["points"]] == list(slots)


@row("a diverged run (NaN validation loss in `final.json`) and `--retry-failed`",
     "relaunched; its old record kept as `final.diverged.json`")
def test_retry_failed_retries_a_diverged_run(tmp_path):
    sweep = make_sweep(tmp_path, rhos=(0.5,), steps=4)
    run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), poll_s=0.05, emit=quiet)
    final_path = sweep.runs[0].run_dir / "final.json"
    final_path.write_text(final_path.read_text().replace('"val_loss": ', '"val_loss": NaN, "was": '))
    assert run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), poll_s=0.05, emit=quiet)[0].status == "diverged"
    records = run_sweep(sweep, LocalLauncher(script=SCRIPT, threads=1), retry_failed=True, poll_s=0.05, emit=quiet)
    assert records[0].status == "completed" and len(starts(sweep.runs[0].run_dir)) == 2
    assert "NaN" in (sweep.runs[0].run_dir / "final.diverged.json").read_text()


class _QueuedLauncher(LocalLauncher):
    """A scheduler stand-in: each run waits ``queue_s`` in a queue before its process starts."""

    def __init__(self, queue_s: float, **kw):
        super().__init__(**kw)
        self.queue_s = queue_s

    def launch(self, req):
        return _QueuedHandle(self, req)


class _QueuedHandle(Handle):
    def __init__(self, launcher, req):
        self.launcher, self.req, self.t0, self.inner = launcher, req, time.monotonic(), None
        self.description = "queued"

    def poll(self):
        if self.inner is None:
            if time.monotonic() - self.t0 > self.launcher.queue_s:
                self.inner = LocalLauncher.launch(self.launcher, self.req)
            return None
        return self.inner.poll()

    def is_running(self) -> bool:
        return self.inner is not None

    def stop(self) -> None:
        if self.inner is not None:
            self.inner.stop()


@row("`--run-timeout` with runs waiting in a scheduler queue", "the timeout counts run time only")
def test_run_timeout_counts_run_time_not_queue_time(tmp_path):
    sweep = make_sweep(tmp_path, rhos=(0.5,), steps=5)  # about 0.1 s of steps, well under the timeout
    records = run_sweep(sweep, _QueuedLauncher(2.0, script=SCRIPT, threads=1), run_timeout_s=1.5, poll_s=0.05,
                        emit=quiet)
    assert records[0].status == "completed", records[0].reason


class _FakeSlurmJob:
    states: list = []

    def __init__(self, folder, job_id):
        self.job_id = job_id

    @property
    def state(self):
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


@row("a Slurm job whose state comes back UNKNOWN when the driver re-attaches",
     "re-queried; if it stays unknown the driver waits for it, never submits a duplicate")
@pytest.mark.parametrize("states,attached", [(["UNKNOWN", "UNKNOWN", "RUNNING"], "re-attached"),
                                             (["UNKNOWN"], "waiting, not resubmitting"),
                                             (["UNKNOWN", "CANCELLED by 42"], None)])
def test_unknown_slurm_state_is_requeried_never_resubmitted(tmp_path, monkeypatch, states, attached):
    import submitit.slurm.slurm as slurm_mod

    from sweeps.execution import submitit_launcher

    monkeypatch.setattr(slurm_mod, "SlurmJob", _FakeSlurmJob)
    monkeypatch.setattr(_FakeSlurmJob, "states", list(states))
    monkeypatch.setattr(submitit_launcher.time, "sleep", lambda s: None)
    (tmp_path / "launcher.json").write_text(json.dumps({"cluster": "slurm", "folder": str(tmp_path), "job_id": "7"}))
    launcher = SubmititLauncher.__new__(SubmititLauncher)
    launcher.cluster = "slurm"
    handle = launcher.reattach(tmp_path)
    assert (handle is None) if attached is None else (attached in handle.description)


@row("several budgets in one command (`--budget 6e12 2e13`)",
     "one queue of runs: a free slot takes the next run of any budget, not after the previous budget finished")
def test_budgets_of_one_command_share_one_queue(tmp_path):
    sweeps = [build_sweep([ContractSpec(0.5, 6)], out=tmp_path, family="contract", budget=b, seeds=[0],
                          settings=["+contract.step_s=0.2"], wandb_mode="disabled") for b in (1e9, 2e9)]
    lines = []
    per_sweep = run_sweeps(sweeps, LocalLauncher(script=SCRIPT, parallel=2, threads=1), poll_s=0.05,
                           emit=lines.append)
    assert [[r.status for r in recs] for recs in per_sweep] == [["completed"], ["completed"]]
    t_a, t_b = (starts(s.runs[0].run_dir)[0]["time"] for s in sweeps)
    assert abs(t_a - t_b) < 1.0  # both ran at once (each takes about 1.2 s)
    assert all((s.dir / "results.parquet").exists() for s in sweeps)
    assert any(ln.startswith("[contract-2e+09]") or "contract-2e" in ln for ln in lines)




def test_the_driver_looks_again_soon_after_a_launch_or_an_ending_then_backs_off(tmp_path, monkeypatch):
    """A run that ends within a second is seen within a few tens of milliseconds (a sweep of short runs is
    not a second per run slower), while a long run is polled no more often than poll_s."""
    from sweeps.execution import runloop

    waits = []

    class Clock:  # the run loop's time module, its sleeps recorded (only the run loop's: not the process's)
        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, s):
            waits.append(s)
            time.sleep(s)

    monkeypatch.setattr(runloop, "time", Clock())
    records = run_sweep(make_sweep(tmp_path, rhos=(1.0, 0.5), steps=4), LocalLauncher(script=SCRIPT, threads=1),
                        poll_s=0.4, emit=quiet)
    assert [r.status for r in records] == ["completed"] * 2
    assert waits[0] == runloop.FIRST_POLL_S and max(waits) <= 0.4
    assert all(b in (runloop.FIRST_POLL_S, min(0.4, 2 * a)) for a, b in zip(waits, waits[1:])), waits
    assert waits.count(runloop.FIRST_POLL_S) >= 2  # the second run's launch started the short waits again
