"""Engine greedy output == transformers' DeepseekV2ForCausalLM greedy `generate`, on checkpoints
written by transformers' save_pretrained and loaded by latentmoe, whatever the batch composition."""

from __future__ import annotations

import pytest
import torch

from latentmoe.engine import LLM, SamplingParams

from test_engine import assert_no_leak, random_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", [
    dict(),
    dict(q_lora_rank=24, topk_method="group_limited_greedy", yarn=True),
], ids=["lite-like", "v2-like-yarn"])
def test_greedy_matches_transformers_generate(hf_factory, variant):
    hf, path = hf_factory(seed=1, std=0.08, **variant)
    prompts = random_prompts([4, 23, 1, 11, 16], seed=2, vocab=128)
    want = [hf_greedy(hf, p, 10) for p in prompts]
    assert len({tuple(w) for w in want}) == len(want)
    params = SamplingParams(temperature=0, max_tokens=10)  # EOS (id 2) stops both alike
    for kwargs in (dict(), dict(max_num_batched_tokens=7), dict(num_blocks=14, max_model_len=40),
                   dict(enable_prefix_caching=False, max_num_seqs=2)):
        llm = LLM(str(path), **{"block_size": 4, "num_blocks": 200, **kwargs})
        outs = llm.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in outs] == want, kwargs
        assert llm.scheduler.num_preemptions > 0 or "num_blocks" not in kwargs
        assert_no_leak(llm)
    # Prefix-cache hits: the same prompts again, now served partly from the cache.
    llm = LLM(str(path), block_size=4, num_blocks=200)
    llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert llm.block_manager.num_prefix_hits > 0
