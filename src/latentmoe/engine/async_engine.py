"""AsyncLLM: the offline engine driven by a background asyncio task, for serving.

Requests and aborts are queued on the event loop and applied between steps (the scheduler is
never touched while a step runs in the worker thread); each request gets its own stream of
cumulative RequestOutputs. An aborted request's blocks are free when `abort` returns.
"""

from __future__ import annotations

import asyncio
import functools
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
        step = None   # the step in flight in the worker thread
        launched = asyncio.Event()

        def on_launch():   # in the worker thread
            loop.call_soon_threadsafe(launched.set)

        def start_step():
            launched.clear()
            return loop.run_in_executor(None, functools.partial(self.llm.step, on_launch=on_launch))

        try:
            while not self._stopping or step is not None:
                if step is None:
                    self._apply_pending()
                    if not self.llm.has_unfinished():
                        self._wakeup.clear()
                        await self._wakeup.wait()
                        continue
                    # The step runs in a worker thread so the event loop keeps accepting requests.
                    step = start_step()
                outs = await step
                step = None
                # The next step starts before these outputs are handed out: the event loop streams them to
                # the clients while the model computes, instead of the two taking turns. The engine is only
                # touched here, between steps; the outputs are snapshots, so the next step cannot change them.
                if not self._stopping:
                    self._apply_pending()
                    if self.llm.has_unfinished():
                        step = start_step()
                        # ... and only once that step's host work is done and its device work queued (or it
                        # ended): streaming meanwhile would hold the interpreter lock the step's host work
                        # needs, delaying the device by as much.
                        waiter = asyncio.ensure_future(launched.wait())
                        await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
                        waiter.cancel()
                for out in outs:
                    q = self._streams.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
                        if out.finished:
                            self._streams.pop(out.request_id, None)
                await asyncio.sleep(0)   # let consumers and new requests in between steps
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
