"""Streaming when the event loop falls behind the engine: the outputs already waiting go out as one event per prompt
(cumulative outputs: the last one says all the others would), nothing lost, and an engine failure still comes after
the outputs that preceded it."""

from __future__ import annotations

import asyncio
import json
import types
from unittest import mock

import pytest

from latentmoe.engine.sequence import CompletionOutput, RequestOutput
from latentmoe.server.generation import Generation
from latentmoe.server.protocol import APIError
from latentmoe.server.responses import Envelope, delta_chunks
from latentmoe.server.streaming import sse_response

WORDS = ["a", " b", " c", " d", " e"]


def output(n: int, last: bool) -> RequestOutput:
    text = "".join(WORDS[:n])
    return RequestOutput("r", None, [1, 2], [CompletionOutput(0, text, list(range(n)), "length" if last else None)],
                         last)


class Engine:
    """Yields its outputs without suspending in between: all of them are queued before the stream reads any (the
    stream's reader fell behind by that many steps). `fail_after`: then raise, as a dying engine loop does."""
    healthy = True

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after

    async def generate(self, prompt, params):
        for n in range(1, len(WORDS) + 1):
            if self.fail_after is not None and n > self.fail_after:
                raise RuntimeError("device lost")
            yield output(n, n == len(WORDS))


def stream(engine) -> list[str]:
    async def main():
        gen = Generation(engine, mock.MagicMock(), [[1, 2]], None)
        await asyncio.sleep(0)   # the pump runs: every output is queued before the stream reads
        make_chunk = Envelope("cmpl", "text_completion", "m", types.SimpleNamespace(stream=True, stream_options=None))
        choice = lambda i, c, tok, chars: {"index": c.index, "text": c.text[chars:], "finish_reason": c.finish_reason}
        response = sse_response(gen, delta_chunks(choice, make_chunk), make_chunk)
        writes = [w async for w in response.body_iterator]
        return writes, gen

    return asyncio.run(main())


def events(writes: list[str]) -> list:
    data = [line[len("data: "):] for w in writes for line in w.split("\n") if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_outputs_that_piled_up_go_out_as_one_event():
    writes, gen = stream(Engine())
    evs = events(writes)
    assert evs[-1] == "[DONE]"
    assert len(evs) == 2 and len(writes) == 2   # five steps' outputs: one event, one write, then [DONE]
    assert evs[0]["choices"] == [{"index": 0, "text": "a b c d e", "finish_reason": "length"}]
    assert gen.final[0].outputs[0].token_ids == [0, 1, 2, 3, 4]


def test_failure_after_piled_up_outputs_sends_them_first():
    async def main():
        gen = Generation(Engine(fail_after=3), mock.MagicMock(), [[1, 2]], None)
        await asyncio.sleep(0)
        got = []
        with pytest.raises(APIError):
            async for batch in gen.batches():
                got.append([out.outputs[0].text for _, out in batch])
        return got

    assert asyncio.run(main()) == [["a", "a b", "a b c"]]
