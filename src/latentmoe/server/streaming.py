"""How a generation reaches its client: awaited unless the client leaves first, or streamed as server-sent events.

Either way a client that goes away has its generation closed at once, which aborts its engine requests and frees
their cache blocks.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import StreamingResponse

from .errors import ClientGone
from .generation import Generation
from .protocol import APIError
from .responses import Envelope


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, gen: Generation, work):
    """Await `work` unless the client disconnects first; then close the generation and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request))
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
        gen.metrics.disconnects.inc()
        raise ClientGone()
    return task.result()


def _event(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


def sse_response(gen: Generation, chunks, make_chunk: Envelope) -> StreamingResponse:
    """`chunks(prompt index, cumulative output)` -> the chunks to send; ends with a usage chunk if asked, then [DONE]."""
    async def body():
        try:
            for piece in chunks(None, None):   # chunks due before any output (e.g. the chat role)
                yield _event(piece)
            async for i, out in gen:
                for piece in chunks(i, out):
                    yield _event(piece)
            if make_chunk.include_usage:
                yield _event(make_chunk([], usage=gen.usage()))
        except APIError as e:   # failed mid-way: the error as a chunk, then the usual end
            yield _event(e.body())
        except BaseException:   # cancelled: the client disconnected
            gen.close()
            gen.metrics.disconnects.inc()
            raise
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
