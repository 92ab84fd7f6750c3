"""The OpenAI server under load beside the offline engine, one process, one engine, same run.

One `LLM` (V2-Lite shape, random bf16 weights, the server's default token budget) first runs the workload
offline (`generate`, the reference, asking logprobs=0 as the served requests do) with all requests at once.
Then, at each concurrency c, `--rounds` times: the workload offline with at most c sequences running (the
offline cost of serving c clients at a time, so that the ratio to it is the server's own overhead), then
served: the same engine behind `latentmoe`'s FastAPI app in uvicorn, loaded by `latentmoe.bench.serve_load`
(what `latentmoe bench serve` runs), new prompts each time (no prefix-cache hits). The load runs in its own
process, as a client would: in the server's process its parsing of every stream would compete for the
interpreter. Prompts are token ids, so both sides do the same work. Target: at concurrency 64, throughput within 10% of offline and
no errors.

    python benchmarks/bench_serve.py                             # GPU: writes benchmarks/results/serve.md
    python benchmarks/bench_serve.py --smoke --out /tmp/s.md     # CPU: tiny model
    python benchmarks/bench_serve.py --stand-in 8,13 --concurrency 64 --out /tmp/s.md   # CPU: the host's share

`--stand-in MS,US` measures what the host side costs (scheduling, outputs, HTTP streaming) apart from the
model: the same workload and engine on a tiny CPU model whose every step is a sleep of MS milliseconds plus
US microseconds per prefill token (8,13: about a V2-Lite decode step and prefill rate on an H200) and whose
sampled token is fixed. The sleeps queue as a device's work does, so the engine looks ahead over them as on a
GPU; what a GPU step costs the host beyond the engine's Python (launching an eager step's kernels, building its
inputs on the device) is not modelled. A diagnostic, not a measurement of any device.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import summary_block   # noqa: E402

from latentmoe import build_model, get_config   # noqa: E402
from latentmoe.bench import random_prompts, throughput   # noqa: E402
from latentmoe.bench.serve import serve_load   # noqa: E402
from latentmoe.engine import LLM, EngineConfig   # noqa: E402
from latentmoe.engine.async_engine import AsyncLLM   # noqa: E402
from latentmoe.engine.model_runner import LaunchedStep, ModelRunner   # noqa: E402


def stand_in_llm(step_ms: float, prefill_us: float, **options) -> LLM:
    """An engine over a tiny CPU model whose steps are sleeps (see the module docstring). The sleeps queue as a
    device's work does: a step launched while another runs starts when that one ends, so the engine looks ahead
    (async_scheduling) as it does on a GPU, and the host's work between steps overlaps them."""
    class SleptStep(LaunchedStep):
        done_at: float = 0.0

    class SleepRunner(ModelRunner):
        device_free_at = 0.0

        def warm_up(self, *args, **kwargs):
            self.ready = True

        def launch(self, batch, after=None):
            samplers = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == len(s)]
            step = SleptStep(batch, samplers)
            seconds = (step_ms + prefill_us * (batch.num_tokens - batch.num_decodes) / 1e3) / 1e3
            step.done_at = self.device_free_at = max(time.perf_counter(), self.device_free_at) + seconds
            return step

        def collect(self, step):
            time.sleep(max(0.0, step.done_at - time.perf_counter()))
            return [5] * len(step.samplers), [{5: 0.0} if s.params.logprobs is not None else None
                                              for s in step.samplers]

    class SleepLLM(LLM):
        runner_class = SleepRunner

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._looks_ahead = self.engine_config.async_scheduling   # the sleeps run beside the host, as a GPU

    return SleepLLM(build_model(get_config("tiny"), seed=0).eval(), device="cpu", **options)


