"""AsyncLLM: the offline engine driven by a background asyncio task, for serving.

Requests and aborts are queued on the event loop and applied between steps (the scheduler is
never touched while steps run in the worker thread); each request gets its own stream of
cumulative RequestOutputs. An aborted request's blocks are free when `abort` returns.

The worker thread runs steps back to back and hands each step's outputs to the event loop; it
returns to the loop only when requests or aborts are queued there (or nothing is left to do). So
the engine never waits for the event loop between steps: with hundreds of streams the loop may
be busy for longer than a step, and the device would idle for as long. (The CPU stand-in of
benchmarks/bench_serve.py at concurrency 256, medians of 3 rounds: 0.70x the offline engine when
every step waited for the loop, 0.77x with this; 16 and 64 unchanged. A client of a loop that
falls behind then receives several tokens at once instead of the engine slowing down.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from .llm_engine import LLM
from .sampling import SamplingParams
from .sequence import RequestOutput

log = logging.getLogger("latentmoe.engine")


class QueueFullError(RuntimeError):
    """More sequences waiting than `max_queued`: the caller should retry later (HTTP 503/429)."""


class AsyncLLM:
    def __init__(self, llm: LLM, max_queued: int = 1024):
        self.llm = llm
        self.max_queued = max_queued
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending_adds: list[tuple] = []
        self._pending_aborts: list[tuple[str, asyncio.Future]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._stopping = False

    @classmethod
    def from_path(cls, path, max_queued: int = 1024, **llm_kwargs) -> "AsyncLLM":
        """An engine for the checkpoint directory `path`; `llm_kwargs` are LLM's (EngineConfig fields or config=)."""
        return cls(LLM(path, **llm_kwargs), max_queued=max_queued)

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def config(self):
        return self.llm.config

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done() and self._error is None

    @property
    def failed(self) -> bool:
        """The engine loop died (for good): every request is answered with an error from now on."""
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        return self._error

    def stats(self) -> dict:
        return self.llm.stats()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is not None:
            return
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="latentmoe-engine-loop")

    async def shutdown(self) -> None:
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                pass
        for rid in list(self._streams):
            self.llm.abort_request(rid)
            self._finish_stream(rid, None)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._apply_pending()
                if self._stopping:
                    break
                if not self.llm.has_unfinished():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                # The steps run in a worker thread so the event loop keeps accepting requests and streaming.
                await loop.run_in_executor(None, self._run_steps, loop)
        except BaseException as e:   # the loop died: fail every stream, report unhealthy
            self._error = e
            log.exception("engine loop failed")
            for rid in list(self._streams):
                self._finish_stream(rid, e)
            for _, fut in self._pending_aborts:
                if not fut.done():
                    fut.set_result(None)
            for *_, fut in self._pending_adds:
                if not fut.done():
                    fut.set_exception(RuntimeError("the engine loop failed"))
            if not isinstance(e, Exception):
                raise

    def _run_steps(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the worker thread: steps until requests or aborts wait to be applied, shutdown, or nothing is left.

        A step's outputs are handed to the event loop once the next step's host work is done and its device work
        queued (its `on_launch`), or when it ends: streaming them earlier would hold the interpreter lock that host
        work needs, delaying the device by as much. Outputs are snapshots: later steps cannot change them."""
        held: list[RequestOutput] | None = None

        def hand_out():
            nonlocal held
            if held:
                loop.call_soon_threadsafe(self._deliver, held)
            held = None

        try:
            while True:
                outs = self.llm.step(on_launch=hand_out)
                hand_out()   # (a step that launched nothing did not call it)
                held = outs
                if self._pending_adds or self._pending_aborts or self._stopping or not self.llm.has_unfinished():
                    return
        finally:
            hand_out()

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """On the event loop: each output to its request's stream (none if it was aborted meanwhile)."""
        for out in outs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
                if out.finished:
                    self._streams.pop(out.request_id, None)

    def _apply_pending(self) -> None:
        adds, self._pending_adds = self._pending_adds, []
        for prompt, params, request_id, q, fut in adds:
            try:
                req = self.llm.add_request(prompt, params, request_id)
            except Exception as e:   # bad parameters: raised in the caller's generate()
                fut.set_exception(e)
                continue
            self._streams[req.request_id] = q
            fut.set_result(req)
        aborts, self._pending_aborts = self._pending_aborts, []
        for rid, fut in aborts:
            out = self.llm.abort_request(rid)
            q = self._streams.pop(rid, None)
            if q is not None and out is not None:
                q.put_nowait(out)
            if not fut.done():
                fut.set_result(None)

    def _finish_stream(self, rid: str, error: BaseException | None) -> None:
        q = self._streams.pop(rid, None)
        if q is not None:
            q.put_nowait(error if error is not None else StopAsyncIteration())

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs; the last has finished=True (finish_reason 'abort' if aborted).
        Bad parameters raise ValueError at the first iteration, before anything is queued."""
        if self._error is not None or self._task is None or self._task.done():
            raise RuntimeError("the engine is not running (start() it; or its loop died)")
        if isinstance(params, SamplingParams):
            params.validate()   # fail fast, before queueing
        # The bound counts sequences (each of a request's n samples waits as one), not requests.
        queued = len(self.llm.scheduler.waiting) + sum(p.n if p is not None else 1 for _, p, *_ in self._pending_adds)
        n = params.n if params is not None else 1
        if queued + n > self.max_queued:
            raise QueueFullError(f"{queued} sequences are waiting and this request adds {n} "
                                 f"(max_queued={self.max_queued})")
        q: asyncio.Queue = asyncio.Queue()
        # Requests join between steps (the scheduler is never touched while a step runs).
        fut = asyncio.get_running_loop().create_future()
        self._pending_adds.append((prompt, params, request_id, q, fut))
        self._wakeup.set()
        req = await fut
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, StopAsyncIteration):
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine loop failed") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished and req.request_id in self.llm.requests:
                # The consumer went away (client disconnect, cancellation): free its blocks.
                await self.abort(req.request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request; when this returns its cache blocks are back on the free list."""
        if self._task is None or self._task.done():
            self.llm.abort_request(request_id)
            self._finish_stream(request_id, None)
            return
        fut = asyncio.get_running_loop().create_future()
        self._pending_aborts.append((request_id, fut))
        self._wakeup.set()
        await fut


__all__ = ["AsyncLLM", "QueueFullError"]
