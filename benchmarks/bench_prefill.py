"""Batched prefill attention (kernels.prefill_attention) at V2-Lite's heads, beside torch SDPA in the same run.

Cases: one causal prompt of L tokens, a 16K chunk over a long cached prefix (what chunked prefill of a
128K prompt runs last), and the steps of many prompts the engine forms at a 16,384-token budget (16
prompts of 1,000 tokens; 25 of 256-1,024). Timed (median of 5): the engine's entry (kernels.prefill_attention:
cuDNN's fused attention for the long one-chunk steps on sm90+, the Triton kernel for the steps of many
prompts), the Triton kernel at its default tiles (and, with --sweep, every tile configuration); the reference
is torch's scaled_dot_product_attention (its fastest backend for these shapes) on the same q/k/v with k_pe
repeated per head, one call per prompt; the floor is the causal attention FLOPs at the FLOP/s of a large GEMM
measured in the same run (floors.measured). Last, the first call of one-chunk lengths the process has not run
against their repeats, through the engine's entry (padded to the ladder of lengths start-up runs) and through
cuDNN unpadded.

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
from floors import measured   # noqa: E402
from report import summary_block   # noqa: E402

from latentmoe import kernels   # noqa: E402

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


def case(chunks, dev, dtype):
    """One step of prompt chunks [(cached prefix, new tokens), ...]: the batched kernel's inputs (each chunk's
    keys are its prefix then itself), and per chunk SDPA's (q with q_pe, keys with k_pe per head, heads first;
    a mask where a prefix makes the causal diagonal start off the corner)."""
    T = sum(q for _, q in chunks)
    S = sum(p + q for p, q in chunks)
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=g)   # noqa: E731
    q, qpe, k, kpe, v = r(T, H, N), r(T, H, R), r(S, H, N), r(S, R), r(S, H, V)
    starts_q = [0, *itertools.accumulate(q for _, q in chunks)]
    starts_k = [0, *itertools.accumulate(p + q for p, q in chunks)]
    cu_q = torch.tensor(starts_q, dtype=torch.int32, device=dev)
    cu_k = torch.tensor(starts_k, dtype=torch.int32, device=dev)
    sdpa = []
    for i, (prefix, q_len) in enumerate(chunks):
        qs, ks = slice(starts_q[i], starts_q[i + 1]), slice(starts_k[i], starts_k[i + 1])
        qq = torch.cat([q[qs], qpe[qs]], -1).transpose(0, 1)[None]
        kk = torch.cat([k[ks], kpe[ks, None].expand(-1, H, -1)], -1).transpose(0, 1)[None]
        mask = None if prefix == 0 else torch.ones(q_len, prefix + q_len, dtype=torch.bool, device=dev).tril(prefix)
        sdpa.append((qq, kk, v[ks].transpose(0, 1)[None], mask))
    return q, qpe, k, kpe, v, cu_q, cu_k, sdpa


def first_use(out, summary, dev, dtype, lengths):
    """One-chunk prompts of lengths this process has not run: the first call against the best of three
    repeats. cuDNN's attention plans once per sequence length (torch keeps its plans by shape), so a length
    start-up did not run paid that on its first call while serving. The engine's entry pads the chunk to a
    ladder of lengths (kernels.prefill.cudnn_length) that start-up runs: here the ladder length runs once
    first, as start-up would, then the new length. Beside it, the same chunk through cuDNN unpadded (what
    the entry did before), and the largest difference between the two outputs."""
    cudnn = dev.type == "cuda" and kernels.prefill.cudnn_usable(dev, dtype)
    out("")
    out("First call of a one-chunk prompt length not run before in this process (no prefix): the engine's entry"
        " (kernels.prefill_attention, padded to its ladder length, which ran once before) and cuDNN unpadded:")
    out("")
    out("| tokens | padded to | entry first ms | entry repeat ms | unpadded first ms | unpadded repeat ms | "
        "max abs diff |")
    out("|---|---|---|---|---|---|---|")
    worst = []
    for length in lengths:
        padded = kernels.prefill.cudnn_length(length)
        q, qpe, k, kpe, v, _, _, _ = case([(0, length)], dev, dtype)

        def entry(tensors, n):
            cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
            return kernels.prefill_attention(*tensors, cu, cu, n, 0.1, max_k=n)
        entry(case([(0, padded)], dev, dtype)[:5], padded)      # the ladder length, as start-up runs it
        first, again = timed(lambda: entry((q, qpe, k, kpe, v), length), reps=1), \
            timed(lambda: entry((q, qpe, k, kpe, v), length), reps=3)
        got = entry((q, qpe, k, kpe, v), length)
        row = f"| {length:,} | {padded:,} | {first * 1e3:.1f} | {again * 1e3:.1f} |"
        if cudnn:
            def unpadded():
                qq = torch.cat([q, qpe], -1).transpose(0, 1)[None]
                kk = kernels.prefill.concat_heads(k, kpe).transpose(0, 1)[None]
                o = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    qq, kk, v.transpose(0, 1)[None], None, True, 0.0, True, False, scale=0.1)[0]
                return o[0].transpose(0, 1)
            u_first, u_again = timed(unpadded, reps=1), timed(unpadded, reps=3)
            diff = (got.float() - unpadded().float()).abs().max().item()
            row += f" {u_first * 1e3:.1f} | {u_again * 1e3:.1f} | {diff:.1e} |"
            worst.append((first / again, u_first / u_again))
        else:
            row += " - | - | - |"
        out(row)
    if worst:
        summary.append(f"| one-chunk prompt of a new length ({', '.join(f'{n:,}' for n in lengths)} tokens), first call "
                       f"against repeats | at most {max(w[0] for w in worst):.2f}x, padded to the ladder | "
                       f"unpadded at most {max(w[1] for w in worst):.2f}x | - |")


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
    floors = measured(dev)
    lens = torch.randint(256, 1025, (25,), generator=torch.Generator().manual_seed(0)).tolist()
    cases = ([[(0, 256)], [(256, 128)], [(0, 96)] * 3] if args.smoke else
             [[(0, 32768)], [(114688, 16384)], [(0, 1000)] * 16, [(0, n) for n in lens]])
    configs = [dict()] if not args.sweep else [
        dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
        for bm, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))
        if not (bm == 128 and bn == 128 and s == 3)]
    out("| case | config | ms | TFLOP/s | % of the floor |")
    out("|---|---|---|---|---|")
    for chunks in cases:
        q, qpe, k, kpe, v, cu_q, cu_k, sdpa = case(chunks, dev, dtype)
        max_q, max_k = max(q for _, q in chunks), max(p + q for p, q in chunks)
        # Causal inside each chunk, full over its prefix: (prefix + i + 1) keys for query i.
        flops = sum(2 * H * (N + R + V) * (q_len * prefix + q_len * (q_len + 1) / 2) for prefix, q_len in chunks)
        floor = flops / floors.flops
        prefix, q_len = chunks[0]
        sizes = sorted(q for _, q in chunks)
        if len(chunks) == 1:
            name = f"{q_len:,} queries over {prefix + q_len:,} keys"
        elif sizes[0] == sizes[-1]:
            name = f"{len(chunks)} prompts of {q_len:,} tokens"
        else:
            name = f"{len(chunks)} prompts of {sizes[0]:,}-{sizes[-1]:,} tokens"

        def reference():
            return [F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None, scale=0.1)
                    for qq, kk, vv, mask in sdpa]

        # The engine's entry against SDPA, prompt by prompt ([1, H, q, V] each -> [T, H, V]).
        expected = torch.cat([o[0].transpose(0, 1) for o in reference()])
        got = kernels.prefill_attention(q, qpe, k, kpe, v, cu_q, cu_k, max_q, 0.1, max_k=max_k)
        diff = f"max abs diff vs SDPA {(got.float() - expected.float()).abs().max().item():.1e}"
        t = timed(reference)
        ref_t, best = t, None
        out(f"| {name} | torch SDPA{'' if len(chunks) == 1 else ', one call a prompt'} | {t * 1e3:.1f} | "
            f"{flops / t / 1e12:.0f} | {floor / t:.0%} |")
        if dev.type != "cuda":
            t = timed(lambda: kernels.prefill_attention(q, qpe, k, kpe, v, cu_q, cu_k, max_q, 0.1))
            out(f"| {name} | dispatch (reference here; {diff}) | {t * 1e3:.1f} | - | - |")
            continue
        t = timed(lambda: kernels.prefill_attention(q, qpe, k, kpe, v, cu_q, cu_k, max_q, 0.1, max_k=max_k))
        route = "one long chunk: cuDNN" if len(chunks) == 1 and max_q >= kernels.prefill.CUDNN_MIN_CHUNK else "Triton"
        out(f"| {name} | kernels.prefill_attention ({route}; {diff}) | {t * 1e3:.1f} | {flops / t / 1e12:.0f} | "
            f"{floor / t:.0%} |")
        summary.append(f"| {name}, kernels.prefill_attention | {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s | "
                       f"torch SDPA {ref_t * 1e3:.1f} ms, {flops / ref_t / 1e12:.0f} TFLOP/s | {ref_t / t:.2f}x |")
        for cfg in configs:
            try:
                t = timed(lambda: kernels.prefill_attention_triton(q, qpe, k, kpe, v, cu_q, cu_k, max_q, 0.1, **cfg))
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
    first_use(out, summary, dev, dtype, (300, 301) if args.smoke else (5000, 9001, 20001, 40003))
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    prov = f"date: {date}; device: {device}; torch {torch.__version__}; command: `python {' '.join(sys.argv)}`"
    text = ["# Batched prefill attention vs torch SDPA (V2-Lite heads)", "", *summary_block(prov, summary), "",
            "Config: block_m, block_n, num_warps, num_stages of the Triton kernel. Floor: attention FLOPs at the GEMM "
            f"rate this device sustains ({floors.describe()}).", "", *lines, ""]
    with open(args.out, "w") as f:
        f.write("\n".join(text))


if __name__ == "__main__":
    main()
