"""The offline engine: `LLM(path).generate(prompts, SamplingParams(...))` and a streaming form.

Owns the block manager, scheduler and model runner; `step()` schedules, runs and samples once and
turns new tokens into outputs (detokenized at the edge when a tokenizer is present, stop
strings/tokens applied). The async engine drives the same `step()` from a background loop.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import torch

from .block_manager import BlockManager
from .fused_ops import set_fused_ops
from .model_runner import ModelRunner, plan_cache, set_fused_experts
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Request, RequestOutput, Sequence

_request_counter = itertools.count()


def _load_tokenizer(path):
    try:
        from ..tokenizer import Tokenizer
        return Tokenizer.from_dir(path)
    except (ImportError, FileNotFoundError):
        return None


class LLM:
    def __init__(self, model, device=None, dtype=None, max_num_seqs: int = 256, max_model_len: int | None = None,
                 block_size: int = 64, cache_memory_gb: float | None = None, tokenizer=None,
                 enable_prefix_caching: bool = True, max_num_batched_tokens: int | None = None,
                 num_blocks: int | None = None, enforce_eager: bool = False, experts_impl: str | None = None,
                 expert_parallel_size: int = 1, kv_cache: str = "latent", fused_ops: bool | None = None):
        if not isinstance(expert_parallel_size, int) or expert_parallel_size < 1:
            raise ValueError(f"expert_parallel_size must be a positive integer, got {expert_parallel_size!r}")
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if expert_parallel_size > 1:
                # Routed experts split over N devices of this host; the rest lives on the first.
                from ..parallel.inference import load_model_expert_parallel
                model = load_model_expert_parallel(path, expert_parallel_size, device=device, dtype=dtype)
                enforce_eager = True  # the expert-sharded layer syncs with the host: no CUDA graphs
            else:
                from ..checkpoint import load_model
                model = load_model(path, device=device, dtype=dtype)
            if tokenizer is None:
                tokenizer = _load_tokenizer(path)
        elif expert_parallel_size > 1:
            raise ValueError("expert_parallel_size > 1 needs a checkpoint path (experts are placed while loading)")
        elif device is not None or dtype is not None:
            from ..checkpoint import resolve_dtype
            device = torch.device(device) if device is not None else next(model.parameters()).device
            model = model.to(device=device, dtype=resolve_dtype(dtype, device) if dtype is not None else None)
        model.eval()
        if kv_cache not in ("latent", "mha"):   # 'mha': per-head K/V of the same model (the MLA-vs-MHA baseline)
            raise ValueError(f"kv_cache must be 'latent' or 'mha', got {kv_cache!r}")
        if experts_impl not in (None, "model", "fused"):
            raise ValueError(f"experts_impl must be 'model' or 'fused', got {experts_impl!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive integer, got {max_num_seqs!r}")
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        num_blocks, self.max_model_len = plan_cache(self.config, self.device, self.dtype, block_size, cache_memory_gb,
                                                    num_blocks, max_num_seqs, max_model_len, kv_cache=kv_cache)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(2048, max_num_seqs)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        # 'fused': routed experts through the Triton fused-MoE kernel (CUDA, inference only).
        # Default 'fused' for half-precision models on CUDA: its logits are as close to an fp32 reference
        # as the model's own grouped-GEMM path (bf16 rounding either way; results/engine.md), and it is
        # faster. fp32 models keep the model's exact path (the kernel's fp32 dots run as tf32).
        if experts_impl is None:
            half = self.dtype in (torch.bfloat16, torch.float16)
            experts_impl = "fused" if self.device.type == "cuda" and half else "model"
        self.experts_impl = experts_impl
        if self.device.type == "cuda":
            set_fused_experts(model, experts_impl == "fused")
        # Fused decode glue (RMSNorm, MLA post-projection, router): default on CUDA, off elsewhere.
        self.fused_ops = self.device.type == "cuda" if fused_ops is None else bool(fused_ops)
        if self.fused_ops or fused_ops is not None:
            self.fused_ops = set_fused_ops(model, self.fused_ops) > 0 and self.fused_ops
        self.runner = ModelRunner(model, block_size, num_blocks, max_num_seqs, self.max_model_len,
                                  use_cuda_graphs=not enforce_eager, kv_cache=kv_cache)
        self.requests: dict[str, Request] = {}
        self.eos_token_ids = set(self.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)

    # ------------------------------------------------------------------ requests
    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (none found in the checkpoint directory); "
                                 "pass token ids or tokenizer=")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("a prompt must be a string or a list of integer token ids")
        return None, ids

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> Request:
        """Validate and queue one request; raises ValueError before anything is queued."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        text, ids = self._prompt_ids(prompt)
        V = self.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary [0, {V}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; it must be shorter than max_model_len "
                             f"({self.max_model_len}) to leave room for at least one generated token")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
                             f"({self.max_model_len})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        if request_id is None:
            request_id = f"req-{next(_request_counter)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(params.seed + i)
            seq = Sequence(request_id, i, ids, params, gen, max_tokens, now)
            if self.tokenizer is not None:
                seq.detok = self.tokenizer.incremental_decoder(params.skip_special_tokens)
            seqs.append(seq)
        req = Request(request_id, text, ids, seqs)
        self.requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks return to the free list before this returns."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return req.output()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ step
    def step(self, outputs: bool = True) -> list[RequestOutput]:
        """One scheduling + forward + sampling step; outputs of the requests that got a new token
        (only the finished ones with outputs=False: cumulative outputs cost O(length) each step)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        tokens, lps = self.runner.execute(batch)
        touched: dict[str, Request] = {}
        k = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            if seq.num_computed_tokens < len(seq):
                continue   # a prefill chunk that does not reach the end yet
            token, lp = tokens[k], lps[k]
            k += 1
            seq.append(token)
            if seq.logprobs is not None:
                seq.logprobs.append(lp)
            self._check_stop(seq, token)
            touched[seq.request_id] = self.requests[seq.request_id]
        outs = []
        for rid, req in touched.items():
            if req.finished:
                del self.requests[rid]
                outs.append(req.output())
            elif outputs:
                outs.append(req.output())
        return outs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        stop_token = (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids
        if seq.detok is not None and not stop_token:
            old = len(seq.text)
            seq.text += seq.detok.step([token])
            for s in p.stop:
                # Only where the new text could complete a stop string.
                i = seq.text.find(s, max(0, old - len(s) + 1))
                if i >= 0:
                    seq.text = seq.text[:i]
                    self.scheduler.finish(seq, "stop")
                    return
        if stop_token:
            if seq.detok is not None:
                seq.text += seq.detok.flush()
            self.scheduler.finish(seq, "stop")
        elif seq.num_output_tokens >= seq.max_tokens:
            if seq.detok is not None:
                seq.text += seq.detok.flush()
            self.scheduler.finish(seq, "length")

    # ------------------------------------------------------------------ offline API
    def _normalize(self, prompts, params):
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        return prompts, list(params)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts, params = self._normalize(prompts, params)
        reqs = []
        try:
            for prompt, p in zip(prompts, params):
                reqs.append(self.add_request(prompt, p))
        except Exception:
            for r in reqs:   # all or nothing
                self.abort_request(r.request_id)
            raise
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(reqs), desc="generating", unit="req")
        try:
            while any(not r.finished for r in reqs):
                for out in self.step(outputs=False):
                    if out.finished and bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for r in reqs:
                if not r.finished:
                    self.abort_request(r.request_id)
        return [r.output() for r in reqs]

    def generate_stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's cumulative output after every new token; the last has finished=True."""
        req = self.add_request(prompt, params)
        try:
            while not req.finished:
                for out in self.step():
                    if out.request_id == req.request_id:
                        yield out
        finally:
            if not req.finished:
                self.abort_request(req.request_id)

    def stats(self) -> dict:
        bm = self.block_manager
        return dict(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                    num_blocks_total=bm.num_usable_blocks, num_blocks_used=bm.num_used_blocks,
                    num_preemptions=self.scheduler.num_preemptions, prefix_cache_hit_tokens=bm.num_prefix_hits)


__all__ = ["LLM"]
