"""The OpenAI-compatible HTTP server: FastAPI routes over one shared AsyncLLM, SSE streaming, API keys, metrics.

Every error leaves in the OpenAI envelope {"error": {"message", "type", "param", "code"}}; a client that goes away
has its engine request aborted (and its cache blocks freed) at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generation import (Detokenizer, Envelope, Generation, chat_logprobs, completion_logprobs,
                         completion_prompts, delta_chunks, engine_unavailable, render_chat)
from .metrics import Metrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       bad_request)

log = logging.getLogger("latentmoe.server")


def create_app(engine, served_model_name: str, api_keys: list[str] | None = None,
               manage_engine: bool = True) -> FastAPI:
    """`engine`: an AsyncLLM (started and shut down with the app unless `manage_engine` is False)."""

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            await engine.start()
        yield
        if manage_engine:
            await engine.shutdown()

    app = FastAPI(title="latentmoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine, served_model_name)
    detok = Detokenizer(engine.tokenizer)
    # Keys are compared as digests in constant time, so neither their content nor their length leaks.
    key_digests = [hashlib.sha256(k.encode()).digest() for k in (api_keys or [])]

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(bad_request("invalid request").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(_ClientGone)
    async def _client_gone(request, e):
        return Response(status_code=499)   # nobody reads it; the connection is closed

    @app.exception_handler(Exception)
    async def _internal_error(request, e):
        log.exception("internal error")   # the details stay in the server log, never in the response
        return JSONResponse(APIError(500, "internal server error", "internal_server_error").body(), status_code=500)

    # ------------------------------------------------------------------ helpers
    async def check_key(request: Request) -> None:
        if not key_digests:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for key in key_digests:   # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(digest, key)
        if scheme.lower() != "bearer" or not ok:
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{served_model_name}'",
                           "not_found_error", "model", "model_not_found")

    async def parse(request: Request, model: type[BaseModel]):
        # Parsed here rather than by FastAPI so that bad bodies get 400 (not 422) and a message without internals.
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as e:
            err = e.errors(include_url=False, include_input=False)[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise bad_request(f"{loc}: {err['msg']}" if loc else err["msg"],
                              str(err["loc"][0]) if err["loc"] else None) from None

    def tokenizer():
        if engine.tokenizer is None:
            raise bad_request("this model has no tokenizer: send token ids")
        return engine.tokenizer

    async def until_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def run(request: Request, gen: Generation, work):
        """Await `work` unless the client disconnects first; then abort the generation."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:   # this handler was cancelled (server shutdown)
            task.cancel()
            gen.close()
            raise
        finally:
            watch.cancel()
        if not task.done():   # the client went away
            task.cancel()
            gen.close()
            metrics.disconnects.inc()
            raise _ClientGone()
        return task.result()

    def sse(gen: Generation, chunks, make_chunk: Envelope) -> StreamingResponse:
        async def body():
            try:
                for piece in chunks(None, None):   # chunks due before any output (e.g. the chat role)
                    yield f"data: {json.dumps(piece)}\n\n"
                async for i, out in gen:
                    for piece in chunks(i, out):
                        yield f"data: {json.dumps(piece)}\n\n"
                if make_chunk.include_usage:
                    yield f"data: {json.dumps(make_chunk([], usage=gen.usage()))}\n\n"
            except APIError as e:   # failed mid-way: the error as a chunk, then the usual end
                yield f"data: {json.dumps(e.body())}\n\n"
            except BaseException:   # cancelled: the client disconnected
                gen.close()
                metrics.disconnects.inc()
                raise
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ open routes
    @app.get("/health")
    async def health():
        if not engine.healthy:
            raise engine_unavailable()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse((resources.files("latentmoe.server") / "static" / "chat.html").read_text("utf-8"))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse(request, TokenizeRequest)
        check_model(body.model)
        tok = tokenizer()
        if body.messages is not None:
            ids = render_chat(tok, [m for m in body.messages], body.add_generation_prompt)
        elif body.prompt is not None:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise bad_request("send 'prompt' or 'messages'", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse(request, DetokenizeRequest)
        check_model(body.model)
        tok = tokenizer()
        bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise bad_request(f"token ids out of the vocabulary [0, {tok.vocab_size}): {bad[:5]}", "tokens")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}

    # ------------------------------------------------------------------ /v1 (API key checked)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "latentmoe", "max_model_len": engine.max_model_len}]}

    @v1.post("/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        check_model(req.model)
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of not in (None, req.n):
            raise bad_request("best_of must equal n (no server-side ranking)", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (no prompt logprobs)", "echo")
        texts, prompts = completion_prompts(req.prompt, engine.tokenizer)
        params = req.sampling_params(req.max_tokens, req.logprobs)
        if req.echo:
            texts = [t if t is not None else tokenizer().decode(p, skip_special_tokens=False)
                     for t, p in zip(texts, prompts)]
        n, make_chunk = params.n, Envelope("cmpl", "text_completion", served_model_name, req)

        def choice(i, c, start_tok, start_text):
            text = c.text[start_text:]
            if req.echo and start_tok == 0:
                text = texts[i] + text
            lps = None
            if req.logprobs is not None:
                lps = completion_logprobs(c.token_ids[start_tok:], c.logprobs[start_tok:], req.logprobs, detok,
                                          offset=start_text)
            return {"index": i * n + c.index, "text": text, "logprobs": lps, "finish_reason": c.finish_reason}

        gen = Generation(engine, metrics, prompts, params)
        await run(request, gen, gen.start())
        if req.stream:
            return sse(gen, delta_chunks(choice, make_chunk, every_token=req.logprobs is not None), make_chunk)
        await run(request, gen, gen.collect())
        return {**make_chunk([choice(i, c, 0, 0) for i in sorted(gen.final) for c in gen.final[i].outputs]),
                "usage": gen.usage()}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        check_model(req.model)
        if req.tools or req.tool_choice not in (None, "none"):
            raise bad_request("tools are not supported by this server", "tools")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        tok = tokenizer()
        if tok.chat_template is None:
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        ids = render_chat(tok, [m.for_template() for m in req.messages], req.add_generation_prompt)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(req.max_completion_tokens if req.max_completion_tokens is not None
                                     else req.max_tokens, k)
        make_chunk = Envelope("chatcmpl", "chat.completion.chunk" if req.stream else "chat.completion",
                              served_model_name, req)

        def choice(i, c, start_tok, start_text):
            lps = chat_logprobs(c.token_ids[start_tok:], c.logprobs[start_tok:], k, detok) if k is not None else None
            if not req.stream:
                return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lps,
                        "finish_reason": c.finish_reason}
            text = c.text[start_text:]
            return {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lps,
                    "finish_reason": c.finish_reason}

        gen = Generation(engine, metrics, [ids], params)
        await run(request, gen, gen.start())
        if req.stream:
            role = [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for j in range(params.n)]
            return sse(gen, delta_chunks(choice, make_chunk, make_chunk(role), k is not None), make_chunk)
        await run(request, gen, gen.collect())
        return {**make_chunk([choice(0, c, 0, 0) for c in gen.final[0].outputs]), "usage": gen.usage()}

    app.include_router(v1)
    app.state.engine, app.state.metrics = engine, metrics
    return app


class _ClientGone(Exception):
    pass
