"""Train one Hydra-configured model with a DeepSpeed engine.

    python train/main.py +experiment=engram_25pct
    torchrun --nproc_per_node=2 train/main.py train.zero_stage=2
    deepspeed --no_local_rank --num_gpus=8 train/main.py +experiment=...

Every rank agrees on ``run_dir`` (from the config, never the clock) and writes its own
``rank<N>.log`` there. Bad input stops with a one-line ``error:`` before any compute.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python train/main.py` from a checkout without installing
    sys.path.insert(0, str(REPO))
CONF = REPO / "conf"


def _check_group_choices(argv: list[str]) -> None:
    """Fail fast, in one line, on a config group option that does not exist (Hydra's own message
    is a multi-line dump, and under torchrun it repeats per rank)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or "." in key or not (CONF / key).is_dir() or value in ("null", ""):
            continue
        if not (CONF / key / f"{value}.yaml").exists():
            options = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
            raise SystemExit(f"error: unknown {key} '{value}' (available: {', '.join(options)})")


def _fail(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {msg}", file=sys.stderr)


def _record_failure(cfg, status: str, reason: str) -> None:
    """Leave the reason in run_dir/failed.json (rank 0) so a sweep can report it."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from train.run_files import FAILED, FINAL, atomic_write_json

    run_dir = Path(cfg.run_dir)
    if (run_dir / FINAL).exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / FAILED, {"status": status, "reason": reason, "step": None})


def main() -> int:
    _check_group_choices(sys.argv[1:])
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    import hydra
    from omegaconf import DictConfig

    exit_code = {"code": 0}

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
    def _run(cfg: DictConfig) -> None:
        from data_prep.reader import DataError
        from train.checkpoint import CheckpointError
        from train.distributed import setup, teardown
        from train.trainer import Diverged, train

        dist = setup()
        try:
            exit_code["code"] = train(cfg, dist)
        except (DataError, CheckpointError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            _record_failure(cfg, "failed", msg)
            _fail(msg)
            exit_code["code"] = 2
        except Diverged as e:  # the trainer has recorded it in failed.json
            _fail(f"run diverged: {e}")
            exit_code["code"] = 3
        except BaseException as e:
            _record_failure(cfg, "failed", f"{type(e).__name__}: {e}")
            teardown(clean=False)  # peers may be stuck in a collective: no barrier
            raise
        teardown()

    _run()
    return exit_code["code"]


if __name__ == "__main__":
    sys.exit(main())
