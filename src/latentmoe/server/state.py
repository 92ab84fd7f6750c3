"""What every route of one app shares (engine, metrics, API keys), kept on `app.state`, and the checks built on it.

Routes receive it through FastAPI's dependency injection (`Depends(server_state)`) rather than a closure, so each
route module stands alone and several apps can live in one process without sharing anything.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Depends, Request

from .limits import ServerLimits
from .metrics import Metrics
from .protocol import APIError, bad_request, parse_body
from .responses import Detokenizer


@dataclass
class ServerState:
    engine: object                  # the AsyncLLM
    model_name: str                 # the id clients send as `model`
    metrics: Metrics
    detokenizer: Detokenizer
    key_digests: list[bytes]        # SHA-256 of each accepted API key; empty: no key needed
    limits: ServerLimits
    max_prompt_chars: int           # longer text cannot fit in max_model_len tokens (Tokenizer.max_token_chars)
    max_n: int                      # samples per request: the engine's batch size (they must fit in one batch)

    @classmethod
    def build(cls, engine, model_name: str, api_keys: list[str], limits: ServerLimits | None = None) -> ServerState:
        # Keys are kept and compared as digests, in constant time, so neither their content nor their length leaks.
        scheduler = getattr(getattr(engine, "llm", None), "scheduler", None)
        return cls(engine, model_name, Metrics(engine, model_name), Detokenizer(engine.tokenizer),
                   [hashlib.sha256(k.encode()).digest() for k in api_keys], limits or ServerLimits(),
                   engine.max_model_len * (engine.tokenizer.max_token_chars if engine.tokenizer else 1),
                   getattr(scheduler, "max_num_seqs", None) or 256)

    def cache_salt(self, request: Request, salt: str | None) -> str | None:
        """The engine's cache salt for a request: its API key (so keys never share cached prefixes, whose timing
        would tell one client what another sent) and the request's own `cache_salt`."""
        key = getattr(request.state, "key_digest", None)
        if key is None and salt is None:
            return None
        return hashlib.sha256((key or b"") + b"\0" + (salt or "").encode()).hexdigest()

    def check_prompt_chars(self, n_chars: int, param: str) -> None:
        if n_chars > self.max_prompt_chars:
            raise bad_request(f"the prompt has {n_chars} characters: more than fit in max_model_len "
                              f"({self.engine.max_model_len}) tokens", param)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           "not_found_error", "model", "model_not_found")

    def tokenizer(self):
        if self.engine.tokenizer is None:
            raise bad_request("this model has no tokenizer: send token ids")
        return self.engine.tokenizer


async def server_state(request: Request) -> ServerState:
    """`async`: FastAPI runs a plain-function dependency in its thread pool, a thread hand-off on every request
    for a field read (~28% of a completion request's handling on the event loop, in a CPU profile)."""
    return request.app.state.server


async def check_key(request: Request, state: ServerState = Depends(server_state)) -> None:
    if not state.key_digests:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    digest = hashlib.sha256(token.strip().encode()).digest()
    ok = False
    for key in state.key_digests:   # no early exit: the time does not depend on which key matched
        ok |= hmac.compare_digest(digest, key)
    if scheme.lower() != "bearer" or not ok:
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       "authentication_error", code="invalid_api_key")
    request.state.key_digest = digest


def body_of(model: type):
    """A dependency that parses the request body as `model` (see protocol.parse_body for why not FastAPI's own).

    Only `application/json` bodies are read (415 otherwise): a web page can POST text/plain or a form to any site
    without asking, but must ask (a CORS preflight, refused unless --allowed-origins) before it can send JSON.
    """
    async def parse(request: Request):
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"the request body must be application/json (got {ctype or 'no content type'!r})",
                           code="unsupported_media_type")
        return parse_body(await request.body(), model)

    return parse
