"""`latentmoe serve`: an OpenAI-compatible HTTP server for a checkpoint (directory or hub model id), with a chat page
at `/`."""

from __future__ import annotations

import os
import sys
import threading
import time

from ._engine_args import add_engine_args, build_llm, prepare, use_interactive_budget


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over the OpenAI API (completions, chat, streaming)",
                       description="Load an HF-format checkpoint directory (with its tokenizer) and serve "
                                   "/v1/models, /v1/completions and /v1/chat/completions, plus /health, /metrics, "
                                   "/tokenize, /detokenize, /tokenizer_info and a chat page at /.")
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json) or hub model id "
                                 "(e.g. deepseek-ai/DeepSeek-V2-Lite)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (repeat for several keys); "
                        "default: the LATENTMOE_API_KEY environment variable if set, else no key")
    p.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: the hub model id, or the directory name)")
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

    limits = ServerLimits(max_request_bytes=args.max_request_bytes, limit_concurrency=args.limit_concurrency,
                          keep_alive_s=args.timeout_keep_alive, allowed_origins=args.allowed_origins)
    _check_address(args.host, args.port)   # before loading: a busy port would otherwise show only afterwards
    path = prepare(args, args.model)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    use_interactive_budget(args)
    keys = args.api_key or ([os.environ["LATENTMOE_API_KEY"]] if os.environ.get("LATENTMOE_API_KEY") else [])
    engine = AsyncLLM(build_llm(args, path), max_queued=args.max_queued)
    name = args.served_model_name or (args.model if path != args.model else os.path.basename(os.path.normpath(path)))
    app = create_app(engine, name, keys, limits)
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, limits, log_level=args.log_level,
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


def _check_address(host: str, port: int) -> None:
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ValueError(f"--host {host}: not an address of this machine") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror} (pick another --port)") from None
