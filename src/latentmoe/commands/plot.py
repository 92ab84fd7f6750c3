"""`latentmoe plot RUN`: loss curves and expert-load heatmaps of a training run, as PNGs."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="plot a training run's metrics (PNG files)")
    p.add_argument("run", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/plots)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.plot import plot_run

    for path in plot_run(args.run, args.out):
        print(path)
    return 0
