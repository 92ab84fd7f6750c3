"""The chat page at `/`: one static HTML file that talks to /v1/chat/completions from the browser.

It is served with a Content-Security-Policy that allows only its own inline script and style (by hash) and requests
to this server, and may not be framed: injected markup cannot run, and no other site can overlay it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


@lru_cache(maxsize=1)
def _page() -> tuple[str, dict[str, str]]:
    html = (resources.files("latentmoe.server") / "static" / "chat.html").read_text("utf-8")
    csp = (f"default-src 'none'; script-src {_hashes(html, 'script')}; style-src {_hashes(html, 'style')}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


@router.get("/", response_class=HTMLResponse)
async def chat_page():
    html, headers = _page()
    return HTMLResponse(html, headers=headers)
