"""FP8 weights and the FP8 latent cache, each beside the unquantised engine in the same run.

Speed (GPU; --smoke runs it on CPU with a tiny model): a V2-Lite-shaped model with random weights, four
engines over the same bf16 model (bf16 / FP8 weights / FP8 cache / both): decode at B=1 and B=256,
prefill of one 8K prompt, and the sequences of 4K tokens that fit, at the same cache budget and in the
device's memory after each engine's weights. Kernel rows time the FP8 GEMM and FP8 fused MoE against
cuBLAS bf16 and the bf16 fused MoE; a check compares them with their references at full size first.

Quality (--quality CHECKPOINT, CPU): a trained checkpoint (e.g. the demo model) on held-out text:
perplexity through the paged cache and teacher-forced arg-max agreement with the unquantised model for
FP8 weights, FP8 cache and both, greedy generation agreement, and per-channel scales for comparison.

    python benchmarks/bench_fp8.py                          # GPU, writes benchmarks/results/fp8.md
    python benchmarks/bench_fp8.py --smoke                  # CPU, tiny model: the speed part runs
    python benchmarks/bench_fp8.py --quality runs/demo/model --text-corpus python-docs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import sys
import time
import unittest.mock

import torch

from latentmoe import build_model, get_config, kernels
from latentmoe.engine import LLM, SamplingParams
from latentmoe.engine.attention import AttentionMetadata, PrefillMetadata
from latentmoe.kernels import fp8, fp8_moe

from bench_engine import engine_decode, engine_prefill, release_memory
from report import summary_block

VARIANTS = [("bf16", None, "auto"), ("fp8 weights", "fp8", "auto"), ("fp8 cache", None, "fp8"),
            ("fp8 weights + cache", "fp8", "fp8")]
GiB = 1024 ** 3
# The quality row with the routed experts' activations in fp8 at every size: the GPU kernels quantise them
# from FP8_ACTIVATIONS_MIN_PER_EXPERT assignments per expert when D and I are whole 128-blocks, which the demo
# model's hidden size (192) is not, so the reference path is made to round them regardless.
FORCED_W8A8 = "fp8 weights, fp8 activations in experts and dense layers (forced at every size)"


def engine_weight_bytes(llm) -> int:
    """Bytes of the tensors the engine's module tree holds (each tensor once)."""
    seen, total = set(), 0
    for t in list(llm.runner.model.parameters()) + list(llm.runner.model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- speed
def speed(args, device, log):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        cfg = get_config("tiny", vocab_size=512, num_hidden_layers=2, topk_method="greedy", n_group=1, topk_group=1,
                         hidden_size=256, moe_intermediate_size=128)
        B_big, L_dec, L_pre, cache_gb, steps = 8, 64, 256, 0.05, 2
    else:
        cfg = get_config(args.preset)
        B_big, L_dec, L_pre, cache_gb, steps = 256, args.context, 8192, args.cache_gb, args.steps
    model = build_model(cfg, device=device, dtype=dtype, seed=0, std=0.02).eval()
    total_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 80 * GiB
    rows = {}
    for name, quant, kv in VARIANTS:
        t0 = time.perf_counter()
        llm = LLM(model, quantization=quant, kv_cache_dtype=kv, cache_memory_gb=cache_gb, max_num_seqs=B_big,
                  max_model_len=L_pre + 16, block_size=64)
        ready = time.perf_counter() - t0
        r = {"ready_s": ready, "weights": engine_weight_bytes(llm),
             "bpt": llm.engine_config.kv_cache.bytes_per_token(cfg, dtype)}
        r["dec1"] = engine_decode(llm, 1, L_dec, steps)[0]
        r["decB"] = engine_decode(llm, B_big, L_dec, steps)[0]
        r["prefill"] = engine_prefill(llm, 1, L_pre, repeats=args.repeats)
        cap_tokens = (llm.runner.num_blocks - 1) * llm.runner.block_size
        r["seqs_budget"] = cap_tokens // 4096
        r["seqs_device"] = max(0, int((0.9 * total_mem - r["weights"] - 4 * GiB) // (4096 * r["bpt"])))
        rows[name] = r
        log(f"{name}: ready {ready:.1f}s, weights {r['weights'] / GiB:.2f} GiB, cache {r['bpt']} B/token; decode B=1 "
            f"{1 / r['dec1']:.1f} tok/s, B={B_big} {B_big / r['decB']:.0f} tok/s (L={L_dec}); prefill {L_pre}: "
            f"{r['prefill']:.0f} tok/s; 4K sequences: {r['seqs_budget']} in {cache_gb} GB of cache, "
            f"{r['seqs_device']} in the device's memory")
        del llm
        release_memory(device)
    del model
    release_memory(device)
    return cfg, rows, dict(B=B_big, L=L_dec, L_pre=L_pre, cache_gb=cache_gb, total_gb=total_mem / GiB)


def speed_table(rows, p) -> list[str]:
    base = rows["bf16"]
    out = [f"| engine | decode B=1 tok/s | decode B={p['B']} tok/s | prefill {p['L_pre']} tok/s | weights GiB | "
           f"cache B/token | 4K seqs in {p['cache_gb']} GB cache | 4K seqs in {p['total_gb']:.0f} GB device |",
           "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        def x(v, b):
            return f" ({v / b:.2f}x)" if name != "bf16" else ""
        out.append(f"| {name} | {1 / r['dec1']:,.1f}{x(base['dec1'], r['dec1'])} | "
                   f"{p['B'] / r['decB']:,.0f}{x(base['decB'], r['decB'])} | "
                   f"{r['prefill']:,.0f}{x(r['prefill'], base['prefill'])} | {r['weights'] / GiB:.2f} | {r['bpt']:,} | "
                   f"{r['seqs_budget']:,}{x(r['seqs_budget'], max(1, base['seqs_budget']))} | "
                   f"{r['seqs_device']:,}{x(r['seqs_device'], max(1, base['seqs_device']))} |")
    return out


# ----------------------------------------------------------------------------- kernels
V2_LITE_KERNEL_SHAPES = dict(q=3072, kv_a=576, hidden=2048, shared=2816, rows=(256, 8192), experts=64, moe_inter=1408,
                             top_k=6, tokens=(1, 16, 64, 128, 256, 1024, 8192), heads=16, latent=512, rope=64,
                             decode=((1, 131072), (4, 32768), (64, 4096), (256, 1024)))


def cache_decode_rows(device, log, dims: dict = V2_LITE_KERNEL_SHAPES) -> list[str]:
    """MLA decode over a bf16 latent cache against an FP8 one, one layer, 64-token cache blocks in shuffled
    order. Floor: the cache's bytes at 4.8 TB/s."""
    from timing import median_seconds
    H, C, R, page = dims["heads"], dims["latent"], dims["rope"], 64
    g = torch.Generator(device=device).manual_seed(1)
    out = ["", f"MLA decode, one layer ({H} heads, latent {C} + rope {R}), bf16 cache against the FP8 cache (e4m3 rows, "
           "a scale per row and part), CUDA-graph replays, 5 calls a graph. Rel err: FP8 against the bf16 cache's "
           "output (the cache's quantisation).", "",
           "| B | context | bf16 us | fp8 us | fp8 speed-up | floor bf16 / fp8 us | rel err |", "|---|---|---|---|---|---|---|"]
    for B, L in dims["decode"]:
        nb = B * L // page
        rows = torch.randn(nb * page, C + R, device=device, generator=g, dtype=torch.bfloat16)
        q8, s8 = kernels.quantize_latent_rows(rows[:, :C], rows[:, C:])
        cache, cache8, scale = rows.view(nb, page, C + R), q8.view(nb, page, C + R), s8.view(nb, page, 2)
        table = torch.randperm(nb, device=device, generator=g).to(torch.int32).view(B, L // page)
        lens = torch.full((B,), L, device=device, dtype=torch.int32)
        q_lat = torch.randn(B, H, C, device=device, generator=g, dtype=torch.bfloat16)
        q_pe = torch.randn(B, H, R, device=device, generator=g, dtype=torch.bfloat16)

        def run(kv, sc=None):
            return lambda: kernels.mla_decode(q_lat, q_pe, kv, table, lens, 0.1147, kv_scale=sc)
        o16, o8 = run(cache)(), run(cache8, scale)()
        err8 = ((o8.float() - o16.float()).norm() / o16.float().norm()).item()
        t16, t8 = (median_seconds(fn, graph=True, calls_per_graph=5) * 1e6 for fn in (run(cache), run(cache8, scale)))
        byts = B * L * (C + R)
        out.append(f"| {B} | {L:,} | {t16:.1f} | {t8:.1f} | {t16 / t8:.2f}x | {2 * byts / 4.8e6:.1f} / "
                   f"{byts / 4.8e6:.1f} | {err8:.1e} |")
        log(out[-1])
        del rows, q8, cache, cache8, scale
    return out


def kernel_rows(device, log, dims: dict = V2_LITE_KERNEL_SHAPES) -> list[str]:
    """FP8 GEMM vs cuBLAS bf16, FP8 fused MoE vs the bf16 fused MoE, V2-Lite shapes; references checked first.
    (`dims` scales the shapes down for a check of this code under Triton's interpreter.)"""
    from timing import median_seconds
    import torch.nn.functional as F
    from latentmoe.kernels.fp8 import fp8_linear_triton, uses_fp8_dense_activations
    g = torch.Generator(device=device).manual_seed(0)
    out = ["Dense GEMMs: `fp8_linear` as dispatched (one row: the few-row kernel; 256: the FP8 GEMM's tiles; "
           "8,192: fp8 activations through torch's blockwise scaled GEMM, quantisation included). Rel err "
           "against the reference of the route taken.", "",
           "| kernel | shape | bf16 us | fp8 us | fp8 speed-up | rel err vs reference |", "|---|---|---|---|---|---|"]
    Q, KV, D2, S = dims["q"], dims["kv_a"], dims["hidden"], dims["shared"]
    shapes = ((Q, D2), (KV, D2), (D2, D2), (S, D2), (D2, S))
    for (N, K) in shapes:
        w = torch.randn(N, K, device=device, generator=g, dtype=torch.bfloat16) * 0.02
        q, s = kernels.quantize_fp8_blocks(w)
        for M in dims["rows"]:
            x = torch.randn(M, K, device=device, generator=g, dtype=torch.bfloat16)
            ref = kernels.fp8_linear_ref(x.float(), q, s, quantize_input=uses_fp8_dense_activations(M, q.shape))
            err = ((kernels.fp8_linear(x, q, s).float() - ref).norm() / ref.norm()).item()
            tb = median_seconds(lambda: F.linear(x, w), graph=True) * 1e6
            tf = median_seconds(lambda: kernels.fp8_linear(x, q, s), graph=True) * 1e6
            out.append(f"| GEMM | M={M} N={N} K={K} | {tb:.1f} | {tf:.1f} | {tb / tf:.2f}x | {err:.1e} |")
            log(out[-1])
    # One row (batch-1 decode): every variant, 20 calls per graph (as inside a decode step's graph).
    out += ["", "One row (batch-1 decode), 20 calls per CUDA graph: cuBLAS bf16, the few-row kernel on bf16 and "
            "e4m3 weights (kernels/skinny.py), the FP8 GEMM's tensor-core tiles, and the floor (the weight's "
            "bytes at 4.8 TB/s). MLA's q and kv_a projections in one launch, and the shared experts' gate, up "
            "and silu*up in one, against their unfused bf16 ops.", "",
            "| op | shape | cuBLAS bf16 us | few-row bf16 us | FP8 tensor-core GEMM us | few-row fp8 us | "
            "floor bf16 / fp8 us | rel err (few-row fp8) |", "|---|---|---|---|---|---|---|---|"]

    def one_row(fn):
        return median_seconds(fn, graph=True, calls_per_graph=20) * 1e6

    ws = {}
    for (N, K) in shapes:
        w = torch.randn(N, K, device=device, generator=g, dtype=torch.bfloat16) * 0.02
        q, s = kernels.quantize_fp8_blocks(w)
        ws[(N, K)] = (w, q, s)
        x = torch.randn(1, K, device=device, generator=g, dtype=torch.bfloat16)
        ref = kernels.fp8_linear_ref(x.float(), q, s)
        err = ((kernels.skinny_linear(x, q, s).float() - ref).norm() / ref.norm()).item()
        row = (one_row(lambda: F.linear(x, w)), one_row(lambda: kernels.skinny_linear(x, w)),
               one_row(lambda: fp8_linear_triton(x, q, s)), one_row(lambda: kernels.skinny_linear(x, q, s)))
        out.append(f"| linear | N={N} K={K} | " + " | ".join(f"{t:.2f}" for t in row) +
                   f" | {2 * N * K / 4.8e6:.2f} / {N * K / 4.8e6:.2f} | {err:.1e} |")
        log(out[-1])
    x = torch.randn(1, D2, device=device, generator=g, dtype=torch.bfloat16)
    (wq, qq, sq), (wk, qk, sk), (wg, qg, sg) = ws[(Q, D2)], ws[(KV, D2)], ws[(S, D2)]
    wu = torch.randn(S, D2, device=device, generator=g, dtype=torch.bfloat16) * 0.02
    qu, su = kernels.quantize_fp8_blocks(wu)
    pair = (one_row(lambda: (F.linear(x, wq), F.linear(x, wk))),
            one_row(lambda: kernels.skinny_linear_pair(x, wq, None, wk, None)),
            one_row(lambda: (fp8_linear_triton(x, qq, sq), fp8_linear_triton(x, qk, sk))),
            one_row(lambda: kernels.skinny_linear_pair(x, qq, sq, qk, sk)))
    out.append(f"| q + kv_a, one launch | N={Q}+{KV} K={D2} | " + " | ".join(f"{t:.2f}" for t in pair) +
               f" | {2 * (Q + KV) * D2 / 4.8e6:.2f} / {(Q + KV) * D2 / 4.8e6:.2f} | - |")
    swiglu = (one_row(lambda: kernels.silu_mul(F.linear(x, wg), F.linear(x, wu))),
              one_row(lambda: kernels.skinny_swiglu(x, wg, None, wu, None)),
              one_row(lambda: kernels.silu_mul(fp8_linear_triton(x, qg, sg), fp8_linear_triton(x, qu, su))),
              one_row(lambda: kernels.skinny_swiglu(x, qg, sg, qu, su)))
    out.append(f"| gate, up, silu*up, one launch | N=2x{S} K={D2} | " + " | ".join(f"{t:.2f}" for t in swiglu) +
               f" | {4 * S * D2 / 4.8e6:.2f} / {2 * S * D2 / 4.8e6:.2f} | - |")
    log("\n".join(out[-2:]))
    E, D, I, TOPK = dims["experts"], D2, dims["moe_inter"], dims["top_k"]
    gu = torch.randn(E, 2 * I, D, device=device, generator=g, dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, D, I, device=device, generator=g, dtype=torch.bfloat16) * 0.02
    gq, gs = kernels.quantize_fp8_blocks(gu)
    dq, ds = kernels.quantize_fp8_blocks(dn)
    layout = kernels.few_token_layout(kernels.FEW_TOKENS * TOPK, device)
    out += ["", f"Fused MoE (E={E}, top-{TOPK}, D={D}, I={I}): the bf16 kernels, `fused_moe_fp8` as dispatched, and its two "
            "kernel pairs forced (weight-only: fp8 weights, activations in bf16; fp8 activations: both operands on "
            "FP8 tensor cores). Rel err against the reference of the path taken.", "",
            "| tokens | path taken | bf16 us | fp8 us | fp8 speed-up | weight-only us | fp8 activations us | rel err |",
            "|---|---|---|---|---|---|---|---|"]
    for M in dims["tokens"]:
        x = torch.randn(M, D, device=device, generator=g, dtype=torch.bfloat16)
        w, idx = torch.randn(M, E, device=device, generator=g).softmax(-1).topk(TOPK, -1)
        w8a8 = fp8_moe.uses_fp8_activations(M * TOPK, dn.shape, few_tokens=M <= kernels.FEW_TOKENS)
        got = kernels.fused_moe_fp8(x, gq, gs, dq, ds, idx, w, few_token_layout=layout)
        ref_fn = fp8_moe.fused_moe_fp8_w8a8_ref if w8a8 else kernels.fused_moe_fp8_ref
        ref = ref_fn(x[:64].float(), gq, gs, dq, ds, idx[:64], w[:64])
        err = ((got[:64].float() - ref.float()).norm() / ref.float().norm()).item()
        tb = median_seconds(lambda: kernels.fused_moe(x, gu, dn, idx, w, few_token_layout=layout), graph=True) * 1e6
        tf = median_seconds(lambda: kernels.fused_moe_fp8(x, gq, gs, dq, ds, idx, w, few_token_layout=layout),
                            graph=True) * 1e6
        tw = median_seconds(lambda: fp8_moe.fused_moe_fp8_triton(x, gq, gs, dq, ds, idx, w, few_token_layout=layout),
                            graph=True) * 1e6
        ta = median_seconds(lambda: fp8_moe.fused_moe_fp8_w8a8_triton(x, gq, gs, dq, ds, idx, w), graph=True) * 1e6
        out.append(f"| {M} | {'fp8 activations' if w8a8 else 'weight-only'} | {tb:.1f} | {tf:.1f} | {tb / tf:.2f}x | "
                   f"{tw:.1f} | {ta:.1f} | {err:.1e} |")
        log(out[-1])
    return out + cache_decode_rows(device, log, dims)


# ----------------------------------------------------------------------------- quality
def val_sequences(ckpt, corpus, n, T, val_fraction=0.05):
    """n held-out sequences of T tokens: the documents the trainer holds out for validation (the same rule as
    train/data.py: every (1/val_fraction)-th document), tokenised by the checkpoint's tokenizer."""
    from latentmoe.tokenizer import Tokenizer
    from latentmoe.train.data import corpus_documents
    tok = Tokenizer.from_dir(ckpt)
    every = max(2, round(1 / val_fraction))
    ids: list[int] = []
    for i, d in enumerate(corpus_documents(corpus)):
        if i % every == every // 2:
            ids.extend([tok.bos_token_id] + tok.encode(d) + [tok.eos_token_id])
            if len(ids) >= n * T:
                break
    return torch.tensor(ids[: n * T]).view(n, T)


@torch.inference_mode()
def cached_logits(llm, ids, chunk):
    """Logits of one sequence through the engine's paged cache: prefill chunks that read the earlier
    chunks' rows back from the cache (as stored: FP8 rows for an FP8 cache)."""
    r = llm.runner
    T = len(ids)
    slots = torch.arange(r.block_size, r.block_size + T, device=r.device)   # block 0 is the engine's reserved one
    out = []
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        cu_q = torch.tensor([0, e - s], dtype=torch.int32, device=r.device)
        cu_k = torch.tensor([0, e], dtype=torch.int32, device=r.device)
        r.backend.meta = AttentionMetadata(slot_mapping=slots[s:e],
                                           prefill=PrefillMetadata(slots[:e], cu_q, cu_k, e - s, e))
        h, _ = r.model.forward_hidden(torch.tensor([ids[s:e]], device=r.device),
                                      positions=torch.arange(s, e, device=r.device)[None], backend=r.backend)
        out.append(r.model.compute_logits(h[0]).float())
    r.backend.meta = None
    return torch.cat(out)


def quality(args, log) -> list[str]:
    from latentmoe.checkpoint import load_model
    from latentmoe.engine.layers import FP8_SKIP
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = load_model(args.quality, device=device, dtype=torch.float32)
    cfg = model.config
    T = min(args.seq_len, cfg.max_position_embeddings)
    seqs = val_sequences(args.quality, args.text_corpus, args.sequences, T)
    log(f"quality: {args.quality}, {seqs.shape[0]} held-out sequences of {T} tokens ({args.text_corpus})")

    def per_channel_model():
        import copy
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, mod in m.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in FP8_SKIP:
                    q, s = kernels.quantize_fp8_rows(mod.weight)
                    mod.weight.copy_(q.float() * s)
                elif type(mod).__name__ == "Experts":
                    for p in (mod.gate_up_proj, mod.down_proj):
                        q, s = kernels.quantize_fp8_rows(p)
                        p.copy_(q.float() * s)
        return m

    # weight error of the two scale layouts over every tensor FP8 stores
    errs = {"128x128 blocks": [0.0, 0.0], "per channel": [0.0, 0.0]}
    for name, mod in model.named_modules():
        ws = []
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in FP8_SKIP:
            ws = [mod.weight]
        elif type(mod).__name__ == "Experts":
            ws = [mod.gate_up_proj, mod.down_proj]
        for w in ws:
            w = w.detach()
            b = kernels.dequantize_fp8_blocks(*kernels.quantize_fp8_blocks(w))
            q, s = kernels.quantize_fp8_rows(w)
            for key, d in (("128x128 blocks", b), ("per channel", q.float() * s)):
                errs[key][0] += (d - w).pow(2).sum().item()
                errs[key][1] += w.pow(2).sum().item()
    settings = [("fp32", None, "auto", model), ("fp8 weights", "fp8", "auto", model), ("fp8 cache", None, "fp8", model),
                ("fp8 weights + cache", "fp8", "fp8", model),
                ("fp8 weights, per-channel scales (dequantised)", None, "auto", per_channel_model()),
                (FORCED_W8A8, "fp8", "auto", model)]
    base_logits, rows = None, []
    prompts = [s[:32].tolist() for s in seqs[:16]]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    base_gen = None
    for name, quant, kv, m in settings:
        # The forced row: every expert call outside the few-token layout, and every FP8 Linear above the
        # few-row sizes, quantises its activations (the demo's widths are not whole 128-blocks).
        with contextlib.ExitStack() as forced:
            if name == FORCED_W8A8:
                forced.enter_context(unittest.mock.patch.object(fp8_moe, "uses_fp8_activations",
                                                                lambda n, shape, few_tokens=False: not few_tokens))
                forced.enter_context(unittest.mock.patch.object(fp8, "uses_fp8_dense_activations",
                                                                lambda rows, shape: rows > fp8.FP8_ACTIVATION_MIN_ROWS))
            llm = LLM(m, quantization=quant, kv_cache_dtype=kv, num_blocks=2 + (T * 2) // 16,
                      block_size=16, max_num_seqs=16)
            nll, n, logits = 0.0, 0, []
            for s in seqs:
                lg = cached_logits(llm, s.tolist(), chunk=max(1, T // 2))
                nll += torch.nn.functional.cross_entropy(lg[:-1].cpu(), s[1:], reduction="sum").item()
                n += T - 1
                logits.append(lg.argmax(-1).cpu())
            ppl = math.exp(nll / n)
            top1 = torch.stack(logits)
            gen = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
            if base_logits is None:
                base_logits, base_ppl, base_gen = top1, ppl, gen
            agree = (top1 == base_logits).float().mean().item()
            same_tok = sum(a == b for x, y in zip(gen, base_gen) for a, b in zip(x, y)) / sum(len(x) for x in base_gen)
            same_seq = sum(x == y for x, y in zip(gen, base_gen))
            rows.append(f"| {name} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% | {agree:.4f} | {same_tok:.3f} "
                        f"({same_seq}/{len(prompts)} identical) |")
            log(rows[-1])
        del llm
        gc.collect()
    table = ["| model | val ppl | vs fp32 | teacher-forced top-1 agreement | greedy 32-token agreement |",
             "|---|---|---|---|---|", *rows, "",
             "Weight error (||dequant(q) - w|| / ||w|| over every weight FP8 stores): " + ", ".join(
                 f"{k} {math.sqrt(a / b):.4f}" for k, (a, b) in errs.items())]
    return table


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--smoke", action="store_true", help="the speed part on CPU with a tiny model")
    ap.add_argument("--context", type=int, default=1024, help="decode context length")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="prefill rounds (the median is reported)")
    ap.add_argument("--cache-gb", type=float, default=12.0)
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--quality", default=None, metavar="CHECKPOINT", help="measure quality of this trained checkpoint")
    ap.add_argument("--text-corpus", default="python-docs")
    ap.add_argument("--device", default="cpu", help="where the quality run computes (fp32 throughout)")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/fp8.md; fp8_quality.md)")
    args = ap.parse_args()

    here = os.path.dirname(os.path.abspath(__file__))
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    command = "python " + " ".join(sys.argv)
    provenance = f"date: {stamp}; device: {{}}; torch {torch.__version__}; command: `{command}`"

    def log(s):
        print(s, flush=True)

    if args.quality:
        device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
        if device_name != "CPU":
            torch.backends.cuda.matmul.allow_tf32 = False   # an fp32 reference, not tf32
        table = quality(args, log)
        out = args.out or os.path.join(here, "results", "fp8_quality.md")
        text = ["# FP8 quality\n", provenance.format(device_name) + "\n", *table]
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        out = args.out or os.path.join(here, "results", "fp8.md" if device.type == "cuda" else "fp8_smoke.md")
        cfg, rows, p = speed(args, device, log)
        table = speed_table(rows, p)
        base, both = rows["bf16"], rows["fp8 weights + cache"]
        weights = rows["fp8 weights"]
        summary = summary_block(provenance.format(device_name), [
            f"| decode B=1, fp8 weights | {1 / weights['dec1']:,.1f} tok/s | {1 / base['dec1']:,.1f} tok/s (bf16) "
            f"| {base['dec1'] / weights['dec1']:.2f}x |",
            f"| decode B={p['B']}, fp8 weights | {p['B'] / weights['decB']:,.0f} tok/s | "
            f"{p['B'] / base['decB']:,.0f} tok/s | {base['decB'] / weights['decB']:.2f}x |",
            f"| prefill {p['L_pre']}, fp8 weights | {weights['prefill']:,.0f} tok/s | {base['prefill']:,.0f} tok/s | "
            f"{weights['prefill'] / base['prefill']:.2f}x |",
            f"| decode B=1, fp8 weights + cache | {1 / both['dec1']:,.1f} tok/s | {1 / base['dec1']:,.1f} tok/s (bf16) "
            f"| {base['dec1'] / both['dec1']:.2f}x |",
            f"| decode B={p['B']} | {p['B'] / both['decB']:,.0f} tok/s | {p['B'] / base['decB']:,.0f} tok/s | "
            f"{base['decB'] / both['decB']:.2f}x |",
            f"| prefill {p['L_pre']} | {both['prefill']:,.0f} tok/s | {base['prefill']:,.0f} tok/s | "
            f"{both['prefill'] / base['prefill']:.2f}x |",
            f"| 4K sequences in the device | {both['seqs_device']:,} | {base['seqs_device']:,} | "
            f"{both['seqs_device'] / max(1, base['seqs_device']):.2f}x |"])
        text = ["# FP8 weights and FP8 latent cache\n", *summary, "",
                f"Model: {args.preset if not args.smoke else 'tiny (smoke)'} shape, random weights, "
                f"{cfg.num_hidden_layers} layers; decode at context {p['L']} (placeholder contexts), prefill of one "
                f"{p['L_pre']}-token prompt in chunks of the engine's default step, CUDA graphs for decode. "
                "4K sequences in the device: (0.9 x device memory - the engine's weights - 4 GiB) / (4096 x cache "
                "bytes per token).\n", *table, ""]
        with open(out, "w") as f:   # the engine table first: kept should the kernel rows not finish
            f.write("\n".join(text) + "\n")
        if not args.no_kernels and device.type == "cuda":
            text += ["## Kernels (V2-Lite shapes, CUDA-graph replays; rel err against the torch reference)\n",
                     *kernel_rows(device, log)]
    with open(out, "w") as f:
        f.write("\n".join(text) + "\n")
    log("\n".join(text))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
