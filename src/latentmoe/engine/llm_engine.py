"""The offline engine: `LLM(path).generate(prompts, SamplingParams(...))` and a streaming form.

Owns the block manager, scheduler and model runner; `step()` schedules, runs and samples once and
turns new tokens into outputs (detokenized at the edge when a tokenizer is present, stop
strings/tokens applied). The async engine drives the same `step()` from a background loop.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .kv_cache import plan_cache
from .layers import engine_model
from .model_runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Request, RequestOutput, Sequence

_request_counter = itertools.count()
log = logging.getLogger("latentmoe.engine")


def load_tokenizer(path):
    """The checkpoint directory's tokenizer, or None when it has none."""
    try:
        from ..tokenizer import Tokenizer
        return Tokenizer.from_dir(path)
    except (ImportError, FileNotFoundError):
        return None


class LLM:
    """The engine over `model`: a checkpoint directory or hub model id (loaded here, with its tokenizer) or a
    built model.

    Options are EngineConfig fields, as keyword arguments or as `config=EngineConfig(...)`. A built
    model is never changed: the engine runs its own module tree sharing the model's parameters
    (converted copies only when `device`/`dtype` differ from the model's), see layers.engine_model.
    `llm.model` is the model given or loaded; `llm.config` its ModelConfig; `llm.engine_config` the
    resolved options.

    With tensor_parallel_size=N > 1 the engine runs in N processes, one per device, each loading its
    share of the checkpoint directory (engine/distributed.py); `llm.model` is then this process's
    share. `close()` (or `with LLM(...) as llm:`) stops the other processes; they also end with this one.
    """

    runner_class = ModelRunner   # a subclass may run steps differently (tests run the graph path eagerly)

    def __init__(self, model, *, tokenizer=None, config: EngineConfig | None = None, **options):
        t_start = time.perf_counter()
        if config is None:
            config = EngineConfig(**options)
        elif options:
            raise ValueError(f"pass engine options as config= or as keyword arguments, not both "
                             f"(got config= and {sorted(options)})")
        elif not isinstance(config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
        if config.tensor_parallel_size > 1:
            # One process per device, each loading its own share (engine/distributed.py).
            if not isinstance(model, (str, os.PathLike)):
                raise ValueError("tensor_parallel_size > 1 loads each rank's share from a checkpoint directory: "
                                 "pass its path (or hub id), not a built model")
            from ..checkpoint import resolve_checkpoint
            from .distributed import ParallelRunner
            path = resolve_checkpoint(model)   # a directory, or a hub model id through the hub cache
            self.runner = ParallelRunner(path, config, self.runner_class)
            self.model = self.runner.model            # rank 0's share, as the engine runs it
            self.config = self.runner.model_config    # the whole model's config
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
            config = self.runner.config
            num_blocks, self.max_model_len = self.runner.num_blocks, self.runner.max_model_len
        else:
            num_blocks = self._start_local(model, tokenizer, config)
            config = self.engine_config
        self.engine_config = config
        self.device, self.dtype = config.device, config.dtype
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.prefill_hold_steps)
        self.last_execute_seconds = 0.0   # the last step's time in the runner (inputs, forward, sampling)
        # Looking ahead (step) needs the runner's launch/collect (the one-process runner) and a device that
        # computes while the host works (on a CPU a launch computes at once: tests run the graph path eagerly).
        self._looks_ahead = (config.async_scheduling and config.tensor_parallel_size == 1
                             and (config.device.type == "cuda" or self.runner.use_cuda_graphs))
        self._ahead = None                # a step launched ahead, collected by the next step()
        self.num_steps_ahead = 0
        self.requests: dict[str, Request] = {}
        self.eos_token_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        # Everything compiles and captures now, not on the first requests (counted afterwards: stats()).
        # (With tensor_parallel_size > 1 every rank warms up alike, its collectives in step with rank 0's.)
        self.runner.warm_up(config.max_num_batched_tokens, progress=self.device.type == "cuda")
        self.time_to_ready = time.perf_counter() - t_start
        log.info("engine ready in %.1f s (warm-up %.1f s: %d kernel compilations, %d decode graphs)",
                 self.time_to_ready, self.runner.warmup_seconds, self.runner.compilations_at_ready,
                 self.runner.num_captures)

    def _start_local(self, model, tokenizer, config: EngineConfig) -> int:
        """The one-process engine: load or take the model, build the runner; returns the cache's blocks."""
        fp8_weights = None
        if isinstance(model, (str, os.PathLike)):
            from ..checkpoint import load_model, resolve_checkpoint
            path = resolve_checkpoint(model)   # a directory, or a hub model id through the hub cache
            device = config.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
            asked_device, asked_dtype = config.device, config.dtype
            if config.quantization == "fp8":
                # Unquantised weights stay in host memory; the device receives only the engine's FP8 tree.
                from ..checkpoint import read_fp8_weights, resolve_dtype
                asked_device, asked_dtype = device, resolve_dtype(config.dtype, device)
                model = load_model(path, device="cpu", dtype=asked_dtype)
                fp8_weights = read_fp8_weights(path, model.config)   # a block-FP8 checkpoint's own pairs
            else:
                model = load_model(path, device=device, dtype=config.dtype)
            if tokenizer is None:
                tokenizer = load_tokenizer(path)
        else:
            asked_device, asked_dtype = config.device, config.dtype
        p = next(model.parameters())
        config = config.resolved(asked_device or p.device, asked_dtype or p.dtype, model.config)
        self.model = model
        self.config = model.config
        self.engine_config = config
        self.tokenizer = tokenizer
        # Only a device/dtype asked for converts; otherwise every tensor stays where it is. Before the
        # cache plan: on CUDA the budget is the memory left once the weights are in place.
        runner_model = engine_model(model, fused_ops=config.fused_ops, fused_experts=config.experts_impl == "fused",
                                    device=asked_device, dtype=asked_dtype, quantization=config.quantization,
                                    fp8_weights=fp8_weights)
        num_blocks, self.max_model_len = plan_cache(
            self.config, config.kv_cache, config.device, config.dtype, config.block_size, config.cache_memory_gb,
            config.num_blocks, config.max_num_seqs, config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization, max_num_batched_tokens=config.max_num_batched_tokens)
        self.runner = self.runner_class(runner_model, config, num_blocks, self.max_model_len)
        return num_blocks

    def close(self) -> None:
        """Stop the engine's other processes (tensor_parallel_size > 1); nothing to do for one process."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (none found in the checkpoint directory); "
                                 "pass token ids or tokenizer=")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        # Plain ints checked by type in C (a per-element isinstance took ~0.5 ms per 1,000 tokens).
        if not set(map(type, ids)) <= {int} and not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("a prompt must be a string or a list of integer token ids")
        return None, ids

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> Request:
        """Validate and queue one request; raises ValueError before anything is queued."""
        req = self._new_request(prompt, params, request_id)
        for seq in req.seqs:
            self.scheduler.add(seq)
        return req

    def add_request_without_prefill(self, prompt, params: SamplingParams | None = None,
                                    request_id: str | None = None) -> Request:
        """Like add_request, but the prompt is taken as already in the cache: its blocks are allocated
        and left as they are, and the next steps decode straight away at a context of len(prompt).

        For measuring decode at a given context without paying for its prefill (benchmarks/bench_engine.py):
        attention costs the same whatever the cached values, but they are placeholders, so the outputs
        mean nothing. Those blocks are never offered to the prefix cache. Raises ValueError when
        max_num_seqs or the cache has no room for all of the request's sequences.
        """
        req = self._new_request(prompt, params, request_id)
        try:
            for seq in req.seqs:
                self.scheduler.admit_prefilled(seq)
        except ValueError:
            self.abort_request(req.request_id)
            raise
        return req

    def _new_request(self, prompt, params: SamplingParams | None, request_id: str | None) -> Request:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        text, ids = self._prompt_ids(prompt)
        V = self.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= V:
            bad = [t for t in ids if not 0 <= t < V]
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
    def step(self, outputs: bool = True, on_launch=None) -> list[RequestOutput]:
        """One scheduling + forward + sampling step; outputs of the requests that got a new token
        (only the finished ones with outputs=False: cumulative outputs cost O(length) each step).
        `on_launch()`, if given, is called from this thread once the step's device work is queued and
        before the step waits for it (it may not be called, e.g. for a step that samples nothing).

        Looking ahead (async_scheduling): once a step is launched, its effect on the host state is applied
        before its tokens are known (computed tokens advance; a sequence that samples gets a placeholder
        token, Sequence.PENDING_TOKEN), the next step is scheduled and launched (a decode row whose input is
        a placeholder takes the launched step's sampled id on the device), and only then are the first
        step's tokens read, filled in and turned into outputs, while the device computes the next one.
        That next step is returned by the next call. A sequence that stops (stop token or string) or is
        aborted at a token already looked past has its next token computed and dropped; one that ends by
        length at the launched step's token is left out of the next (Scheduler.schedule). Not while
        requests wait to be admitted (see _launch_next), nor with penalties (they read the token history
        on the host)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                return []
        t0 = time.perf_counter()
        if not self._looks_ahead:   # (then nothing is ever launched ahead)
            self.runner.on_launch = on_launch
            try:
                tokens, lps = self.runner.execute(batch)
            finally:
                self.runner.on_launch = None
            pending = self._apply(batch)
        else:
            if ahead is None:
                launched = self.runner.launch(batch)
                pending = self._apply(batch)
            else:
                launched, pending = ahead
            self._ahead = self._launch_next(launched)
            if on_launch is not None:
                on_launch()
            tokens, lps = self.runner.collect(launched)
            batch = launched.batch
        self.last_execute_seconds = time.perf_counter() - t0
        return self._fill(batch, pending, tokens, lps, outputs)

    def _apply(self, batch: ScheduledBatch) -> list[int | None]:
        """A launched step's effect on the host state before its tokens are read: each sequence's computed
        tokens advance, and each that samples gets a placeholder token. Per batch row: the placeholder's
        index, or None (a prompt chunk short of the end samples nothing)."""
        pending = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            samples = seq.num_computed_tokens + n == len(seq)
            seq.num_computed_tokens += n
            pending.append(seq.append_pending() if samples else None)
        return pending

    def _fill(self, batch: ScheduledBatch, pending: list[int | None], tokens: list[int], lps: list,
              outputs: bool) -> list[RequestOutput]:
        """The step's tokens in place of its placeholders; prefix-cache blocks, stop checks and outputs."""
        touched: dict[str, Request] = {}
        k = 0
        for seq, index in zip(batch.seqs, pending):
            if index is not None:
                token, lp = tokens[k], lps[k]
                k += 1
                if seq.is_finished:
                    # Stopped or aborted after this step was launched ahead of it: the token is not its.
                    seq.drop_pending(index)
                    continue
                seq.fill(index, token)
            elif seq.is_finished:
                continue
            self.block_manager.register_full_blocks(seq)
            if index is None:
                continue   # a prefill chunk that does not reach the end yet
            if seq.logprobs is not None:
                seq.logprobs.append(lp)
            self._check_stop(seq, token)
            req = self.requests.get(seq.request_id)
            if req is not None:
                touched[seq.request_id] = req
        outs = []
        for rid, req in touched.items():
            if req.finished:
                del self.requests[rid]
                outs.append(req.output())
            elif outputs:
                outs.append(req.output())
        return outs

    def _launch_next(self, launched):
        """Schedule and launch the step after `launched` before its tokens are read (see step); returns
        (that step, its placeholders) or None: requests wait to be admitted, nothing to schedule, or some
        sequence samples with penalties.

        Not while requests wait: behind the server at concurrency 256 (200 x (1,000 in, 100 out), one H200,
        one round each) looking ahead then served 36.1 requests/s against 40.4 without, while offline, where
        that workload's prompts all wait from the start, runs with and without it differed within their
        noise (bench_e2e 60.9 against 58.9 requests/s, bench_serve's offline reference 54.0 against 55.3)."""
        sched = self.scheduler
        if sched.waiting or any(s.params.uses_penalties for s in sched.running):
            return None
        batch = sched.schedule()
        if not batch.seqs:
            return None
        step = self.runner.launch(batch, after=launched)
        self.num_steps_ahead += 1
        return step, self._apply(batch)

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
                    num_preemptions=self.scheduler.num_preemptions, num_held_steps=self.scheduler.num_held_steps,
                    prefix_cache_hit_tokens=bm.num_prefix_hits, steps_launched_ahead=self.num_steps_ahead,
                    time_to_ready_seconds=self.time_to_ready, **self.runner.stats())


__all__ = ["LLM", "load_tokenizer"]
