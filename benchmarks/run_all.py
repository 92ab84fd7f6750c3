"""Run the GPU benchmarks and rebuild BENCHMARKS.md, the one-page summary of their latest results.

    python benchmarks/run_all.py                 # everything this machine can run (multi-GPU rows need >= 2 GPUs)
    python benchmarks/run_all.py --only engine   # one benchmark, then rebuild the page
    python benchmarks/run_all.py --assemble      # run nothing; rebuild BENCHMARKS.md from benchmarks/results/

Each benchmark writes its full tables, with date, device and command, to benchmarks/results/NAME.md. Before it
runs, the file it will replace is copied to benchmarks/results/history/NAME-DATE.md, so no measurement is lost.
BENCHMARKS.md is a header plus, for each benchmark, the summary block of its results file (benchmarks/report.py:
headline figures beside the reference measured in the same run) and a link to the full tables. bench_kernels.py
writes its blocks itself; for the others the block is written after reading the run, and a results file without
one shows on the page as such (never with an older run's figures).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys

from report import read_summary

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
HISTORY = os.path.join(RESULTS, "history")

# name (results/NAME.md), title on the page, arguments after `python` (run from the repository root)
BENCHMARKS = [
    ("e2e", "End to end: LLM(model) then generate (V2-Lite shape)",
     ["benchmarks/bench_e2e.py", "--cold"]),
    ("budget", "Token budget vs end-to-end throughput (V2-Lite shape): the default's measurement",
     ["benchmarks/bench_budget.py"]),
    ("serve", "The OpenAI server under load vs the offline engine (V2-Lite shape)",
     ["benchmarks/bench_serve.py"]),
    ("prefill", "Kernels: batched prefill attention vs torch SDPA",
     ["benchmarks/bench_prefill.py"]),
    ("engine", "Inference engine vs transformers (V2-Lite shape)",
     ["benchmarks/bench_engine.py", "--check", "--quick"]),
    ("decode_paths", "Batch-1/2 decode: the one-token launch savings, each on and off (V2-Lite shape)",
     ["benchmarks/bench_decode_paths.py"]),
    ("mla_vs_mha", "MLA vs per-head (MHA) cache in the same engine",
     ["benchmarks/bench_mla_vs_mha.py"]),
    ("kernels", "Kernels: MLA decode and fused MoE against the floor",
     ["benchmarks/bench_kernels.py"]),
    ("moe_prefill", "Kernels: fused-MoE prefill tiles",
     ["benchmarks/bench_kernels.py", "--moe-prefill", "--sweep"]),
    ("moe_backward", "Kernels: fused MoE forward + backward for training",
     ["benchmarks/bench_kernels.py", "--moe-backward", "--sweep"]),
    ("fp8_moe", "Kernels: FP8 fused MoE with fp8 activations vs bf16",
     ["benchmarks/bench_kernels.py", "--fp8-moe", "--sweep"]),
    ("few_token_fp8", "Kernels: batch-1/2 decode's FP8 routed experts, early launch on and off",
     ["benchmarks/bench_kernels.py", "--few-token-fp8"]),
    ("fp8", "FP8 weights and FP8 latent cache vs bf16 (V2-Lite shape)",
     ["benchmarks/bench_fp8.py"]),
    ("e2e_fp8", "End to end with FP8 weights: LLM(model, quantization=\"fp8\") then generate (V2-Lite shape)",
     ["benchmarks/bench_e2e.py", "--cold", "--quantization", "fp8", "--skip", "hf,checks"]),
    ("train", "Training throughput vs transformers (`small` preset)",
     ["benchmarks/bench_train.py"]),
    ("v2_projection", "DeepSeek-V2 at N=8: one rank's share on one GPU, projected node decode",
     ["benchmarks/bench_v2_projection.py"]),
    ("parallel", "Multi-GPU: expert-parallel training and serving",
     ["benchmarks/bench_parallel.py", "--gpus", "2"]),
    ("parallel_lite", "Multi-GPU: expert-parallel training, V2-Lite shape (4 layers)",
     ["benchmarks/bench_parallel.py", "--gpus", "2", "--skip-serve", "--steps", "10", "--batch", "4", "--micro", "2",
      "--train-timeout", "180", "--train-args", "--model.preset deepseek-v2-lite --model.overrides.num_hidden_layers 4 "
      "--model.overrides.max_position_embeddings 4096"]),
]

HEADER = """# Benchmarks

