"""A study's report, generated from the files in its folder: RESULTS.md, one results.csv per sweep, and
the README's results section (between the ``study-results`` markers).

Nothing here computes a new statistic: every number comes from the sweeps' own ``summary.json`` (the
U-curve verdict with its intervals, the memory-ablation comparison, the memory sweep's fit, the trend
over budgets) and from ``study_log.json`` (commits, wall time). The text says what a verdict means at
this design's power, so that a reader knows what was and was not shown.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

from sweeps.study_config import LOG_FILE, Study, load_study

BEGIN, END = "<!-- study-results:begin -->", "<!-- study-results:end -->"


def _num(v: Optional[float], fmt: str = ".4f") -> str:
    return "?" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ci(ci: Optional[list], fmt: str = ".4f") -> str:
    return "[no interval]" if not ci or ci[0] is None or ci[1] is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _summaries(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*/summary.json")):
        s = json.loads(path.read_text())
        s["_dir"] = path.parent.name
        out.append(s)
    return sorted(out, key=lambda s: (s.get("mode") != "allocation", s.get("budget", 0)))


def write_results_csv(sweep_dir: Path) -> Optional[Path]:
    """results.parquet -> results.csv (a table a reader can open on GitHub)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    src = sweep_dir / "results.parquet"
    if not src.exists():
        return None
    table = pq.read_table(src)
    keep = [c for c in table.column_names if c not in ("spec", "run_dir")]
    dst = sweep_dir / "results.csv"
    pacsv.write_csv(table.select(keep), dst)
    return dst


def _arm(point: dict) -> str:
    if point.get("mode") == "memory":
        return "memory"
    return "ablated" if "ablate" in str(point.get("run_name", "")) else ("moe" if point.get("rho") == 1.0 else "full")


