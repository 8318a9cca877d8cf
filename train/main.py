"""Train one Hydra-configured model with a DeepSpeed engine.

    python train/main.py +experiment=engram_25pct
    torchrun --nproc_per_node=2 train/main.py train.zero_stage=2
    deepspeed --no_local_rank --num_gpus=8 train/main.py +experiment=...
    python train/main.py --config-dir RUN_DIR --config-name config   # a planned run: its config.yaml, whole

Every rank agrees on ``run_dir`` (from the config, never the clock) and writes its own
``rank<N>.log`` there. Bad input stops with a one-line ``error:`` before any compute.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python train/main.py` from a checkout without installing
    sys.path.insert(0, str(REPO))
CONF = REPO / "conf"
STARTED = time.time()  # this attempt's start: a failed.json newer than this was written by a peer rank


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


RUN_NODE = "run_config"  # a planned run's config.yaml, as Hydra sees it (see _config_source)


def _config_source(argv: list[str]) -> tuple[Optional[Path], str, list[str]]:
    """(config dir, config name, the other arguments): conf/config.yaml, or the run config a planner wrote
    (``--config-dir RUN_DIR --config-name config``, rundir/config.py). A run config goes into Hydra's
    ConfigStore (dir None) rather than putting RUN_DIR on Hydra's search path: there Hydra would take the
    run's own ``hydra/config.yaml`` record for its ``hydra/config`` group on a relaunch."""
    where, rest, i = {}, [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in ("--config-dir", "--config-name"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            where[flag] = value
        else:
            rest.append(argv[i])
        i += 1
    if "--config-dir" not in where:
        return CONF, where.get("--config-name", "config"), rest
    path = Path(where["--config-dir"]).resolve() / f"{where.get('--config-name', 'config')}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: no run config {path} (--config-dir, --config-name)")
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=RUN_NODE, node=OmegaConf.to_container(OmegaConf.load(path)))
    return None, RUN_NODE, rest


def _compose_and_validate(config_dir: Optional[Path], config_name: str, argv: list[str]):
    """Compose the config as Hydra will and check it against rundir/schema.py, before torch is imported,
    so a typo'd key or a bad value costs a second, not a checkpoint (and fails in one line)."""
    if any(a.startswith("-") for a in argv):  # Hydra's own flags (--cfg, --multirun): leave it to Hydra
        return
    from hydra import compose, initialize, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rundir.schema import ConfigError, check

    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    init = (initialize(config_path=None, version_base="1.3") if config_dir is None
            else initialize_config_dir(config_dir=str(config_dir), version_base="1.3"))
    try:
        with init:
            try:
                cfg = compose(config_name, overrides=overrides)
            except AssertionError as e:  # OmegaConf asserts when an override reaches into a null section
                raise ConfigError(_null_section(compose, config_name, overrides) or f"overrides: {e}") from None
        check(cfg)
        return cfg
    except ConfigError as e:
        _fail(str(e))
        raise SystemExit(2) from None
    except (HydraException, OmegaConfBaseException) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        _fail("; ".join(lines[:2]) or type(e).__name__)
        raise SystemExit(2) from None


def _null_section(compose, config_name: str, overrides: list[str]) -> Optional[str]:
    """``model.moe is null in this config: +model.moe.top_k=2 has nothing to set ...`` for the first dotted
    override under a section the config (composed with the group choices alone) leaves null."""
    groups = [o for o in overrides if "." not in o.split("=", 1)[0]]
    base = compose(config_name, overrides=groups)
    for o in overrides:
        *parents, _ = o.split("=", 1)[0].lstrip("+~").split(".")
        node = base
        for i, part in enumerate(parents):
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                section = ".".join(parents[:i + 1])
                return (f"{section} is null in this config: {o} has nothing to set (pick a config where "
                        f"{section} is a section, e.g. a config group such as model=moe or memory=engram_tiny)")
    return None


