"""The OpenAI-compatible HTTP server: one FastAPI app over one shared AsyncLLM.

`create_app` only assembles the parts: the state every route shares (state.py), the routes (routes/), the
handlers that put every error in the OpenAI envelope (errors.py) and the request bounds (limits.py). The engine loop
starts and stops with the app. No redirects (the trailing-slash one would build its Location from the Host header)
and no CORS unless origins are given.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .errors import install_error_handlers
from .limits import BodyGuard, ServerLimits
from .routes import chat, completions, health, models, page, tokens
from .state import ServerState, check_key


@asynccontextmanager
async def _lifespan(app: FastAPI):
    engine = app.state.server.engine
    await engine.start()
    yield
    await engine.shutdown()


def create_app(engine, served_model_name: str, api_keys: list[str] | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """`engine`: an AsyncLLM; `api_keys`: if given, every /v1 route needs 'Authorization: Bearer <one of them>'."""
    limits = limits or ServerLimits()
    app = FastAPI(title="latentmoe", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.server = ServerState.build(engine, served_model_name, api_keys or [], limits)
    install_error_handlers(app)
    for router in (health.router, page.router, tokens.router):
        app.include_router(router)
    for router in (models.router, completions.router, chat.router):
        app.include_router(router, prefix="/v1", dependencies=[Depends(check_key)])
    if limits.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=limits.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyGuard, max_bytes=limits.max_request_bytes, timeout_s=limits.body_timeout_s)
    return app
