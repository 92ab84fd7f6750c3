"""Engine throughput on a V2-Lite-shaped model with random weights, beside transformers in the same run.

Measures decode tok/s (batch x context), prefill tok/s and the concurrency the latent cache allows,
with transformers' DeepseekV2ForCausalLM (grouped_mm experts, sdpa) and the memory-bound floor (bytes
touched per step at the copy bandwidth measured in the run, benchmarks/floors.py) alongside; prints a
markdown table and writes it (with date, device and command) to benchmarks/results/engine.md. Decode contexts are filled with placeholder
latents instead of being prefilled (attention cost does not depend on the values).

    python benchmarks/bench_engine.py            # full
    python benchmarks/bench_engine.py --quick    # fewer points, fits one device call
    --check: engine greedy vs plain generation first; --accuracy-layers N: each bf16 path vs an fp32
    reference of N layers; --experts / --ops: the expert paths and fused-glue settings to measure.

Every path is chosen through the engine's options (LLM(..., experts_impl=, fused_ops=, enforce_eager=)),
one engine per setting; logits of a path come from the engine's own module tree (engine.layers.engine_model).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

import torch

from floors import decode_bytes, measured
from latentmoe import build_model, get_config
from latentmoe.engine import LLM, LatentCache, PerHeadCache, SamplingParams
from latentmoe.engine.layers import engine_model

def floor_ms(cfg, B: int, L: int, bandwidth: float, dtype_bytes: int = 2) -> float:
    """Memory-bound floor of one decode step: weights touched + latent cache read (floors.decode_bytes), at
    `bandwidth` (floors.measured on the device that runs)."""
    return decode_bytes(cfg, B, L, dtype_bytes) / bandwidth * 1e3


# ----------------------------------------------------------------------------- transformers
def build_hf(cfg, device, dtype, std=0.02):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    hcfg = DeepseekV2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, topk_method=cfg.topk_method, n_group=cfg.n_group,
        topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace, norm_topk_prob=cfg.norm_topk_prob,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rope_scaling=cfg.rope_scaling,
        rms_norm_eps=cfg.rms_norm_eps, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    hcfg._attn_implementation = "sdpa"
    if device.type == "cuda":
        hcfg._experts_implementation = "grouped_mm"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = DeepseekV2ForCausalLM(hcfg).eval()
    finally:
        torch.set_default_dtype(old)
    # Initialise explicitly: a model built in a CUDA device context may hold uninitialised memory.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    return hf


@torch.inference_mode()
def hf_decode(hf, cfg, B, L, steps, device, dtype):
    from transformers import DynamicCache
    cache = DynamicCache()
    for i in range(cfg.num_hidden_layers):   # a context of L placeholder latents per layer
        cache.update(torch.randn(B, 1, L, cfg.kv_lora_rank, device=device, dtype=dtype),
                     torch.randn(B, 1, L, cfg.qk_rope_head_dim, device=device, dtype=dtype), i)
    ids = torch.randint(0, cfg.vocab_size, (B, 1), device=device)
    times = []
    for s in range(steps + 1):
        pos = torch.full((B, 1), L + s, device=device)
        sync(device)
        t = time.perf_counter()
        logits = hf(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t)
    del cache
    return median(times[1:])


@torch.inference_mode()
def hf_prefill(hf, cfg, L, device):
    ids = torch.randint(0, cfg.vocab_size, (1, L), device=device)
    times = []
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        hf(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync(device)
        times.append(time.perf_counter() - t)
    return L / median(times[1:])


# ----------------------------------------------------------------------------- engine
def engine_decode(llm, B, L, steps):
    """Decode tok/s of B sequences at context L: full engine steps (schedule, graph replay, sampling).

    The contexts are placeholders (LLM.add_request_without_prefill: attention costs the same whatever
    the cached values), so the steps are pure decodes from the first. -> (seconds per step, seconds
    of it outside the model runner)."""
    g = torch.Generator().manual_seed(B * 7919 + L)
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    reqs = [llm.add_request_without_prefill(torch.randint(0, llm.config.vocab_size, (L,), generator=g).tolist(),
                                            params) for _ in range(B)]
    times, exec_times = [], []
    for s in range(steps + 2):   # two warm-up steps (graph capture for this bucket)
        t = time.perf_counter()
        llm.step()
        times.append(time.perf_counter() - t)
        exec_times.append(llm.last_execute_seconds)
    for r in reqs:
        llm.abort_request(r.request_id)
    assert llm.stats()["num_blocks_used"] == 0
    step, ex = median(times[2:]), median(exec_times[2:])
    return step, step - ex


def engine_prefill(llm, n, L, repeats: int = 1):
    """Prefill tok/s of n prompts of L tokens, after a warm-up round of n other prompts: the same
    step shapes (so kernels are compiled), different tokens (so nothing is a prefix-cache hit). With
    `repeats` > 1, the median over that many rounds of new prompts (one 8K prompt is a tenth of a second:
    single rounds of the same code moved by a quarter between runs on an H200)."""
    g = torch.Generator().manual_seed(n + L)
    prompts = [torch.randint(0, llm.config.vocab_size, (L,), generator=g).tolist() for _ in range((1 + repeats) * n)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:n], params)   # warm-up
    rates = []
    for r in range(1, 1 + repeats):
        sync(llm.device)
        t = time.perf_counter()
        llm.generate(prompts[r * n:(r + 1) * n], params)
        sync(llm.device)
        rates.append(n * L / (time.perf_counter() - t))
    return median(rates)


def profile_decode(llm, B, L, out_path):
    """Where an eager decode step's time goes (CUDA kernels, grouped by name); `llm` built with enforce_eager."""
    from timing import kernel_profile
    engine_decode(llm, B, L, 1)   # warm
    _, table, n, busy = kernel_profile(lambda: engine_decode(llm, B, L, 2), llm.device)   # 4 steps
    cfg = llm.engine_config
    table = (f"## eager decode, batch {B}, context {L}, 4 steps, experts {cfg.experts_impl}, "
             f"fused ops {'on' if cfg.fused_ops else 'off'}: {n / 4:.0f} CUDA kernels and "
             f"{busy / 4e3:.2f} ms of kernel time per step\n{table}\n")
    with open(out_path, "a") as f:
        f.write(table)
    return table


