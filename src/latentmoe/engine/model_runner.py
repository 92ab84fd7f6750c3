"""Runs one scheduled step on the device: owns the engine's model and the paged cache, builds the
step's inputs and attention metadata, runs the model (decode-only steps replay a CUDA graph, one
per batch bucket whatever the context length), and samples on device.

A step is launched (its device work queued, its samples copied to pinned host memory in stream order) and
then collected (the host waits for those samples). Between the two the engine may launch the next step,
whose decode rows read the launched step's samples on the device where the host has only placeholders
(`launch(..., after=)`; LLM.step, "Looking ahead").

Start-up (`warm_up`) does every compilation and capture before the engine serves: prefill steps of
every token-count class up to the token budget (each Triton specialisation and tile configuration
the kernels pick) and of every length cuDNN's attention is given (kernels.prefill.cudnn_lengths), eager
decodes of every split count the decode kernel can choose (these eager steps run one decoder layer of
each kind: `warmup_layers`), and one decode graph per batch bucket over the whole model. What still
compiles or captures afterwards is counted (`stats`).
"""

from __future__ import annotations

import itertools
import logging
import time
from array import array
from dataclasses import dataclass

import torch

from .. import kernels
from ..config import ModelConfig
from .attention import AttentionMetadata, PrefillMetadata
from .block_manager import NULL_BLOCK
from .config import EngineConfig
from .sampling import SamplingBatch, argmax_rows, sample
from .scheduler import ScheduledBatch
from .sequence import PENDING_TOKEN

log = logging.getLogger("latentmoe.engine")
_ARRAY_CODES = {torch.int64: "q", torch.int32: "i"}


