"""Open routes for operators: liveness (`/health`) and Prometheus metrics (`/metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..generation import engine_unavailable
from ..state import ServerState, server_state

router = APIRouter()


@router.get("/health")
async def health(state: ServerState = Depends(server_state)):
    if not state.engine.healthy:
        raise engine_unavailable()
    return Response(status_code=200)


@router.get("/metrics")
async def prometheus(state: ServerState = Depends(server_state)):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