def start_server(llm):
    """The app over `llm` in a uvicorn thread on a free local port -> (base_url, uvicorn.Server)."""
    import httpx
    import uvicorn

    from latentmoe.server.app import create_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(AsyncLLM(llm), "model"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return base, server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become healthy")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=100)
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--budget", type=int, default=None,
                    help="token budget (default: the engine's own, what `latentmoe serve` uses)")
    ap.add_argument("--prefill-hold-steps", default=str(EngineConfig.prefill_hold_steps),
                    help="comma list: each value serves every concurrency (0: arrivals admitted at once; "
                         "default: the engine's default)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="served runs at each concurrency, each after its own offline reference (medians reported)")
    ap.add_argument("--stand-in", default=None, metavar="MS,US",
                    help="a tiny CPU model whose steps sleep MS ms + US us per prefill token (the host's share)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serve.md"))
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.preset, args.num_prompts, args.input_len, args.output_len = "tiny", 8, 32, 8
        args.budget, args.concurrency = 512, "1,4"
    if args.stand_in:
        step_ms, prefill_us = (float(x) for x in args.stand_in.split(","))
        dev, args.preset = torch.device("cpu"), f"stand-in {step_ms:g} ms + {prefill_us:g} us/prefill token"
        cfg = get_config("tiny")
        llm = stand_in_llm(step_ms, prefill_us, max_num_batched_tokens=args.budget or 8192, block_size=64,
                           num_blocks=max(64, 2 * args.num_prompts * -(-(args.input_len + args.output_len) // 64)),
                           max_model_len=args.input_len + args.output_len + 64)
    else:
        cfg = get_config(args.preset)
        model = build_model(cfg, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, seed=0,
                            std=0.02).eval()
        llm = LLM(model, max_num_batched_tokens=args.budget)
    n, L, O = args.num_prompts, args.input_len, args.output_len
    seed = iter(range(1, 1000))
    prompts = lambda count: random_prompts(count, L, cfg.vocab_size, seed=next(seed))   # noqa: E731
    # The served requests ask for logprobs 0 (a chunk per token: the random model has no text to stream), so the
    # offline references do too: the same sampling work on both sides.
    off = throughput(llm, [prompts(n), prompts(n)], O, logprobs=0)["runs"][-1]
    print(f"offline: {off['requests_per_s']:.1f} req/s, {off['output_tokens_per_s']:,.0f} output tok/s", flush=True)
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    counts = {c: min(n, max(4 * c, 20)) for c in concurrencies}   # concurrency 1: fewer requests, the same rates

    def offline_at(c: int) -> float:
        """The offline engine with at most c sequences running: what serving c clients at a time costs without
        the server, so that the ratio to it is the server's own overhead. Run while the server idles."""
        llm.scheduler.max_num_seqs = min(c, llm.engine_config.max_num_seqs)
        try:
            return throughput(llm, [prompts(counts[c])], O, progress=False, logprobs=0)["runs"][-1]["requests_per_s"]
        finally:
            llm.scheduler.max_num_seqs = llm.engine_config.max_num_seqs

    base, server = start_server(llm)
    rows, lines = [], []
    client = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    holds = [int(x) for x in args.prefill_hold_steps.split(",")]
    default_hold = EngineConfig.prefill_hold_steps if EngineConfig.prefill_hold_steps in holds else holds[0]
    for hold in holds:
        # The scheduler reads it every step: one engine (one start-up) serves each setting in turn, and the
        # offline reference runs with the same setting.
        llm.scheduler.prefill_hold_steps = hold
        for c in concurrencies:
            count = counts[c]
            served, offline = [], []
            for _ in range(args.rounds):
                # Offline and served runs alternate, so that a drift of the device's speed during the benchmark
                # (runs of the same code in one process moved by a tenth) reaches both sides alike.
                offline.append(offline_at(c))
                # logprobs 0: a chunk per token though the random model has no tokenizer (no text to stream)
                r = client.submit(serve_load, base, prompts(count), O, model="model", max_concurrency=c,
                                  progress=False, extra_body={"logprobs": 0}).result()
                served.append(r)
                pct = lambda k: " / ".join("-" if r[k][p] is None else f"{r[k][p]:.1f}" for p in ("p50", "p99"))   # noqa: E731
                line = (f"| {hold} | {c} | {r['completed']}/{count} | {r['errors']} | {r['requests_per_s']:.1f} | "
                        f"{offline[-1]:.1f} | {r['requests_per_s'] / offline[-1]:.2f}x | "
                        f"{r['output_tokens_per_s']:,.0f} | {pct('ttft_ms')} | {pct('tpot_ms')} | {pct('itl_ms')} | "
                        f"{r['client_cpu_share']:.0%} |")
                print(line, flush=True)
                lines.append(line)
            if hold == default_hold:
                hold_note = f", prefill hold {hold} steps" if hold else ""
                rounds_note = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
                rate = statistics.median(x["requests_per_s"] for x in served)
                ratio = statistics.median(x["requests_per_s"] / o for x, o in zip(served, offline))
                errors = sum(x["errors"] for x in served)
                rows.append(f"| server, concurrency {c}, {count} x ({L} in, {O} out){hold_note}{rounds_note} | "
                            f"{rate:.1f} req/s, {errors} errors | offline engine at most {c} running "
                            f"{statistics.median(offline):.1f} req/s; all at once {off['requests_per_s']:.1f} | "
                            f"{ratio:.2f}x; {rate / off['requests_per_s']:.2f}x |")
    client.shutdown()
    server.should_exit = True
    stats = llm.stats()
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    prov = (f"date: {date}; device: {device}; torch {torch.__version__}; {args.preset} random weights, token budget "
            f"{llm.engine_config.max_num_batched_tokens:,}; command: `python {' '.join(sys.argv)}`")
    text = [f"# The server under load vs the offline engine ({args.preset})", "", *summary_block(prov, rows), "",
            f"Offline, same engine, {n} x ({L} in, {O} out), second run: {off['requests_per_s']:.1f} req/s, "
            f"{off['output_tokens_per_s']:,.0f} output tok/s.", "",
            "Prefill hold: steps a new request may wait while others decode, so that arrivals prefill together "
            "(`prefill_hold_steps`; 0 admits at once).", "",
            "Each served run follows its offline reference (at most c running, same prefill hold) in the same "
            "process; the summary's ratio is the median of the rounds' ratios.", "",
            "| prefill hold | concurrency | completed | errors | req/s | offline at most c running, req/s | served / "
            "offline | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | client CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|", *lines, "",
            "Client CPU: the load generator's thread busy, as a share of the served run (near 100% the client may be "
            "what limits it).", "",
            f"Compilations / graph captures after ready, over the whole run: "
            f"{stats.get('compilations_after_ready')} / {stats.get('graph_captures_after_ready')}.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
