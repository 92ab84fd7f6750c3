"""End to end, as a user sees it: `LLM(model)` then `generate`, V2-Lite shape with random weights.

One fresh process measures (run it with an empty Triton cache for the cold start, `--cold`):
  - time to ready (load + cache plan + start-up compilation and CUDA-graph capture);
  - 200 x (1,000 in, 100 out): the first run after start-up vs the second (target: within 1.15x);
  - one 32K-token prompt's prefill (transformers, same weights, same run) and one 128K-token prompt's;
  - decode B=1 at 128K, B=4 at 32K, B=1 at 1K (pure decode steps, placeholder contexts) against the
    memory floor, and B=1 at 1K generating 128 tokens including the prefill;
  - kernel compilations and graph captures after ready, over everything above (target: 0);
  - 256 x (256-1,024 in, 128 out) against transformers `generate` (batches of 128) on the same prompts
    (target: at least 25x);
  - checks on a tiny model: greedy output vs full recompute in bf16 and fp32 (fp32 decode graphs).
Floors (benchmarks/floors.py): prefill compute at the FLOP/s of a large GEMM, decode bytes (weights touched + latent
cache) at the bandwidth of a large copy, both measured on this device before the engine starts.

    python benchmarks/bench_e2e.py --cold                  # GPU: writes benchmarks/results/e2e.md
    python benchmarks/bench_e2e.py --cold --quantization fp8 --skip hf,checks   # results/e2e_fp8.md
    python benchmarks/bench_e2e.py --smoke --out /tmp/e2e.md   # CPU smoke test, tiny model
"""
from __future__ import annotations

import os
import sys
import tempfile

if "--cold" in sys.argv:   # before anything imports triton: an empty kernel cache, as on a fresh install
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")


def triton_cache_entries() -> int:
    """Compiled kernels in Triton's cache directory (0 when absent), counted before the engine starts: without
    --cold a machine just started may still hold none, so time to ready is labelled with what it found."""
    path = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return len(os.listdir(path)) if os.path.isdir(path) else 0


TRITON_CACHE_AT_START = triton_cache_entries()

import argparse   # noqa: E402
import dataclasses   # noqa: E402
import datetime   # noqa: E402
import json   # noqa: E402
import time   # noqa: E402

import torch   # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import engine_decode, plain_greedy   # noqa: E402
from floors import Floors, active_params, decode_bytes, fp8_gemm_flops, measured   # noqa: E402
from report import summary_block   # noqa: E402

from latentmoe import build_model, get_config   # noqa: E402
from latentmoe.bench import random_prompts, throughput   # noqa: E402
from latentmoe.engine import LLM, SamplingParams   # noqa: E402

def workload_floor_s(cfg, n: int, lin: int, lout: int, floors: Floors, step_bytes=decode_bytes) -> float:
    """n requests of lin prompt and lout output tokens: prefill compute + decode bytes (all n at once).
    `step_bytes(cfg, B, L)`: a decode step's bytes (decode_bytes with the engine's weight and cache formats)."""
    prefill = 2 * active_params(cfg) * n * lin / floors.flops
    return prefill + sum(step_bytes(cfg, n, lin + t) for t in range(lout)) / floors.bandwidth


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(llm, prompts, max_tokens):
    sync(llm.device)
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    sync(llm.device)
    return time.perf_counter() - t


@torch.inference_mode()
def hf_prefill_s(hf, L: int, device) -> float:
    ids = torch.randint(3, hf.config.vocab_size, (1, L), device=device)
    times = []
    for _ in range(2):   # the first warms cuBLAS / SDPA
        sync(device)
        t = time.perf_counter()
        hf(input_ids=ids, logits_to_keep=1)
        sync(device)
        times.append(time.perf_counter() - t)
    return times[-1]


def profile_prefill(llm, L: int, out_path: str) -> str:
    """Where one L-token prompt's prefill time goes: CUDA kernels grouped by name (self time), the step
    count, the wall time and the GPU's busy time (what the gaps between kernels leave out)."""
    from timing import kernel_profile
    g = torch.Generator().manual_seed(L + 11)
    prompt = torch.randint(3, llm.config.vocab_size, (L,), generator=g).tolist()
    wall, table, n, busy = kernel_profile(lambda: timed_generate(llm, [prompt], 1), llm.device, 40, 90)
    text = (f"## prefill of one {L:,}-token prompt (token budget {llm.engine_config.max_num_batched_tokens:,}): "
            f"{wall:.3f} s wall under the profiler, {busy / 1e6:.3f} s of kernel time, {n} kernels\n{table}\n")
    with open(out_path, "a") as f:
        f.write(text)
    return text