def point_rows(summary: dict) -> list[str]:
    """One table row per (arm, rho or slots): mean and sd of val loss over seeds, FLOPs, tokens and lookups."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in summary.get("points", []):
        key = (_arm(p), p.get("slots") or p.get("rho"))
        groups[key].append(p)
    rows = []
    for (arm, x), pts in sorted(groups.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 0))):
        losses = [p["val_loss"] for p in pts if p.get("status") == "completed" and p.get("val_loss") is not None]
        mean = sum(losses) / len(losses) if losses else None
        sd = (math.sqrt(sum((v - mean) ** 2 for v in losses) / (len(losses) - 1)) if len(losses) > 1 else None)
        p0 = pts[0]
        spent = [p.get("train_flops") for p in pts if p.get("train_flops")]
        err = [abs(p["flops_error"]) for p in pts if p.get("flops_error") is not None]
        label = f"slots {int(x):,}" if arm == "memory" else f"{x:.2f}"
        rows.append(f"| {summary['_dir']} | {arm} | {label} | {_num(p0.get('rho_eff'), '.3f')} | {len(losses)}/{len(pts)}"
                    f" | {_num(mean)} | {_num(sd)} | {_num(p0.get('planned_flops'), '.4e')} | "
                    f"{_num(max(spent) if spent else None, '.4e')} | {_num(100 * max(err) if err else None, '.3f')}% | "
                    f"{_num(p0.get('tokens_per_active_param'), '.3f')} | {_num(p0.get('tokens_per_total_param'), '.3f')}"
                    f" | {_num(p0.get('lookups_per_row'), '.1f')} |")
    return rows


def allocation_row(s: dict) -> str:
    fit = s.get("fit") or {}
    abl = (s.get("ablation") or {})
    mem = abl.get("memory_effect") or {}
    sigma = f"{_num(fit.get('sigma'))} ({fit.get('sigma_dof', '?')} dof)" if fit.get("sigma") else "?"
    return (f"| {s['_dir']} | **{fit.get('verdict', 'no fit')}** | {_num(fit.get('rho_star'), '.3f')} "
            f"{_ci(fit.get('rho_star_ci'), '.3f')} | {_num(fit.get('gain_vs_moe'), '+.4f')} "
            f"{_ci(fit.get('gain_vs_moe_ci'), '+.4f')} | {sigma} | {_num(fit.get('mde'), '.3f')} | "
            f"{fit.get('n_rho', '?')} x {fit.get('n_seeds', '?')} | {abl.get('verdict', 'not run')}: "
            f"{_num(mem.get('diff'), '+.4f')} {_ci(mem.get('ci'), '+.4f')} |")


def memory_line(s: dict) -> str:
    fit = s.get("fit")
    if not fit:
        return f"- {s['_dir']}: no fit ({s.get('fit_error')})"
    return (f"- {s['_dir']}: loss = {fit['a']:.4f} + {fit['b']:.4f} (slots/{fit['s0']:.3g})^-{fit['c']:.3f}; "
            f"log-linear slope {fit['beta']:+.4f} nats per decade of slots {_ci(fit.get('beta_ci'), '+.4f')} "
            f"({100 * fit.get('level', 0.95):.0f}%)")


def trend_lines(folder: Path) -> list[str]:
    path = folder / "summary.json"
    if not path.exists():
        return []
    trend = json.loads(path.read_text()).get("trend") or {}
    lines = []
    for key in ("rho_star", "gain"):
        t = trend.get(key)
        if isinstance(t, dict) and "slope_per_decade" in t:
            lines.append(f"- {key} against budget: slope {t['slope_per_decade']:+.4f} per decade of FLOPs "
                         f"{_ci(t.get('slope_ci'), '+.4f')}")
    return lines


def log_lines(folder: Path) -> list[str]:
    path = folder / LOG_FILE
    if not path.exists():
        return ["- no invocation logged yet"]
    lines = []
    for e in json.loads(path.read_text()):
        trained = sum(e.get("runs_trained", {}).values())
        lines.append(f"- {e['started_utc']}: commit `{e['commit'][:10] or 'unknown (not a git checkout)'}`{' (dirty tree)' if e.get('dirty') else ''}, "
                     f"{trained} run(s) trained in {e['wall_s'] / 60:.1f} min wall on {e.get('cpus')} CPU(s), "
                     f"{e.get('runs_at_once')} run(s) at once x {e.get('threads_per_run')} thread(s)")
    last = json.loads(path.read_text())[-1]
    lines += ["", "Commands of the last invocation:", "```",
              *(" ".join(c) for c in last.get("commands", [])), "```"]
    return lines


def _interpretation(study: Study, summaries: list[dict]) -> list[str]:
    """What was and was not shown, from the verdicts and the design's power."""
    out = []
    for s in summaries:
        fit = s.get("fit") or {}
        if s.get("mode") != "allocation" or not fit:
            continue
        verdict, mde = fit.get("verdict"), fit.get("mde")
        if verdict == "U":
            out.append(f"- {s['_dir']}: an interior optimum, rho* {_num(fit.get('rho_star'), '.2f')} "
                       f"{_ci(fit.get('rho_star_ci'), '.2f')}, gain over pure MoE "
                       f"{_num(fit.get('gain_vs_moe'), '+.3f')} {_ci(fit.get('gain_vs_moe_ci'), '+.3f')} nats.")
        elif verdict == "flat":
            out.append(f"- {s['_dir']}: no allocation effect detected; this design detects gains of "
                       f"{_num(mde, '.3f')} nats at 80% power, so the paper's 0.014-nat gain is "
                       f"{'below' if mde and mde > 0.014 else 'within'} what it can see.")
        else:
            out.append(f"- {s['_dir']}: verdict {verdict}: {fit.get('reason') or ''}")
        abl = s.get("ablation") or {}
        if abl.get("memory_effect"):
            out.append(f"  Memory ablation ({abl['verdict']}): loss(one-row tables) - loss(full tables) = "
                       f"{_num(abl['memory_effect'].get('diff'), '+.4f')} "
                       f"{_ci(abl['memory_effect'].get('ci'), '+.4f')} nats, pooled over rho < 1.")
    for s in summaries:
        fit = s.get("fit") or {}
        if s.get("mode") == "memory" and fit.get("beta_ci") and None not in fit["beta_ci"]:
            lo, hi = fit["beta_ci"]
            slots = sorted({p["slots"] for p in s.get("points", []) if p.get("slots")})
            what = ("no detectable effect of table size" if lo <= 0 <= hi else
                    "larger tables lower the loss" if hi < 0 else "larger tables raise the loss")
            out.append(f"- {s['_dir']}: {what} between {slots[0]:,} and {slots[-1]:,} slots (slope "
                       f"{fit['beta']:+.4f} nats per decade {_ci(fit['beta_ci'], '+.4f')}).")
    lookups = [p.get("lookups_per_row") for s in summaries for p in s.get("points", [])
               if _arm(p) == "full" and p.get("lookups_per_row")]
    if lookups:
        out.append(f"- Scale caveat: the full tables were looked up {min(lookups):.0f}-{max(lookups):.0f} times per "
                   f"row over a run (the paper's 2e20 point: ~3e4-1e5); at "
                   f"{min(p.get('tokens_per_active_param') or 0 for s in summaries for p in s.get('points', [])):.2f}+ "
                   f"tokens per active parameter the backbones are far from trained. Whatever the verdicts say, they "
                   f"hold at this scale only; a flat curve here is weak evidence about Engram at the paper's scale.")
    return out


