"""Kernel benchmarks against the physical floor and the plain-PyTorch paths, measured in one run (CUDA).

Prints markdown tables: the roofline inputs (copy bandwidth, bf16 matmul rate), MLA decode, the
routed experts, and which SDPA kernel prefill attention gets at the 192/128 head dims. One table alone:
--moe-backward (routed experts forward + backward for training), --moe-prefill (the fused-MoE prefill
tile at V2 and V2-Lite shapes, 4K and 8K tokens), --fp8-moe (the FP8 fused MoE with fp8 activations at
V2-Lite's shape, 4K to 16K tokens, beside the bf16 fused MoE), --few-token-fp8 (one and two tokens' routed
experts over FP8 weights, V2-Lite shape, 26 layers in one CUDA graph, with and without early launch). --sweep
adds candidate tile configurations to each table and reports the best; the defaults in kernels/ were picked
this way.

    python benchmarks/bench_kernels.py [--moe-backward | --moe-prefill | --fp8-moe | --few-token-fp8] [--sweep]
                                       [--out FILE]

--out writes the tables with a summary block (report.py) that run_all.py puts on BENCHMARKS.md.
"""
import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from floors import fp8_gemm_flops, measured  # noqa: E402
from report import summary_block  # noqa: E402
from timing import median_seconds  # noqa: E402

from latentmoe.kernels import fused_moe_triton, mla_decode_einsum, mla_decode_triton
from latentmoe.kernels import choose_num_splits
from latentmoe.kernels.fp8 import quantize_fp8_blocks
from latentmoe.kernels.fp8_moe import W8A8_CONFIG, W8A8_PREFILL_CONFIG, choose_w8a8_config, fused_moe_fp8_w8a8_triton
from latentmoe.kernels.moe import PREFILL_CONFIG, choose_moe_config

C, R = 512, 64
ROW_BYTES = (C + R) * 2

# Prefill-sized tiles for the fused MoE (block_m, block_n1, block_n2, block_k, num_warps, num_stages): the
# candidates --sweep times against the default at 8K and 4K tokens.
PREFILL_TILES = [dict(block_m=bm, block_n1=n1, block_n2=n2, block_k=bk, num_warps=nw, num_stages=st)
                 for bm, n1, n2, bk, nw, st in [
                     (64, 128, 128, 64, 4, 3), (64, 128, 128, 64, 8, 3), (64, 64, 128, 64, 4, 4),
                     (128, 128, 256, 64, 8, 3), (128, 64, 128, 64, 8, 4), (64, 128, 256, 64, 8, 3),
                     (128, 128, 128, 64, 8, 4), (64, 256, 128, 64, 8, 3), (128, 128, 128, 32, 8, 5)]] + [
    # The default's merged gate_up dot and TMA boxes (kernels.moe.PREFILL_CONFIG) in other forms: pointer loads
    # (the default before the boxes), 3 gate_up stages, and 4 stages for both GEMMs.
    dict(PREFILL_CONFIG, tma=False, gate_up_stages=3), dict(PREFILL_CONFIG, gate_up_stages=3),
    dict(PREFILL_CONFIG, num_stages=4)]
# Configs of the FP8 fused MoE with fp8 activations (kernels.fp8_moe) that --fp8-moe --sweep times beside the
# default: either default tile, the gate_up GEMM's earlier pipeline depth, pointer loads instead of the down GEMM's TMA boxes,
# shallower pipelines, and the smaller row tile with either depth.
W8A8_TILES = [W8A8_PREFILL_CONFIG, dict(W8A8_PREFILL_CONFIG, gate_up_stages=3), dict(W8A8_PREFILL_CONFIG, tma=False),
              dict(W8A8_PREFILL_CONFIG, num_stages=2, gate_up_stages=2), W8A8_CONFIG,
              dict(W8A8_CONFIG, gate_up_stages=4), dict(W8A8_CONFIG, num_stages=3, gate_up_stages=3)]
# Rows of the main tables that also go on the summary: MLA (heads, batch, context), MoE (preset, tokens).
MLA_SUMMARY = [(16, 64, 4096), (16, 128, 4096), (128, 64, 4096)]
MOE_SUMMARY = [("deepseek-v2-lite", 256), ("deepseek-v2-lite", 8192), ("deepseek-v2-lite", 16384),
               ("deepseek-v2", 8192)]


def bench(fn, warmup=5, iters=30, graph=False):
    """Median milliseconds of fn(), optionally as replays of a captured CUDA graph."""
    return median_seconds(fn, iters=iters, warmup=warmup, graph=graph) * 1e3


def make_decode_inputs(B, H, L, page=64, dtype=torch.bfloat16):
    nbp = L // page
    kv_cache = torch.randn(B * nbp, page, C + R, device="cuda", dtype=dtype)
    block_table = torch.randperm(B * nbp, device="cuda", dtype=torch.int32).view(B, nbp).contiguous()
    seq_lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
    q_lat = torch.randn(B, H, C, device="cuda", dtype=dtype)
    q_pe = torch.randn(B, H, R, device="cuda", dtype=dtype)
    return q_lat, q_pe, kv_cache, block_table, seq_lens


