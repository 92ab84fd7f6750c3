"""Batched prefill attention (kernels.prefill_attention) at V2-Lite's heads, beside torch SDPA in the same run.

Cases: one causal prompt of L tokens, and a 16K chunk over a long cached prefix (what chunked prefill of a
128K prompt runs last). Timed (median of 5): the engine's entry (kernels.prefill_attention: cuDNN's fused
attention for these one-chunk steps on sm90+), the Triton kernel at its default tiles (and, with --sweep,
every tile configuration); the reference is torch's scaled_dot_product_attention (its fastest backend for these shapes) on the same
q/k/v with k_pe repeated per head; the floor is the causal attention FLOPs at PEAK_FLOPS.

    python benchmarks/bench_prefill.py [--sweep]                 # GPU: writes benchmarks/results/prefill.md
    python benchmarks/bench_prefill.py --smoke --out /tmp/p.md   # CPU: tiny shapes, the reference only
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import summary_block   # noqa: E402

from latentmoe import kernels   # noqa: E402

PEAK_FLOPS = 790e12
H, N, R, V = 16, 128, 64, 128


def timed(fn, reps=5):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def case(prefix, q_len, dev, dtype):
    S = prefix + q_len
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g)   # noqa: E731
    q, qpe, k, kpe, v = r(q_len, H, N), r(q_len, H, R), r(S, H, N), r(S, R), r(S, H, V)
    cu_q = torch.tensor([0, q_len], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, S], dtype=torch.int32, device=dev)
    return q, qpe, k, kpe, v, cu_q, cu_k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time every Triton tile configuration")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "prefill.md"))
    args = ap.parse_args()
    lines, summary = [], []

    def out(line):
        print(line, flush=True)
        lines.append(line)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cases = [(0, 256), (256, 128)] if args.smoke else [(0, 32768), (114688, 16384)]
    configs = [dict()] if not args.sweep else [
        dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
        for bm, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))
        if not (bm == 128 and bn == 128 and s == 3)]
    out("| case | config | ms | TFLOP/s | % of the floor |")
    out("|---|---|---|---|---|")
    for prefix, q_len in cases:
        q, qpe, k, kpe, v, cu_q, cu_k = case(prefix, q_len, dev, dtype)
        S = prefix + q_len
        # Causal inside the chunk, full over the prefix: (prefix + i + 1) keys for query i.
        flops = 2 * H * (N + R + V) * (q_len * prefix + q_len * (q_len + 1) / 2)
        floor = flops / PEAK_FLOPS
        name = f"{q_len:,} queries over {S:,} keys"
        qq = torch.cat([q, qpe], -1).transpose(0, 1)[None]
        kk = torch.cat([k, kpe[:, None].expand(-1, H, -1)], -1).transpose(0, 1)[None]
        vv = v.transpose(0, 1)[None]
        mask = None if prefix == 0 else torch.ones(q_len, S, dtype=torch.bool, device=dev).tril(prefix)
        t = timed(lambda: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None))
        ref_t, best = t, None
        out(f"| {name} | torch SDPA | {t * 1e3:.1f} | {flops / t / 1e12:.0f} | {floor / t:.0%} |")
        if dev.type != "cuda":
            t = timed(lambda: kernels.prefill_attention(q, qpe, k, kpe, v, cu_q, cu_k, q_len, 0.1))
            out(f"| {name} | dispatch (reference here) | {t * 1e3:.1f} | - | - |")
            continue
        t = timed(lambda: kernels.prefill_attention(q, qpe, k, kpe, v, cu_q, cu_k, q_len, 0.1, max_k=S))
        out(f"| {name} | kernels.prefill_attention (one chunk: cuDNN) | {t * 1e3:.1f} | {flops / t / 1e12:.0f} | "
            f"{floor / t:.0%} |")
        summary.append(f"| {name}, kernels.prefill_attention | {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s | "
                       f"torch SDPA {ref_t * 1e3:.1f} ms, {flops / ref_t / 1e12:.0f} TFLOP/s | {ref_t / t:.2f}x |")
        for cfg in configs:
            try:
                t = timed(lambda: kernels.prefill_attention_triton(q, qpe, k, kpe, v, cu_q, cu_k, q_len, 0.1, **cfg))
            except Exception as e:   # e.g. out of shared memory for the largest tiles
                out(f"| {name} | {cfg} | failed: {type(e).__name__} | - | - |")
                continue
            label = ",".join(f"{v}" for v in cfg.values()) or "default"
            if best is None or t < best[0]:
                best = (t, label)
            out(f"| {name} | {label} | {t * 1e3:.1f} | {flops / t / 1e12:.0f} | {floor / t:.0%} |")
        if best is not None:
            summary.append(f"| {name}, Triton kernel, best tiles ({best[1]}) | {best[0] * 1e3:.1f} ms, {flops / best[0] / 1e12:.0f} TFLOP/s "
                           f"| torch SDPA {ref_t * 1e3:.1f} ms, {flops / ref_t / 1e12:.0f} TFLOP/s | "
                           f"{ref_t / best[0]:.2f}x |")
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    prov = f"date: {date}; device: {device}; torch {torch.__version__}; command: `python {' '.join(sys.argv)}`"
    text = ["# Batched prefill attention vs torch SDPA (V2-Lite heads)", "", *summary_block(prov, summary), "",
            "Config: block_m, block_n, num_warps, num_stages of the Triton kernel. Floor: attention FLOPs at 790 TFLOP/s.", "", *lines, ""]
    with open(args.out, "w") as f:
        f.write("\n".join(text))


if __name__ == "__main__":
    main()
