"""Looking ahead (EngineConfig.async_scheduling): a step scheduled and queued before the previous step's tokens
are read gives exactly the outputs of the engine without it, for every way a sequence can end (length, a stop
token at the step just launched past, a stop string, an abort between steps) and every sampling mode; it
is actually used, and nothing leaks. The decode-graph path runs eagerly here (test_engine.EagerGraphLLM)."""

from __future__ import annotations

import pytest
from test_engine import EagerGraphLLM, assert_no_leak, random_prompts, tiny_model

from latentmoe.engine import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def engine(model, async_scheduling, **kw):
    return EagerGraphLLM(model, **{**dict(block_size=4, num_blocks=200, max_num_seqs=8, max_model_len=120), **kw},
                         async_scheduling=async_scheduling)


def run(model, prompts, params, async_scheduling, **kw):
    llm = engine(model, async_scheduling, **kw)
    outs = llm.generate(prompts, params)
    assert_no_leak(llm)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].logprobs) for o in outs], llm


def test_same_outputs_and_steps_launched_ahead(model):
    # Different lengths: some sequences end by length while others decode on.
    prompts = random_prompts([5, 17, 1, 30, 9, 12])
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 3, 9, 12, 1, 7)]
    on, llm_on = run(model, prompts, params, True)
    off, llm_off = run(model, prompts, params, False)
    assert on == off
    assert [len(t) for t, _, _ in on] == [12, 3, 9, 12, 1, 7]
    assert llm_on.stats()["steps_launched_ahead"] > 0
    assert llm_off.stats()["steps_launched_ahead"] == 0


def test_sequences_ending_by_length_are_left_out_of_the_next_step(model):
    """Four prompts admitted together, ending by length after 4, 6, 8 and 10 tokens: every decode step (tokens
    2 to 10) is launched ahead of the step before it, the sequence that ends at a step's token left out of
    the step queued behind it, and the outputs are those of the engine without looking ahead."""
    prompts = random_prompts([7, 7, 7, 7], seed=8)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (4, 6, 8, 10)]
    on, llm = run(model, prompts, params, True)
    off, _ = run(model, prompts, params, False)
    assert on == off
    assert [len(t) for t, _, _ in on] == [4, 6, 8, 10]
    assert llm.stats()["steps_launched_ahead"] == 9


def _record_launches(llm):
    """Wrap the runner's launch: a list of (launched after another step, the step's rows include a prompt
    chunk, requests waiting to be admitted at launch)."""
    seen, launch = [], llm.runner.launch

    def recording(batch, after=None):
        seen.append((after is not None, batch.num_decodes < len(batch.seqs), bool(llm.scheduler.waiting)))
        return launch(batch, after)
    llm.runner.launch = recording
    return seen


@pytest.mark.parametrize("kw", [dict(max_num_batched_tokens=8, max_num_seqs=2),   # chunked prefill, requests wait
                                dict(max_num_batched_tokens=16, max_num_seqs=8)],   # prompts and decodes mixed
                         ids=["chunks-and-waiting", "mixed"])
def test_prefill_and_mixed_steps_are_launched_ahead(model, kw):
    """Steps with prompt chunks (eager) are scheduled and launched before the step before them is read (a
    decode row after a prompt's last chunk takes its first token from the device), except while requests
    wait to be admitted. Outputs as without looking ahead."""
    prompts = random_prompts([13, 3, 21, 8, 30], seed=21)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 9, 4, 7, 5)]
    off, _ = run(model, prompts, params, False, **kw)
    llm = engine(model, True, **kw)
    seen = _record_launches(llm)
    outs = llm.generate(prompts, params)
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].logprobs) for o in outs] == off
    assert (True, True, False) in seen                 # a step with a prompt chunk, launched ahead
    assert not any(a and w for a, _, w in seen)         # none launched ahead while requests waited
    assert sum(a for a, _, _ in seen) == llm.stats()["steps_launched_ahead"]
    assert_no_leak(llm)


def test_preemption_while_a_step_is_launched_ahead(model):
    """A cache too small for every sequence: the scheduler preempts (recompute) while the step before is
    still unread, so a victim may hold a placeholder token; it is filled in, and the victim readmitted
    later with its real tokens. Outputs as without looking ahead, nothing leaked."""
    prompts = random_prompts([10, 7, 12, 9], seed=22)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    kw = dict(num_blocks=13, max_num_seqs=4)
    res = {}
    for ahead in (False, True):
        llm = EagerGraphLLM(model, block_size=4, max_model_len=40, async_scheduling=ahead, **kw)
        res[ahead] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.stats()["num_preemptions"] > 0
        assert_no_leak(llm)
    assert res[True] == res[False]
    assert llm.stats()["steps_launched_ahead"] > 0


