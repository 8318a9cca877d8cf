"""Sweep pieces without running anything: names, resolved run configs, launch commands, run-directory outcomes,
the results table, progress/ETA, figures, the W&B summary run and the CLI's input checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep_contract_trainer import ContractSpec
from sweeps.execution.driver import build_sweep
from sweeps.execution.sweep import budget_tag, rho_tag, sweep_name
from sweeps.analysis.planview import describe_plan
from sweeps.execution.runloop import log_tail_reason
from sweeps.analysis.summary import overlay_allocation_sweeps
from sweeps.analysis.fit import fit_power_law, fit_u_curve
from sweeps.execution.launchers import LocalLauncher, trainer_command
from sweeps.analysis.plots import CurveData, plot_memory_scaling, plot_u_curves
from sweeps.execution.progress import Progress, fmt_duration
from rundir.outcome import read_outcome
from sweeps.execution.results import RunRecord, read_results, write_results


# ---- names and run configs --------------------------------------------------------------------------
def test_names_are_deterministic_and_readable():
    assert [budget_tag(b) for b in (1e13, 2.5e20, 3e18, 6e20)] == ["1e13", "2.5e20", "3e18", "6e20"]
    assert [rho_tag(r) for r in (0.8, 1.0, 0.825)] == ["0.80", "1.00", "0.825"]
    assert sweep_name("small", 1e13) == "small-1e13" and sweep_name("small", 1e13, "memory") == "small-1e13-memory"
    with pytest.raises(ValueError, match="positive number"):
        budget_tag(-1.0)


def test_build_sweep_lays_out_runs_and_passes_sweep_identity_to_the_trainer(tmp_path):
    a = build_sweep([ContractSpec(0.8), ContractSpec(0.4)], out=tmp_path, family="fam", budget=1e13, seeds=[0, 1],
                    settings=["train.eval_tokens=4096"], wandb_mode="offline")
    b = build_sweep([ContractSpec(0.8), ContractSpec(0.4)], out=tmp_path, family="fam", budget=1e13, seeds=[0, 1],
                    settings=["train.eval_tokens=4096"], wandb_mode="offline")
    assert [r.run_dir for r in a.runs] == [r.run_dir for r in b.runs]
    assert a.dir == tmp_path.resolve() / "fam-1e13"
    assert [r.run_dir.name for r in a.runs] == ["rho0.80-seed0", "rho0.80-seed1", "rho0.40-seed0", "rho0.40-seed1"]
    cfg = a.runs[1].config  # the complete trainer config: the trainer's defaults, the plan, --set, the sweep's own
    assert cfg["run_dir"] == str(a.runs[1].run_dir) and cfg["train"]["seed"] == 1 and cfg["train"]["progress"] is False
    assert cfg["logging"]["wandb"] == {**cfg["logging"]["wandb"], "group": "fam-1e13", "name": "fam-1e13-rho0.80-seed1",
                                       "mode": "offline"}
    assert cfg["sweep"] == {"name": "fam-1e13", "mode": "allocation", "family": "fam", "budget": 1e13, "rho": 0.8,
                            "seed": 1, "slots": None}  # the schema's typed sweep section
    assert cfg["train"]["max_steps"] == 6 and cfg["train"]["eval_tokens"] == 4096  # the plan's, then --set
    assert cfg["optim"]["groups"]["matrix"]["weight_decay"] == cfg["optim"]["weight_decay"]  # resolved, no ${...}
    assert cfg["model"]["d_model"] > 0 and "hydra" not in cfg and "defaults" not in cfg


@pytest.mark.parametrize("setting,msg", [
    ("model.d_model=96", "solved by the iso-FLOP plan"),
    ("train.train_tokens=5", "solved by the iso-FLOP plan"),
    ("train.eval_tokenz=4096", "has no key train.eval_tokenz"),
    ("train.eval_tokens=lots", "takes a int"),
    ("train.progress=3", "takes a bool"),
    ("oops", "KEY=VALUE"),
])
def test_set_is_typed_by_the_trainer_config_and_refused_on_planned_keys(tmp_path, setting, msg):
    with pytest.raises(ValueError, match=msg):
        build_sweep([ContractSpec(0.8)], out=tmp_path, family="f", budget=1e13, seeds=[0], settings=[setting])


def test_set_values_take_the_type_of_the_value_they_replace(tmp_path):
    sweep = build_sweep([ContractSpec(0.8)], out=tmp_path, family="f", budget=1e13, seeds=[0],
                        settings=["optim.lr=1e-3", "optim.weight_decay=0", "train.grad_clip=null",
                                  "logging.wandb.tags=[a,b]", "+contract.step_s=0.5"])
    cfg = sweep.runs[0].config
    assert cfg["optim"]["lr"] == 1e-3 and cfg["optim"]["weight_decay"] == 0.0
    assert isinstance(cfg["optim"]["weight_decay"], float) and cfg["optim"]["groups"]["head"]["weight_decay"] == 0.0
    assert cfg["train"]["grad_clip"] is None and cfg["logging"]["wandb"]["tags"] == ["a", "b"]
    assert cfg["contract"] == {"step_s": 0.5}  # '+' adds a key the trainer's config lacks


@pytest.mark.parametrize("kwargs,msg", [
    (dict(specs=[]), "no runs"),
    (dict(seeds=[0, 0]), "distinct"),
    (dict(specs=[ContractSpec(0.8), ContractSpec(0.8000000001)]), "share the point"),
    (dict(mode="memory"), "slot count"),
])
def test_build_sweep_refuses_bad_plans(tmp_path, kwargs, msg):
    args = dict(specs=[ContractSpec(0.8)], out=tmp_path, family="f", budget=1e13, seeds=[0])
    args.update(kwargs)
    specs = args.pop("specs")
    with pytest.raises(ValueError, match=msg):
        build_sweep(specs, **args)


def test_dry_run_lists_every_run_and_the_first_command(tmp_path):
    sweep = build_sweep([ContractSpec(1.0), ContractSpec(0.5)], out=tmp_path, family="f", budget=1e13, seeds=[0])
    text = describe_plan(sweep)
    assert "rho1.00-seed0" in text and "rho0.50-seed0" in text and "pending" in text
    assert "train/main.py --config-dir" in text and f"{sweep.runs[0].run_dir} --config-name config" in text
    assert not sweep.dir.exists()  # a dry run writes nothing


# ---- launch commands ------------------------------------------------------------------------------
def test_trainer_commands_for_each_runner(tmp_path):
    ov = tmp_path / "run"  # the trainer gets the run's config.yaml and nothing else
    cfg = ["--config-dir", str(ov), "--config-name", "config"]
    assert trainer_command(ov, python="py") == ["py", "train/main.py", *cfg]
    tr = trainer_command(ov, runner="torchrun", nproc=4, python="py")
    assert tr == ["py", "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone", "train/main.py", *cfg]
    mn = trainer_command(ov, runner="torchrun", nproc=8, nnodes=2, node_rank=1, master_addr="n0", master_port=1234,
                         python="py")
    assert "--nnodes=2" in mn and "--node_rank=1" in mn and "--master_addr=n0" in mn and "--standalone" not in mn
    ds = trainer_command(ov, runner="deepspeed", nproc=2, devices=["2", "3"], master_port=999, python="/v/bin/python")
    assert ds[:3] == ["/v/bin/deepspeed", "--no_local_rank", "--master_port=999"]
    assert "--include=localhost:2,3" in ds and ds[-5:] == ["train/main.py", *cfg]
    dsm = trainer_command(ov, runner="deepspeed", nproc=8, nnodes=2, node_rank=1, master_addr="n0",
                          hostfile=tmp_path / "hosts", python="py")
    assert "--no_ssh" in dsm and "--node_rank=1" in dsm and f"--hostfile={tmp_path / 'hosts'}" in dsm
    with pytest.raises(ValueError, match="one process"):
        trainer_command(ov, nproc=2)
    with pytest.raises(ValueError, match="master_addr"):
        trainer_command(ov, runner="torchrun", nnodes=2)


def test_local_launcher_device_slots_and_threads():
    one_per_gpu = LocalLauncher(devices=["0", "1", "2", "3"])
    assert one_per_gpu.capacity == 4
    cmd, env = one_per_gpu.command(Path("r"), one_per_gpu.slots[2])
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and cmd[1] == "train/main.py"
    all_gpus = LocalLauncher(devices=["0", "1", "2", "3"], procs_per_run=4)
    assert all_gpus.capacity == 1 and all_gpus.runner == "torchrun"
    cmd, env = all_gpus.command(Path("r"), all_gpus.slots[0])
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and "--nproc_per_node=4" in cmd
    cpu = LocalLauncher(parallel=2, threads=3)
    assert cpu.capacity == 2 and cpu.command(Path("r"), None)[1]["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="do not split"):
        LocalLauncher(devices=["0", "1", "2"], procs_per_run=2)
    with pytest.raises(ValueError, match="one process per run"):
        LocalLauncher(procs_per_run=2, runner="python")


# ---- run directories and the results table ---------------------------------------------------------------
def test_read_outcome_follows_the_trainer_contract(tmp_path):
    d = tmp_path / "r"
    assert read_outcome(d)[0] == "pending"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "tag": "step_00000004"}))
    assert read_outcome(d)[0] == "interrupted"
    (d / "failed.json").write_text(json.dumps({"status": "diverged", "reason": "training loss nan", "step": 7}))
    assert read_outcome(d) == ("diverged", {"reason": "training loss nan (step 7)"})
    (d / "final.json").write_text(json.dumps({"status": "completed", "val_loss": 3.25, "steps": 10, "tokens": 100,
                                              "train_flops": 1e9, "wall_time_s": 5.0}))
    status, info = read_outcome(d)
    assert status == "completed" and info["val_loss"] == 3.25 and info["tokens"] == 100
    (d / "final.json").write_text(json.dumps({"status": "completed", "val_loss": float("nan")}))
    assert read_outcome(d)[0] == "diverged"
    (d / "final.json").write_text("{broken")
    assert read_outcome(d)[0] == "failed"


def test_results_table_round_trips_through_parquet(tmp_path):
    recs = [RunRecord("s", "allocation", "f", 1e13, 0.8, 0, "s-rho0.80-seed0", "/x", "completed", val_loss=3.1,
                      total_params=10, tokens=5, wall_time_s=1.5),
            RunRecord("s", "allocation", "f", 1e13, 0.4, 0, "s-rho0.40-seed0", "/y", "failed", reason="boom",
                      val_loss=float("nan"))]
    path = write_results(recs, tmp_path / "t" / "results.parquet")
    back = read_results(path)
    assert back[0] == recs[0]
    assert back[1].val_loss is None and back[1].reason == "boom"
    assert not list((tmp_path / "t").glob(".*tmp*"))  # atomic: no temp file left
    with pytest.raises(ValueError, match="unknown run status"):
        RunRecord("s", "allocation", "f", 1e13, 0.8, 0, "n", "/x", "weird")


def test_log_tail_reason_prefers_error_lines(tmp_path):
    log = tmp_path / "launch.log"
    log.write_text("=== launch\nstep 1\nerror: data in /d uses a 9000-token vocabulary\nbye\n")
    assert log_tail_reason(log) == "error: data in /d uses a 9000-token vocabulary"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\"\nRuntimeError: CUDA out of memory\n")
    assert log_tail_reason(log) == "RuntimeError: CUDA out of memory"
    assert log_tail_reason(tmp_path / "missing.log") == "no log"


# ---- progress ---------------------------------------------------------------------------------------------
def test_progress_counts_and_eta_from_measured_wall_times():
    now = [100.0]
    p = Progress("s", capacity=2, emit=lambda m: None, clock=lambda: now[0])
    recs = [RunRecord("s", "allocation", "f", 1.0, r, 0, f"n{i}", f"/o/rho{r}-seed0", st)
            for i, (r, st) in enumerate([(1.0, "completed"), (0.8, "running"), (0.6, "pending"), (0.4, "pending"),
                                         (0.2, "failed")])]
    assert p.eta(recs) is None and "ETA after the first run" in p.line(recs)
    p.record_duration(60.0)
    p.run_started("n1")
    now[0] += 20.0
    # 2 waiting x 60 s + 40 s left of the running one, over 2 lanes
    assert p.eta(recs) == pytest.approx((2 * 60 + 40) / 2)
    line = p.line(recs)
    assert "done 1/5" in line and "failed 1" in line and "running 1 (rho0.8-seed0 20s)" in line and "ETA 1m20s" in line
    assert fmt_duration(3725) == "1h02m"


# ---- figures ------------------------------------------------------------------------------------------------
def test_u_curves_of_several_budgets_overlay_in_one_png(tmp_path):
    curves = []
    for i, budget in enumerate((1e13, 3e13)):
        rho = [0.2, 0.4, 0.6, 0.8, 1.0]
        loss = [3.0 - 0.1 * i + 0.3 * (r - 0.7) ** 2 + 0.001 * (-1) ** j for j, r in enumerate(rho)]
        curves.append((CurveData(f"{budget:g}", rho, loss, n_missing=i), fit_u_curve(rho, loss, n_boot=200)))
    curves.append((CurveData("no fit", [0.5], [3.3]), None))
    path = plot_u_curves(curves, tmp_path / "u.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    slots = [1e4, 3e4, 1e5, 3e5, 1e6]
    fit = fit_power_law(slots, [2.0 + 0.5 * (s / 1e4) ** -0.3 for s in slots], n_boot=50)
    assert plot_memory_scaling(CurveData("m", slots, [2.0 + 0.5 * (s / 1e4) ** -0.3 for s in slots]), fit,
                               tmp_path / "m.png").stat().st_size > 10_000


def test_overlay_reads_every_allocation_summary(tmp_path):
    for budget, shift in ((1e13, 0.0), (3e13, -0.1)):
        rho = [0.2, 0.4, 0.6, 0.8, 1.0]
        loss = [3.0 + shift + 0.3 * (r - 0.7) ** 2 for r in rho]
        fit = fit_u_curve(rho, [v + 0.001 * (-1) ** i for i, v in enumerate(loss)], n_boot=200)
        d = tmp_path / f"f-{budget_tag(budget)}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "mode": "allocation", "family": "f", "budget": budget, "fit": fit.to_dict(),
            "points": [{"rho": r, "seed": 0, "val_loss": v, "status": "completed"} for r, v in zip(rho, loss)]}))
    (tmp_path / "f-1e13-memory").mkdir()
    (tmp_path / "f-1e13-memory" / "summary.json").write_text(json.dumps({"mode": "memory", "points": []}))
    out = overlay_allocation_sweeps(tmp_path)
    assert out == tmp_path / "u_curves.png" and out.stat().st_size > 20_000
    assert overlay_allocation_sweeps(tmp_path / "empty") is None


# ---- W&B summary run -------------------------------------------------------------------------------------
def test_wandb_summary_run_is_logged_offline_once_per_content(tmp_path, monkeypatch):
    from sweeps.analysis.wandb_summary import STATE_FILE, log_summary

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recs = [RunRecord("g", "allocation", "f", 1e13, r, 0, f"g-rho{r}", f"/o/rho{r}", "completed",
                      val_loss=3 + (r - 0.7) ** 2) for r in (0.2, 0.5, 0.8, 1.0)]
    fit = fit_u_curve([r.rho for r in recs], [r.val_loss for r in recs], n_boot=200).to_dict()
    curve = {"x": [0.2, 0.6, 1.0], "loss": [3.2, 3.0, 3.1], "lo": [3.1, 2.9, 3.0], "hi": [3.3, 3.1, 3.2],
             "x_name": "rho"}
    where = log_summary(tmp_path, "g", recs, fit, curve, [], {"budget": 1e13}, project="p")
    assert where is not None and Path(where).name.startswith("offline-run-")
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert Path(where).name.endswith(state["run_id"])
    tables = {p.name.split("_0_")[0]: json.loads(p.read_text())
              for p in (Path(where) / "files" / "media" / "table").glob("*.table.json")}
    assert set(tables) >= {"results", "fitted_curve", "runs_scatter_table"}
    assert tables["results"]["columns"][:3] == ["run_name", "rho", "seed"] and len(tables["results"]["data"]) == 4
    assert [row[0] for row in tables["fitted_curve"]["data"]] == [0.2, 0.6, 1.0]
    log = b"".join(p.read_bytes() for p in Path(where).glob("*.wandb"))  # offline log: summary strings in clear
    assert b"headline" in log and f"verdict: {fit['verdict']}".encode() in log
    assert log_summary(tmp_path, "g", recs, fit, curve, [], {}, project="p") is None  # unchanged: no new run
    recs[0] = RunRecord("g", "allocation", "f", 1e13, 0.2, 0, "g-rho0.2", "/o/rho0.2", "failed", reason="x")
    again = log_summary(tmp_path, "g", recs, fit, curve, [], {}, project="p")
    assert again is not None and json.loads((tmp_path / STATE_FILE).read_text())["run_id"] == state["run_id"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_summary(tmp_path / "x", "g", recs, fit, curve, [], {}, project="p") is None


# ---- CLI input checks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,msg", [
    (["--budget", "1e13", "--seeds", "0"], "--seeds must be >= 1"),
    (["--budget", "1e13", "--mode", "memory"], "needs --slots"),
    (["--budget", "1e13", "--mode", "memory", "--slots", "1.5", "10"], "whole numbers"),
    (["--budget", "1e13", "--family", "no_such_family", "--dry-run"], "unknown family"),
    (["--budget", "1e13", "--launcher", "gpus"], "needs --devices"),
    (["--budget", "1e13", "--launcher", "local", "--slurm", "partition=x"], "only apply to --launcher slurm"),
])
def test_cli_refuses_bad_input_in_one_line(argv, msg, capsys):
    from sweeps.run import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1


def test_cli_dry_run_plans_the_paper_sweep_without_writing(tmp_path, capsys):
    from sweeps.run import main

    assert main(["--budget", "2e20", "--family", "paper", "--rho", "1.0", "0.4", "--out", str(tmp_path),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "paper-2e20" in out and "rho1.00-seed0" in out and "rho0.40-seed0" in out
    assert "106" in out and "46" in out  # the published expert counts at rho = 1 and 0.4
    assert not any(tmp_path.iterdir())


def test_memory_plan_grows_only_the_tables_of_the_rho1_backbone():
    from sweeps.execution.driver import plan_allocation, plan_memory

    specs, _ = plan_memory("paper", 2e20, [258_000, 1_000_000, 10_000_000])
    base, _ = plan_allocation("paper", 2e20, [1.0])
    head_dim = 384 // 8
    assert [abs(s.slots / s.requested_slots - 1) < 1e-3 for s in specs] == [True] * 3
    for s in specs:
        d = s.to_dict()
        assert d["engram_params"] == s.slots * head_dim  # every slot is one row of head_dim parameters
        assert d["n_routed_experts"] == 106 and d["train_tokens"] == base[0].to_dict()["train_tokens"]
        assert d["active_params"] == specs[0].to_dict()["active_params"]  # lookups add no active params
        assert d["estimates"]["gpu_hours"] > 0
    totals = [s.to_dict()["total_params"] for s in specs]
    assert totals[0] < totals[1] < totals[2]
    assert totals[2] - totals[0] == (specs[2].slots - specs[0].slots) * head_dim
    assert "experiment_name" not in specs[0].config()  # the sweep names its runs
    with pytest.raises(ValueError, match="distinct positive"):
        plan_memory("paper", 2e20, [1000, 1000])


def test_one_rho_option_and_one_default_grid_for_plan_and_run():
    from sweeps.plan import DEFAULT_RHOS, build_parser, flat
    from sweeps.run import parser as run_parser

    plan_args = build_parser().parse_args(["--budget", "1e13"])
    run_args = run_parser().parse_args(["--budget", "1e13"])
    assert flat(plan_args.rho) == flat(run_args.rho) == list(DEFAULT_RHOS)
    for p in (build_parser(), run_parser()):  # comma- or space-separated, one spelling
        assert flat(p.parse_args(["--budget", "1e13", "--rho", "1,0.8", "0.5"]).rho) == [1.0, 0.8, 0.5]
        with pytest.raises(SystemExit):
            p.parse_args(["--budget", "1e13", "--rhos", "0.7"])


def test_run_config_names_the_trainers_schema():
    from rundir.config import SCHEMA_NAME
    from rundir import schema

    assert SCHEMA_NAME == schema.SCHEMA_NAME  # config.yaml's defaults list starts from the trainer's schema


def test_trainer_reads_the_run_config_even_beside_hydras_record_of_an_earlier_launch(tmp_path):
    """A relaunched run's directory holds Hydra's hydra/config.yaml: the trainer must read config.yaml, not
    take that record for Hydra's own config group (the run directory is never on Hydra's search path)."""
    import subprocess
    import sys

    from rundir.config import trainer_args, write_run_config
    from sweeps.planning.runconfig import REPO, TRAIN_SCRIPT, hydra_block

    sweep = build_sweep([ContractSpec(0.8)], out=tmp_path, family="f", budget=1e13, seeds=[0])
    run = sweep.runs[0]
    write_run_config(run.run_dir, run.config, hydra_block())
    (run.run_dir / "hydra").mkdir()
    (run.run_dir / "hydra" / "config.yaml").write_text("train: {max_steps: 1}\n")
    out = subprocess.run([sys.executable, TRAIN_SCRIPT, *trainer_args(run.run_dir), "--cfg", "job"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"run_dir: {run.run_dir}" in out.stdout and "max_steps: 6" in out.stdout


def test_readme_multi_node_example_is_what_the_launchers_run():
    """The README's hand-run multi-node commands carry the launcher flags trainer_command builds (the Slurm
    launcher's path), so the example cannot drift from what the sweep runs."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index("Several nodes by hand"):]
    block = block[block.index("```bash"):block.index("```", block.index("```bash") + 7)]
    commands = [shlex.split(c) for c in re.sub(r"\\\n\s*", "", block).splitlines() if c.startswith(("deepspeed", "torchrun"))]
    ds = {a for a in commands[0][1:commands[0].index("train/main.py")]}
    want = trainer_command(Path("r"), runner="deepspeed", nproc=8, nnodes=2, node_rank=0, master_addr="gpu-node-01",
                           master_port=29500, hostfile=Path("hostfile"), deepspeed_bin="deepspeed")
    assert ds == set(want[1:want.index("train/main.py")])
    tr = {a for a in commands[1][1:commands[1].index("train/main.py")]}
    want = trainer_command(Path("r"), runner="torchrun", nproc=8, nnodes=2, node_rank=0, master_addr="gpu-node-01",
                           master_port=29500, python="py")
    assert tr == set(want[3:want.index("train/main.py")])
    hosts = block[block.index("<<'HOSTS'") + 9:block.index("HOSTS\n", block.index("<<'HOSTS'") + 9)].split()
    assert hosts == ["gpu-node-01", "slots=8", "gpu-node-02", "slots=8"]


def test_dry_run_prints_the_launchers_command_for_several_processes_per_run(tmp_path, capsys):
    from sweeps.run import main

    assert main(["--budget", "6e12", "--family", "cpu", "--rho", "1", "--procs-per-run", "2", "--dry-run",
                 "--set", "parallel.engram_tables=sharded", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "-m torch.distributed.run --nproc_per_node=2 --standalone train/main.py --config-dir" in out
    assert not (tmp_path / "cpu-6e12").exists()
