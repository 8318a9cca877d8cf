"""What the sweep CLI refuses before anything runs (budgets out of range, a plan this machine cannot run,
--set on a solved field, a changed plan), in this process: nothing is launched."""
from __future__ import annotations

import json

import pytest

from fault_rows import row

def _cli(tmp_path, *argv) -> tuple[int, str]:
    import contextlib
    import io

    from sweeps.run import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*argv, "--out", str(tmp_path / "out")])
    return code, err.getvalue()


@row("`--budget 6e12 1e20` (the second budget out of the family's range)",
     "refused before the first run; nothing written")
def test_every_budget_is_validated_before_the_first_run(tmp_path):
    code, err = _cli(tmp_path, "--budget", "6e12", "1e20", "--family", "cpu")
    assert code == 2 and "budget 1e+20 FLOPs is above family cpu" in err
    assert not (tmp_path / "out").exists()


@row("`make sweep BUDGET=1e20 FAMILY=paper` on a machine without the plan's GPUs or memory",
     "refused in one line with the plan's GPU-hours and memory per rank and a Slurm command; `--force` overrides")
def test_plan_that_does_not_fit_this_machine_is_refused_with_its_cost(tmp_path, monkeypatch):
    from sweeps.execution import preflight

    monkeypatch.setattr(preflight, "_gpu_memory_gib", lambda: [])
    code, err = _cli(tmp_path, "--budget", "1e20", "--family", "paper", "--data-dir", str(tmp_path / "ds_corpus"))
    assert code == 2 and "will not run on this machine" in err
    assert "GPU-hours on H100" in err and "GiB per rank" in err and "--launcher slurm" in err and "--force" in err
    assert not (tmp_path / "out").exists()


@row("`--set model.d_model=96` (a field the iso-FLOP plan solved)", "refused in one line naming the key")
def test_set_on_a_planned_field_is_refused(tmp_path):
    code, err = _cli(tmp_path, "--budget", "6e12", "--family", "cpu", "--set", "model.d_model=96")
    assert code == 2 and "--set model.d_model=96: model.d_model is solved by the iso-FLOP plan" in err
    code, err = _cli(tmp_path, "--budget", "6e12", "--family", "cpu", "--set", "optim.lr=1e-2", "--dry-run")
    assert code == 0


@row("a sweep re-run under a changed plan", "refused; `plan.json` keeps the plan the runs were launched under")
def test_changed_plan_leaves_plan_json_alone(tmp_path, monkeypatch):
    code, _ = _cli(tmp_path, "--budget", "6e12", "--family", "cpu", "--rho", "1", "--dry-run")
    sweep_dir = tmp_path / "out" / "cpu-6e12"
    run_dir = sweep_dir / "rho1.00-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "sweep_run.json").write_text(json.dumps({"attempts": 1}))
    (run_dir / "config.yaml").write_text("train: {train_tokens: 1}\n")  # launched under another token count
    (sweep_dir / "plan.json").write_text('{"the": "old plan"}')
    code, err = _cli(tmp_path, "--budget", "6e12", "--family", "cpu", "--rho", "1")
    assert code == 2 and "plan changed since these runs were launched: rho1.00-seed0 (train.train_tokens)" in err
    assert (sweep_dir / "plan.json").read_text() == '{"the": "old plan"}'


def test_preflight_refuses_only_what_this_machine_cannot_run():
    from types import SimpleNamespace

    from sweeps.execution.preflight import Machine, check_fits

    def plan(gpu_hours, mem, peak=989.0):
        est = {"hardware": "H100", "peak_tflops": peak, "mfu": 0.3, "gpu_hours": gpu_hours, "mem_per_gpu_gib": mem}
        return [SimpleNamespace(name="s", runs=[SimpleNamespace(spec={"estimates": est})])]

    cpu = Machine(0, 20.0, "no GPU, 20 GiB RAM")
    check_fits(plan(1e-6, 0.1), cpu, "hint")  # a tiny plan made for GPUs still runs here in seconds
    check_fits(plan(100.0, 1.0, peak=0.16), cpu, "hint")  # a CPU plan is the family's own estimate
    with pytest.raises(ValueError, match=r"assumes H100 accelerators.*about [\d.e+]+ hours.*100 GPU-hours"):
        check_fits(plan(100.0, 1.0), cpu, "hint")
    with pytest.raises(ValueError, match=r"needs 40 GiB per rank and a rank gets 20 GiB"):
        check_fits(plan(1e-6, 40.0), cpu, "hint")
    check_fits(plan(100.0, 40.0), Machine(8, 80.0, "8 GPUs"), "hint")



def test_set_of_an_unknown_trainer_key_is_refused_before_anything_is_written(tmp_path):
    code, err = _cli(tmp_path, "--budget", "6e12", "--family", "cpu", "--rho", "1", "--set", "+train.max_stepz=3")
    assert code == 2 and "unknown config key train.max_stepz; did you mean train.max_steps?" in err
    assert not (tmp_path / "out").exists()
