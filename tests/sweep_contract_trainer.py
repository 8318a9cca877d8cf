"""A test fixture that honours train/main.py's run-directory contract, for driver tests that must be fast.

    python tests/sweep_contract_trainer.py --config-dir RUN_DIR --config-name config

It reads the run's config.yaml (rundir/config.py) exactly as the trainer does, and from it ``run_dir``,
``sweep.rho``, ``train.seed``, ``train.max_steps`` and its own section, e.g. ``contract: {step_s: 0.05,
ckpt_every: 2, fail_rho: 0.4, crash_rho: 0.2}`` (given with ``--set +contract.step_s=0.05``).

It "trains" for max_steps steps of ``step_s`` seconds, commits ``checkpoints/latest.json`` atomically
every ``ckpt_every`` steps, resumes from it when re-run, exits at once if ``final.json`` exists, and
finally writes ``final.json`` whose ``val_loss`` is a known U-curve in rho (or, when ``+sweep.slots`` is
given, a known power law in slots) plus seed noise. At
``fail_rho`` it reports a failure the way the trainer does (``failed.json`` + ``error:`` line, exit 2);
at ``crash_rho`` it dies without a word (exit 1 after a traceback). Every start is appended to
``<run_dir>/starts.jsonl`` with the step it resumed from, so tests can tell reruns from resumes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import yaml

from rundir.config import flatten
from rundir.files import CHECKPOINTS, FAILED, FINAL, LATEST, atomic_write_json

RHO_STAR, CURVATURE, FLOOR, SEED_NOISE = 0.7, 0.4, 3.0, 0.002


def contract_loss(rho: float, seed: int) -> float:
    """The fixture's validation loss: a U in rho with its minimum at RHO_STAR, plus a seed offset."""
    return FLOOR + CURVATURE * (rho - RHO_STAR) ** 2 + SEED_NOISE * math.sin(12.9898 * (seed + 1) + 78.233 * rho)


def contract_memory_loss(slots: float, seed: int) -> float:
    """The fixture's loss in memory sweeps: a power law in Engram slots, plus a seed offset."""
    return 2.0 + 0.5 * (slots / 1e4) ** -0.3 + SEED_NOISE * math.sin(3.1 * (seed + 1) + math.log(slots))


def parse(argv: list[str]) -> dict[str, str]:
    """The run config named by ``--config-dir DIR --config-name NAME`` as dotted keys, values as text."""
    where = dict(zip(argv[::2], argv[1::2]))
    path = Path(where["--config-dir"]) / f"{where['--config-name']}.yaml"
    return {k: str(v) for k, v in flatten(yaml.safe_load(path.read_text())).items() if v is not None}


class ContractSpec:
    """A planner spec for the fixture (the driver's spec protocol: rho, config(), to_dict())."""

    def __init__(self, rho: float, steps: int = 6):
        self.rho, self.steps = float(rho), int(steps)

    def config(self) -> dict:
        return {"train": {"max_steps": self.steps}}

    def to_dict(self) -> dict:
        return {"rho": self.rho, "steps": self.steps, "total_params": 1000, "active_params": 100}


class MemoryContractSpec(ContractSpec):
    """A memory-sweep spec for the fixture: fixed backbone (rho = 1), ``slots`` Engram rows."""

    def __init__(self, slots: int, steps: int = 6):
        super().__init__(1.0, steps)
        self.slots = int(slots)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "slots": self.slots}


def main() -> int:
    args = parse(sys.argv[1:])
    run_dir = Path(args["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / FINAL).exists():
        print("run already completed")
        return 0
    rho, seed = float(args["sweep.rho"]), int(args.get("train.seed", 0))
    steps = int(args.get("train.max_steps", 6))
    step_s = float(args.get("contract.step_s", os.environ.get("CONTRACT_STEP_S", 0.05)))  # env: whole studies
    every = int(args.get("contract.ckpt_every", 2))
    ckpt = run_dir / CHECKPOINTS
    latest = ckpt / LATEST
    start = json.loads(latest.read_text())["step"] if latest.exists() else 0
    with open(run_dir / "starts.jsonl", "a") as f:
        f.write(json.dumps({"resume_step": start, "pid": os.getpid(), "time": time.time(), "argv": sys.argv[1:]}) + "\n")
    (run_dir / FAILED).unlink(missing_ok=True)
    if "contract.fail_rho" in args and abs(rho - float(args["contract.fail_rho"])) < 1e-9:
        atomic_write_json(run_dir / FAILED, {"status": "failed", "reason": "injected failure", "step": None})
        print("error: injected failure", file=sys.stderr)
        return 2
    t0 = time.time()
    for step in range(start + 1, steps + 1):
        time.sleep(step_s)
        if "contract.crash_rho" in args and abs(rho - float(args["contract.crash_rho"])) < 1e-9 and step == 2:
            raise RuntimeError("injected crash inside the training loop")
        if step % every == 0 and step < steps:
            ckpt.mkdir(exist_ok=True)
            atomic_write_json(latest, {"step": step, "tag": f"step_{step:08d}"})
    slots = args.get("sweep.slots")  # None (allocation sweeps) or the memory sweep's Engram rows
    val = contract_memory_loss(float(slots), seed) if slots is not None else contract_loss(rho, seed)
    val += float(args.get("contract.loss_offset", 0.0))  # e.g. a control arm's known effect (test_ablation.py)
    spent = float(args.get("sweep.budget", 6e9 * steps))  # an honest run spends its sweep's budget exactly
    atomic_write_json(run_dir / FINAL, {
        "status": "completed", "val_loss": val, "steps": steps, "tokens": steps * 1024, "train_flops": spent,
        "flops_per_token": spent / (steps * 1024), "total_params": 1000, "active_params": 100,
        "wall_time_s": time.time() - t0, "wandb_run_id": None})
    print(f"final validation loss {val:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

