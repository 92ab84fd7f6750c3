"""AsyncLLM: requests joining a running loop stream the same tokens as offline generation,
abort frees blocks at once, errors surface in the caller."""

from __future__ import annotations

import asyncio

import pytest

from latentmoe.engine import LLM, AsyncLLM, QueueFullError, SamplingParams

from test_engine import assert_no_leak, random_prompts, reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


async def collect(engine, prompt, params, request_id=None, delay=0.0):
    await asyncio.sleep(delay)
    outs = [o async for o in engine.generate(prompt, params, request_id=request_id)]
    return outs


def test_streams_match_offline_greedy(model):
    prompts = random_prompts([5, 14, 2, 9], seed=11)
    want = [reference_greedy(model, p, 8) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def main():
        engine = AsyncLLM(LLM(model, block_size=4, num_blocks=200, max_num_batched_tokens=8))
        await engine.start()
        assert engine.healthy and engine.max_model_len > 0 and engine.config is model.config
        # Requests arrive while others run.
        results = await asyncio.gather(*[collect(engine, p, params, delay=0.01 * i) for i, p in enumerate(prompts)])
        stats = engine.stats()
        await engine.shutdown()
        return results, stats

    results, stats = asyncio.run(main())
    for outs, w in zip(results, want):
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == w
        assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 9))
        assert all(not o.finished for o in outs[:-1])
    assert stats["num_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_abort_frees_blocks_and_ends_stream(model):
    async def main():
        llm = LLM(model, block_size=4, num_blocks=200)
        engine = AsyncLLM(llm)
        await engine.start()
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        seen = []

        async def consume():
            async for out in engine.generate(random_prompts([20])[0], params, request_id="victim"):
                seen.append(out)

        task = asyncio.create_task(consume())
        while len(seen) < 3:
            await asyncio.sleep(0.005)
        assert llm.block_manager.num_used_blocks > 0
        await engine.abort("victim")
        assert llm.block_manager.num_used_blocks == 0     # freed when abort returns
        await asyncio.wait_for(task, 5)
        assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
        # A consumer that walks away mid-stream (client disconnect) also frees its blocks.
        gen = engine.generate(random_prompts([10])[0], params)
        await gen.__anext__()
        await gen.aclose()
        assert llm.block_manager.num_used_blocks == 0
        await engine.shutdown()
        assert_no_leak(llm)

    asyncio.run(main())


def test_errors_surface_in_the_caller(model):
    async def main():
        engine = AsyncLLM(LLM(model, block_size=4, num_blocks=50, max_model_len=32), max_queued=2)
        with pytest.raises(RuntimeError, match="not running"):
            await collect(engine, [5, 6], SamplingParams())
        await engine.start()
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(engine, list(range(3, 40)), SamplingParams())
        with pytest.raises(ValueError, match="top_p"):
            await collect(engine, [5, 6], SamplingParams(top_p=2.0))
        # A flood of requests beyond max_queued is refused, the rest complete.
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        results = await asyncio.gather(*[collect(engine, [5, 6, 7], params) for _ in range(6)],
                                       return_exceptions=True)
        assert any(isinstance(r, QueueFullError) for r in results)
        assert any(isinstance(r, list) and r[-1].finished for r in results)
        assert engine.healthy
        await engine.shutdown()

    asyncio.run(main())


def test_loop_failure_marks_unhealthy(model):
    async def main():
        llm = LLM(model, block_size=4, num_blocks=50)
        engine = AsyncLLM(llm)
        await engine.start()

        def broken_step(**kwargs):
            raise RuntimeError("device lost")

        llm.step = broken_step
        with pytest.raises(RuntimeError, match="engine loop failed"):
            await collect(engine, [5, 6, 7], SamplingParams())
        await asyncio.sleep(0)
        assert not engine.healthy
        await engine.shutdown()

    asyncio.run(main())


def test_step_reports_its_launch_before_waiting(model):
    """LLM.step(on_launch=...) calls back once per sampling step, from inside the runner's execute (before
    its host sync), and leaves no callback behind; AsyncLLM hands out outputs on that signal."""
    llm = LLM(model, block_size=4, num_blocks=50)
    llm.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    llm.add_request([9, 1], SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True, logprobs=1))
    calls = []
    while llm.has_unfinished():
        outs = llm.step(on_launch=lambda: calls.append(llm.runner.on_launch is not None))
        assert outs and llm.runner.on_launch is None
    assert calls == [True] * 3   # greedy and sampled rows alike, every step

    async def main():
        engine = AsyncLLM(LLM(model, block_size=4, num_blocks=50))
        await engine.start()
        got = await asyncio.gather(*(collect(engine, p, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
                                     for p in ([5, 6, 7], [9, 1], [2, 2, 2, 2])))
        await engine.shutdown()
        return got

    outs = asyncio.run(main())
    assert [len(o[-1].outputs[0].token_ids) for o in outs] == [5, 5, 5]


def test_steps_do_not_wait_for_the_event_loop(model):
    """While the event loop is busy (streaming to hundreds of clients, say), the engine keeps stepping in its
    worker thread; the outputs reach the stream when the loop is free again, none lost, in order."""
    import time
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = random_prompts([6], seed=5)[0]

    async def main():
        llm = LLM(model, block_size=4, num_blocks=200)
        steps, step = [0], llm.step

        def counted(**kwargs):
            steps[0] += 1
            return step(**kwargs)

        llm.step = counted
        engine = AsyncLLM(llm)
        await engine.start()
        stream = engine.generate(prompt, params)
        outs = [await stream.__anext__()]   # the request is running
        before = steps[0]
        time.sleep(0.5)   # the event loop is blocked: no callback of it runs
        during = steps[0] - before
        outs += [o async for o in stream]
        await engine.shutdown()
        return outs, during

    outs, during = asyncio.run(main())
    assert during >= 5   # steps went on (waiting for the loop, at most the step in flight would finish)
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == reference_greedy(model, prompt, 40)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)
