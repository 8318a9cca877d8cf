"""`make demo` (sweeps/demo.py): a real allocation sweep whose plan is valid and whose report gives the
verdict's noise, what more seeds would need, and the paths."""
from __future__ import annotations

import json
import re
from pathlib import Path

from sweeps.demo import BUDGET, FAMILY, RHOS, report, sweep_argv
from sweeps.analysis.power import noise_dof
from sweeps.run import parser

REPO = Path(__file__).resolve().parents[2]


def test_makefile_demo_runs_the_sweep_demo():
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^demo: data\n\t(.+)$", text, re.M).group(1)
    assert "-m sweeps.demo" in recipe and "OMP_NUM_THREADS=1" in recipe


def test_demo_is_moe_plus_engram_with_a_noise_dof_and_a_valid_plan():
    from sweeps.execution.driver import plan_allocation

    args = parser().parse_args(sweep_argv(Path("out"), 2, 1))
    assert args.parallel == 2 and args.threads == 1 and args.wandb_mode == "offline" and args.seeds == 1
    assert len(RHOS) >= 3 and 1.0 in RHOS and noise_dof(len(RHOS), 1) >= 1  # a verdict with intervals
    specs, warnings = plan_allocation(FAMILY, BUDGET, RHOS)
    runs = [s.to_dict() for s in specs]
    assert not warnings and sum(r["engram_params"] > 0 for r in runs) == len(RHOS) - 1
    assert all(abs(r["train_flops_error"]) < 0.002 and r["tokens_per_active_param"] >= 0.25 for r in runs)
    # two waves of two runs on 2 cores: the demo's size is bounded by its token count
    assert max(r["train_tokens"] for r in runs) <= 240_000


def test_report_names_paths_noise_and_seeds_needed(tmp_path):
    sweep_dir = tmp_path / "cpu-3e12"
    sweep_dir.mkdir()
    fit = {"verdict": "flat", "sigma": 0.03, "sigma_dof": 1, "reason": "F test does not reject"}
    (sweep_dir / "summary.json").write_text(json.dumps({
        "fit": fit, "results_table": "results.parquet", "figures": ["u_curve.png"], "counts": {"completed": 4},
        "wandb_summary_dir": str(sweep_dir / "wandb" / "offline-run-x")}))
    text = "\n".join(report(sweep_dir))
    for expected in ("results.parquet", "u_curve.png", "summary.json", "offline-run-x",
                     "smallest gain detectable", "seeds per rho for a 0.014-nat gain", "--seeds N"):
        assert expected in text, expected
    # a failed demo says why there is no noise estimate instead of inventing one
    (sweep_dir / "summary.json").write_text(json.dumps({
        "fit": {"verdict": "insufficient", "reason": "2 finished rho value(s)"}, "results_table": "results.parquet",
        "counts": {"completed": 2}}))
    text = "\n".join(report(sweep_dir))
    assert "no noise estimate from 2 finished run(s): 2 finished rho" in text and "seeds per rho" not in text
