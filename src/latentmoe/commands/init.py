"""`latentmoe init`: write a randomly initialised model of a preset or config to an HF-format directory."""

from __future__ import annotations

import json
import os


def register(sub) -> None:
    p = sub.add_parser("init", help="write a random model (preset or config.json) as an HF-format checkpoint",
                       description="Create a randomly initialised DeepSeek-V2-architecture model and save it "
                                   "(config.json + safetensors) so that load_model, generate and serve can use it.")
    p.add_argument("model", help="preset (deepseek-v2, deepseek-v2-lite, small, tiny) or a config.json path")
    p.add_argument("out", help="output directory")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (JSON value), e.g. --set num_hidden_layers=2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=None, help="init std (default: config initializer_range)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.set_defaults(func=run)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args) -> int:
    import torch

    from ..checkpoint import save_model
    from ..config import get_config
    from ..model import build_model

    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise ValueError(f"{args.out} is not empty (use --force to overwrite)")
    cfg = get_config(args.model, **_parse_overrides(args.set))
    total, active = cfg.num_parameters(), cfg.num_parameters(active=True)
    print(f"building {args.model}: {total / 1e6:,.1f}M parameters ({active / 1e6:,.1f}M active per token)")
    model = build_model(cfg, dtype=getattr(torch, args.dtype), seed=args.seed, std=args.std)
    save_model(model, args.out, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}")
    return 0
