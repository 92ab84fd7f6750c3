"""`latentmoe serve`: an OpenAI-compatible HTTP server for a checkpoint directory, with a chat page at `/`."""

from __future__ import annotations

import os
import sys
import threading
import time

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
    p.add_argument("--max-queued", type=int, default=1024, help="waiting requests before answering 503")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    import uvicorn

    from ..engine import AsyncLLM
    from ..server import create_app

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"no checkpoint directory {args.model!r}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    keys = args.api_key or ([os.environ["LATENTMOE_API_KEY"]] if os.environ.get("LATENTMOE_API_KEY") else [])
    engine = AsyncLLM(build_llm(args, args.model), max_queued=args.max_queued)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(engine, name, keys)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    threading.Thread(target=_stop_when_engine_fails, args=(engine, server), daemon=True).start()
    try:
        server.run()
    finally:
        engine.llm.close()
    if engine.failed:
        print(f"latentmoe serve: error: the engine failed: {str(engine.error).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def _stop_when_engine_fails(engine, server, grace_s: float = 2.0) -> None:
    """A dead engine (e.g. a rank of a multi-process engine failed) does not come back: requests are
    answered 503 for `grace_s`, then the server stops and the command exits non-zero."""
    while not server.should_exit:
        if engine.failed:
            time.sleep(grace_s)
            server.should_exit = True
            return
        time.sleep(0.5)
