"""Offline benchmarks over an `LLM`: throughput of many requests, and one batch's latency.

Prompts are random token ids (or given ones). Generation ignores EOS so every request produces
exactly its output length; greedy, as transformers `generate` runs in the comparison.
"""
from __future__ import annotations

import itertools
import random
import time

import torch


def random_prompts(n: int, input_len: int, vocab_size: int, min_input_len: int | None = None,
                   seed: int = 0) -> list[list[int]]:
    """n prompts of random token ids (ids 3.. so that no special token starts or ends one); lengths
    uniform in [min_input_len, input_len] (all input_len when min_input_len is None)."""
    rng = random.Random(seed)
    lo = input_len if min_input_len is None else min_input_len
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randint(lo, input_len))] for _ in range(n)]


def _params(output_len: int, logprobs: int | None = None):
    from ..engine import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, logprobs=logprobs)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def throughput(llm, prompt_sets: list[list[list[int]]], output_len: int, progress: bool = True,
               logprobs: int | None = None) -> dict:
    """One run per prompt set, in order (the first right after start-up counts as much as the later ones:
    nothing should compile or capture in it). Give each run its own prompts of the same lengths, or
    the prefix cache serves the later runs' prompts. Requests/s and tokens/s of each run. `logprobs`: as
    in SamplingParams (a reference for requests that ask for them does the same sampling work)."""
    params = _params(output_len, logprobs)
    results = []
    for r, prompts in enumerate(prompt_sets):
        in_tokens = sum(len(p) for p in prompts)
        _sync(llm.device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=progress)
        _sync(llm.device)
        dt = time.perf_counter() - t0
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results.append(dict(run=r + 1, seconds=dt, requests_per_s=len(prompts) / dt, input_tokens=in_tokens,
                            total_tokens_per_s=(in_tokens + out_tokens) / dt, output_tokens_per_s=out_tokens / dt,
                            output_tokens=out_tokens))
    stats = llm.stats()
    return dict(num_prompts=len(prompt_sets[0]), input_tokens=results[0]["input_tokens"], output_len=output_len,
                runs=results,
                time_to_ready_s=stats.get("time_to_ready_seconds"),
                compilations_after_ready=stats.get("compilations_after_ready"),
                graph_captures_after_ready=stats.get("graph_captures_after_ready"),
                prefix_cache_hit_tokens=stats.get("prefix_cache_hit_tokens"))


def latency(llm, batch_size: int, input_len: int, output_len: int, iters: int = 3, seed: int = 0) -> dict:
    """One batch of `batch_size` prompts: prefill time (generating one token) and the time per further
    token (the rest of a generation of output_len tokens), medians over `iters` runs. One untimed run goes
    first (what a process does on first use is not a prefill cost), and every run has new prompts of the
    same length (a prefix-cache hit on an earlier run's prompt is not a prefill either)."""
    fresh = (random_prompts(batch_size, input_len, llm.config.vocab_size, seed=seed * 10007 + k)
             for k in itertools.count())
    hits0 = llm.stats().get("prefix_cache_hit_tokens") or 0
    llm.generate(next(fresh), _params(output_len))
    prefill, full = [], []
    for _ in range(iters):
        for n, into in ((1, prefill), (output_len, full)):
            prompts = next(fresh)
            _sync(llm.device)
            t0 = time.perf_counter()
            llm.generate(prompts, _params(n))
            _sync(llm.device)
            into.append(time.perf_counter() - t0)
    p, f = sorted(prefill)[len(prefill) // 2], sorted(full)[len(full) // 2]
    per_token = (f - p) / max(1, output_len - 1)
    return dict(batch_size=batch_size, input_len=input_len, output_len=output_len, iters=iters,
                prefill_s=p, total_s=f, per_token_ms=per_token * 1e3,
                decode_tokens_per_s=batch_size / per_token if per_token > 0 else None,
                prefix_cache_hit_tokens=(llm.stats().get("prefix_cache_hit_tokens") or 0) - hits0)


@torch.inference_mode()
def transformers_throughput(hf_model, prompts: list[list[int]], output_len: int, batch_size: int,
                            pad_token_id: int = 0, progress: bool = True) -> dict:
    """transformers `generate` (greedy, no early stop) over the same prompts in batches, left-padded."""
    device = next(hf_model.parameters()).device
    in_tokens = sum(len(p) for p in prompts)
    out_tokens = 0
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="transformers", unit="req")
    _sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                                min_new_tokens=output_len, do_sample=False, pad_token_id=pad_token_id)
        out_tokens += (out.shape[1] - width) * len(batch)
        if bar is not None:
            bar.update(len(batch))
    _sync(device)
    dt = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return dict(seconds=dt, requests_per_s=len(prompts) / dt, total_tokens_per_s=(in_tokens + out_tokens) / dt,
                output_tokens_per_s=out_tokens / dt, output_tokens=out_tokens, batch_size=batch_size)
