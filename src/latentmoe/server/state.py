"""What every route of one app shares (engine, metrics, API keys), kept on `app.state`, and the checks built on it.

Routes receive it through FastAPI's dependency injection (`Depends(server_state)`) rather than a closure, so each
route module stands alone and several apps can live in one process without sharing anything.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Depends, Request

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

    @classmethod
    def build(cls, engine, model_name: str, api_keys: list[str]) -> ServerState:
        # Keys are kept and compared as digests, in constant time, so neither their content nor their length leaks.
        return cls(engine, model_name, Metrics(engine, model_name), Detokenizer(engine.tokenizer),
                   [hashlib.sha256(k.encode()).digest() for k in api_keys])

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           "not_found_error", "model", "model_not_found")

    def tokenizer(self):
        if self.engine.tokenizer is None:
            raise bad_request("this model has no tokenizer: send token ids")
        return self.engine.tokenizer


def server_state(request: Request) -> ServerState:
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


def body_of(model: type):
    """A dependency that parses the request body as `model` (see protocol.parse_body for why not FastAPI's own)."""
    async def parse(request: Request):
        return parse_body(await request.body(), model)

    return parse