def mla_rows(copy_gbs, tflops, sweep):
    rows, notes, summary = [], [], []
    shapes = [(16, 64, 4096), (16, 128, 4096), (16, 256, 1024), (16, 1, 4096), (128, 64, 4096), (128, 128, 4096)]
    for H, B, L in shapes:
        q_lat, q_pe, kv_cache, bt, lens = make_decode_inputs(B, H, L)
        scale = 0.1147
        cache_bytes = B * L * ROW_BYTES
        flops = 2 * B * H * L * (C + R + C)
        t_floor = max(cache_bytes / copy_gbs / 1e6, flops / tflops / 1e9)  # ms
        bound = "memory" if cache_bytes / copy_gbs / 1e6 >= flops / tflops / 1e9 else "compute"
        # The plain-PyTorch baseline reads a dense (unpaged) cache: the most favourable layout for it.
        dense = kv_cache[bt.long()].view(B, L, C + R)
        c_dense, pe_dense = dense[..., :C], dense[..., C:]
        ms_ref = bench(lambda: mla_decode_einsum(q_lat, q_pe, c_dense, pe_dense, scale), iters=10)
        del dense, c_dense, pe_dense
        configs = [dict()]
        if sweep and B in (64, 128):
            if H <= 16:
                # 3 and 4 stages double- and triple-buffer the latent tile (4: one program a multiprocessor);
                # fewer pieces at 4 stages fill one wave of one-program multiprocessors.
                configs += [dict(block_n=bn, num_stages=st, num_splits=ns, num_warps=nw)
                            for bn, st, ns, nw in [(32, 3, None, 4), (32, 4, None, 4), (32, 4, 2 * 64 // B, 4),
                                                   (16, 3, None, 4), (64, 3, 8 * 64 // B, 8), (32, 2, None, 4),
                                                   (64, 3, None, 8)]]
            else:
                configs += [dict(block_h=bh, block_n=bn, num_warps=nw, num_stages=st, num_splits=ns)
                            for bh, bn, nw, st, ns in [(64, 64, 8, 2, 2), (64, 64, 8, 2, 3), (64, 32, 8, 2, 1),
                                                       (64, 32, 8, 3, 2)]]
        best = None
        for cfg in configs:
            try:
                fn = lambda: mla_decode_triton(q_lat, q_pe, kv_cache, bt, lens, scale, **cfg)
                fn()
                ms = bench(fn, iters=20, graph=True)  # the engine replays decode steps as CUDA graphs
            except Exception as exc:  # a config the compiler cannot fit (shared memory) is skipped
                notes.append(f"H={H} B={B} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            if best is None or ms < best[1]:
                best = (cfg, ms)
            if cfg:
                notes.append(f"sweep H={H} B={B} L={L} {cfg}: {ms * 1e3:.1f} us = {cache_bytes / ms / 1e6:.0f} GB/s")
            else:
                ms_default = ms
                ms_eager = bench(fn, iters=20)
        splits = choose_num_splits(B, -(-H // (16 if H <= 16 else 64)), L, q_lat.device, 2 if H <= 16 else 1)
        pct = t_floor / ms_default * 100
        rows.append(f"| {H} | {B} | {L} | {bound} | {t_floor * 1e3:.1f} | {ms_ref * 1e3:.1f} | {ms_default * 1e3:.1f} "
                    f"| {ms_eager * 1e3:.1f} | {cache_bytes / ms_default / 1e6:.0f} | {pct:.0f}% | {ms_ref / ms_default:.1f}x "
                    f"| {splits} | {best[0] or 'default'}: {best[1] * 1e3:.1f} us ({t_floor / best[1] * 100:.0f}%) |")
        if (H, B, L) in MLA_SUMMARY:
            summary.append(f"| MLA decode, {H} heads, B={B}, L={L:,} | {ms_default * 1e3:.1f} us, {pct:.0f}% of the "
                           f"floor | plain-PyTorch einsum {ms_ref * 1e3:.1f} us | {ms_ref / ms_default:.1f}x |")
        del q_lat, q_pe, kv_cache, bt, lens
        torch.cuda.empty_cache()
    return rows, notes, summary


def random_experts(preset, dtype):
    """The model's routed experts of one layer at `preset`'s shapes, random weights of unit-variance outputs."""
    from latentmoe.config import get_config
    from latentmoe.model import Experts
    cfg = get_config(preset)
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    with torch.device("cuda"):
        experts = Experts(cfg).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=D**-0.5)
        experts.down_proj.normal_(std=I**-0.5)
    experts.impl = "grouped_mm"
    return cfg, experts


def moe_rows(copy_gbs, tflops, sweep):
    rows, notes, summary = [], [], []
    for preset, Ms in [("deepseek-v2-lite", (1, 16, 64, 256, 8192, 16384)), ("deepseek-v2", (64, 8192))]:
        cfg, experts = random_experts(preset, torch.bfloat16)
        E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        for M in Ms:
            x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
            scores = torch.randn(M, E, device="cuda").softmax(-1)
            w, idx = scores.topk(K, dim=-1)
            A = M * K
            touched = idx.unique().numel()
            weight_bytes = touched * 3 * D * I * 2
            flops = 6 * A * D * I
            t_floor = max(weight_bytes / copy_gbs / 1e6, flops / tflops / 1e9)
            with torch.no_grad():
                # Both paths as CUDA-graph replays at every size: kernel time without the host's launch
                # time (a dozen small routing-table ops that a lone eager call waits on; inside a model's
                # forward the host runs ahead of the GPU). Eager Triton is printed beside it.
                ms_gmm = bench(lambda: experts(x, idx, w), iters=20, graph=True)
                configs = [None]
                if sweep and M in (64, 8192) and preset == "deepseek-v2-lite":
                    base = choose_moe_config(A, E)
                    if M == 64:
                        configs += [dict(base, block_n1=n, block_n2=n, block_k=k, num_stages=s)
                                    for n, k, s in [(64, 128, 3), (32, 64, 4), (32, 256, 3)]]
                    else:
                        configs += PREFILL_TILES
                best = None
                for c in configs:
                    try:
                        fn = lambda: fused_moe_triton(x, experts.gate_up_proj, experts.down_proj, idx, w, c)
                        fn()
                        ms = bench(fn, iters=20, graph=True)
                    except Exception as exc:
                        notes.append(f"moe M={M} {c}: {type(exc).__name__}: {str(exc)[:120]}")
                        continue
                    if c is None:
                        ms_tri = ms
                        ms_tri_eager = bench(fn, iters=20)
                    else:
                        notes.append(f"sweep moe {preset} M={M} {c}: {ms * 1e3:.1f} us, {flops / ms / 1e9:.0f} TFLOP/s")
                    if best is None or ms < best[1]:
                        best = (c, ms)
            bound = "memory" if weight_bytes / copy_gbs / 1e6 >= flops / tflops / 1e9 else "compute"
            rows.append(f"| {preset} | {M} | {touched} | {bound} | {t_floor * 1e3:.1f} | {ms_gmm * 1e3:.1f} | {ms_tri * 1e3:.1f} "
                        f"| {ms_tri_eager * 1e3:.1f} "
                        f"| {t_floor / ms_tri * 100:.0f}% | {flops / ms_tri / 1e9:.0f} ({flops / ms_tri / 1e9 / tflops * 100:.0f}%) "
                        f"| {flops / ms_gmm / 1e9:.0f} | {ms_gmm / ms_tri:.2f}x | {'' if best[0] is None else best[0]} {best[1] * 1e3:.1f} |")
            if (preset, M) in MOE_SUMMARY:
                share = (f"{t_floor / ms_tri * 100:.0f}% of the floor" if bound == "memory" else
                         f"{flops / ms_tri / 1e9:.0f} TFLOP/s = {flops / ms_tri / 1e9 / tflops * 100:.0f}% of matmul")
                summary.append(f"| fused MoE, {preset}, {M:,} tokens | {ms_tri * 1e3:,.1f} us, {share} "
                               f"| torch._grouped_mm {ms_gmm * 1e3:,.1f} us | {ms_gmm / ms_tri:.2f}x |")
            del x
        del experts
        torch.cuda.empty_cache()
    return rows, notes, summary


def moe_backward_rows(tflops, sweep):
    """Training-sized routed experts, forward + backward: the model's Experts (torch._grouped_mm and
    torch's backward) against kernels.moe_autograd, fp32 master weights cast to bf16 as under autocast."""
    from latentmoe.kernels.moe_autograd import fused_moe_train
    rows, notes, summary = [], [], []
    for preset in ("small", "deepseek-v2-lite"):
        cfg, experts = random_experts(preset, torch.float32)
        E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        for M in (8192, 16384):
            x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w, idx = torch.randn(M, E, device="cuda").softmax(-1).topk(K, dim=-1)
            w.requires_grad_()
            dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
            params = [x, experts.gate_up_proj, experts.down_proj, w]
            flops_fwd = 6 * M * K * D * I  # two GEMMs (2I and I wide); the backward does twice this
            paths = {"grouped_mm": lambda: experts(x, idx, w),
                     "Triton": lambda: fused_moe_train(x, experts.gate_up_proj, experts.down_proj, idx, w)}
            if sweep:
                for br, bc in [(64, 64), (128, 64)]:
                    paths[f"Triton dW {br}x{bc}"] = lambda br=br, bc=bc: fused_moe_train(
                        x, experts.gate_up_proj, experts.down_proj, idx, w,
                        dict(choose_moe_config(M * K, E), block_r=br, block_c=bc))
            res, grads = {}, {}
            for name, fwd in paths.items():
                def step():
                    for p in params:
                        p.grad = None
                    fwd().backward(dy)
                try:
                    step()
                    grads[name] = [p.grad.float() for p in params]
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    ms_fb = bench(step, iters=10)
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                    with torch.no_grad():
                        ms_f = bench(fwd, iters=10)
                except Exception as exc:
                    notes.append(f"moe backward {preset} M={M} {name}: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                res[name] = (ms_f, ms_fb, peak)
            ref = grads.get("grouped_mm")
            for name, (ms_f, ms_fb, peak) in res.items():
                errs = "" if ref is None or name == "grouped_mm" else " ".join(
                    f"{((g - r).norm() / r.norm()).item():.1e}" for g, r in zip(grads[name], ref))
                tf = 3 * flops_fwd / ms_fb / 1e9
                speedup = res["grouped_mm"][1] / ms_fb if "grouped_mm" in res else float("nan")
                rows.append(f"| {preset} | {M} | {name} | {ms_f * 1e3:.0f} | {ms_fb * 1e3:.0f} | {tf:.0f} "
                            f"({tf / tflops * 100:.0f}%) | {3 * flops_fwd / tflops / 1e9 * 1e3:.0f} | {peak:.0f} "
                            f"| {speedup:.2f}x | {errs} |")
            if "Triton" in res and "grouped_mm" in res:
                ms_tri, ms_gmm = res["Triton"][1], res["grouped_mm"][1]
                summary.append(f"| fused MoE forward + backward, {preset}, {M:,} tokens | {ms_tri * 1e3:,.0f} us "
                               f"| torch._grouped_mm + torch's backward {ms_gmm * 1e3:,.0f} us | {ms_gmm / ms_tri:.2f}x |")
            del x, w, dy, grads
        del experts
        torch.cuda.empty_cache()
    return rows, notes, summary


def stages_label(c):
    """A config's pipeline depths: "4/3" where the gate_up GEMM's (`gate_up_stages`) differs from down's."""
    stages = c["num_stages"]
    return f"{c['gate_up_stages']}/{stages}" if c.get("gate_up_stages", stages) != stages else f"{stages}"


def tile_name(c):
    """Every field that changes the kernels: two configs never share a name (the sweep's times are keyed by it)."""
    stages = stages_label(c)
    flags = "".join(f", {f}" for f in ("merged", "tma") if c.get(f))
    return (f"{c['block_m']} rows, n {c['block_n1']}/{c['block_n2']}, k {c['block_k']}, {c['num_warps']} warps, "
            f"{stages} stages{flags}")


def moe_prefill_rows(tflops, sweep):
    """The fused MoE's prefill tile at 8K and 4K tokens, V2 (160 experts) and V2-Lite (64) shapes: the default
    that kernels.moe.choose_moe_config picks, and with `sweep` every candidate in PREFILL_TILES beside it."""
    rows, notes, summary = [], [], []
    for preset in ("deepseek-v2", "deepseek-v2-lite"):
        cfg, experts = random_experts(preset, torch.bfloat16)
        E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        for M in (8192, 4096):
            x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
            w, idx = torch.randn(M, E, device="cuda").softmax(-1).topk(K, dim=-1)
            flops = 6 * M * K * D * I
            default = choose_moe_config(M * K, E)
            configs = [default] + [c for c in PREFILL_TILES if sweep and c != default]
            times = {}
            with torch.no_grad():
                for c in configs:
                    try:
                        times[tile_name(c)] = bench(lambda: fused_moe_triton(
                            x, experts.gate_up_proj, experts.down_proj, idx, w, c), iters=10, graph=True)
                    except Exception as exc:  # a tile the compiler cannot fit (shared memory) is skipped
                        notes.append(f"moe prefill {preset} M={M} {tile_name(c)}: {type(exc).__name__}: "
                                     f"{str(exc)[:120]}")
            ms_default = times.get(tile_name(default))
            if ms_default is None:
                continue
            pct = lambda ms: flops / ms / 1e9 / tflops * 100
            for name, ms in times.items():
                rows.append(f"| {preset} | {M} | {M * K / E:.0f} | {name}{' (default)' if name == tile_name(default) else ''} "
                            f"| {ms * 1e3:,.0f} | {flops / ms / 1e9:.0f} ({pct(ms):.0f}%) | {ms_default / ms:.2f}x |")
            best, ms_best = min(times.items(), key=lambda kv: kv[1])
            summary.append(f"| fused-MoE prefill tile, {preset}, {M:,} tokens | default: {ms_default * 1e3:,.0f} us "
                           f"({pct(ms_default):.0f}% of matmul) | best of {len(times)} tiles: {best}, "
                           f"{ms_best * 1e3:,.0f} us ({pct(ms_best):.0f}%) | {ms_default / ms_best:.2f}x |")
            del x
        del experts
        torch.cuda.empty_cache()
    return rows, notes, summary


def w8a8_name(c):
    """The fields that change the FP8 MoE kernels (the sweep's times are keyed by it)."""
    return f"{c['block_m']} rows, {c['num_warps']} warps, {stages_label(c)} stages, down {'TMA' if c.get('tma', True) else 'pointers'}"


def fp8_moe_rows(fp8_tflops, sweep, sizes=(4096, 8192, 16384), preset="deepseek-v2-lite"):
    """The FP8 fused MoE with fp8 activations (weights in 128 x 128 blocks, x and h quantised per token and 128
    columns) at V2-Lite's shape, 4K, 8K and 16K tokens: the default config (kernels.fp8_moe.choose_w8a8_config)
    beside the bf16 fused MoE on the same tokens and routing, and with `sweep` every config in W8A8_TILES
    (whether its output equals the default's bit for bit in the last column)."""
    rows, notes, summary = [], [], []
    cfg, experts = random_experts(preset, torch.bfloat16)
    E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    dev = gate_up.device
    guq, gus = quantize_fp8_blocks(gate_up)
    dnq, dns = quantize_fp8_blocks(down)
    pct = (lambda t: f" ({t / fp8_tflops * 100:.0f}%)") if fp8_tflops else (lambda t: "")
    for M in sizes:
        x = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
        w, idx = torch.randn(M, E, device=dev).softmax(-1).topk(K, dim=-1)
        flops = 6 * M * K * D * I
        default = choose_w8a8_config(M * K, E)
        configs = [default] + [c for c in W8A8_TILES if sweep and c != default]
        times, same = {}, {}
        with torch.no_grad():
            ms_bf16 = bench(lambda: fused_moe_triton(x, gate_up, down, idx, w), iters=10, graph=True)
            ref = fused_moe_fp8_w8a8_triton(x, guq, gus, dnq, dns, idx, w, config=default)
            for c in configs:
                try:
                    same[w8a8_name(c)] = torch.equal(fused_moe_fp8_w8a8_triton(x, guq, gus, dnq, dns, idx, w, config=c),
                                                     ref)
                    times[w8a8_name(c)] = bench(lambda: fused_moe_fp8_w8a8_triton(
                        x, guq, gus, dnq, dns, idx, w, config=c), iters=10, graph=True)
                except Exception as exc:  # a config the compiler cannot fit (shared memory) is skipped
                    notes.append(f"fp8 moe M={M} {w8a8_name(c)}: {type(exc).__name__}: {str(exc)[:120]}")
        ms_default = times.get(w8a8_name(default))
        if ms_default is None:
            continue
        rows.append(f"| {M} | {M * K / E:.0f} | bf16 fused MoE (reference) | {ms_bf16 * 1e3:,.0f} | "
                    f"{flops / ms_bf16 / 1e9:.0f} | 1.00x | - | - |")
        for name, ms in times.items():
            tf = flops / ms / 1e9
            rows.append(f"| {M} | {M * K / E:.0f} | {name}{' (default)' if name == w8a8_name(default) else ''} | "
                        f"{ms * 1e3:,.0f} | {tf:.0f}{pct(tf)} | {ms_bf16 / ms:.2f}x | {ms_default / ms:.2f}x | "
                        f"{'yes' if same[name] else 'no'} |")
        tf = flops / ms_default / 1e9
        best, ms_best = min(times.items(), key=lambda kv: kv[1])
        summary.append(f"| FP8 fused MoE (fp8 activations), {preset}, {M:,} tokens | {ms_default * 1e3:,.0f} us, "
                       f"{tf:.0f} TFLOP/s{pct(tf)}{f'; best of {len(times)}: {best}, {ms_best * 1e3:,.0f} us' if sweep else ''}"
                       f" | bf16 fused MoE {ms_bf16 * 1e3:,.0f} us | {ms_bf16 / ms_default:.2f}x |")
        del x
    return rows, notes, summary


def sdpa_rows():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    rows = []
    B, H, T = 1, 16, 4096
    q = torch.randn(B, H, T, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, H, T, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, H, T, 128, device="cuda", dtype=torch.bfloat16)
    flops = 2 * B * H * T * T * (192 + 128) / 2  # causal: half the square
    def kernel_names(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return ", ".join(sorted({e.name[:60] for e in prof.events() if e.device_type.name == "CUDA"}))
    cases = [("default", None, v), ("FLASH_ATTENTION", SDPBackend.FLASH_ATTENTION, v),
             ("EFFICIENT_ATTENTION", SDPBackend.EFFICIENT_ATTENTION, v), ("CUDNN_ATTENTION", SDPBackend.CUDNN_ATTENTION, v),
             ("FLASH, V padded to 192", SDPBackend.FLASH_ATTENTION, F.pad(v, (0, 64)))]
    for name, backend, vv in cases:
        fn = lambda: F.scaled_dot_product_attention(q, k, vv, is_causal=True)
        try:
            if backend is None:
                ms, names = bench(fn, iters=10), kernel_names(fn)
            else:
                with sdpa_kernel([backend]):
                    ms, names = bench(fn, iters=10), kernel_names(fn)
            rows.append(f"| {name} | {ms * 1e3:.0f} | {flops / ms / 1e9:.0f} | {names} |")
        except Exception as exc:
            rows.append(f"| {name} | - | - | not available: {str(exc).splitlines()[0][:100]} |")
    return rows


def per_head_rows(copy_gbs: float):
    """Absorbed decode's per-head products (q_nope by W_UK, the latent output by W_UV, views of one kv_b_proj
    weight): kernels.per_head_matmul's few-row kernel against cuBLAS's batched GEMM, CUDA-graph replays of
    20 calls (a decode step runs them back to back with its other kernels). Floor: the weight's bytes."""
    from latentmoe.kernels.skinny import PER_HEAD_MAX_BYTES, PER_HEAD_MAX_ROWS, per_head_matmul
    rows = []
    for model, H in (("deepseek-v2-lite", 16), ("deepseek-v2", 128)):
        w = torch.randn(H * 256, 512, device="cuda", dtype=torch.bfloat16).view(H, 256, 512) * 0.05
        for name, K, m in (("W_UK", 128, w[:, :128]), ("W_UV", 512, w[:, 128:].transpose(1, 2))):
            for B in (1, 2, 4, 8):
                x = torch.randn(B, H, K, device="cuda", dtype=torch.bfloat16)

                def kernel():
                    return per_head_matmul(x, m, max_rows=8, max_bytes=1 << 40)
                t_k = median_seconds(kernel, graph=True, calls_per_graph=20)
                t_b = median_seconds(lambda: per_head_matmul(x, m, max_rows=0), graph=True, calls_per_graph=20)
                err = ((kernel().float() - per_head_matmul(x, m, max_rows=0).float()).norm()
                       / per_head_matmul(x, m, max_rows=0).float().norm()).item()
                floor = H * 128 * 512 * 2 / (copy_gbs * 1e9)
                rows.append(f"| {model} | {name} | {B} | {t_k * 1e6:.2f} | {t_b * 1e6:.2f} | {t_b / t_k:.2f}x | "
                            f"{floor * 1e6:.2f} | {'kernel' if B <= PER_HEAD_MAX_ROWS and H * 128 * 512 * 2 <= PER_HEAD_MAX_BYTES else 'batched GEMM'} | {err:.1e} |")
                print(rows[-1], flush=True)
    return rows


def few_token_fp8_rows(copy_gbs: float, sweep: bool, preset: str = "deepseek-v2-lite", layers: int = 26):
    """Batch-1/2 decode's routed experts over block-FP8 weights: the grouped few-token kernels (kernels.fp8_moe)
    launched with programmatic dependent launch, as the engine does, and without; with --sweep, other tiles.
    `layers` layers of distinct weights and random routing in one CUDA graph, so the weights come from memory
    as in a decode step and launch latency is amortised; the combine included. Alone, back to back, early
    launch can lose where it wins inside a decode step (results/few_token_fp8.md): bench_decode_paths.py
    decides. Floor: the distinct experts' e4m3 bytes and scales at the copy bandwidth."""
    import contextlib
    import itertools
    import unittest.mock
    from latentmoe.config import get_config
    from latentmoe.kernels import fp8_moe
    from latentmoe.kernels.moe import DECODE_CONFIG, few_token_layout
    cfg = get_config(preset)
    E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    weights = []
    for _ in range(layers):
        gu = quantize_fp8_blocks(torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16) * D ** -0.5)
        dn = quantize_fp8_blocks(torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16) * I ** -0.5)
        weights.append((*gu, *dn))
    expert_bytes = 3 * I * D + 4 * (3 * I * D) // (128 * 128)
    layout = few_token_layout(2 * K, "cuda")
    others = [dict(DECODE_CONFIG, block_n1=n, block_n2=n, num_warps=w, num_stages=st)
              for n, w, st in itertools.product((16, 32, 64), (2, 4, 8), (2, 3, 4))] if sweep else []
    tiles = [DECODE_CONFIG] + [t for t in others if t != DECODE_CONFIG]
    rows, summary = [], []
    for M in (1, 2):
        x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        idx = [torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(M)]).int() for _ in range(layers)]
        wt = torch.rand(M, K, device="cuda")
        floor = sum(len(set(i.flatten().tolist())) for i in idx) / layers * expert_bytes / (copy_gbs * 1e9)
        ref = fp8_moe.fused_moe_fp8_ref(x.float(), *weights[0], idx[0], wt)
        for tile, pdl in [(t, True) for t in tiles] + [(DECODE_CONFIG, False)]:
            name = (f"n {tile['block_n1']}, {tile['num_warps']} warps, {tile['num_stages']} stages"
                    + ("" if pdl else ", no PDL") + (" (as built)" if tile is DECODE_CONFIG and pdl else ""))

            def one(l, tile=tile):
                return fp8_moe.fused_moe_fp8_triton(x, *weights[l], idx[l], wt, layout, config=tile)
            with contextlib.ExitStack() as stack:
                if not pdl:
                    stack.enter_context(unittest.mock.patch.object(fp8_moe, "pdl_launch", lambda t: {"PDL": False}))
                err = ((one(0).float() - ref).norm() / ref.norm()).item()
                t = median_seconds(lambda: [one(l) for l in range(layers)], graph=True) / layers
            if tile is DECODE_CONFIG and pdl:
                built = t
            rows.append(f"| {M} | {name} | {t * 1e6:.1f} | {floor * 1e6:.1f} | {floor / t * 100:.0f}% | {err:.1e} |")
            print(rows[-1], flush=True)
        summary.append(f"| FP8 routed experts, {M} token{'s' if M > 1 else ''}, grouped kernels as built | "
                       f"{built * 1e6:.1f} us a layer | floor {floor * 1e6:.1f} us | "
                       f"{floor / built * 100:.0f}% of the floor |")
    return rows, [], summary


def md_table(caption, columns, rows):
    return [caption, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|", *rows, ""]


def write_results(path, title, provenance, summary, body, notes):
    """A results file: its heading, the summary block for BENCHMARKS.md, the full tables, the sweep's notes."""
    text = [f"# {title}", "", *summary_block(provenance, summary), "", *body]
    if notes:   # (an empty block would read as a sweep that printed nothing)
        text += ["<details><summary>sweep and notes</summary>", "", "```", *notes, "```", "</details>"]
    text.append("")
    with open(path, "w") as f:
        f.write("\n".join(text))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--moe-backward", action="store_true",
                      help="only the training table: routed experts forward + backward, Triton vs torch._grouped_mm")
    only.add_argument("--moe-prefill", action="store_true",
                      help="only the fused-MoE prefill tile table (V2 and V2-Lite shapes, 4K and 8K tokens)")
    only.add_argument("--fp8-moe", action="store_true",
                      help="only the FP8 fused MoE with fp8 activations beside the bf16 one (V2-Lite, 4K-16K tokens)")
    only.add_argument("--few-token-fp8", action="store_true",
                      help="only batch-1/2 decode's FP8 routed experts (few-token kernels, with and without PDL)")
    only.add_argument("--per-head", action="store_true",
                      help="only absorbed decode's per-head products: the few-row kernel vs cuBLAS's batched GEMM")
    only.add_argument("--profile-one", type=int, default=0, metavar="HEADS",
                      help="only run the B=64 decode 3 times (for a profiler)")
    ap.add_argument("--sweep", action="store_true", help="also time candidate tile configs and report the best")
    ap.add_argument("--out", default=None, help="write the tables here (a results file with its summary block)")
    args = ap.parse_args()
    if args.profile_one:
        inputs = make_decode_inputs(64, args.profile_one, 4096)
        for _ in range(3):
            mla_decode_triton(*inputs, 0.1147)
        torch.cuda.synchronize()
        return
    torch.manual_seed(0)
    flags = "".join(f" --{f}" for f, on in (("moe-backward", args.moe_backward), ("moe-prefill", args.moe_prefill),
                                            ("fp8-moe", args.fp8_moe), ("few-token-fp8", args.few_token_fp8),
                                            ("per-head", args.per_head), ("sweep", args.sweep)) if on)
    provenance = (f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: "
                  f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs); "
                  f"torch {torch.__version__}; command: `python benchmarks/bench_kernels.py{flags}`")
    floors = measured("cuda")
    copy_gbs, tflops = floors.bandwidth / 1e9, floors.flops / 1e12
    roof = ["| roofline input | value |", "|---|---|",
            f"| device-to-device copy (read + write) | {copy_gbs:.0f} GB/s |",
            f"| 8192^3 bf16 matmul (random data) | {tflops:.0f} TFLOP/s |", ""]
    print("\n".join([provenance, ""] + roof), flush=True)
    if args.moe_backward:
        rows, notes, summary = moe_backward_rows(tflops, args.sweep)
        title = "Fused MoE forward + backward (training kernels)"
        tables = md_table(
            "Routed experts for training, forward + backward (gradients of x, both weights, the routing weight); "
            "bf16 compute, fp32 master weights. floor = 18·M·K·D·I / matmul rate. grouped_mm = the model's Experts "
            "with torch's backward; rel err = each gradient against grouped_mm's (x, gate_up, down, weight).",
            ["model", "M tokens", "path", "fwd us", "fwd+bwd us", "TFLOP/s (% of matmul)", "floor us",
             "peak extra MiB", "speedup vs grouped_mm", "rel err of grads"], rows)
    elif args.few_token_fp8:
        rows, notes, summary = few_token_fp8_rows(copy_gbs, args.sweep)
        title = "Batch-1/2 decode's FP8 routed experts: the few-token kernels"
        tables = md_table(
            "Routed experts (SwiGLU, top-6) of one and two tokens, V2-Lite shape, e4m3 weights in 128 x 128 blocks, "
            "26 layers of distinct weights and random routing per CUDA graph, us per layer (the combine included): "
            "kernels.fp8_moe's weight-only kernels over the few-token layout, 16-row blocks, n output columns per "
            "program, launched with programmatic dependent launch unless marked. floor = the distinct experts' bytes "
            "at the copy bandwidth above; rel err against the fp32 reference.",
            ["tokens", "variant", "us a layer", "floor us", "% of floor", "rel err"], rows)
    elif args.per_head:
        rows, notes, summary = per_head_rows(copy_gbs), [], []
        title = "Absorbed decode's per-head products"
        tables = md_table(
            "x [B, H, K] times each head's own matrix (W_UK: K=128 -> 512; W_UV: K=512 -> 128, a transposed view), "
            "bf16, CUDA-graph replays of 20 calls. floor = the weight's bytes at the copy bandwidth above; dispatch = what "
            "kernels.per_head_matmul runs at that B; rel err = kernel against batched GEMM.",
            ["model", "product", "B", "kernel us", "batched GEMM us", "kernel speed-up", "floor us", "dispatch",
             "rel err"], rows)
    elif args.fp8_moe:
        fp8_flops = fp8_gemm_flops("cuda")
        fp8_tflops = fp8_flops / 1e12 if fp8_flops else None
        if fp8_tflops:
            roof.insert(-1, f"| 8192^3 FP8 matmul (e4m3, torch._scaled_mm) | {fp8_tflops:.0f} TFLOP/s |")
        print(f"FP8 matmul rate: {fp8_tflops or 0:.0f} TFLOP/s", flush=True)
        rows, notes, summary = fp8_moe_rows(fp8_tflops, args.sweep)
        title = "FP8 fused MoE (fp8 activations)"
        tables = md_table(
            "Routed experts (SwiGLU, top-6), V2-Lite shape: FP8 weights in 128 x 128 blocks with x and the SwiGLU "
            "output quantised per token and 128 columns (kernels.fp8_moe, both GEMMs on FP8 tensor cores), against "
            "the bf16 fused MoE on the same tokens and routing; CUDA-graph replays, quantisation, routing layout and "
            "combine included. % = of the FP8 matmul rate above.",
            ["M tokens", "rows per expert", "config", "us", "TFLOP/s", "vs bf16", "vs default",
             "identical to default"], rows)
    elif args.moe_prefill:
        rows, notes, summary = moe_prefill_rows(tflops, args.sweep)
        title = "Fused-MoE prefill tiles"
        tables = md_table(
            "Routed experts (SwiGLU, top-K), bf16, the Triton fused MoE as CUDA-graph replays: the default tile "
            "(kernels.moe.choose_moe_config) and, with --sweep, each candidate tile. vs default = default time / "
            "this tile's time.",
            ["model", "M tokens", "rows per expert", "tile", "us", "TFLOP/s (% of matmul)", "vs default"], rows)
    else:
        rows, notes, summary = mla_rows(copy_gbs, tflops, args.sweep)
        rows2, notes2, summary2 = moe_rows(copy_gbs, tflops, args.sweep)
        notes, summary = notes + notes2, summary + summary2
        title = "Kernel benchmarks"
        tables = md_table(
            "MLA decode, one layer, C=512 R=64, bf16, paged cache (block 64, shuffled). floor = max(latent bytes / "
            "copy BW, FLOPs / matmul rate); einsum = plain-PyTorch absorbed attention over a dense cache (eager). "
            "Triton timed as CUDA-graph replays (how the engine runs decode); eager adds the host's launch time.",
            ["heads", "B", "L", "bound", "floor us", "einsum us", "Triton us (graph)", "Triton eager us", "GB/s latent",
             "% of floor", "vs einsum", "splits", "best config in sweep"], rows)
        tables += md_table(
            "Routed experts (SwiGLU, top-K), bf16. floor = max(touched expert bytes / copy BW, 6·M·K·D·I / matmul "
            "rate). grouped_mm = the model's Experts (torch._grouped_mm). Both timed as CUDA-graph replays at every "
            "size (Triton eager beside it: a lone eager call also waits for the host to launch the routing-table ops).",
            ["model", "M tokens", "experts touched", "bound", "floor us", "grouped_mm us", "Triton us",
             "Triton eager us", "Triton % of floor", "Triton TFLOP/s (% of matmul)", "grouped_mm TFLOP/s", "speedup",
             "best in sweep (us)"], rows2)
        tables += md_table("Prefill attention, SDPA, B=1 H=16 T=4096 causal, q/k 192, v 128, bf16",
                           ["backend", "us", "TFLOP/s", "CUDA kernels"], sdpa_rows())
    print("\n".join(tables + notes), flush=True)
    if args.out:
        write_results(args.out, title, provenance, summary, roof + tables, notes)


if __name__ == "__main__":
    sys.exit(main())
