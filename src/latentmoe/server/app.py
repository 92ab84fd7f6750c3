"""The OpenAI-compatible HTTP server: one FastAPI app over one shared AsyncLLM.

`create_app` only assembles the parts: the state every route shares (state.py), the routes (routes/), and the
handlers that put every error in the OpenAI envelope (errors.py). The engine loop starts and stops with the app.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from .errors import install_error_handlers
from .routes import chat, completions, health, models, page, tokens
from .state import ServerState, check_key


@asynccontextmanager
async def _lifespan(app: FastAPI):
    engine = app.state.server.engine
    await engine.start()
    yield
    await engine.shutdown()


def create_app(engine, served_model_name: str, api_keys: list[str] | None = None) -> FastAPI:
    """`engine`: an AsyncLLM; `api_keys`: if given, every /v1 route needs 'Authorization: Bearer <one of them>'."""
    app = FastAPI(title="latentmoe", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState.build(engine, served_model_name, api_keys or [])
    install_error_handlers(app)
    for router in (health.router, page.router, tokens.router):
        app.include_router(router)
    for router in (models.router, completions.router, chat.router):
        app.include_router(router, prefix="/v1", dependencies=[Depends(check_key)])
    return app
