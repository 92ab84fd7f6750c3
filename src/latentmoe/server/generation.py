"""One API call's engine requests (one per prompt) as a single stream, and the HTTP errors the engine can cause."""

from __future__ import annotations

import asyncio
import time

from ..engine import QueueFullError
from .protocol import APIError


RETRY_AFTER = {"Retry-After": "1"}   # seconds; the engine frees a batch slot within a few steps


def engine_error(e: Exception) -> APIError:
    """The HTTP error for an exception from the engine."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(503, "the server is overloaded: too many requests are waiting; retry later",
                        "service_unavailable_error", code="queue_full", headers=RETRY_AFTER)
    if isinstance(e, ValueError):   # the engine's checks: prompt length, token ids, parameters
        msg = str(e)
        param = "max_tokens" if "max_tokens" in msg else "prompt"
        return APIError(400, msg, "invalid_request_error", param)
    return APIError(500, "the engine failed while generating", "internal_server_error")


def engine_unavailable() -> APIError:
    return APIError(503, "the engine loop is not running", "service_unavailable_error", code="engine_dead",
                    headers=RETRY_AFTER)


class Generation:
    """Submits every prompt at once (so they batch together) and merges their cumulative outputs.

    Each prompt is pumped by its own task; cancelling the tasks (`close`) ends the engine generators, whose cleanup
    aborts the engine requests and frees their cache blocks.
    """

    def __init__(self, engine, metrics, prompts: list[list[int]], params):
        if not engine.healthy:
            raise engine_unavailable()
        self.engine, self.metrics, self.params = engine, metrics, params
        self.prompts = prompts
        self.final: dict[int, object] = {}
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: list[tuple] = []
        self._arrival = time.monotonic()
        self._tasks = [asyncio.create_task(self._pump(i, p)) for i, p in enumerate(prompts)]

    async def _pump(self, i: int, prompt: list[int]) -> None:
        first, tokens = True, 0
        try:
            async for out in self.engine.generate(prompt, self.params):
                tokens = sum(len(c.token_ids) for c in out.outputs)
                if first and tokens:
                    self.metrics.ttft.observe(time.monotonic() - self._arrival)
                    first = False
                if out.finished:
                    self.metrics.e2e.observe(time.monotonic() - self._arrival)
                    self.metrics.prompt_tokens.inc(len(prompt))
                    for c in out.outputs:
                        self.metrics.finished(c.finish_reason)
                self._queue.put_nowait((i, out, None))
        except Exception as e:
            self._queue.put_nowait((i, None, e))
        else:
            self._queue.put_nowait((i, None, None))
        finally:
            self.metrics.generation_tokens.inc(tokens)

    async def start(self) -> None:
        """Wait for every prompt's first output; the engine's validation errors are raised here as APIError."""
        started: set[int] = set()
        while len(started) < len(self._tasks):
            item = await self._queue.get()
            self._buffer.append(item)
            i, _, err = item
            if err is not None:
                self.close()
                raise engine_error(err)
            started.add(i)

    async def batches(self):
        """Lists of (prompt index, cumulative RequestOutput): each the next output and every other one already
        here (a stream read more slowly than the engine steps gets several at once, to send as one write); raises
        APIError if the engine fails on the way (after the outputs that came before the failure)."""
        done = 0
        while done < len(self._tasks):
            # What start() read ahead, else the next item; then whatever else is already queued.
            items, self._buffer = self._buffer or [await self._queue.get()], []
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            batch = []
            for i, out, err in items:
                if err is not None:
                    if batch:
                        yield batch
                    self.close()
                    raise engine_error(err)
                if out is None:
                    done += 1
                    continue
                if out.finished:
                    self.final[i] = out
                batch.append((i, out))
            if batch:
                yield batch

    async def __aiter__(self):
        """(prompt index, cumulative RequestOutput), one at a time (see `batches`)."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def collect(self) -> None:
        """Run to the end (the final outputs are in `self.final`)."""
        async for _ in self:
            pass

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for out in self.final.values() for c in out.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