@dataclass
class LaunchedStep:
    """A step whose device work is queued: its sampled ids (and log-probabilities) are device tensors until
    ModelRunner.collect reads them."""
    batch: ScheduledBatch
    samplers: list                        # the sequences that sample, in batch order
    graph: bool = False                   # replayed a decode graph
    tokens: torch.Tensor | None = None    # [len(samplers)] sampled ids
    lp_vals: torch.Tensor | None = None
    lp_ids: torch.Tensor | None = None
    host: list | None = None              # on CUDA: their pinned host copies, complete once `ready` has passed
    ready: "torch.cuda.Event | None" = None


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class ModelRunner:
    """`model` is the engine's own module tree (layers.engine_model), on the device it runs on;
    `config` a resolved EngineConfig; the cache gets `num_blocks` blocks of the config's layout."""

    def __init__(self, model, config: EngineConfig, num_blocks: int, max_model_len: int):
        self.model = model
        self.cfg: ModelConfig = model.config
        self.device, self.dtype = config.device, config.dtype
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self.max_num_seqs = config.max_num_seqs
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.backend = config.kv_cache.allocate(self.cfg, num_blocks, self.block_size, self.dtype, self.device)
        self.kv_caches = self.backend.kv_caches
        self.use_cuda_graphs = not config.enforce_eager and self.supports_graphs(self.device)
        self.buckets = batch_buckets(self.max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        self.ready = False                  # set by warm_up: later captures/compilations are counted
        self.num_captures = 0
        self.captures_after_ready = 0
        self.compilations_at_ready = 0
        self.warmup_seconds = 0.0
        self.warmup_breakdown: dict[str, tuple[int, float]] = {}   # kind -> (steps, seconds), from warm_up
        self.warmup_layers = warmup_layers(model)   # the decoder layers start-up's eager steps run
        # Called (from the step's thread) once a step's device work is queued, before the step waits for
        # it: a server hands out the previous step's outputs then, not while this step's host work runs.
        self.on_launch = None
        if self.use_cuda_graphs:
            self._alloc_graph_buffers()

    @staticmethod
    def supports_graphs(device: torch.device) -> bool:
        return device.type == "cuda"

    # ------------------------------------------------------------------ inputs
    def _to_device(self, values: list[int], dtype) -> torch.Tensor:
        # Through a typed array: torch.tensor(list) checks every element (a prefill step's 16K ids and slots:
        # ~1.4 ms a list against ~0.3), and a step's host work is on the critical path when it samples.
        t = torch.frombuffer(array(_ARRAY_CODES[dtype], values), dtype=dtype) if values else torch.empty(0, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1: a range per block (a per-token loop took ~1.2 ms for 16K)."""
        bs = self.block_size
        slots: list[int] = []
        for i in range(start // bs, (end - 1) // bs + 1):
            first = block_table[i] * bs - i * bs
            slots.extend(range(first + max(start, i * bs), first + min(end, (i + 1) * bs)))
        return slots

    def prepare(self, batch: ScheduledBatch):
        """Host lists -> device tensors (pinned, non-blocking): ids, positions, metadata, sample rows."""
        ids, pos, slots, sample_rows = [], [], [], []
        ctx_slots, cu_q, cu_k = [], [0], [0]
        row = 0
        for k, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            new_slots = self._slots(seq.block_table, start, start + n)
            slots.extend(new_slots)
            if k >= batch.num_decodes:
                ctx_slots.extend(self._slots(seq.block_table, 0, start))
                ctx_slots.extend(new_slots)
                cu_q.append(cu_q[-1] + n)
                cu_k.append(len(ctx_slots))
            row += n
            if start + n == len(seq):
                sample_rows.append(row - 1)
        nd = batch.num_decodes
        meta = AttentionMetadata(slot_mapping=self._to_device(slots, torch.int64), num_decodes=nd)
        if nd:
            meta.block_table, meta.seq_lens = self._decode_tables(batch.seqs[:nd])
        if len(cu_q) > 1:
            meta.prefill = PrefillMetadata(self._to_device(ctx_slots, torch.int64), self._to_device(cu_q, torch.int32),
                                           self._to_device(cu_k, torch.int32),
                                           max(b - a for a, b in zip(cu_q, cu_q[1:])),
                                           max(b - a for a, b in zip(cu_k, cu_k[1:])))
        return ids, pos, meta, sample_rows

    def _decode_tables(self, seqs):
        """Block table and lengths of eager decodes. On CUDA the table is padded to max_model_len's width, as
        in the decode graphs, so the decode kernel's split count depends on the batch size only (a set
        warmed at start-up), never on the context; elsewhere (the torch reference reads every column) to
        the longest table of the batch."""
        lens = torch.tensor([len(s.block_table) for s in seqs])
        rows = torch.repeat_interleave(torch.arange(len(seqs)), lens)
        cols = torch.arange(len(rows)) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        width = self.max_blocks_per_seq if self.device.type == "cuda" else int(lens.max())
        table = torch.full((len(seqs), width), NULL_BLOCK, dtype=torch.int32)
        table[rows, cols] = torch.tensor(list(itertools.chain.from_iterable(s.block_table for s in seqs)),
                                         dtype=torch.int32)
        if self.device.type == "cuda":
            table = table.pin_memory().to(self.device, non_blocking=True)
        return table, self._to_device([s.num_computed_tokens + 1 for s in seqs], torch.int32)

    # ------------------------------------------------------------------ step
    def execute(self, batch: ScheduledBatch):
        """Run the step; returns (tokens, logprob rows) for the sequences that sample, in batch order."""
        step = self.launch(batch)
        self._launched()
        return self.collect(step)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, after: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the step's device work (forward and sampling) without waiting for it.

        `after`: a step launched before, not yet collected, whose effect the host state already shows with
        placeholders (PENDING_TOKEN) for its sampled ids; a decode row whose input is one takes that id
        from `after`'s samples on the device."""
        # Rows that reach their sequence's end sample (a prompt chunk short of the end samples nothing).
        keep = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                if s.num_computed_tokens + n == len(s)]
        samplers = [batch.seqs[i] for i in keep]
        all_decode = batch.num_decodes == len(batch.seqs)
        logits = None
        if all_decode and self.use_cuda_graphs and len(batch.seqs) <= self.buckets[-1]:
            logits = self._run_graph(batch, after)
            if logits is not None and len(samplers) < len(batch.seqs):
                logits = logits[self._to_device(keep, torch.int64)]
        graph = logits is not None
        if logits is None:
            ids, pos, meta, sample_rows = self.prepare(batch)
            ids_dev = self._to_device(ids, torch.int64)
            self._take_pending(ids_dev, ids, batch, after)
            self.backend.meta = meta
            h, _ = self.model.forward_hidden(ids_dev[None], positions=self._to_device(pos, torch.int64)[None],
                                             backend=self.backend)
            self.backend.meta = None
            logits = self.model.compute_logits(h[0, self._to_device(sample_rows, torch.int64)]) if sample_rows else None
        step = LaunchedStep(batch, samplers, graph=graph)
        if not samplers:
            return step
        if all(s.params.temperature == 0 and not s.params.uses_penalties and s.params.logprobs is None
               for s in samplers):
            # All greedy, nothing else asked: the arg-max is the whole of sampling (no per-step tensors).
            step.tokens = argmax_rows(logits)
        else:
            # Token histories travel to the device only when some row applies penalties.
            pen = any(s.params.uses_penalties for s in samplers)
            sb = SamplingBatch.build([s.params for s in samplers], [s.generator for s in samplers],
                                     [s.prompt_token_ids if pen else [] for s in samplers],
                                     [s.output_token_ids if pen else [] for s in samplers], self.cfg.vocab_size,
                                     self.device)
            step.tokens, step.lp_vals, step.lp_ids = sample(logits, sb)
        if self.device.type == "cuda":
            # Results to the host now, in stream order: a step launched after this one must not delay them
            # (a plain read in collect would queue behind it).
            step.host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                t, non_blocking=True) for t in (step.tokens, step.lp_vals, step.lp_ids)]
            step.ready = torch.cuda.Event()
            step.ready.record()
        return step

    def _take_pending(self, ids_dev: torch.Tensor, ids: list[int], batch: ScheduledBatch,
                      after: LaunchedStep | None) -> None:
        """Decode rows (the batch's first rows, one token each) whose host input is a placeholder: their ids
        from `after`'s samples, on the device (a plain copy when they are all of them, in order)."""
        rows = [i for i in range(batch.num_decodes) if ids[i] == PENDING_TOKEN]
        if not rows:
            return
        if after is None or after.tokens is None:
            raise RuntimeError("a placeholder token without the launched step that samples it")
        where = {id(s): j for j, s in enumerate(after.samplers)}
        srcs = [where[id(batch.seqs[i])] for i in rows]
        if rows[-1] == len(rows) - 1 and srcs == list(range(len(after.samplers))):
            ids_dev[:len(rows)].copy_(after.tokens)
        else:
            ids_dev[self._to_device(rows, torch.int64)] = after.tokens[self._to_device(srcs, torch.int64)].to(ids_dev.dtype)

    @staticmethod
    def collect(step: LaunchedStep):
        """Wait for a launched step: (tokens, logprob rows) of its sampling rows, in batch order."""
        if step.tokens is None:
            return [], []
        # The one host sync of the step: the scheduler needs the tokens.
        tokens, lp_vals, lp_ids = step.tokens, step.lp_vals, step.lp_ids
        if step.ready is not None:
            step.ready.synchronize()
            tokens, lp_vals, lp_ids = step.host
        tokens = tokens.tolist()
        lps = [None] * len(step.samplers)
        if lp_vals is not None:
            vals, idx = lp_vals.tolist(), lp_ids.tolist()
            for i, s in enumerate(step.samplers):
                if s.params.logprobs is not None:
                    k = s.params.logprobs + 1
                    lps[i] = dict(zip(idx[i][:k], vals[i][:k]))
        return tokens, lps

    def _launched(self) -> None:
        if self.on_launch is not None:
            self.on_launch()

    # ------------------------------------------------------------------ CUDA graphs
    def _alloc_graph_buffers(self) -> None:
        B, MB = self.buckets[-1], self.max_blocks_per_seq
        dev = self.device
        self.g_ids = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        self.g_pos = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        self.g_slots = torch.zeros(B, dtype=torch.int64, device=dev)
        self.g_block_table = torch.zeros(B, MB, dtype=torch.int32, device=dev)
        self.g_seq_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.g_logits = torch.zeros(B, self.cfg.vocab_size, dtype=self.dtype, device=dev)
        # Staging on the host: pinned buffers, one asynchronous copy each per step.
        pin = dev.type == "cuda"
        self.h_ids = torch.zeros(B, dtype=torch.int64, pin_memory=pin)
        self.h_pos = torch.zeros(B, dtype=torch.int64, pin_memory=pin)
        self.h_slots = torch.zeros(B, dtype=torch.int64, pin_memory=pin)
        self.h_block_table = torch.zeros(B, MB, dtype=torch.int32, pin_memory=pin)
        self.h_seq_lens = torch.ones(B, dtype=torch.int32, pin_memory=pin)
        # Block-table rows change once per block_size tokens: rows are rewritten only when they do
        # (each staged row is its whole width, NULL-padded, so any context bucket may slice it).
        self.h_block_table.fill_(NULL_BLOCK)
        self.h_rows: list[list[int] | None] = [None] * B
        self._staged = None   # CUDA event after the last step's copies out of these buffers

    def decode_body(self, b: int) -> None:
        """One decode step of bucket b on the static buffers: what a graph captures. The block table is
        max_model_len wide whatever the contexts, so the kernel's split count depends on b alone and each
        piece's range comes from the lengths on the device: one graph serves every context length."""
        meta = AttentionMetadata(slot_mapping=self.g_slots[:b], num_decodes=b,
                                 block_table=self.g_block_table[:b], seq_lens=self.g_seq_lens[:b])
        self.backend.meta = meta
        h, _ = self.model.forward_hidden(self.g_ids[:b], positions=self.g_pos[:b], backend=self.backend)
        self.g_logits[:b] = self.model.compute_logits(h[:, 0])
        self.backend.meta = None

    def _capture(self, b: int) -> torch.cuda.CUDAGraph:
        # Padded rows of the bucket decode against the reserved null block (slot 0, length 1).
        self.g_block_table[:b].zero_()
        self.g_seq_lens[:b].fill_(1)
        self.g_slots[:b].zero_()
        self.decode_body(b)   # warm-up: lazy initialisation must not happen while capturing
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            self.decode_body(b)
        if self.graph_pool is None:
            self.graph_pool = graph.pool()
        torch.cuda.synchronize()
        log.debug("captured decode graph batch=%d", b)
        return graph

    def _run_graph(self, batch: ScheduledBatch, after: LaunchedStep | None = None) -> torch.Tensor:
        n = len(batch.seqs)
        b = next(x for x in self.buckets if x >= n)
        mb = max(len(s.block_table) for s in batch.seqs)   # columns that can have changed
        bs = self.block_size
        pad = b - n
        pos = [s.num_computed_tokens for s in batch.seqs]
        ids = [s.token_ids[p] for s, p in zip(batch.seqs, pos)]   # placeholders taken from `after` below
        if self._staged is not None:
            # The host buffers are rewritten below: the last step's copies out of them must have run (with a
            # step launched ahead, they may still be queued behind the step before it).
            self._staged.synchronize()
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(batch.seqs, pos)]
        rows, table = self.h_rows, self.h_block_table
        for i, s in enumerate(batch.seqs):
            if rows[i] != s.block_table:   # list comparison in C: cheap when unchanged
                rows[i] = list(s.block_table)
                table[i, :len(rows[i])] = torch.tensor(rows[i], dtype=torch.int32)
                table[i, len(rows[i]):] = NULL_BLOCK
        for i in range(n, b):             # padded rows decode against the reserved null block
            if rows[i] != []:
                rows[i] = []
                table[i] = NULL_BLOCK
        # Padded rows: slot 0, length 1.
        self.h_ids[:b] = torch.tensor(ids + [0] * pad)
        self.h_pos[:b] = torch.tensor(pos + [0] * pad)
        self.h_slots[:b] = torch.tensor(slots + [0] * pad)
        self.h_seq_lens[:b] = self.h_pos[:b] + 1
        self.h_seq_lens[n:b] = 1
        graph = self.decode_graph(b)
        if graph is None:
            return None
        self._copy_graph_inputs(b, mb)
        self._take_pending(self.g_ids[:, 0], ids, batch, after)
        if self.device.type == "cuda":
            self._staged = torch.cuda.Event()
            self._staged.record()
        graph.replay()
        return self.g_logits[:n]

    def decode_graph(self, b: int):
        """The replayable decode step of bucket b: its CUDA graph (captured at start-up; one missing is
        captured now and counted). None when capture fails (e.g. a host sync somewhere in the model):
        the runner then decodes eagerly."""
        if b not in self.graphs:
            try:
                self.graphs[b] = self._capture(b)
            except Exception as e:
                log.warning("CUDA graph capture failed (%s); decoding eagerly from now on", e)
                self.use_cuda_graphs = False
                return None
            self._count_capture()
        return self.graphs[b]

    def _count_capture(self) -> None:
        self.num_captures += 1
        if self.ready:
            self.captures_after_ready += 1
            log.warning("decode graph captured while serving (start-up should have captured it)")

    def _copy_graph_inputs(self, b: int, mb: int) -> None:
        # Table columns past mb keep stale entries: the kernel reads a row only below its length.
        self.g_ids[:b, 0].copy_(self.h_ids[:b], non_blocking=True)
        self.g_pos[:b, 0].copy_(self.h_pos[:b], non_blocking=True)
        self.g_slots[:b].copy_(self.h_slots[:b], non_blocking=True)
        self.g_block_table[:b, :mb].copy_(self.h_block_table[:b, :mb], non_blocking=True)
        self.g_seq_lens[:b].copy_(self.h_seq_lens[:b], non_blocking=True)

    # ------------------------------------------------------------------ start-up
    @staticmethod
    def prefill_warmup_sizes(max_tokens: int) -> list[int]:
        """Token counts of the start-up prefill steps: 1-4, then n, n+1, n+2, n+4, n+8, n+16 for n = 2^k and
        3*2^(k-1) up to the budget, and the budget itself. Kernels specialise integer arguments on ==1
        and on divisibility by 16 (of tokens, or of tokens x experts per token), and pick tile shapes
        by token count (expert-GEMM tiles by tokens per expert, the expert sort's kernel vs torch path):
        each class of count they can see is among these."""
        sizes = {1, 2, 3, 4, max_tokens, max(1, max_tokens - 1)}
        p = 8
        while p <= max_tokens:
            for base in (p, 3 * p // 2):
                sizes.update(n for n in (base, base + 1, base + 2, base + 4, base + 8, base + 16) if n <= max_tokens)
            p *= 2
        return sorted(sizes)

    def _warmup_chunk(self, max_num_batched_tokens: int) -> int:
        """The longest prefill chunk a step can hold: the token budget, within the context."""
        return min(max_num_batched_tokens, self.max_model_len - 1)

    def warmup_plan(self, max_num_batched_tokens: int) -> list[tuple[str, int]]:
        """What start-up runs: ("prefill", tokens), ("prefix", cached tokens before a full chunk), ("chunks", count)
        and ("decode", batch) eager steps, ("graph", bucket) captures.
        Prefill warm-up only where kernels compile (Triton on the device); graphs where captured."""
        plan = []
        probe = torch.empty(0, device=self.device)
        if kernels.HAS_TRITON and kernels._triton.use_triton(probe) and not kernels._triton.INTERPRET:
            budget = self._warmup_chunk(max_num_batched_tokens)
            sizes = set(self.prefill_warmup_sizes(budget))
            # One-chunk steps that cuDNN's attention takes run padded to its ladder of lengths: each one here
            # (cuDNN plans per length).
            sizes.update(kernels.prefill.cudnn_lengths(budget, self.device, self.dtype))
            plan += [("prefill", n) for n in sorted(sizes)]
            # A step of two chunks: the Triton attention kernel (one-chunk steps of CUDNN_MIN_CHUNK tokens or
            # more take cuDNN's where it runs: kernels/prefill.py).
            plan.append(("chunks", 2))
            # Long prompts: a full chunk after cached prefixes of 1, 2, 4... chunks. Attention libraries pick
            # kernels by shape (cuDNN generates one the first time it meets a shape class): the first 32K
            # prompt after a start-up without these took 1.25 s against 0.64 s warm.
            p = budget
            while p + budget <= self.max_model_len - 1:
                plan.append(("prefix", p))
                p *= 2
            plan += [("decode", b) for b in range(1, self.max_num_seqs + 1)]
        if self.use_cuda_graphs:
            plan += [("graph", b) for b in reversed(self.buckets)]   # largest first: the pool's size
        return plan

    @torch.inference_mode()
    def warm_up(self, max_num_batched_tokens: int, progress: bool = True) -> None:
        """Compile and capture everything before serving (see the module docstring); marks the runner ready.

        Eager decodes run every batch size 1..max_num_seqs once (cheap: one token each against the null
        block), which covers each split count the decode kernel can pick in a mixed step."""
        t0 = time.perf_counter()
        kernels.compilations()   # installs the counter
        plan = self.warmup_plan(max_num_batched_tokens)
        bar = None
        if progress and plan:
            from tqdm import tqdm
            bar = tqdm(total=len(plan), desc="warming up (compile + capture)", unit="step")
        self.warmup_breakdown = {}
        try:
            for kind, n in plan:
                t = time.perf_counter()
                self._warmup_step(kind, n, max_num_batched_tokens)
                if self.device.type == "cuda":   # so each kind's time is its own, not the next one's wait
                    torch.cuda.synchronize(self.device)
                steps, secs = self.warmup_breakdown.get(kind, (0, 0.0))
                self.warmup_breakdown[kind] = (steps + 1, secs + time.perf_counter() - t)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_seconds = time.perf_counter() - t0
        self.compilations_at_ready = kernels.compilations()
        self.ready = True
        if self.warmup_breakdown:
            log.info("warm-up by step kind: %s", self.describe_warmup())

    def describe_warmup(self) -> str:
        """Where start-up went, e.g. "prefill 120 steps 20.1 s, graph 20 steps 4.2 s" (what to shorten)."""
        return ", ".join(f"{kind} {steps} steps {secs:.1f} s" for kind, (steps, secs) in self.warmup_breakdown.items())

    def _warmup_step(self, kind: str, n: int, max_num_batched_tokens: int) -> None:
        """One entry of warmup_plan. Start-up runs the largest steps the engine will: running out of memory in
        one says which step and what to change, not only the allocator's bytes (same exception type)."""
        try:
            if kind == "prefill":
                self._dummy_step(0, n)
            elif kind == "prefix":
                self._dummy_step(0, self._warmup_chunk(max_num_batched_tokens), prefix=n)
            elif kind == "chunks":
                self._dummy_step(0, min(16 * n, max_num_batched_tokens), chunks=n)
            elif kind == "decode":
                self._dummy_step(n, 0)
            elif self.use_cuda_graphs:
                self.decode_graph(n)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(
                f"out of device memory in start-up's {kind} step ({n:,}) with a token budget of "
                f"{max_num_batched_tokens:,} and a cache of {self.num_blocks:,} blocks: lower "
                f"max_num_batched_tokens or gpu_memory_utilization, or set cache_memory_gb ({e})") from e

    def _dummy_step(self, num_decodes: int, prefill_tokens: int, prefix: int = 1, chunks: int = 1) -> None:
        """A step on placeholder tokens that writes and reads only the reserved null block (slot 0); its
        prefill tokens (if any) form `chunks` chunks of about equal size, each after a cached prefix of
        `prefix` placeholder tokens."""
        M = num_decodes + prefill_tokens
        meta = AttentionMetadata(slot_mapping=torch.zeros(M, dtype=torch.int64, device=self.device),
                                 num_decodes=num_decodes)
        if num_decodes:
            meta.block_table = torch.full((num_decodes, self.max_blocks_per_seq), NULL_BLOCK, dtype=torch.int32,
                                          device=self.device)
            meta.seq_lens = torch.ones(num_decodes, dtype=torch.int32, device=self.device)
        if prefill_tokens:
            # Chunks after a cached prefix (one token by default): the prefix and causal parts both run.
            q, r = divmod(prefill_tokens, chunks)
            sizes = [q + (i < r) for i in range(chunks) if q + (i < r)]
            cu_q = list(itertools.accumulate(sizes, initial=0))
            cu_k = list(itertools.accumulate((q + prefix for q in sizes), initial=0))
            meta.prefill = PrefillMetadata(torch.zeros(cu_k[-1], dtype=torch.int64, device=self.device),
                                           torch.tensor(cu_q, dtype=torch.int32, device=self.device),
                                           torch.tensor(cu_k, dtype=torch.int32, device=self.device),
                                           max(sizes), max(sizes) + prefix)
        ids = torch.zeros(1, M, dtype=torch.int64, device=self.device)
        pos = torch.arange(M, device=self.device)[None]
        self.backend.meta = meta
        h, _ = self.model.forward_hidden(ids, positions=pos, backend=self.backend, layers=self.warmup_layers)
        self.backend.meta = None
        self.model.compute_logits(h[0, -1:]).argmax(dim=-1)

    def stats(self) -> dict:
        return dict(warmup_seconds=self.warmup_seconds, graph_captures=self.num_captures,
                    graph_captures_after_ready=self.captures_after_ready,
                    compilations_after_ready=kernels.compilations() - self.compilations_at_ready if self.ready else 0)


def warmup_layers(model) -> list[int]:
    """The first decoder layer of each kind, which start-up's eager steps run. Layers alike in module types and
    in their tensors' shapes and dtypes launch the same kernel variants, so one compiles them for all (V2-Lite:
    the dense first layer and one MoE layer of 26), and a step costs that fraction of a full one. Its peak
    memory is a full step's: activations live one layer at a time."""
    seen, picked = set(), []
    for i, layer in enumerate(model.model.layers):
        kind = tuple((type(m), tuple((t.shape, t.dtype) for t in (*m.parameters(recurse=False),
                                                                  *m.buffers(recurse=False))))
                     for m in layer.modules())
        if kind not in seen:
            seen.add(kind)
            picked.append(i)
    return picked


__all__ = ["LaunchedStep", "ModelRunner", "batch_buckets", "warmup_layers"]
