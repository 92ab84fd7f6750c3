"""One API call's engine requests (one per prompt) as a single stream, and the OpenAI shapes of what they produce."""

from __future__ import annotations

import asyncio
import time
import uuid

from ..engine import QueueFullError
from .protocol import APIError, bad_request


def engine_error(e: Exception) -> APIError:
    """The HTTP error for an exception from the engine."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(503, "the server is overloaded: too many requests are waiting; retry later",
                        "service_unavailable_error", code="queue_full")
    if isinstance(e, ValueError):   # the engine's checks: prompt length, token ids, parameters
        msg = str(e)
        param = "max_tokens" if "max_tokens" in msg else "prompt"
        return APIError(400, msg, "invalid_request_error", param)
    return APIError(500, "the engine failed while generating", "internal_server_error")


def engine_unavailable() -> APIError:
    return APIError(503, "the engine loop is not running", "service_unavailable_error", code="engine_dead")


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

    async def __aiter__(self):
        """(prompt index, cumulative RequestOutput); raises APIError if the engine fails on the way."""
        done = 0
        while done < len(self._tasks):
            i, out, err = self._buffer.pop(0) if self._buffer else await self._queue.get()
            if err is not None:
                self.close()
                raise engine_error(err)
            if out is None:
                done += 1
                continue
            if out.finished:
                self.final[i] = out
            yield i, out

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


class Envelope:
    """(choices, usage) -> a response, or a stream chunk, with the id, time and model shared by all of them."""

    def __init__(self, prefix: str, kind: str, model: str, req):
        self.fields = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                       "model": model}
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

    def __call__(self, choices: list, usage: dict | None = None) -> dict:
        out = {**self.fields, "choices": choices}
        if self.include_usage or usage is not None:   # with include_usage every chunk has the key, null until the end
            out["usage"] = usage
        return out


class Detokenizer:
    """Token id -> text for logprobs (each token decoded on its own, as the OpenAI API reports them)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _top(lp: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(lp.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], k: int, detok: Detokenizer,
                        offset: int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(token_ids, logprobs):
        s = detok(tid)
        tokens.append(s)
        token_lps.append(lp[tid])
        tops.append({detok(t): v for t, v in _top(lp, k)} if k > 0 else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], k: int, detok: Detokenizer) -> dict:
    def entry(tid, v):
        s = detok(tid)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(tid, lp[tid]), "top_logprobs": [entry(t, v) for t, v in _top(lp, k)]}
                        for tid, lp in zip(token_ids, logprobs)]}


def delta_chunks(choice, make_chunk, first: dict | None = None, every_token: bool = False):
    """A function (prompt index, cumulative output) -> chunks with what is new since the last call."""
    sent: dict[tuple[int, int], tuple[int, int, bool]] = {}   # (prompt, choice) -> (tokens, chars, finished)

    def chunks(i, out):
        if out is None:
            return [first] if first is not None else []
        pieces = []
        for c in out.outputs:
            toks, chars, done = sent.get((i, c.index), (0, 0, False))
            if done or c.finish_reason is None and (len(c.token_ids) == toks or
                                                    not every_token and len(c.text) == chars):
                continue   # nothing new to show (text held back mid-character or before a possible stop string)
            pieces.append(choice(i, c, toks, chars))
            sent[(i, c.index)] = (len(c.token_ids), len(c.text), c.finish_reason is not None)
        return [make_chunk(pieces)] if pieces else []

    return chunks


def completion_prompts(prompt, tokenizer) -> tuple[list[str | None], list[list[int]]]:
    """The prompt field (text, token ids, or a list of either) -> texts (None for ids) and token ids per prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("the prompt is empty", "prompt")
    texts, ids = [], []
    for p in prompt:
        if len(p) == 0:
            raise bad_request("the prompt is empty", "prompt")
        if isinstance(p, str):
            if tokenizer is None:
                raise bad_request("this model has no tokenizer: send token ids", "prompt")
            texts.append(p)
            ids.append(tokenizer.encode(p))
        else:
            texts.append(None)
            ids.append(list(p))
    return texts, ids


def render_chat(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    import jinja2

    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except jinja2.TemplateError as e:   # raise_exception() in the template, or a sandbox violation
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
