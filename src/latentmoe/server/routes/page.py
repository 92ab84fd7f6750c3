"""The chat page at `/`: one static HTML file that talks to /v1/chat/completions from the browser."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def chat_page():
    return HTMLResponse((resources.files("latentmoe.server") / "static" / "chat.html").read_text("utf-8"))
