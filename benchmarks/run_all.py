"""Regenerate BENCHMARKS.md on a GPU machine: run every benchmark, then assemble their result files.

    python benchmarks/run_all.py                 # everything this machine can run (multi-GPU rows need >= 2 GPUs)
    python benchmarks/run_all.py --only engine   # one benchmark, then reassemble
    python benchmarks/run_all.py --assemble      # only rebuild BENCHMARKS.md from benchmarks/results/*.md

Each benchmark writes its own table (with date, device and command) under benchmarks/results/;
BENCHMARKS.md is those tables in a fixed order under one header, so a partial rerun keeps the rest.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# name, title, result file, command (run from the repository root)
BENCHMARKS = [
    ("kernels", "Kernels: MLA decode, latent-cache write, fused MoE", "kernels.md",
     [sys.executable, "benchmarks/bench_kernels.py", "--out", "benchmarks/results/kernels.md"]),
    ("moe_backward", "Kernels: fused MoE forward + backward for training", "moe_backward.md",
     [sys.executable, "benchmarks/bench_kernels.py", "--moe-backward", "--sweep", "--out",
      "benchmarks/results/moe_backward.md"]),
    ("engine", "Inference engine vs transformers (V2-Lite shape)", "engine.md",
     [sys.executable, "benchmarks/bench_engine.py", "--check", "--quick", "--out", "benchmarks/results/engine.md"]),
    ("mla_vs_mha", "MLA vs MHA cache in the same engine", "mla_vs_mha.md",
     [sys.executable, "benchmarks/bench_mla_vs_mha.py", "--out", "benchmarks/results/mla_vs_mha.md"]),
    ("train", "Training throughput vs transformers (`small` preset)", "train.md",
     [sys.executable, "benchmarks/bench_train.py", "--out", "benchmarks/results/train.md"]),
    ("parallel", "Multi-GPU: expert-parallel training and serving", "parallel.md",
     [sys.executable, "benchmarks/bench_parallel.py", "--gpus", "2", "--out", "benchmarks/results/parallel.md"]),
    ("parallel_lite", "Multi-GPU: expert-parallel training, V2-Lite shape (4 layers)", "parallel_lite.md",
     [sys.executable, "benchmarks/bench_parallel.py", "--gpus", "2", "--skip-serve", "--steps", "10", "--batch", "4",
      "--micro", "2", "--train-timeout", "180", "--train-args",
      "--model.preset deepseek-v2-lite --model.overrides.num_hidden_layers 4 "
      "--model.overrides.max_position_embeddings 4096", "--out", "benchmarks/results/parallel_lite.md"]),
]

HEADER = """# Benchmarks

Every figure here was measured on a GPU machine (one H100 80GB, or 2 x H200 for the
multi-GPU rows), with the reference (transformers, plain PyTorch, the copy bandwidth and matmul rate
that bound the floor) measured in the same run. Each section names its date, device and command;
`python benchmarks/run_all.py` regenerates all of it (see its docstring). Random weights throughout:
speed does not depend on the values, and no checkpoint can be downloaded where these ran.
"""


def assemble(summary: str | None = None) -> str:
    parts = [HEADER]
    if summary:
        parts.append(summary)
    for name, title, fname, cmd in BENCHMARKS:
        path = os.path.join(RESULTS, fname)
        if not os.path.exists(path):
            parts.append(f"## {title}\n\nNot measured yet: `{' '.join(cmd[1:])}`.\n")
            continue
        with open(path) as f:
            body = f.read().strip()
        # Demote the file's own top-level heading so the sections nest under this page.
        lines = [("#" + line if line.startswith("#") else line) for line in body.splitlines()]
        if not lines or not lines[0].startswith("## "):
            lines.insert(0, f"## {title}\n")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=None, choices=[b[0] for b in BENCHMARKS])
    ap.add_argument("--assemble", action="store_true", help="do not run anything; rebuild BENCHMARKS.md")
    ap.add_argument("--summary", default=os.path.join(RESULTS, "summary.md"),
                    help="a hand-written summary placed before the tables (kept if present)")
    args = ap.parse_args()
    if not args.assemble:
        import torch
        gpus = torch.cuda.device_count()
        if gpus == 0:
            sys.exit("no CUDA device: these benchmarks run on the GPU machine (use --assemble here)")
        for name, _, _, cmd in BENCHMARKS:
            if args.only and name not in args.only:
                continue
            if name.startswith("parallel") and gpus < 2:
                print(f"[skip] {name}: needs 2 GPUs, {gpus} here", flush=True)
                continue
            print(f"[run] {' '.join(cmd)}", flush=True)
            env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
            subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    summary = None
    if args.summary and os.path.exists(args.summary):
        with open(args.summary) as f:
            summary = f.read().strip() + "\n"
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write(assemble(summary))
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