def _wait_for_own_rank0(run_dir: Path, timeout_s: float = 300.0) -> None:
    """A peer rank writes nothing into run_dir (Hydra's yaml files, its rank log) until its own rank 0
    holds the lock, which rank 0 marks by writing this launch's id into the lock file. A launch refused
    because another trainer is live there thus touches nothing: its rank 0 exits and the launcher stops
    the peers while they wait here. Peers on other nodes (RANK != LOCAL_RANK) match the rendezvous only."""
    from rundir.locks import launch_id, lock_owner

    me = launch_id()
    same_node = os.environ.get("RANK") == os.environ.get("LOCAL_RANK", "0")
    deadline, launcher = time.time() + timeout_s, os.getppid()
    while time.time() < deadline and os.getppid() == launcher:  # a dead launcher: nobody to wait for
        owner = lock_owner(run_dir)
        if owner == me or (not same_node and owner.split(" launcher=")[0] == me.split(" launcher=")[0]):
            return
        time.sleep(0.1)
    if os.getppid() != launcher:
        raise SystemExit(2)  # the launcher is gone: nothing to say to anyone
    print(f"error: rank {os.environ.get('RANK')}: rank 0 of this launch did not take {run_dir}'s lock within "
          f"{timeout_s:.0f} s (is run_dir on storage every node shares?)", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _lock_run_dir(run_dir: Path) -> None:
    """Rank 0 takes run_dir/.run.lock before Hydra writes its logs there, and keeps it until it exits
    (the descriptor is passed on to the trainer in ISOFLOP_RUN_LOCK_FD); the other ranks wait until it
    holds it. A second launch into a live run stops here, every rank touching nothing in the directory;
    under torchrun or the DeepSpeed launcher, rank 0's exit makes the launcher stop the peers."""
    from rundir.locks import LOCK_FD_ENV, LOCK_NAME, launch_id, stamp_lock_owner, try_lock

    rank0 = int(os.environ.get("RANK", "0")) == 0
    if os.environ.get(LOCK_FD_ENV):  # a launcher (the sweep driver) holds the lock for this launch
        if rank0 and "RANK" in os.environ:
            stamp_lock_owner(run_dir, launch_id())  # for ranks on nodes the launcher's lock does not reach
        return
    if not rank0:
        return _wait_for_own_rank0(run_dir)
    fd = try_lock(run_dir, owner=launch_id())
    if fd is None:
        _fail(f"run_dir {run_dir} is in use by another live trainer ({run_dir / LOCK_NAME}); "
              f"wait for it, stop it, or use another run_dir")
        raise SystemExit(2)
    os.environ[LOCK_FD_ENV] = str(fd)


def _fail(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)


def _report_rank_failure(cfg, status: str, msg: str) -> None:
    """Any rank that fails says so on stderr and in run_dir/failed.json (rank 0's record wins), so a
    failure on one rank is never silent. Without FINAL: a finished run's record is not overwritten."""
    from rundir.files import FAILED, FINAL, atomic_write_json

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    who = f"rank {rank}: " if world > 1 else ""
    print(f"error: {who}{msg}", file=sys.stderr, flush=True)
    run_dir = Path(cfg.run_dir)
    failed = run_dir / FAILED
    if (run_dir / FINAL).exists() or (failed.exists() and failed.stat().st_mtime >= STARTED):
        return  # the first failure of this attempt is the cause; later ones (peers losing it) are echoes
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / FAILED, {"status": status, "reason": f"{who}{msg}", "step": None, "rank": rank})


def _exit_now(code: int) -> None:
    """Leave without a barrier or process-group teardown: peers may be blocked in a collective that will
    never complete. The launcher (torchrun, deepspeed) sees this rank exit and stops the others; ranks
    without such a launcher give up after train.dist_timeout_s."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> int:
    _check_group_choices(sys.argv[1:])
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    from rundir.schema import register

    register()
    config_dir, config_name, args = _config_source(sys.argv[1:])
    sys.argv[1:] = args  # Hydra gets the run config by name, never its directory on the search path
    cfg = _compose_and_validate(config_dir, config_name, args)  # every rank: all stop, rank 0 says why
    if cfg is not None:
        _lock_run_dir(Path(cfg.run_dir))
    import hydra
    from omegaconf import DictConfig

    exit_code = {"code": 0}

    @hydra.main(version_base="1.3", config_path=None if config_dir is None else str(config_dir),
                config_name=config_name)
    def _run(cfg: DictConfig) -> None:
        from data_prep.reader import DataError
        from train.checkpoint import CheckpointError
        from train.distributed import setup, teardown
        from train.trainer import Diverged, RunLocked, train

        from rundir.schema import ConfigError

        dist = setup(float(cfg.train.dist_timeout_s))
        try:
            exit_code["code"] = train(cfg, dist)
        except RunLocked as e:
            _fail(str(e))
            exit_code["code"] = 2
        except (ConfigError, DataError, CheckpointError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not dist.is_main:  # usually raised alike on every rank: then the launcher stops this
                time.sleep(2.0)  # one while it waits, once rank 0 exited, and only rank 0 speaks
            _report_rank_failure(cfg, "failed", msg)
            exit_code["code"] = 2
        except Diverged as e:  # every rank sees the same all-reduced loss; the trainer wrote failed.json
            _fail(f"run diverged: {e}")
            exit_code["code"] = 3
        except Exception as e:  # possibly this rank alone: report it here, do not wait for peers
            lines = str(e).splitlines()
            _report_rank_failure(cfg, "failed", f"{type(e).__name__}: {lines[0] if lines else ''}")
            logging.getLogger("train").exception("rank %d failed", dist.rank)  # the traceback, in rank<N>.log
            teardown(clean=False) if dist.world_size == 1 else _exit_now(1)
            exit_code["code"] = 1
            return
        if exit_code["code"] == 2 and dist.world_size > 1:
            _exit_now(2)
        teardown()

    _run()
    return exit_code["code"]


if __name__ == "__main__":
    sys.exit(main())
