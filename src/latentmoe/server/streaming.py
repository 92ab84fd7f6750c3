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
    """`chunks(prompt index, cumulative output)` -> the chunks to send; ends with a usage chunk if asked, then [DONE].
    A client read more slowly than the engine steps gets what is new since its last event in one event per prompt
    (several tokens' text, and their logprobs when asked), not one event per step."""
    async def body():
        try:
            for piece in chunks(None, None):   # chunks due before any output (e.g. the chat role)
                yield _event(piece)
            async for batch in gen.batches():
                # Outputs are cumulative: the last of each prompt says all the others would, so a stream that fell
                # behind the engine sends one event per prompt, in one write, instead of one per step.
                latest = dict(batch)
                text = "".join(_event(piece) for i, out in latest.items() for piece in chunks(i, out))
                if text:
                    yield text
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