Measured on GPU machines (one H100 80GB or one H200, 2 x H200 for the multi-GPU rows; each section names its
device); every ratio is against a reference measured in the same run on the same device (transformers, plain
PyTorch, or the copy bandwidth and matmul rate that set the floor, benchmarks/floors.py). Random weights
throughout: speed does not depend on the values. This page holds each benchmark's latest headline figures; the
full tables, the notes on what limits each figure and the earlier runs are in
[benchmarks/results/](benchmarks/results/). `python benchmarks/run_all.py` reruns and rebuilds it.
"""


def results_path(name: str) -> str:
    return os.path.join(RESULTS, f"{name}.md")


def run_date(path: str) -> str:
    """The date and time of the run a results file records (from its text; else the file's modification time)."""
    with open(path) as f:
        m = re.search(r"(\d{4}-\d{2}-\d{2})(?:[ T](\d{2}):(\d{2}))?", f.read())
    if m:
        return m.group(1) + (f"-{m.group(2)}{m.group(3)}" if m.group(2) else "")
    return datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime("%Y-%m-%d-%H%M")


# Files a benchmark writes beside its results file, archived with it.
COMPANIONS = {"engine": ["engine_profile.txt"]}


def archive(name: str) -> None:
    """Copy the current results into history/ before a rerun replaces them (a failed run leaves them in place)."""
    path = results_path(name)
    if not os.path.exists(path):
        return
    os.makedirs(HISTORY, exist_ok=True)
    date = run_date(path)
    shutil.copyfile(path, os.path.join(HISTORY, f"{name}-{date}.md"))
    for companion in COMPANIONS.get(name, []):
        if os.path.exists(os.path.join(RESULTS, companion)):
            stem, ext = os.path.splitext(companion)
            shutil.copyfile(os.path.join(RESULTS, companion), os.path.join(HISTORY, f"{stem}-{date}{ext}"))


def section(name: str, title: str, args: list[str]) -> str:
    link = f"benchmarks/results/{name}.md"
    path = results_path(name)
    if not os.path.exists(path):
        return f"## {title}\n\nNot measured yet: `python {' '.join(args)}`.\n"
    with open(path) as f:
        summary = read_summary(f.read())
    if summary is None:
        print(f"[note] {link} has no summary block (see benchmarks/report.py); the page links it without figures")
        summary = f"Run of {run_date(path)}: its headline figures are not summarised yet."
    return f"## {title} ([full tables]({link}))\n\n{summary}\n"


def assemble() -> str:
    return "\n".join([HEADER] + [section(*b) for b in BENCHMARKS])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=None, choices=[b[0] for b in BENCHMARKS])
    ap.add_argument("--assemble", action="store_true", help="run nothing; rebuild BENCHMARKS.md")
    args = ap.parse_args()
    if not args.assemble:
        import torch
        gpus = torch.cuda.device_count()
        if gpus == 0:
            sys.exit("no CUDA device: these benchmarks run on a GPU machine (use --assemble here)")
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for name, _, cmd in BENCHMARKS:
            if args.only and name not in args.only:
                continue
            if name.startswith("parallel") and gpus < 2:
                print(f"[skip] {name}: needs 2 GPUs, {gpus} here", flush=True)
                continue
            archive(name)
            full = [sys.executable, *cmd, "--out", os.path.relpath(results_path(name), ROOT)]
            print(f"[run] {' '.join(full)}", flush=True)
            subprocess.run(full, cwd=ROOT, env=env, check=False)
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write(assemble())
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
