"""Batch-1/2 decode with each of the engine's one-token launch savings, and without it: what each is worth.

At batch 1 a decode step is a chain of ~400 small launches, so the engine saves launches where one token allows:
the router's GEMM and top-K (with the block's residual add and norm) in one launch (kernels.route_one_token),
W_UK's product in the MLA post-projection's launch (PagedAttention.absorb_rows), and the FP8 routed experts'
few-token kernels launched early (programmatic dependent launch, kernels/fp8_moe.py). This builds one engine
per variant in one process, over one model (bf16, then FP8 weights), with a path turned off by standing in for
its entry point while that engine is built, captured and measured, and times pure decode steps (graph replays,
bench_engine.engine_decode) at batch 1, 2 and 4 and 1K to 128K of context, against the variant with every path
off and the memory floor (bf16 rows).

    python benchmarks/bench_decode_paths.py            # GPU, V2-Lite shape (about 3 min on an H200)
    python benchmarks/bench_decode_paths.py --smoke    # CPU, tiny model
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import unittest.mock

import torch

from latentmoe import build_model, get_config, kernels
from latentmoe.engine import LLM
from latentmoe.engine import attention
from latentmoe.kernels import fp8_moe

from bench_engine import engine_decode, release_memory
from floors import decode_bytes, measured
from report import summary_block


def _off(name: str):
    """A context in which the named path does not apply (its entry point answers 'not here')."""
    if name == "router":
        return unittest.mock.patch.object(kernels, "route_one_token", lambda *a, **k: None)
    if name == "w_uk":
        return unittest.mock.patch.object(attention.PagedLatentAttention, "absorb_rows", lambda self, layer: 0)
    if name == "fp8 pdl":
        return unittest.mock.patch.object(fp8_moe, "pdl_launch", lambda t: {"PDL": False})
    raise ValueError(name)


PATHS = ("router", "w_uk", "fp8 pdl")
# (label, quantization, paths off); the first of each weight format is its reference.
VARIANTS = [("bf16, all paths off", None, PATHS), ("bf16, as built", None, ()),
            ("bf16, no router launch", None, ("router",)), ("bf16, no W_UK in post", None, ("w_uk",)),
            ("fp8, all paths off", "fp8", PATHS), ("fp8, as built", "fp8", ()),
            ("fp8, no few-token PDL", "fp8", ("fp8 pdl",)),
            ("fp8, no router launch", "fp8", ("router",)), ("fp8, no W_UK in post", "fp8", ("w_uk",))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "decode_paths.md"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        cfg = get_config("deepseek-v2-lite")
        points, max_len, cache_gb, steps = [(1, 1024), (2, 1024), (4, 1024), (1, 32768), (1, 131072), (4, 32768)], \
            131072 + 256, 6.0, args.steps
    else:
        cfg = get_config("tiny", vocab_size=512, topk_method="greedy", n_group=1, topk_group=1)
        points, max_len, cache_gb, steps = [(1, 64), (2, 64)], 256, 0.05, 3
    floors = measured(dev)
    model = build_model(cfg, device=dev, dtype=torch.bfloat16 if cuda else torch.float32, seed=0, std=0.02).eval()
    rows = {}
    for label, quant, off in VARIANTS:
        with contextlib.ExitStack() as stack:
            for p in off:
                stack.enter_context(_off(p))
            llm = LLM(model, quantization=quant, max_model_len=max_len, cache_memory_gb=cache_gb)
            rows[label] = [engine_decode(llm, B, L, steps)[0] for B, L in points]
            assert llm.stats()["compilations_after_ready"] == 0
        print(f"{label}: " + ", ".join(f"{t * 1e3:.3f}" for t in rows[label]) + " ms/step", flush=True)
        del llm
        release_memory(dev)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    provenance = (f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: {device}; "
                  f"torch {torch.__version__}; command: `python benchmarks/bench_decode_paths.py "
                  f"{' '.join(sys.argv[1:])}`".rstrip())
    B1, L1 = points[0]
    summary = []
    for fmt in ("bf16", "fp8"):
        t, r = rows[f"{fmt}, as built"][0], rows[f"{fmt}, all paths off"][0]
        summary.append(f"| decode B={B1} at {L1:,}, {fmt} as built | {t * 1e3:.3f} ms/step | every path off "
                       f"{r * 1e3:.3f} ms | {r / t:.2f}x |")
    t, r = rows["fp8, as built"][0], rows["bf16, as built"][0]
    summary.append(f"| decode B={B1} at {L1:,}, fp8 against bf16, both as built | {t * 1e3:.3f} ms/step | bf16 "
                   f"{r * 1e3:.3f} ms | {r / t:.2f}x |")
    floor = decode_bytes(cfg, B1, L1) / floors.bandwidth
    t = rows["bf16, as built"][0]
    summary.append(f"| decode B={B1} at {L1:,}, bf16 as built against the floor | {t * 1e3:.3f} ms/step | floor "
                   f"{floor * 1e3:.3f} ms | {floor / t:.0%} |")
    head = "| variant | " + " | ".join(f"B={B} at {L:,}" for B, L in points) + " |"
    lines = [*summary_block(provenance, summary), "",
             "ms per decode step (graph replay of a whole engine step); in brackets the speed-up over the same "
             "weights with every path off; floor: the bytes a step reads at the measured copy bandwidth.", "",
             head, "|---|" + "---|" * len(points)]
    lines.append("| floor, bf16 | " + " | ".join(f"{decode_bytes(cfg, B, L) / floors.bandwidth * 1e3:.3f}"
                                                 for B, L in points) + " |")
    for label, quant, _ in VARIANTS:
        ref = rows["fp8, all paths off" if quant else "bf16, all paths off"]
        lines.append(f"| {label} | " + " | ".join(f"{t * 1e3:.3f} ({r / t:.3f}x)" for t, r in zip(rows[label], ref))
                     + " |")
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write("# Batch-1/2 decode: the one-token launch savings, each on and off\n\n" + text + "\n")


if __name__ == "__main__":
    main()