def trace_decode(llm, B: int, L: int, out_path: str) -> str:
    """Where a decode step's time goes, as the engine runs it (CUDA-graph replays): one step's kernels in
    launch order with their durations and the idle time before each, grouped by name, and one middle
    layer's sequence in full. Idle time is what a kernel's launch and ramp-up cost beyond its own run."""
    from torch.profiler import ProfilerActivity, profile
    if llm.device.type != "cuda":
        return f"decode B={B} at {L}: the timeline needs CUDA\n"
    engine_decode(llm, B, L, 2)   # warm (graph for this bucket)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine_decode(llm, B, L, 4)
    ks = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    if len(ks) < 12:
        return f"decode B={B} at {L}: no CUDA kernels recorded\n"
    # Steps: each begins with its input staging (host-to-device copies) where the engine stages inputs once
    # a step; else runs of kernels separated by the host's work between steps (the longest idle stretches).
    per_step = len(ks) // 6
    staged = [i for i, e in enumerate(ks) if e.name.startswith("Memcpy HtoD")
              and (i == 0 or not ks[i - 1].name.startswith("Memcpy HtoD"))]
    if 4 <= len(staged) <= 12:
        steps = [ks[a:b] for a, b in zip(staged, staged[1:] + [len(ks)])]
    else:
        idle = [b.time_range.start - a.time_range.end for a, b in zip(ks, ks[1:])]
        cuts = sorted(sorted(range(len(idle)), key=lambda i: -idle[i])[:5])
        steps = [ks[a + 1:b + 1] for a, b in zip([-1] + cuts, cuts + [len(ks) - 1])]
    whole = [s for s in steps if len(s) > per_step // 2] or steps
    step = sorted(whole, key=len)[len(whole) // 2]
    span = step[-1].time_range.end - step[0].time_range.start
    busy = sum(e.time_range.elapsed_us() for e in step)
    groups: dict[str, list[float]] = {}
    for a, b in zip([None] + step[:-1], step):
        gap = 0.0 if a is None else b.time_range.start - a.time_range.end
        g = groups.setdefault(b.name[:60], [0, 0.0, 0.0])
        g[0] += 1
        g[1] += b.time_range.elapsed_us()
        g[2] += gap
    # The host's share: the step's graph replayed back to back (its inputs as the last step left them, so
    # each replay rewrites the same cache row with the same values) against full engine steps.
    from timing import median_seconds
    replay = median_seconds(llm.runner.graphs[next(x for x in llm.runner.buckets if x >= B)].replay, iters=20)
    step_s, _ = engine_decode(llm, B, L, 10)
    lines = [f"## decode B={B} at context {L:,} (graph replay, under the profiler): {len(step)} kernels a step "
             f"(~{per_step} by count), {span:.0f} us from first start to last end, {busy:.0f} us busy, "
             f"{span - busy:.0f} us idle between kernels (overlap under programmatic dependent launch: negative)", "",
             f"Without the profiler: the graph replayed alone {replay * 1e3:.3f} ms, an engine step "
             f"{step_s * 1e3:.3f} ms: {(step_s - replay) * 1e3:.3f} ms a step is the host's (input staging, "
             "sampling's wait, scheduling) with the device idle.", "",
             "| kernel | per step | us busy | us idle before |", "|---|---|---|---|"]
    for name, (c, t, gap) in sorted(groups.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        lines.append(f"| {name} | {c} | {t:.1f} | {gap:.1f} |")
    third = len(step) // 3
    i0 = next((i for i in range(third, len(step)) if "mla_post" in step[i].name), third)
    i1 = next((i for i in range(i0 + 1, len(step)) if "mla_post" in step[i].name), min(len(step), i0 + 25))
    lines += ["", "One layer in launch order (from one MLA post-projection to the next):", "",
              "| kernel | us | us idle before |", "|---|---|---|"]
    for a, b in zip(step[i0 - 1:i1], step[i0:i1 + 1]):
        lines.append(f"| {b.name[:80]} | {b.time_range.elapsed_us():.1f} | {b.time_range.start - a.time_range.end:.1f} |")
    text = "\n".join(lines) + "\n\n"
    with open(out_path, "a") as f:
        f.write(text)
    return text


def checks(device, log):
    cfg = get_config("tiny", vocab_size=512, num_hidden_layers=3, topk_method="greedy", n_group=1, topk_group=1)
    for dtype in (torch.bfloat16, torch.float32):
        model = build_model(cfg, device=device, dtype=dtype, seed=0, std=0.08).eval()
        prompts, want = plain_greedy(model, device)
        llm = LLM(model, block_size=16, num_blocks=400, max_num_seqs=16, max_num_batched_tokens=256)
        got = [o.outputs[0].token_ids for o in llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
        same = sum(a == b for a, b in zip(got, want))
        s = llm.stats()
        log(f"check {str(dtype)[6:]}: {same}/{len(prompts)} sequences identical to full recompute; decode graphs "
            f"{'on' if llm.runner.use_cuda_graphs else 'OFF'} ({s['graph_captures']} captured, "
            f"{s['graph_captures_after_ready']} after ready)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cold", action="store_true", help="empty Triton cache (set before import)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: checks,hf,128k,generate (the 256-prompt "
                                               "workload against transformers generate)")
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="the engine's weights in block FP8 (LLM(..., quantization='fp8'))")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="the engine's latent cache format")
    ap.add_argument("--out", default=None, help="results file (default results/e2e.md, or e2e_fp8.md with FP8)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-prefill", default=None, metavar="PATH",
                    help="append a kernel profile of the first long prompt's prefill to PATH")
    ap.add_argument("--trace-decode", default=None, metavar="PATH",
                    help="append the kernel timeline of decode steps (B=1 at 1K and 128K, B=4 at 32K) to PATH")
    args = ap.parse_args()
    fp8 = args.quantization == "fp8" or args.kv_cache_dtype == "fp8"
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", "e2e_fp8.md" if fp8 else "e2e.md")
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = "tiny" if args.smoke else args.preset
    n, lin, lout = (8, 32, 8) if args.smoke else (200, 1000, 100)
    long_lens = (256, 512) if args.smoke else (32768, 131072)
    dec = [(1, 512, "B=1 at 512"), (4, 256, "B=4 at 256"), (1, 64, "B=1 at 64")] if args.smoke else \
        [(1, 131072, "B=1 at 128K"), (4, 32768, "B=4 at 32K"), (1, 1024, "B=1 at 1K")]
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": preset,
           "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
           "cold_triton_cache": args.cold, "triton_cache_entries_at_start": TRITON_CACHE_AT_START, "date": datetime.datetime.now(datetime.timezone.utc).strftime(
               "%Y-%m-%d %H:%M UTC"), "command": "python " + " ".join(sys.argv)}
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    cfg = get_config(preset)
    floors = measured(device)   # before the engine takes the device's memory for its cache
    if args.quantization == "fp8" and device.type == "cuda":
        # An FP8 engine's compute floor is the FP8 GEMM's rate (its attention stays bf16: a floor, not a target).
        floors = dataclasses.replace(floors, flops=fp8_gemm_flops(device) or floors.flops, dtype=torch.float8_e4m3fn)
    res["floors"] = dataclasses.asdict(floors)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build_model(cfg, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                        seed=0, std=0.02).eval()
    t0 = time.perf_counter()
    llm = LLM(model, max_model_len=max(long_lens) + 64, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    res["time_to_ready_s"] = time.perf_counter() - t0
    cache_bytes = llm.engine_config.kv_cache.bytes_per_token(cfg, llm.engine_config.dtype)

    def step_bytes(cfg, B, L):
        """A decode step's bytes in this engine's formats."""
        return decode_bytes(cfg, B, L, fp8_weights=args.quantization == "fp8", cache_bytes_per_token=cache_bytes)
    res["max_num_batched_tokens"] = llm.engine_config.max_num_batched_tokens
    log(f"time to ready {res['time_to_ready_s']:.1f} s (warm-up {llm.runner.warmup_seconds:.1f} s, "
        f"{llm.runner.compilations_at_ready} compilations, {llm.runner.num_captures} graphs; "
        f"{llm.runner.describe_warmup()})")
    # Each run its own prompts (same lengths): the second run gets no prefix-cache hits from the first.
    tp = throughput(llm, [random_prompts(n, lin, cfg.vocab_size, seed=s) for s in (1, 2)], lout, progress=False)
    r1, r2 = tp["runs"]
    floor = workload_floor_s(cfg, n, lin, lout, floors, step_bytes)
    res["workload"] = dict(n=n, input=lin, output=lout, run1_s=r1["seconds"], run2_s=r2["seconds"],
                           run1_req_s=r1["requests_per_s"], run2_req_s=r2["requests_per_s"], floor_req_s=n / floor)
    log(f"{n} x ({lin} in, {lout} out): run 1 {r1['seconds']:.2f} s ({r1['requests_per_s']:.1f} req/s), run 2 "
        f"{r2['seconds']:.2f} s ({r2['requests_per_s']:.1f} req/s), ratio {r1['seconds'] / r2['seconds']:.2f}; "
        f"floor {n / floor:.1f} req/s")
    g = torch.Generator().manual_seed(7)
    res["prefill"] = {}
    for L in long_lens:
        if L > 100000 and "128k" in skip:
            continue
        p = torch.randint(3, cfg.vocab_size, (L,), generator=g).tolist()
        s = timed_generate(llm, [p], 1)
        res["prefill"][L] = dict(engine_s=s)
        log(f"prefill {L:,} tokens: {s:.2f} s ({L / s:,.0f} tok/s)")
        if args.profile_prefill:
            print(profile_prefill(llm, L, args.profile_prefill))
    # Prompt lengths start-up did not run, each three times (new tokens each time: no prefix-cache hit):
    # whatever plans per shape while serving shows as a first call slower than its repeats.
    res["new_lengths"] = []
    for L in ((40, 77) if args.smoke else (5000, 20001, 60007)):
        t = [timed_generate(llm, [torch.randint(3, cfg.vocab_size, (L,), generator=g).tolist()], 1) for _ in range(3)]
        res["new_lengths"].append(dict(tokens=L, first_s=t[0], repeat_s=min(t[1:])))
        log(f"prefill of a new length, {L:,} tokens: first {t[0] * 1e3:.0f} ms, then {t[1] * 1e3:.0f} / "
            f"{t[2] * 1e3:.0f} ms")
    for B, L, name in dec:
        step, host = engine_decode(llm, B, L, 20 if not args.smoke else 3)
        fl = step_bytes(cfg, B, L) / floors.bandwidth
        res.setdefault("decode", {})[name] = dict(ms_per_step=step * 1e3, floor_ms=fl * 1e3, share=fl / step)
        log(f"decode {name}: {step * 1e3:.2f} ms/step, floor {fl * 1e3:.2f} ms ({fl / step:.0%} of the floor)")
        if args.trace_decode:
            print(trace_decode(llm, B, L, args.trace_decode))
    p = torch.randint(3, cfg.vocab_size, (lin if args.smoke else 1024,), generator=g).tolist()
    s = timed_generate(llm, [p], 128 if not args.smoke else 8)
    res["b1_with_prefill_tok_s"] = (128 if not args.smoke else 8) / s
    log(f"B=1, 1K prompt, 128 tokens incl. prefill: {res['b1_with_prefill_tok_s']:.0f} tok/s")
    gen_prompts = None
    if "generate" not in skip and "hf" not in skip:
        n2, lo, hi, out2 = (8, 16, 32, 8) if args.smoke else (256, 256, 1024, 128)
        gen_prompts = random_prompts(n2, hi, cfg.vocab_size, min_input_len=lo, seed=3)
        run = throughput(llm, [gen_prompts], out2, progress=False)["runs"][0]
        res["generate"] = dict(n=n2, min_input=lo, input=hi, output=out2, engine_s=run["seconds"],
                               engine_req_s=run["requests_per_s"])
        log(f"{n2} x ({lo}-{hi} in, {out2} out): {run['seconds']:.2f} s ({run['requests_per_s']:.1f} req/s)")
    st = llm.stats()
    res["compilations_after_ready"], res["graph_captures_after_ready"] = (st["compilations_after_ready"],
                                                                          st["graph_captures_after_ready"])
    log(f"after ready, over all of the above: {st['compilations_after_ready']} compilations, "
        f"{st['graph_captures_after_ready']} graph captures")
    del llm
    if "hf" not in skip:
        import gc
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        from latentmoe.commands.bench import _transformers_model
        hf = _transformers_model(model)
        L = long_lens[0]
        s = hf_prefill_s(hf, L, device)
        res["prefill"][L]["transformers_s"] = s
        log(f"transformers prefill {L:,} tokens: {s:.2f} s (engine {res['prefill'][L]['engine_s'] / s:.2f}x its time)")
        if gen_prompts is not None:
            from latentmoe.bench.offline import transformers_throughput
            g2 = res["generate"]
            t = transformers_throughput(hf, gen_prompts, g2["output"], batch_size=128, progress=False)
            g2["transformers_s"] = t["seconds"]
            log(f"transformers generate, the same {g2['n']} prompts: {t['seconds']:.2f} s "
                f"(engine {t['seconds'] / g2['engine_s']:.1f}x faster)")
        del hf
    write(args, res, lines)
    # Last: another engine's compilations would count against the one measured above.
    if device.type == "cuda" and "checks" not in skip:
        checks(device, print)


def write(args, res, lines):
    w = res["workload"]
    found = res["triton_cache_entries_at_start"]
    cache = "empty Triton cache" if found == 0 else f"Triton cache of {found:,} entries at start"
    rows = [f"| time to ready ({cache}) | "
            f"{res['time_to_ready_s']:.1f} s | - | - |",
            f"| {w['n']} x ({w['input']:,} in, {w['output']} out), first run after start-up | "
            f"{w['run1_req_s']:.1f} req/s | second run {w['run2_req_s']:.1f} req/s | "
            f"{w['run1_s'] / w['run2_s']:.2f}x the time |",
            f"| same, second run vs the floor | {w['run2_req_s']:.1f} req/s | floor {w['floor_req_s']:.1f} req/s | "
            f"{w['run2_req_s'] / w['floor_req_s']:.0%} |"]
    for L, p in res["prefill"].items():
        ref = f"transformers {p['transformers_s']:.2f} s" if "transformers_s" in p else "-"
        ratio = f"{p['transformers_s'] / p['engine_s']:.2f}x" if "transformers_s" in p else "-"
        rows.append(f"| prefill, one prompt of {L:,} tokens | {p['engine_s']:.2f} s | {ref} | {ratio} |")
    if res.get("new_lengths"):
        nl = res["new_lengths"]

        def each(key, scale=1.0):
            return " / ".join(f"{d[key] * scale:,.0f}" for d in nl)
        worst = max(d["first_s"] / d["repeat_s"] for d in nl)
        rows.append(f"| prefill of a prompt length start-up did not run ({each('tokens')} tokens), first call | "
                    f"{each('first_s', 1e3)} ms | repeats {each('repeat_s', 1e3)} ms | at most {worst:.2f}x the time |")
    for name, d in res.get("decode", {}).items():
        rows.append(f"| decode {name} | {d['ms_per_step']:.2f} ms/step | floor {d['floor_ms']:.2f} ms | "
                    f"{d['share']:.0%} of the floor |")
    rows.append(f"| decode B=1, 1K prompt, 128 tokens incl. prefill | {res['b1_with_prefill_tok_s']:.0f} tok/s | - | - |")
    if "transformers_s" in res.get("generate", {}):
        g = res["generate"]
        rows.append(f"| {g['n']} x ({g['min_input']:,}-{g['input']:,} in, {g['output']} out) | {g['engine_s']:.2f} s | "
                    f"transformers generate {g['transformers_s']:.1f} s | {g['transformers_s'] / g['engine_s']:.1f}x |")
    rows.append(f"| compilations / graph captures after ready (all of the above) | "
                f"{res['compilations_after_ready']} / {res['graph_captures_after_ready']} | 0 | - |")
    prov = (f"date: {res['date']}; device: {res['device']}; torch {torch.__version__}; token budget "
            f"{res['max_num_batched_tokens']:,}; command: `{res['command']}`")
    formats = ", ".join(f for f, on in (("FP8 weights", res["quantization"] == "fp8"),
                                         ("FP8 latent cache", res["kv_cache_dtype"] == "fp8")) if on)
    what = f"random bf16 weights, engine with {formats}" if formats else "random bf16 weights"
    text = [f"# End to end: LLM(model) then generate (V2-Lite shape, {what})", "",
            *summary_block(prov, rows), "", "Log of the run:", "", "```", *lines, "```", "",
            f"Floors: prefill compute and decode bytes (weights touched + latent cache, in the engine's formats) "
            f"at what this device sustains, {Floors(**res['floors']).describe()}.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    print("\n".join(text))


if __name__ == "__main__":
    main()
