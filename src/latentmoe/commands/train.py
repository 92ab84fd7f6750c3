"""`latentmoe train --config FILE.toml [--section.key value ...] [--resume | --verify]`."""

from __future__ import annotations

import os

from ._overrides import accept_overrides


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a DeepSeek-V2 model with the report's recipe",
        description="Train from a TOML config (a path or a built-in name: demo, tiny, small). Any config key "
                    "can be overridden as --section.key value, e.g. --train.max_steps 200 --optim.lr 1e-3.")
    p.add_argument("--config", default=None, help="TOML file or built-in config name (default: demo)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in run_dir from its newest whole checkpoint (exactly; a damaged newer "
                        "one is skipped with a warning)")
    p.add_argument("--verify", action="store_true",
                   help="check every checkpoint of the run in run_dir against its manifest (sizes, SHA-256) and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run_dir that already holds a run (its checkpoints, metrics and model are "
                        "deleted); without it, train refuses (same as --checkpoint.overwrite true)")
    accept_overrides(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train import TrainingDiverged, load_config, train

    overrides = list(getattr(args, "overrides", []) or [])
    config = args.config
    if config is None:
        # `--resume --run_dir X` without --config continues with the run's own resolved config.
        run_dir = _override_value(overrides, "run_dir")
        saved = os.path.join(run_dir, "config.toml") if run_dir else None
        config = saved if args.resume and saved and os.path.exists(saved) else "demo"
    if args.overwrite:
        if args.resume:
            raise ValueError("--overwrite starts the run over; --resume continues it: give one of them")
        overrides += ["--checkpoint.overwrite", "true"]
    cfg = load_config(config, overrides)
    if args.verify:
        return _verify(cfg.run_dir)
    try:
        run = train(cfg, resume=args.resume)
    except TrainingDiverged as e:
        print(f"latentmoe train: stopped: {e}")
        return 1
    if run.plan.is_main:  # under torchrun, rank 0 speaks for all
        print(f"model: {os.path.join(cfg.run_dir, 'model')}  (latentmoe chat {os.path.join(cfg.run_dir, 'model')})")
    return 0


def _verify(run_dir: str) -> int:
    from ..checkpoint.commit import checkpoint_dirs
    from ..checkpoint.integrity import verify

    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    bad = 0
    for path in ckpts:
        problems = verify(path)
        bad += bool(problems)
        print(f"{path}: " + ("ok" if not problems else "DAMAGED"))
        for p in problems:
            print(f"  {p}")
    return 1 if bad else 0


def _override_value(overrides: list[str], key: str) -> str | None:
    for i, item in enumerate(overrides):
        if item in (f"--{key}", f"--{key.replace('_', '-')}") and i + 1 < len(overrides):
            return overrides[i + 1]
        if item.startswith(f"--{key}="):
            return item.split("=", 1)[1]
    return None