def plain_greedy(model, device, n_new: int = 16):
    """The check prompts (8 of 1-100 tokens, seeded) and their greedy continuations by full recompute."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 1, 30, 9, 12, 64, 100)]
    want = []
    with torch.inference_mode():
        for p in prompts:
            ids = list(p)
            for _ in range(n_new):
                ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
            want.append(ids[len(p):])
    return prompts, want


def check_cuda(device):
    """Greedy tokens of the engine (CUDA graphs, then eager) vs plain full recompute, tiny model, bf16.

    bf16 rounding differs between a batched decode and a full recompute, so near-ties may flip:
    prints the share of sequences identical over 16 tokens rather than asserting.
    """
    # Greedy routing as in V2-Lite (the tiny preset limits groups, which the fused router leaves to the model).
    cfg = get_config("tiny", vocab_size=512, num_hidden_layers=3, topk_method="greedy", n_group=1, topk_group=1)
    model = build_model(cfg, device=device, dtype=torch.bfloat16, seed=0, std=0.08).eval()
    prompts, want = plain_greedy(model, device)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for eager, impl, ops in ((False, "model", False), (False, "model", True), (True, "model", True),
                             (False, "fused", False), (False, "fused", True), (True, "fused", True)):
        llm = LLM(model, block_size=16, num_blocks=400, max_num_seqs=16, enforce_eager=eager, experts_impl=impl,
                  fused_ops=ops)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        same = sum(a == b for a, b in zip(got, want))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 16) for a, b in zip(got, want)]
        print(f"check eager={eager} experts={impl} fused_ops={ops}: {same}/{len(prompts)} sequences identical; "
              f"first differing position "
              f"per sequence {first_diff}; graphs captured: {len(llm.runner.graphs)}; "
              f"blocks in use after: {llm.stats()['num_blocks_used']}", flush=True)


@torch.inference_mode()
def accuracy_vs_fp32(preset, layers, device):
    """Is the fused path's difference bf16 rounding? The same random weights in fp32 (the reference) and
    in bf16 through each path; prints each path's relative logits error and argmax agreement vs fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False   # a true fp32 reference
    cfg = get_config(preset, num_hidden_layers=layers)
    model = build_model(cfg, device=device, dtype=torch.float32, seed=0, std=0.02).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 64), device=device, generator=torch.Generator(device=device).manual_seed(0))
    ref = model(ids).float()
    model.to(torch.bfloat16)
    res = {}
    for experts, ops in (("model", False), ("fused", False), ("model", True), ("fused", True)):
        out = engine_model(model, fused_experts=experts == "fused", fused_ops=ops)(ids).float()
        res[(experts, ops)] = out
        print(f"accuracy {preset} {layers} layers, bf16 experts={experts} fused_ops={ops} vs fp32: rel logits err "
              f"{((out - ref).norm() / ref.norm()).item():.3e}, argmax agreement "
              f"{(out.argmax(-1) == ref.argmax(-1)).float().mean().item():.3f}", flush=True)
    base = res[("model", False)]
    for k, v in res.items():
        print(f"accuracy: bf16 {k} vs bf16 plain: rel {((v - base).norm() / base.norm()).item():.3e}", flush=True)
    del model, ref, res
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- helpers
def label(variant) -> str:
    impl, ops = variant
    return f"{impl} experts" + (", fused ops" if ops else "")


