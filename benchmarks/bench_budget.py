"""How the token budget (max_num_batched_tokens) moves end-to-end throughput: the measurement behind its default.

One engine (V2-Lite shape, random bf16 weights, `max_model_len` 131,136 as in bench_e2e.py) is started for the
largest budget, so every smaller one is inside its warm-up and no run pays a compilation; before each run the
scheduler's budget is set to the one measured. Rounds run the budgets in a shuffled order and every run gets
fresh prompts (no prefix-cache hits), so drift between runs of one machine spreads over all budgets alike.
Per budget: 200 x (1,000 in, 100 out) each round; 256 x (256-1,024 in, 128 out) and one 32K-token prompt every
other round. The table gives medians and each budget's time against the budget the engine picks by default
on this device (engine/config.py, default_budget).

    python benchmarks/bench_budget.py                          # GPU: writes benchmarks/results/budget.md
    python benchmarks/bench_budget.py --smoke --out /tmp/b.md  # CPU: tiny model, tiny workloads
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import summary_block   # noqa: E402

from latentmoe import build_model, get_config   # noqa: E402
from latentmoe.bench import random_prompts   # noqa: E402
from latentmoe.engine import LLM, SamplingParams   # noqa: E402
from latentmoe.engine.config import default_budget   # noqa: E402


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default=None, help="comma list (default 16384,65536,131072; smoke 32,64,128)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds over all budgets (default 6; smoke 2)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and workloads (CPU)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "budget.md"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budgets = [int(b) for b in (args.budgets or ("32,64,128" if args.smoke else "16384,65536,131072")).split(",")]
    rounds = args.rounds or (2 if args.smoke else 6)
    if args.smoke:
        preset, max_len, many, mixed, long_len = "tiny", 512, (8, 32, 8), (8, 16, 32, 8), 256
    else:
        preset, max_len, many, mixed, long_len = "deepseek-v2-lite", 131136, (200, 1000, 100), (256, 256, 1024, 128), 32768
    cfg = get_config(preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device=device, dtype=dtype, seed=0, std=0.02).eval()
    llm = LLM(model, max_model_len=max_len, max_num_batched_tokens=max(budgets))
    default = default_budget(device, dtype, cfg) if device.type == "cuda" else None
    seed = 1000

    def run(budget: int, prompts: list[list[int]], out_len: int) -> float:
        llm.scheduler.max_num_batched_tokens = budget
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    def fresh(n, hi, lo=None):
        nonlocal seed
        seed += 1
        return random_prompts(n, hi, cfg.vocab_size, min_input_len=lo, seed=seed)

    n, lin, lout = many
    n2, lo2, hi2, out2 = mixed
    run(budgets[-1], fresh(n, lin), lout)   # the engine's first run (bench_e2e.py measures it), not timed here
    times = {b: {"many": [], "mixed": [], "long": []} for b in budgets}
    rng = random.Random(0)
    for r in range(rounds):
        order = budgets[:]
        rng.shuffle(order)
        for b in order:
            times[b]["many"].append(run(b, fresh(n, lin), lout))
            if r % 2 == 0:
                times[b]["mixed"].append(run(b, fresh(n2, hi2, lo2), out2))
                times[b]["long"].append(run(b, fresh(1, long_len), 1))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{b}: {times[b]['many'][-1]:.3f} s" for b in budgets), flush=True)
    stats = llm.stats()
    ref = default if default in times else budgets[0]
    med = {b: {k: median(v) for k, v in t.items()} for b, t in times.items()}
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join(sys.argv)
    rows = [f"| budget {b:,} |"
            f" {med[b]['many']:.3f} s ({n / med[b]['many']:.1f} req/s) | {med[b]['many'] / med[ref]['many']:.3f}x |"
            f" {med[b]['mixed']:.3f} s | {med[b]['mixed'] / med[ref]['mixed']:.3f}x | {med[b]['long']:.3f} s |"
            for b in budgets]
    summary = [f"| {n} x ({lin:,} in, {lout} out), budget {b:,}, median of {rounds} | {n / med[b]['many']:.1f} req/s |"
               f" budget {ref:,}: {n / med[ref]['many']:.1f} req/s | {med[ref]['many'] / med[b]['many']:.2f}x |"
               for b in budgets if b != ref]
    lines = ["# Token budget vs end-to-end throughput", "",
             *summary_block(f"date: {date}; device: {dev}; torch {torch.__version__}; preset {preset}; default "
                            f"budget here {default if default is not None else '-'}; command: `{command}`", summary),
             "", f"One engine warmed up for {max(budgets):,} tokens, budgets interleaved in shuffled order over "
             f"{rounds} rounds, fresh prompts every run; times are medians (ratio: against budget {ref:,}).", "",
             f"| budget | {n} x ({lin:,} in, {lout} out) | vs {ref:,} | {n2} x ({lo2:,}-{hi2:,} in, {out2} out) | "
             f"vs {ref:,} | one {long_len:,}-token prompt |", "|---|---|---|---|---|---|", *rows, "",
             f"Compilations / graph captures after ready: {stats['compilations_after_ready']} / "
             f"{stats['graph_captures_after_ready']}.", "",
             "Every run: " + "; ".join(f"{b:,}: " + ", ".join(f"{t:.3f}" for t in times[b]['many']) for b in budgets)
             + " s.", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
