"""`GET /v1/models`: the one model this server serves, with its context length (a vLLM extension clients read)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from ..state import ServerState, server_state

router = APIRouter()


@router.get("/models")
async def models(state: ServerState = Depends(server_state)):
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(time.time()),
                                        "owned_by": "latentmoe", "max_model_len": state.engine.max_model_len}]}
