"""The engine at two source trees, measured on one machine in one call: a change's effect without the spread
between machines.

Between device calls (other machines, other clocks) the end-to-end figures move by 5-10%, as much as most single
changes do. This runs one set of measurements in child processes, one per source tree (PYTHONPATH), alternating
baseline and current (`--rounds`), and prints each figure for both with their ratio. The figures: time to ready,
a 32K-token prefill (fresh prompts, the median of three), pure decode steps at B=1/4/64/200, 200 x (1,000 in,
100 out) and 256 x (256-1,024 in, 128 out), and the compilations after ready.

    git archive HEAD~3 src | tar -x -C /tmp/base                       # the baseline's sources
    python benchmarks/bench_ab.py --baseline /tmp/base/src             # GPU, V2-Lite shape: against ./src
    python benchmarks/bench_ab.py --baseline /tmp/base/src --smoke     # CPU, tiny model
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CURRENT_SRC = os.path.join(os.path.dirname(HERE), "src")
MARK = "AB-RESULT "


def measure(smoke: bool) -> dict:
    """One process's figures (this process imports whichever latentmoe its PYTHONPATH holds)."""
    import torch
    sys.path.insert(0, HERE)
    from bench_engine import engine_decode

    import latentmoe
    from latentmoe import build_model, get_config
    from latentmoe.bench import random_prompts, throughput
    from latentmoe.engine import LLM, SamplingParams

    want = os.environ.get("LATENTMOE_AB_SRC")
    if want and not os.path.abspath(latentmoe.__file__).startswith(os.path.join(want, "")):
        raise SystemExit(f"imported latentmoe from {latentmoe.__file__}, not from {want}")
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    cfg = get_config("deepseek-v2-lite") if not smoke else get_config("tiny", vocab_size=512)
    model = build_model(cfg, device=device, dtype=torch.bfloat16 if cuda else torch.float32, seed=0, std=0.02).eval()
    long_len, decodes = (32768, ((1, 1024), (4, 32768), (64, 1024), (200, 1024))) if not smoke else \
        (256, ((1, 64), (4, 128)))
    work = ((200, 1000, None, 100), (256, 1024, 256, 128)) if not smoke else ((8, 64, None, 8), (8, 64, 16, 8))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    res = {}
    t0 = time.perf_counter()
    llm = LLM(model, max_model_len=long_len + 232)
    res["time to ready, s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(7)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for _ in range(3):
        prompt = torch.randint(3, cfg.vocab_size, (long_len,), generator=g).tolist()
        sync()
        t = time.perf_counter()
        llm.generate([prompt], one)
        sync()
        times.append(time.perf_counter() - t)
    res[f"prefill of {long_len:,} tokens, s (median of 3)"] = statistics.median(times)
    for B, L in decodes:
        res[f"decode B={B} at {L:,}, ms/step"] = engine_decode(llm, B, L, 20 if not smoke else 3)[0] * 1e3
    for i, (n, hi, lo, out) in enumerate(work):
        prompts = random_prompts(n, hi, cfg.vocab_size, min_input_len=lo, seed=i + 1)
        run = throughput(llm, [prompts], out, progress=False)["runs"][0]
        res[f"{n} x ({f'{lo}-' if lo else ''}{hi} in, {out} out), s"] = run["seconds"]
    res["compilations after ready"] = llm.stats()["compilations_after_ready"]
    return res


def child_run(label: str, src: str, smoke: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p and os.path.abspath(p) != CURRENT_SRC]), LATENTMOE_AB_SRC=src)
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + (["--smoke"] if smoke else [])
    print(f"{label}: {src}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f"the {label} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", help="the baseline's source directory (holding the latentmoe package)")
    ap.add_argument("--current", default=CURRENT_SRC, help="the source directory measured against it (default: ./src)")
    ap.add_argument("--rounds", type=int, default=1, help="baseline-current pairs, alternating; medians are shown")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(MARK + json.dumps(measure(args.smoke)), flush=True)
        return
    if not args.baseline or not os.path.isdir(os.path.join(args.baseline, "latentmoe")):
        raise SystemExit("--baseline must name a source directory holding the latentmoe package "
                         "(e.g. git archive REV src | tar -x -C /tmp/base; then /tmp/base/src)")
    runs = {"baseline": [], "current": []}
    for _ in range(args.rounds):
        runs["baseline"].append(child_run("baseline", os.path.abspath(args.baseline), args.smoke))
        runs["current"].append(child_run("current", os.path.abspath(args.current), args.smoke))
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: {device}; "
             f"rounds: {args.rounds}; command: `python benchmarks/bench_ab.py {' '.join(sys.argv[1:])}`", "",
             "| figure | baseline | current | current / baseline |", "|---|---|---|---|"]
    for key in runs["baseline"][0]:
        b = statistics.median(r[key] for r in runs["baseline"])
        c = statistics.median(r[key] for r in runs["current"])
        ratio = f"{c / b:.2f}x" if b else "-"
        lines.append(f"| {key} | {b:,.3g} | {c:,.3g} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# A/B: the engine at two source trees, one machine\n\n" + text + "\n")


if __name__ == "__main__":
    main()
