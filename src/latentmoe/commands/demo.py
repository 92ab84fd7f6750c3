"""`latentmoe demo`: train a tiny DeepSeek-V2 in about three minutes on CPU, sample from it, show the balance."""

from __future__ import annotations

from ._overrides import accept_overrides


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="train a tiny DeepSeek-V2 on built-in text (~3 min on CPU), then sample from it",
        description="Trains the built-in `demo` config into runs/demo, generates samples with the inference "
                    "engine, prints the KV-cache report and the expert-load balance, writes plots. Config keys "
                    "can be overridden as --section.key value (e.g. --data.corpus shakespeare).")
    accept_overrides(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.demo import run_demo

    return run_demo(args.overrides)
