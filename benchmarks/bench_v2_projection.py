"""DeepSeek-V2 (236B) on one 8-GPU node, projected from one rank's share run on one GPU.

At tensor_parallel_size=8 every rank runs the same decode step on its share (engine/tensor_parallel.py):
16 of the 128 heads with its own latent cache, 1/8 of every dense MLP and shared expert, and either 1/8
of every routed expert's width (default) or 20 of the 160 routed experts whole (--mode ep), all 60
layers, random bf16 weights. This script builds exactly that share (the same `build_shard` the engine
uses, with a one-process group so the collectives run as they would, minus the transport) and times
full engine decode steps (schedule, CUDA-graph replay, sampling) at B = 1, 64, 256 and contexts 1K, 4K.

What is measured here: the rank's step, including the launch of its 2 all-reduces per layer (a
one-rank NCCL group: no bytes leave the GPU), and the copy bandwidth of this GPU (the floor's rate).
What is not: the transport. Each all-reduce moves B x hidden bf16 values (both after attention and
after the MLP/MoE; with --mode ep the combine of the experts is that same all-reduce, as every rank
holds every token). Its time is projected as latency + 2(N-1)/N x bytes / bus bandwidth with published
NVLink figures (defaults: 360 GB/s bus bandwidth and 15 us per all-reduce, the order of NCCL's
all_reduce_perf on 8 x H100/H200 SXM; change with --busbw-gbs / --latency-us). The node's projected
decode throughput is B / (step + 120 all-reduces), printed beside the DeepSeek-V2 report's "more than
50K tokens/s" on 8 x H800, which used FP8 weights and a ~6-bit cache (bf16 weights and cache here).

    python benchmarks/bench_v2_projection.py --out benchmarks/results/v2_projection.md    # one H200, ~10 min
    python benchmarks/bench_v2_projection.py --smoke                                      # CPU, tiny shape
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from bench_engine import engine_decode  # noqa: E402
from floors import measured  # noqa: E402
from report import summary_block  # noqa: E402

from latentmoe import get_config  # noqa: E402
from latentmoe.engine import LLM  # noqa: E402
from latentmoe.engine.tensor_parallel import ShardPlan, build_shard  # noqa: E402
from latentmoe.model import init_weights  # noqa: E402

REPORT_TOK_S = 50_000   # DeepSeek-V2 report: > 50K tokens/s generation on one 8 x H800 node (FP8 weights, ~6-bit cache)
GiB = 1024 ** 3


def allreduce_launch_us(device: torch.device, numel: int, dtype: torch.dtype) -> float:
    """One one-rank all_reduce of `numel` values, as a graph replays it: the launch share of a collective."""
    x = torch.zeros(numel, dtype=dtype, device=device)
    n = 100
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(x)
        return (time.perf_counter() - t) / n * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dist.all_reduce(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            dist.all_reduce(x)
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shard_bytes(model) -> tuple[int, int]:
    """(all parameter bytes of the share, of them the routed experts')."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return total, experts


def floor_ms(cfg, model, B: int, L: int, bw: float, dtype_bytes: int) -> float:
    """Bytes one rank must read per decode step / copy bandwidth: its weights (routed experts by the
    expected share a batch of B touches under uniform routing) and its latent cache of B x L tokens."""
    total, experts = shard_bytes(model)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    frac = 1 - (1 - K / E) ** B             # chance that a given expert serves at least one token
    cache = B * L * cfg.num_hidden_layers * cfg.kv_cache_width * dtype_bytes
    return ((total - experts) + experts * frac + cache) / bw * 1e3


def run_mode(cfg, mode, args, device, dtype, bw, lines, summary):
    plan = ShardPlan(0, args.ranks, expert_parallel=mode == "ep")
    torch.manual_seed(0)
    model = build_shard(cfg, plan, device, dtype)
    init_weights(model)
    total, experts = shard_bytes(model)
    L_max = max(args.contexts) + args.steps + 8
    per_token = cfg.num_hidden_layers * cfg.kv_cache_width * torch.tensor([], dtype=dtype).element_size()
    blocks = max(args.batches) * (-(-L_max // 64)) + 2
    cache_gb = blocks * 64 * per_token / GiB
    what = ("1/%d of each routed expert's width" % args.ranks if mode == "tp"
            else "%d of %d routed experts whole" % (cfg.n_routed_experts // args.ranks, cfg.n_routed_experts))
    lines += ["", f"### {mode}: {cfg.num_attention_heads // args.ranks} heads, {what}, {cfg.num_hidden_layers} layers",
              "", f"Rank's weights {total / GiB:.1f} GiB (routed experts {experts / GiB:.1f} GiB); latent cache "
              f"{cache_gb:.1f} GiB for {max(args.batches)} x {L_max} tokens (every rank holds the whole latent cache).",
              "", "| B | context | rank step ms | floor ms | all-reduce launch us (1 rank) | projected comm ms "
              "| projected node tok/s | report (8 x H800) |", "|---|---|---|---|---|---|---|---|"]
    try:
        # Only decodes are timed: a prefill budget of one batch keeps the start-up warm-up short.
        llm = LLM(model, max_num_seqs=max(args.batches), max_num_batched_tokens=max(args.batches), max_model_len=L_max,
                  cache_memory_gb=cache_gb, enforce_eager=args.eager)
    except torch.OutOfMemoryError:
        lines.append(f"The rank's weights and a cache of {cache_gb:.1f} GiB do not fit on this device.")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    n_ar = 2 * cfg.num_hidden_layers
    for L in args.contexts:
        for B in args.batches:
            try:
                step, host = engine_decode(llm, B, L, args.steps)
            except torch.OutOfMemoryError:
                lines.append(f"| {B} | {L} | out of memory | | | | | |")
                continue
            msg = B * cfg.hidden_size * torch.tensor([], dtype=dtype).element_size()
            launch = allreduce_launch_us(device, B * cfg.hidden_size, dtype)
            comm = n_ar * (args.latency_us * 1e-6 + 2 * (args.ranks - 1) / args.ranks * msg / (args.busbw_gbs * 1e9))
            node = B / (step + comm)
            fl = floor_ms(cfg, model, B, L, bw, torch.tensor([], dtype=dtype).element_size())
            lines.append(f"| {B} | {L:,} | {step * 1e3:.2f} (host {host * 1e3:.2f}) | {fl:.2f} | {launch:.1f} | "
                         f"{comm * 1e3:.2f} ({n_ar} x {msg / 1024:.0f} KiB) | {node:,.0f} | {REPORT_TOK_S:,} |")
            print(lines[-1], flush=True)
            if B == max(args.batches):
                summary.append(f"| {mode.upper()} N={args.ranks}, B={B}, context {L:,}: projected node decode | "
                               f"{node:,.0f} tok/s (rank step {step * 1e3:.1f} ms + comm {comm * 1e3:.1f} ms) | "
                               f"report: >{REPORT_TOK_S:,} tok/s (8 x H800, FP8, ~6-bit cache) | "
                               f"{node / REPORT_TOK_S:.2f}x |")
    if device.type == "cuda":
        lines.append("" if llm.runner.use_cuda_graphs else
                     "\nCUDA graph capture failed (see the log): these steps ran eagerly.")
    del llm, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["tp", "ep", "both"], default="both",
                    help="routed experts split by width (tp), whole over ranks (ep), or both runs")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--busbw-gbs", type=float, default=360.0, help="NVLink all-reduce bus bandwidth (published)")
    ap.add_argument("--latency-us", type=float, default=15.0, help="per all-reduce latency (published, small messages)")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny model at N=2: checks the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        cfg = get_config("tiny", num_hidden_layers=3)
        args.ranks, args.steps = 2, 2
        args.batches, args.contexts = [1, 4], [16, 40]
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA device (or --smoke)")
        cfg = get_config("deepseek-v2", num_hidden_layers=args.layers)
        args.batches = [int(b) for b in args.batches.split(",")]
        args.contexts = [int(c) for c in args.contexts.split(",")]
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        torch.cuda.set_device(device)
    from latentmoe.parallel.launch import free_port
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    bw = measured(device).bandwidth
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    prov = (f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {name} (one rank of "
            f"N={args.ranks}); torch {torch.__version__}; command: `python benchmarks/bench_v2_projection.py "
            f"{' '.join(sys.argv[1:])}`")
    lines = [prov, "", f"Copy bandwidth measured here: {bw / 1e9:,.0f} GB/s (the floor's rate). Transport projected "
             f"with {args.busbw_gbs:.0f} GB/s all-reduce bus bandwidth and {args.latency_us:.0f} us per all-reduce "
             "(published NVLink figures, not measured: one GPU has no peer)."]
    summary: list[str] = []
    for mode in (["tp", "ep"] if args.mode == "both" else [args.mode]):
        run_mode(cfg, mode, args, device, dtype, bw, lines, summary)
    dist.destroy_process_group()
    text = "\n".join(["# DeepSeek-V2 at N=8: one rank on one GPU, projected node decode", "",
                      *summary_block(prov, summary), "", *lines[1:]])
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
