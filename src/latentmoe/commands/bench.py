"""`latentmoe bench throughput|latency|serve`: the benchmarks users run (progress bars, --json result).

throughput and latency load MODEL (a checkpoint directory, or `random:PRESET` for random weights of a
preset's shape, e.g. random:deepseek-v2-lite) into the engine with the usual engine flags; serve
sends HTTP load to any OpenAI-compatible server.
"""

from __future__ import annotations

import json
import os

from ._engine_args import add_engine_args

# `bench serve`: above this share of the run's wall time busy, the load generator may be what was measured.
CLIENT_BUSY = 0.9


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the engine offline or a server over HTTP",
                       description="Benchmarks: offline throughput (optionally beside transformers), one batch's "
                                   "latency, or HTTP load against an OpenAI-compatible server.")
    kinds = p.add_subparsers(dest="bench", metavar="KIND")

    t = kinds.add_parser("throughput", help="offline: many requests through the engine")
    _model_args(t)
    t.add_argument("--num-prompts", type=int, default=200)
    t.add_argument("--input-len", type=int, default=1000, help="prompt tokens (the longest with --min-input-len)")
    t.add_argument("--min-input-len", type=int, default=None, help="prompt lengths uniform in [this, --input-len]")
    t.add_argument("--output-len", type=int, default=100)
    t.add_argument("--prompts-file", default=None,
                   help="prompts instead of random ones: one per line, text or JSON objects with 'prompt'")
    t.add_argument("--runs", type=int, default=1,
                   help="runs of the workload, the first right after start-up (random prompts: new ones each run)")
    t.add_argument("--compare-transformers", action="store_true",
                   help="also run transformers generate on the same prompts in this process")
    t.add_argument("--hf-batch-size", type=int, default=128, help="transformers generate batch size")
    _common(t)
    add_engine_args(t)
    t.set_defaults(func=run_throughput)

    lat = kinds.add_parser("latency", help="offline: one batch, prefill time and time per token")
    _model_args(lat)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=1024)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--iters", type=int, default=3)
    _common(lat)
    add_engine_args(lat)
    lat.set_defaults(func=run_latency)

    s = kinds.add_parser("serve", help="HTTP load against an OpenAI-compatible server")
    s.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (the server's root, not /v1)")
    s.add_argument("--model", default=None, help="model id to request (default: the first of /v1/models)")
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    s.add_argument("--num-prompts", type=int, default=200)
    s.add_argument("--input-len", type=int, default=1000,
                   help="prompt length: words of random text (about one token each), or ids with --token-ids")
    s.add_argument("--output-len", type=int, default=100)
    s.add_argument("--token-ids", action="store_true", help="send random token ids in [100, 1000) as prompts")
    s.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: all)")
    s.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    _common(s)
    s.set_defaults(func=run_serve)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _model_args(p) -> None:
    p.add_argument("model", help="checkpoint directory, or random:PRESET (random weights, e.g. random:deepseek-v2-lite)")