def release_memory(device):
    """After `del llm`: return its cache and graph pools to the device before the next engine is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke tests)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--batches", default=None, help="comma list (default 1,32,256)")
    ap.add_argument("--contexts", default=None, help="comma list (default 1024,4096)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "engine.md"))
    ap.add_argument("--profile-out", default=None)
    ap.add_argument("--experts", default="model,fused", help="engine expert paths to measure: model, fused")
    ap.add_argument("--check", action="store_true", help="first compare engine greedy output with plain generation")
    ap.add_argument("--ops", default="off,on", help="fused decode glue (RMSNorm, RoPE, router) settings to measure")
    ap.add_argument("--accuracy-layers", type=int, default=0,
                    help="first compare bf16 paths with an fp32 reference of this many layers (CUDA)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.check:
        check_cuda(device)
    if args.accuracy_layers and device.type == "cuda":
        accuracy_vs_fp32(args.preset, args.accuracy_layers, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = measured(device).bandwidth   # before the engines take the device's memory
    over = {"num_hidden_layers": args.layers} if args.layers else {}
    cfg = get_config(args.preset, **over)
    batches = [int(x) for x in (args.batches or "1,32,256").split(",")]
    contexts = [int(x) for x in (args.contexts or "1024,4096").split(",")]
    steps = 4 if args.quick else args.steps
    points = [(B, L) for L in contexts for B in batches]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {args.preset} ({cfg.num_parameters() / 1e9:.1f}B params), {dev_name}, {dtype}", flush=True)

    hf_tok = {}
    hf_prefill_tps = None
    if not args.no_hf:
        hf = build_hf(cfg, device, dtype)
        hf_prefill_tps = hf_prefill(hf, cfg, max(contexts), device)
        print(f"transformers prefill {hf_prefill_tps:,.0f} tok/s", flush=True)
        for B, L in points:
            if args.quick and B * L > 256 * 1024:
                continue   # the slowest transformers points: skipped in --quick
            try:
                dt = hf_decode(hf, cfg, B, L, 3, device, dtype)
                hf_tok[(B, L)] = B / dt
            except torch.OutOfMemoryError:
                hf_tok[(B, L)] = "OOM"
                torch.cuda.empty_cache()
            except Exception as e:   # report and go on: the engine's numbers still count
                hf_tok[(B, L)] = f"error: {type(e).__name__}"
                print(f"transformers B={B} L={L} failed: {e!r}", flush=True)
            print(f"transformers B={B} L={L}: {hf_tok[(B, L)]}", flush=True)
        del hf
        release_memory(device)

    model = build_model(cfg, device=device, dtype=dtype, seed=0, std=0.02)
    impls = args.experts.split(",")
    opses = [x == "on" for x in args.ops.split(",")]
    variants = [(i, o) for i in impls for o in opses]
    if "fused" in impls and device.type == "cuda":
        # The fused kernel against the model's own experts on this model: relative logits difference.
        ids = torch.randint(0, cfg.vocab_size, (8, 64), device=device)
        with torch.inference_mode():
            ref = model(ids).float()
            fused = engine_model(model, fused_experts=True)(ids).float()
            fused_ops = engine_model(model, fused_experts=True, fused_ops=True)(ids).float()
        for name, out in (("fused experts", fused), ("fused experts + fused ops", fused_ops)):
            rel = ((out - ref).norm() / ref.norm()).item()
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"{name} vs model experts, {cfg.num_hidden_layers} layers bf16: rel logits diff {rel:.2e}, "
                  f"argmax agreement {agree:.3f}", flush=True)
    max_len = max(contexts) + steps + 16
    options = dict(max_num_seqs=max(batches), max_model_len=max_len, block_size=64, max_num_batched_tokens=8192,
                   cache_memory_gb=None if device.type == "cuda" else 1.0)
    eng_tok, host_ms, prefill = {}, {}, {}
    capacity = None
    for impl, ops in variants:
        # One engine per setting (the previous one freed first: each takes most of the free memory).
        t0 = time.perf_counter()
        llm = LLM(model, experts_impl=impl, fused_ops=ops, **options)
        stats = llm.stats()
        capacity = stats["num_blocks_total"] * llm.engine_config.block_size
        print(f"engine ({label((impl, ops))}) ready in {time.perf_counter() - t0:.1f}s: "
              f"{stats['num_blocks_total']} blocks, {capacity:,} tokens", flush=True)
        v = (impl, ops)
        prefill[v] = engine_prefill(llm, 4 if args.quick else 8, max(contexts))
        print(f"engine ({label(v)}) prefill {prefill[v]:,.0f} tok/s", flush=True)
        for B, L in points:
            try:
                dt, host = engine_decode(llm, B, L, steps)
            except Exception as e:
                print(f"engine B={B} L={L} failed: {e!r}", flush=True)
                for rid in list(llm.requests):
                    llm.abort_request(rid)
                eng_tok[(v, B, L)] = f"error: {type(e).__name__}"
                continue
            eng_tok[(v, B, L)], host_ms[(v, B, L)] = B / dt, host * 1e3
            print(f"engine ({label(v)}) B={B} L={L}: {B / dt:,.0f} tok/s ({dt * 1e3:.1f} ms/step, "
                  f"{host * 1e3:.1f} ms outside execute)", flush=True)
        del llm
        release_memory(device)

    per_tok = LatentCache().bytes_per_token(cfg, torch.bfloat16)
    mha_tok = PerHeadCache().bytes_per_token(cfg, torch.bfloat16)
    L_conc = 4096
    conc = capacity // L_conc
    conc_mha = (capacity * per_tok // mha_tok) // L_conc

    def fmt(x):
        return x if isinstance(x, str) else f"{x:,.0f}"

    head = " | ".join(f"engine tok/s ({label(v)})" for v in variants)
    lines = [f"| batch | context | {head} | transformers tok/s | best ratio | best ms/step (host part) | "
             "floor ms/step | best % of floor | ceiling tok/s |", "|---" * (8 + len(variants)) + "|"]
    for B, L in points:
        es = [eng_tok.get((v, B, L), "-") for v in variants]
        h = hf_tok.get((B, L), "-")
        best = max((e for e in es if isinstance(e, float)), default=None)
        ratio = f"{best / h:.1f}x" if isinstance(h, float) and best else "-"
        bi = variants[es.index(best)] if best else None
        ms = f"{B / best * 1e3:.1f} ({host_ms[(bi, B, L)]:.1f})" if best else "-"
        fl = floor_ms(cfg, B, L, bandwidth)
        pct = f"{fl / (B / best * 1e3):.0%}" if best else "-"
        lines.append(f"| {B} | {L:,} | {' | '.join(fmt(e) for e in es)} | {fmt(h)} | {ratio} | {ms} | {fl:.2f} | "
                     f"{pct} | {B / fl * 1e3:,.0f} |")
    lines += ["", "| figure | engine | transformers |", "|---|---|---|",
              f"| prefill tok/s (prompts of {max(contexts):,}) | "
              f"{', '.join(f'{v:,.0f} ({label(k)})' for k, v in prefill.items())} | "
              f"{fmt(hf_prefill_tps) if hf_prefill_tps else '-'} |",
              f"| max concurrent sequences at {L_conc:,} (cache of {capacity:,} tokens, "
              f"{capacity * per_tok / 2**30:.1f} GiB) | {conc} | a per-head cache of the same bytes: {conc_mha} |"]
    table = "\n".join(lines)
    print(table)

    # The command as others would type it (where this run wrote its files is not part of it).
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--out", "--profile-out"):
            skip = True
        elif not a.startswith(("--out=", "--profile-out=")):
            argv.append(a)
    command = " ".join(["python", "benchmarks/bench_engine.py", *argv])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(f"# Engine benchmark\n\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                f"{dev_name}, torch {torch.__version__}, {dtype}, {args.preset} shape, random weights (std 0.02).\n\n"
                f"Command: `{command}`\n\n{table}\n\n"
                f"Floor = (weights touched per step + B x L x latent bytes) / {bandwidth / 1e12:.3g} TB/s (a "
                "device-to-device copy measured in this run); ceiling = B / floor. "
                "Decode tok/s are full engine steps (scheduling, CUDA-graph replay, sampling, output); the host "
                "part is the step's time outside the model runner (scheduling, stop checks, outputs). Experts: "
                "`model` = the model's torch._grouped_mm path, `fused` = the Triton fused-MoE kernel; `fused ops` = "
                "the engine's fused RMSNorm / MLA post-projection (c_KV norm + RoPE) / router kernels.\n")
    prof_path = args.profile_out or os.path.join(os.path.dirname(args.out), "engine_profile.txt")
    if os.path.exists(prof_path):
        os.remove(prof_path)
    if not args.no_profile:
        # Eager steps of the fastest setting measured (fused paths where they were measured).
        llm = LLM(model, experts_impl="fused" if "fused" in impls else "model", fused_ops=True in opses,
                  enforce_eager=True, **options)
        for B in sorted({min(batches), max(batches)}):
            try:
                print(profile_decode(llm, B, 1024 if 1024 in contexts else contexts[0], prof_path))
            except Exception as e:
                print(f"profiling failed: {e!r}")
        del llm
        release_memory(device)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
