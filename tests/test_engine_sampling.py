"""Sampling: parameter validation, the sampler against plain references, seeded reproducibility
independent of batch composition, stop tokens / strings cut exactly, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from latentmoe.engine import LLM, SamplingParams
from latentmoe.engine.sampling import SamplingBatch, apply_penalties, sample

from test_engine import assert_no_leak, random_prompts, reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("name, value", [
    ("n", 0), ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("top_k", 2.5), ("min_p", 1.2), ("max_tokens", 0), ("stop", [""]),
    ("stop_token_ids", [-1]), ("seed", "7"), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("logprobs", 21), ("logprobs", -1),
])
def test_bad_sampling_params_name_the_parameter(name, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} .*must be"):
        SamplingParams(**{name: value})


def _batch(params, vocab, prompt=None, output=None):
    B = len(params)
    return SamplingBatch.build(params, [None] * B, prompt or [[]] * B, output or [[]] * B, vocab, torch.device("cpu"))


def test_sampler_distribution_matches_softmax():
    # 40k rows of the same 6-token logits: empirical frequencies = softmax(logits / T).
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    B = 40000
    p = SamplingParams(temperature=0.7)
    tokens, _, _ = sample(logits.expand(B, -1).clone(), _batch([p] * B, 6))
    freq = torch.bincount(tokens, minlength=6).float() / B
    torch.testing.assert_close(freq, (logits / 0.7).softmax(-1), atol=0.01, rtol=0)


def test_top_k_top_p_min_p_keep_the_right_sets():
    torch.manual_seed(1)
    V, B = 50, 4000
    logits = torch.randn(V) * 2
    order = logits.argsort(descending=True).tolist()
    probs = logits.softmax(-1)
    # The nucleus: the smallest prefix of the sorted tokens whose mass reaches top_p.
    cum, nucleus = 0.0, []
    for t in order:
        nucleus.append(t)
        cum += probs[t].item()
        if cum >= 0.6:
            break
    cases = [(SamplingParams(top_k=3), set(order[:3])),
             (SamplingParams(top_p=0.6), set(nucleus)),
             (SamplingParams(min_p=0.3), {t for t in range(V) if probs[t] >= 0.3 * probs.max()}),
             (SamplingParams(top_k=1, top_p=0.9), {order[0]})]
    for p, allowed in cases:
        tokens, _, _ = sample(logits.expand(B, -1).clone(), _batch([p] * B, V))
        got = set(tokens.tolist())
        assert got == allowed, (p, got, allowed)


def test_penalties_match_plain_loop():
    torch.manual_seed(2)
    V = 12
    logits = torch.randn(3, V)
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams()]
    prompt = [[1, 2], [3], [4]]
    output = [[5, 5, 2], [3, 6, 6, 6], [7]]
    got = apply_penalties(logits.clone(), _batch(params, V, prompt, output))
    want = logits.clone()
    for b, p in enumerate(params):
        for t in set(prompt[b] + output[b]):
            x = want[b, t]
            want[b, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(output[b]):
            want[b, t] -= p.frequency_penalty * output[b].count(t) + p.presence_penalty
    torch.testing.assert_close(got, want)


def test_seeded_sampling_reproducible_and_batch_independent(model):
    prompts = random_prompts([7, 19, 3, 11], seed=5)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=8, ignore_eos=True)
    alone = LLM(model, block_size=4, num_blocks=200).generate(prompts[1], seeded)[0].outputs[0].token_ids
    # The same request inside different batches: greedy, unseeded and other-seeded neighbours,
    # chunked prefill and preemption.
    others = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), SamplingParams(max_tokens=12),
              SamplingParams(seed=9, max_tokens=5, top_k=5)]
    for kwargs in (dict(), dict(max_num_batched_tokens=6), dict(num_blocks=9, max_model_len=32)):
        llm = LLM(model, **{"block_size": 4, "num_blocks": 200, **kwargs})
        outs = llm.generate([prompts[0], prompts[1], prompts[2], prompts[3]],
                            [others[0], seeded, others[1], others[2]])
        assert outs[1].outputs[0].token_ids == alone, kwargs
        assert_no_leak(llm)
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=8, ignore_eos=True)
    assert LLM(model, block_size=4, num_blocks=200).generate(prompts[1], other_seed)[0].outputs[0].token_ids != alone
    # n > 1 with a seed: the samples differ from each other, and reproduce.
    n3 = SamplingParams(n=3, temperature=1.0, seed=77, max_tokens=8, ignore_eos=True)
    a = LLM(model, block_size=4, num_blocks=200).generate(prompts[2], n3)[0]
    b = LLM(model, block_size=4, num_blocks=200).generate(prompts[2], n3)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3


def test_stop_tokens_cut_exactly(model):
    prompt = random_prompts([9], seed=6)[0]
    want = reference_greedy(model, prompt, 10)
    stop_at = next(i for i in range(2, 10) if want[i] not in want[:i])
    llm = LLM(model, block_size=4, num_blocks=200)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                              stop_token_ids=[want[stop_at]]))[0].outputs[0]
    assert out.token_ids == want[:stop_at + 1] and out.finish_reason == "stop"
    # The model's EOS (same weights, eos id set to that token) stops too, unless ignore_eos.
    eos_model = tiny_model(eos_token_id=want[stop_at])
    llm = LLM(eos_model, block_size=4, num_blocks=200)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert out.token_ids == want[:stop_at + 1] and out.finish_reason == "stop"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == want and out.finish_reason == "length"
    assert_no_leak(llm)


@pytest.fixture(scope="module")
def tokenizer():
    from latentmoe.tokenizer import train_bpe
    texts = ["the quick brown fox jumps over the lazy dog", "hello world, this is a test of stop strings",
             "numbers 0123456789 and letters abcdefghijklmnopqrstuvwxyz"] * 20
    return train_bpe(texts, vocab_size=400)


def test_stop_strings_cut_text_exactly(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    prompt = "the quick brown"
    ids = tokenizer.encode(prompt)
    want = reference_greedy(model, ids, 24)
    full = tokenizer.decode(want)
    assert len(full) >= 8, "the reference produced too little text for this test"
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.find(stop)
    llm = LLM(model, block_size=4, num_blocks=200, tokenizer=tokenizer)
    params = SamplingParams(temperature=0, max_tokens=len(want), ignore_eos=True, stop=[stop, "\x00never"])
    out = llm.generate(prompt, params)[0]
    assert out.prompt == prompt and out.prompt_token_ids == ids
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.text == full[:cut]
    # Generation stopped at the first token whose text completes the stop string.
    k = len(c.token_ids)
    assert c.token_ids == want[:k] and stop in tokenizer.decode(want[:k]) and stop not in tokenizer.decode(want[:k - 1])
    # Streaming never shows text that is later taken back.
    texts = [o.outputs[0].text for o in llm.generate_stream(prompt, params)]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == full[:cut]
    assert_no_leak(llm)


def test_logprobs_are_the_models(model):
    prompt = random_prompts([6], seed=8)[0]
    llm = LLM(model, block_size=4, num_blocks=200)
    out = llm.generate(prompt, SamplingParams(temperature=0.8, seed=3, max_tokens=5, logprobs=3,
                                              ignore_eos=True))[0].outputs[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].log_softmax(-1)
    assert len(out.logprobs) == 5
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        top3 = row.topk(3).indices.tolist()
        assert tok in lp and set(top3) <= set(lp) and len(lp) <= 4
        for t, v in lp.items():
            assert math.isclose(v, row[t].item(), abs_tol=1e-4)
    out = llm.generate(prompt, SamplingParams(max_tokens=3))[0].outputs[0]
    assert out.logprobs is None


def test_argmax_rows_is_argmax_with_ties():
    from latentmoe.engine.sampling import _argmax_chunk, argmax_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (64, 1024), generator=g).float()     # many equal maxima in every row
    x[3] = 7.0                                                     # one row all equal: index 0
    x[5, 1000] = 9.0                                               # the maximum in the last chunk
    for chunk in (None, 256, 512):
        assert torch.equal(argmax_rows(x, chunk), x.argmax(-1))
    assert argmax_rows(x, 256)[3] == 0 and argmax_rows(x, 256)[5] == 1000
    assert argmax_rows(x[:, :1000], 300).tolist() == x[:, :1000].argmax(-1).tolist()   # not a divisor: one pass
    assert _argmax_chunk(102400) == 2048 and _argmax_chunk(32000) == 2000 and _argmax_chunk(509) is None