ALLOC_HEAD = ["| sweep | verdict | rho* [95% CI] | gain vs rho = 1, nats [95% CI] | noise sd | mde | rho x seeds | "
              "memory ablation: loss(1-row) - loss(full) [95% CI] |", "|---|---|---|---|---|---|---|---|"]
POINT_HEAD = ["| sweep | arm | rho / slots | rho_eff | runs done | val loss (mean) | sd over seeds | planned FLOPs | "
              "spent FLOPs (max) | max FLOPs error | tokens / P_act | tokens / P_tot | lookups / row |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
GPU_HOWTO = ("To run the same study on a GPU family, copy the folder's study.yaml to a new folder, set `family: gpu` "
             "(or `paper`) and budgets from that family's range (`python -m sweeps.plan --budget B --family gpu` "
             "prints the plan), and run `python -m sweeps.study <folder>` on the GPU machine (add the launcher flags "
             "of `python -m sweeps.run`, e.g. a Slurm cluster, by running its commands from study_log.json by hand); "
             "finished points are kept, only the missing ones train.")


def _figures(folder: Path, summaries: list[dict], prefix: str) -> list[str]:
    figs = [f"{s['_dir']}/{f}" for s in summaries for f in s.get("figures", [])]
    figs += [f for f in ("u_curves.png", "trend.png") if (folder / f).exists()]
    return [f"![{f}]({prefix}{f})" for f in figs]


def verdict_block(folder: Path, study: Study, summaries: list[dict], prefix: str) -> list[str]:
    alloc = [s for s in summaries if s.get("mode") == "allocation"]
    memory = [s for s in summaries if s.get("mode") == "memory"]
    lines = [*ALLOC_HEAD, *map(allocation_row, alloc), ""]
    trend = trend_lines(folder)
    if trend:
        lines += ["Trend across budgets:", *trend, ""]
    if memory:
        lines += ["Infinite-memory sweep (rho = 1 backbone plus Engram tables of growing size):",
                  *map(memory_line, memory), ""]
    lines += ["What this shows and what it does not:", *_interpretation(study, summaries), ""]
    return lines + _figures(folder, summaries, prefix)


def _shown(folder: Path) -> str:
    """The folder as a user would type it: relative to the working directory when it lies below it."""
    try:
        return folder.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return folder.as_posix()


def results_markdown(folder: Path) -> str:
    folder = Path(folder)
    study = load_study(folder)
    summaries = _summaries(folder)
    lines = [f"# Study `{study.name}`: {study.description}", "",
             f"Generated by `python -m sweeps.study {_shown(folder)} --report` from the files in this folder "
             f"(summary.json of each sweep, study_log.json); do not edit by hand. Family `{study.family}`; "
             f"definition: [study.yaml](study.yaml).", "", "## Verdicts", "",
             *verdict_block(folder, study, summaries, ""), "", "## Points (mean over seeds; every run in each "
             "sweep's results.csv)", "", *POINT_HEAD]
    for s in summaries:
        lines += point_rows(s)
    lines += ["", "## How it was run", "", *log_lines(folder), "", GPU_HOWTO, ""]
    return "\n".join(lines)


def readme_section(folder: Path, readme: Path) -> str:
    folder = Path(folder)
    study = load_study(folder)
    summaries = _summaries(folder)
    rel = folder.resolve().relative_to(readme.resolve().parent).as_posix() + "/"
    return "\n".join([BEGIN, f"Study [`{study.name}`]({rel}RESULTS.md) ({study.description}); generated by "
                      f"`make study STUDY={rel.rstrip('/')}` from the committed files in `{rel}`.", "",
                      *verdict_block(folder, study, summaries, rel), "", GPU_HOWTO, END])


def update_readme(folder: Path, readme: Path) -> Optional[Path]:
    """Replace the README text between the study-results markers; None if the README has no markers."""
    if not readme.exists():
        return None
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return None
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + readme_section(folder, readme) + tail)
    return readme


def write_all(folder: Path, readme: Optional[Path] = None) -> list[Path]:
    """results.csv per sweep, RESULTS.md, and the README section when the folder lies under the README's."""
    folder = Path(folder)
    written = [p for s in _summaries(folder) if (p := write_results_csv(folder / s["_dir"])) is not None]
    out = folder / "RESULTS.md"
    out.write_text(results_markdown(folder))
    written.append(out)
    readme = readme or Path("README.md")
    try:
        folder.resolve().relative_to(readme.resolve().parent)
    except ValueError:
        return written
    if update_readme(folder, readme) is not None:
        written.append(readme)
    return written