def _common(p) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON to PATH ('-' = stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_positive(args, *names) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def _resolve_model(args) -> None:
    """MODEL checked before anything loads: random:PRESET against the presets; otherwise the engine flags
    are checked and the checkpoint found (a directory, or a hub model id fetched into the hub cache)."""
    spec = args.model
    if spec.startswith("random:"):
        from ..config import PRESETS
        if spec[7:] not in PRESETS:
            raise ValueError(f"unknown preset {spec[7:]!r}; choose one of {', '.join(sorted(PRESETS))}")
    else:
        from ._engine_args import prepare
        args.model = prepare(args, spec)


def _load(args):
    """(LLM, the model it runs) for MODEL and the engine flags."""
    from ._engine_args import build_llm, engine_config
    if not args.model.startswith("random:"):
        llm = build_llm(args, args.model)
        return llm, llm.model
    import logging

    import torch

    from .. import build_model, get_config
    from ..checkpoint import resolve_dtype
    from ..engine import LLM
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = engine_config(args)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = config.dtype or resolve_dtype(None, device)
    model = build_model(get_config(args.model[7:]), device=device, dtype=dtype, seed=args.seed).eval()
    return LLM(model, config=config), model


def _read_prompts(path: str, tokenizer) -> list:
    if tokenizer is None:
        raise ValueError("--prompts-file needs a checkpoint with a tokenizer")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                text = json.loads(line)["prompt"] if line.lstrip().startswith("{") else line
                prompts.append(tokenizer.encode(text))
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def _emit(args, result: dict) -> None:
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def run_throughput(args) -> int:
    _resolve_model(args)
    _check_positive(args, "num_prompts", "input_len", "min_input_len", "output_len", "runs", "hf_batch_size")
    if args.min_input_len is not None and args.min_input_len > args.input_len:
        raise ValueError("--min-input-len must not exceed --input-len")
    if args.prompts_file and not os.path.isfile(args.prompts_file):
        raise FileNotFoundError(f"no prompts file {args.prompts_file!r}")
    from ..bench import random_prompts, throughput
    from ..bench.stats import print_table
    llm, model = _load(args)
    if args.prompts_file:   # the same prompts every run (later runs may hit the prefix cache)
        sets = [_read_prompts(args.prompts_file, llm.tokenizer)] * args.runs
    else:                   # each run its own random prompts: no prefix-cache hits between runs
        sets = [random_prompts(args.num_prompts, args.input_len, llm.config.vocab_size, args.min_input_len,
                               args.seed + r) for r in range(args.runs)]
    prompts = sets[0]
    result = dict(kind="throughput", model=args.model, device=str(llm.device), dtype=str(llm.dtype),
                  max_num_batched_tokens=llm.engine_config.max_num_batched_tokens,
                  **throughput(llm, sets, args.output_len, progress=not args.no_progress))
    rows = [("requests", result["num_prompts"]), ("input tokens", result["input_tokens"]),
            ("time to ready (s)", result["time_to_ready_s"])]
    for r in result["runs"]:
        rows += [(f"run {r['run']}: seconds", r["seconds"]), (f"run {r['run']}: requests/s", r["requests_per_s"]),
                 (f"run {r['run']}: total tok/s", r["total_tokens_per_s"]),
                 (f"run {r['run']}: output tok/s", r["output_tokens_per_s"])]
    rows += [("compilations after ready", result["compilations_after_ready"]),
             ("graph captures after ready", result["graph_captures_after_ready"])]
    if args.compare_transformers:
        del llm   # its cache is no longer needed: transformers gets the memory
        _release_memory()
        hf = _transformers_model(model)
        from ..bench import transformers_throughput
        ref = transformers_throughput(hf, prompts, args.output_len, args.hf_batch_size,
                                      progress=not args.no_progress)
        result["transformers"] = ref
        best = max(r["requests_per_s"] for r in result["runs"])
        result["speedup_vs_transformers"] = best / ref["requests_per_s"]
        rows += [("transformers: seconds", ref["seconds"]), ("transformers: requests/s", ref["requests_per_s"]),
                 ("transformers: total tok/s", ref["total_tokens_per_s"]),
                 ("speed-up (best run)", result["speedup_vs_transformers"])]
    print_table(f"throughput {args.model} ({result['device']}, {result['dtype']})", rows)
    _emit(args, result)
    return 0


def _transformers_model(model):
    """transformers' DeepseekV2ForCausalLM over the same weights (shared, not copied: the parameter names
    are the same), sdpa attention and grouped-GEMM experts on CUDA."""
    import warnings

    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    p = next(model.parameters())
    cfg = DeepseekV2Config(**{k: v for k, v in model.config.to_dict().items() if k != "architectures"})
    cfg._attn_implementation = "sdpa"
    if p.is_cuda:
        cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        hf = DeepseekV2ForCausalLM(cfg)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg, device=p.device)
    return hf.eval()


def _release_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_latency(args) -> int:
    _resolve_model(args)
    _check_positive(args, "batch_size", "input_len", "output_len", "iters")
    from ..bench import latency
    from ..bench.stats import print_table
    llm, _ = _load(args)
    result = dict(kind="latency", model=args.model, device=str(llm.device), dtype=str(llm.dtype),
                  **latency(llm, args.batch_size, args.input_len, args.output_len, args.iters, args.seed))
    print_table(f"latency {args.model} ({result['device']})",
                [("batch", result["batch_size"]), ("input / output", f"{args.input_len} / {args.output_len}"),
                 ("prefill (s)", result["prefill_s"]), ("per token (ms)", result["per_token_ms"]),
                 ("decode tok/s", result["decode_tokens_per_s"]), ("total (s)", result["total_s"])])
    _emit(args, result)
    return 0


def run_serve(args) -> int:
    _check_positive(args, "num_prompts", "input_len", "output_len", "max_concurrency")
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be positive")
    import random

    from ..bench import serve_load
    from ..bench.serve import text_prompts
    from ..bench.stats import print_table
    if args.token_ids:
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(100, 1000) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    else:
        prompts = text_prompts(args.num_prompts, args.input_len, args.seed)
    r = serve_load(args.base_url, prompts, args.output_len, model=args.model, max_concurrency=args.max_concurrency,
                   request_rate=args.request_rate, api_key=args.api_key, timeout=args.timeout, seed=args.seed,
                   progress=not args.no_progress)
    result = dict(kind="serve", **r)
    rows = [("model", r["model"]), ("completed / errors", f"{r['completed']} / {r['errors']}"),
            ("duration (s)", r["duration_s"]), ("requests/s", r["requests_per_s"]),
            ("output tok/s", r["output_tokens_per_s"]), ("total tok/s", r["total_tokens_per_s"])]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL")):
        for q in ("mean", "p50", "p90", "p99"):
            v = r[key][q]
            rows.append((f"{name} {q} (ms)", "-" if v is None else v))
    rows.append(("client CPU (share of the run)", f"{r['client_cpu_share']:.0%}"))
    if r["client_cpu_share"] > CLIENT_BUSY:
        rows.append(("warning", "the load generator was busy almost all the run: these figures may be its limit "
                                "(fewer concurrent requests, or run it on another machine)"))
    for e in r["error_examples"]:
        rows.append(("error", e))
    print_table(f"serve {args.base_url}", rows)
    _emit(args, result)
    return 0 if r["completed"] else 1