def test_several_samples_per_request(model):
    prompts = random_prompts([6, 15], seed=23)
    params = SamplingParams(temperature=0.9, max_tokens=7, ignore_eos=True, seed=3, n=3)
    on, llm = run(model, prompts, params, True)
    off, _ = run(model, prompts, params, False)
    assert on == off and llm.stats()["steps_launched_ahead"] > 0


def test_stop_token_at_a_step_launched_past(model):
    """A sequence stops at a token the engine had already launched the next step after: that step's token
    for it is dropped; the others continue as without looking ahead."""
    prompts = random_prompts([6, 11, 4], seed=3)
    free, _ = run(model, prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), False)
    stop = free[0][0][4]    # the first sequence's fifth token stops it
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop])
    on, llm = run(model, prompts, params, True)
    off, _ = run(model, prompts, params, False)
    assert on == off
    assert on[0][1] == "stop" and on[0][0][-1] == stop and len(on[0][0]) <= 5
    assert llm.stats()["steps_launched_ahead"] > 0


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, ignore_eos=True, seed=5),
    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, repetition_penalty=1.3, seed=1),
], ids=["seeded-sampling", "logprobs", "penalties"])
def test_sampling_modes(model, params):
    prompts = random_prompts([7, 3, 14], seed=4)
    on, llm = run(model, prompts, params, True)
    off, _ = run(model, prompts, params, False)
    assert on == off
    # Penalties read the token history, which lacks the launched step's tokens: never looked past.
    assert (llm.stats()["steps_launched_ahead"] > 0) == (params.repetition_penalty == 1.0)


def test_abort_between_steps_with_a_step_launched_ahead(model):
    prompts = random_prompts([5, 9], seed=6)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = engine(model, True)
    a, b = (llm.add_request(p, params) for p in prompts)
    while len(a.seqs[0].output_token_ids) < 4 or llm._ahead is None:
        llm.step()
    llm.abort_request(a.request_id)            # its next token is already being computed
    while llm.has_unfinished():
        llm.step()
    assert a.seqs[0].finish_reason == "abort" and len(a.seqs[0].output_token_ids) < 20
    off, _ = run(model, prompts[1:], params, False)
    assert b.seqs[0].output_token_ids == off[0][0]
    llm.step()                                 # nothing left: the last launched step, if any, is dropped
    assert llm._ahead is None
    assert_no_leak(llm)


def test_new_request_while_decoding(model):
    """A request arriving while others decode is admitted at the next step the engine schedules (a launched
    step ahead is collected first); all outputs as without looking ahead."""
    prompts = random_prompts([5, 9, 13], seed=8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    off, _ = run(model, prompts, params, False)
    llm = engine(model, True)
    reqs = [llm.add_request(p, params) for p in prompts[:2]]
    for _ in range(5):
        llm.step()
    reqs.append(llm.add_request(prompts[2], params))
    while llm.has_unfinished():
        llm.step()
    assert [r.seqs[0].output_token_ids for r in reqs] == [o[0] for o in off]
    assert_no_leak(llm)


def test_async_engine_streams_and_aborts_with_look_ahead(model):
    """The server's loop over a looking-ahead engine: requests joining while others decode stream the tokens
    of the engine without look-ahead, each stream one token at a time; an abort mid-stream (a step for it may
    already be launched) ends its stream and frees its blocks at once."""
    import asyncio

    from latentmoe.engine import AsyncLLM

    prompts = random_prompts([5, 14, 2, 9], seed=12)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o[0] for o in run(model, prompts, params, False)[0]]

    async def main():
        llm = engine(model, True)
        eng = AsyncLLM(llm)
        await eng.start()

        async def collect(p, delay, rid=None):
            await asyncio.sleep(delay)
            return [o async for o in eng.generate(p, params, request_id=rid)]

        seen = []

        async def victim():
            long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
            async for out in eng.generate(random_prompts([7], seed=13)[0], long, request_id="victim"):
                seen.append(out)

        vt = asyncio.create_task(victim())
        results = await asyncio.gather(*[collect(p, 0.01 * i) for i, p in enumerate(prompts)])
        while len(seen) < 3:
            await asyncio.sleep(0.005)
        await eng.abort("victim")
        await asyncio.wait_for(vt, 5)
        assert llm.block_manager.num_used_blocks == 0
        await eng.shutdown()
        return results, llm, seen

    results, llm, seen = asyncio.run(main())
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert [r[-1].outputs[0].token_ids for r in results] == want
    assert all([len(o.outputs[0].token_ids) for o in r] == list(range(1, 13)) for r in results)
    assert llm.stats()["steps_launched_ahead"] > 0
    assert_no_leak(llm)
