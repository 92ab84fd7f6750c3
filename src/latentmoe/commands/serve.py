"""`latentmoe serve`: an OpenAI-compatible HTTP server for a checkpoint directory, with a chat page at `/`."""

from __future__ import annotations

import os

from ._engine_args import add_engine_args, build_llm


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over the OpenAI API (completions, chat, streaming)",
                       description="Load an HF-format checkpoint directory (with its tokenizer) and serve "
                                   "/v1/models, /v1/completions and /v1/chat/completions, plus /health, /metrics, "
                                   "/tokenize, /detokenize and a chat page at /.")
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (repeat for several keys); "
                        "default: the LATENTMOE_API_KEY environment variable if set, else no key")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--max-queued", type=int, default=1024,
                   help="waiting sequences (each of a request's n samples counts) before answering 503")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="largest request body accepted (413 beyond); default 4 MiB")
    p.add_argument("--limit-concurrency", type=int, default=1024,
                   help="open connections and in-flight requests before answering 503")
    p.add_argument("--timeout-keep-alive", type=int, default=5, help="seconds an idle connection is kept open")
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN",
                   help="allow cross-origin browser requests from ORIGIN (repeat for several; default: none)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    import uvicorn

    from ..engine import AsyncLLM
    from ..server import create_app
    from ..server.connection import uvicorn_config
    from ..server.limits import ServerLimits

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"no checkpoint directory {args.model!r}")
    limits = ServerLimits(max_request_bytes=args.max_request_bytes, limit_concurrency=args.limit_concurrency,
                          keep_alive_s=args.timeout_keep_alive, allowed_origins=args.allowed_origins)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    keys = args.api_key or ([os.environ["LATENTMOE_API_KEY"]] if os.environ.get("LATENTMOE_API_KEY") else [])
    engine = AsyncLLM(build_llm(args, args.model), max_queued=args.max_queued)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(engine, name, keys, limits)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, limits, log_level=args.log_level,
                                  timeout_graceful_shutdown=5)).run()
    return 0
