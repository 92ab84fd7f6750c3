"""`latentmoe ablate attention|balance --scale cpu|gpu --out DIR`: rerun one of the report's
comparisons at small scale (latentmoe.train.ablation) and write results.json, results.md and plots."""

from __future__ import annotations

import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="rerun the report's attention or load-balance comparison at small scale",
        description="Train every variant with the same data, tokens and recipe over several seeds; writes "
                    "results.json, results.md and plots (val_curves.png; cache_vs_loss.png for attention) in --out. "
                    "attention: MLA, MHA, GQA, MQA at matched total parameters. balance: no balance loss, expert "
                    "loss, all three losses, + device-limited routing, + token dropping.")
    p.add_argument("experiment", choices=["attention", "balance"])
    p.add_argument("--scale", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: about 12 minutes on 2 cores; gpu: about 7.5 minutes on one H200 (training time per comparison: 10 minutes on CPU, 6 on GPU, split over the runs) (default: cpu)")
    p.add_argument("--out", required=True, help="output directory (runs, data cache, results)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per run (default: the scale's, calibrated to its time on the first run)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (toy model and data)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default: torch's; 1 is faster where other work shares the cores)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if args.threads < 0:
        raise ValueError("--threads must be >= 0")
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not a directory")
    if args.scale == "gpu" and not args.tiny and args.device in ("auto", "cuda") and not _cuda():
        raise ValueError("--scale gpu needs a CUDA device (use --scale cpu here)")
    from ..train.ablation import EXPERIMENTS

    result = EXPERIMENTS[args.experiment](args.out, scale="tiny" if args.tiny else args.scale, seeds=args.seeds,
                                          steps=args.steps, device=args.device, threads=args.threads)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    print(f"results: {os.path.join(args.out, 'results.json')}  ({len(result['runs'])} runs)")
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
