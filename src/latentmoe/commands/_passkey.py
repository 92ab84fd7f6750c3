"""`latentmoe eval passkey MODEL`: passkey retrieval accuracy per (context length, depth) and a heatmap
(latentmoe.evaluation.passkey). Registered by the `eval` command as one of its subcommands."""

from __future__ import annotations

import os


def add_parser(eval_subparsers) -> None:
    p = eval_subparsers.add_parser(
        "passkey", help="needle in a haystack: retrieval accuracy per context length and depth",
        description="Hide a random number at depth d of L tokens of filler text and ask for it at the end; "
                    "a trial counts when greedy decoding gives the whole number. Writes passkey.json, "
                    "passkey.md and the heatmap passkey.png to --out.")
    p.add_argument("model", help="model directory (config.json, weights, tokenizer), e.g. runs/demo/model")
    p.add_argument("--lengths", default="1024,2048,4096,8192",
                   help="comma-separated context lengths in tokens (default 1024,2048,4096,8192)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated depths in [0, 1]")
    p.add_argument("--trials", type=int, default=5, help="random keys per (length, depth) (default 5)")
    p.add_argument("--digits", type=int, default=5, help="digits of the key (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: MODEL/../passkey)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on CUDA)")
    p.set_defaults(func=run)


def _numbers(text: str, kind, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def run(args) -> int:
    lengths = _numbers(args.lengths, int, "--lengths")
    depths = _numbers(args.depths, float, "--depths")
    if any(L < 64 for L in lengths):
        raise ValueError("--lengths must be >= 64 tokens")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError("--depths must lie in [0, 1]")
    if args.trials < 1 or not 1 <= args.digits <= 12:
        raise ValueError("--trials must be >= 1 and --digits in 1..12")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"no model at {args.model} (expected a directory with config.json)")
    if not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        raise FileNotFoundError(f"{args.model} has no tokenizer.json")

    import torch

    from ..checkpoint.hf import load_model
    from ..evaluation.passkey import evaluate_passkey, format_table, write_results
    from ..tokenizer import Tokenizer

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model = load_model(args.model, device=device, dtype=args.dtype)
    tokenizer = Tokenizer.from_dir(args.model)
    trials = evaluate_passkey(model, tokenizer, lengths, depths, args.trials, args.digits, args.seed, log=print)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.model)), "passkey")
    rs = model.config.rope_scaling
    meta = {"model": args.model, "max_position_embeddings": model.config.max_position_embeddings,
            "rope_scaling": rs, "attention_type": model.config.attention_type}
    write_results(out, trials, meta, title=f"passkey retrieval ({'YaRN x%g' % rs['factor'] if rs else 'no extension'})")
    print(format_table(trials))
    print(f"heatmap: {os.path.join(out, 'passkey.png')}")
    return 0
