"""Runs one scheduled step on the device: owns the engine's model and the paged cache, builds the
step's inputs and attention metadata, runs the model (decode-only steps replay a CUDA graph
captured per batch-size / context bucket), and samples on device.
"""

from __future__ import annotations

import logging

import torch

from ..config import ModelConfig
from .attention import AttentionMetadata, PrefillChunk
from .block_manager import NULL_BLOCK
from .config import EngineConfig
from .sampling import SamplingBatch, sample
from .scheduler import ScheduledBatch

log = logging.getLogger("latentmoe.engine")


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
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        if self.use_cuda_graphs:
            self._alloc_graph_buffers()

    @staticmethod
    def supports_graphs(device: torch.device) -> bool:
        return device.type == "cuda"

    # ------------------------------------------------------------------ inputs
    def _to_device(self, values, dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, batch: ScheduledBatch):
        """Host lists -> device tensors (pinned, non-blocking): ids, positions, metadata, sample rows."""
        ids, pos, slots, sample_rows, prefills = [], [], [], [], []
        row = 0
        for k, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(self._slots(seq.block_table, start, start + n))
            if k >= batch.num_decodes:
                prefills.append((row, n, self._slots(seq.block_table, 0, start + n)))
            row += n
            if start + n == len(seq):
                sample_rows.append(row - 1)
        nd = batch.num_decodes
        dec = batch.seqs[:nd]
        mb = max((len(s.block_table) for s in dec), default=0)
        meta = AttentionMetadata(slot_mapping=self._to_device(slots, torch.int64), num_decodes=nd)
        if nd:
            meta.block_table = self._to_device([s.block_table + [NULL_BLOCK] * (mb - len(s.block_table)) for s in dec],
                                               torch.int32)
            meta.seq_lens = self._to_device([s.num_computed_tokens + 1 for s in dec], torch.int32)
        meta.prefills = [PrefillChunk(r, n, self._to_device(c, torch.int64)) for r, n, c in prefills]
        return ids, pos, meta, sample_rows

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch):
        """Run the step; returns (tokens, logprob rows) for the sequences that sample, in batch order."""
        samplers = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == len(s)]
        all_decode = batch.num_decodes == len(batch.seqs)
        logits = None
        if all_decode and self.use_cuda_graphs and len(batch.seqs) <= self.buckets[-1]:
            logits = self._run_graph(batch)
            if logits is not None and len(samplers) < len(batch.seqs):
                # A one-token prompt chunk that does not reach the prompt's end samples nothing.
                keep = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                        if s.num_computed_tokens + n == len(s)]
                logits = logits[self._to_device(keep, torch.int64)]
        if logits is None:
            ids, pos, meta, sample_rows = self.prepare(batch)
            self.backend.meta = meta
            h, _ = self.model.forward_hidden(self._to_device(ids, torch.int64)[None],
                                             positions=self._to_device(pos, torch.int64)[None], backend=self.backend)
            self.backend.meta = None
            logits = self.model.compute_logits(h[0, self._to_device(sample_rows, torch.int64)]) if sample_rows else None
        if not samplers:
            return [], []
        if all(s.params.temperature == 0 and not s.params.uses_penalties and s.params.logprobs is None
               for s in samplers):
            # All greedy, nothing else asked: the arg-max is the whole of sampling (no per-step tensors).
            return logits.argmax(dim=-1).tolist(), [None] * len(samplers)
        # Token histories travel to the device only when some row applies penalties.
        pen = any(s.params.uses_penalties for s in samplers)
        sb = SamplingBatch.build([s.params for s in samplers], [s.generator for s in samplers],
                                 [s.prompt_token_ids if pen else [] for s in samplers],
                                 [s.output_token_ids if pen else [] for s in samplers], self.cfg.vocab_size, self.device)
        tokens, lp_vals, lp_ids = sample(logits, sb)
        # The one host sync of the step: the scheduler needs the tokens.
        tokens = tokens.tolist()
        lps = [None] * len(samplers)
        if lp_vals is not None:
            vals, idx = lp_vals.tolist(), lp_ids.tolist()
            for i, s in enumerate(samplers):
                if s.params.logprobs is not None:
                    k = s.params.logprobs + 1
                    lps[i] = dict(zip(idx[i][:k], vals[i][:k]))
        return tokens, lps

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

    def _context_bucket(self, mb: int) -> int:
        """Block-table width a decode graph is captured for: 16 blocks, then multiples of 8.

        The decode kernel splits each sequence over this width, so a bucket much wider than the longest
        sequence leaves split programs idle (4,106 tokens in a 128-block power-of-two bucket ran the
        latent kernel at ~30% of bandwidth); finer buckets cost a graph capture per 8 blocks of growth."""
        b = 16 if mb <= 16 else -(-mb // 8) * 8
        return min(b, self.max_blocks_per_seq)

    def decode_body(self, b: int, mb: int) -> None:
        """One decode step of bucket (b sequences, mb blocks) on the static buffers: what a graph captures."""
        meta = AttentionMetadata(slot_mapping=self.g_slots[:b], num_decodes=b,
                                 block_table=self.g_block_table[:b, :mb], seq_lens=self.g_seq_lens[:b])
        self.backend.meta = meta
        h, _ = self.model.forward_hidden(self.g_ids[:b], positions=self.g_pos[:b], backend=self.backend)
        self.g_logits[:b] = self.model.compute_logits(h[:, 0])
        self.backend.meta = None

    def _capture(self, b: int, mb: int) -> torch.cuda.CUDAGraph:
        # Padded rows of the bucket decode against the reserved null block (slot 0, length 1).
        self.g_block_table[:b].zero_()
        self.g_seq_lens[:b].fill_(1)
        self.g_slots[:b].zero_()
        self.decode_body(b, mb)   # warm-up: lazy initialisation must not happen while capturing
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            self.decode_body(b, mb)
        if self.graph_pool is None:
            self.graph_pool = graph.pool()
        torch.cuda.synchronize()
        log.debug("captured decode graph batch=%d blocks=%d", b, mb)
        return graph

    def _run_graph(self, batch: ScheduledBatch) -> torch.Tensor:
        n = len(batch.seqs)
        b = next(x for x in self.buckets if x >= n)
        mb_needed = max(len(s.block_table) for s in batch.seqs)
        mb = self._context_bucket(mb_needed)
        bs = self.block_size
        pad = b - n
        pos = [s.num_computed_tokens for s in batch.seqs]
        ids = [s.token_ids[p] for s, p in zip(batch.seqs, pos)]
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
        graph = self.decode_graph(b, mb)
        if graph is None:
            return None
        self._copy_graph_inputs(b, mb)
        graph.replay()
        return self.g_logits[:n]

    def decode_graph(self, b: int, mb: int):
        """The replayable decode step of bucket (b, mb): its CUDA graph, captured on first use. None when
        capture fails (e.g. a host sync somewhere in the model): the runner then decodes eagerly."""
        key = (b, mb)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(b, mb)
            except Exception as e:
                log.warning("CUDA graph capture failed (%s); decoding eagerly from now on", e)
                self.use_cuda_graphs = False
                return None
        return self.graphs[key]

    def _copy_graph_inputs(self, b: int, mb: int) -> None:
        self.g_ids[:b, 0].copy_(self.h_ids[:b], non_blocking=True)
        self.g_pos[:b, 0].copy_(self.h_pos[:b], non_blocking=True)
        self.g_slots[:b].copy_(self.h_slots[:b], non_blocking=True)
        self.g_block_table[:b, :mb].copy_(self.h_block_table[:b, :mb], non_blocking=True)
        self.g_seq_lens[:b].copy_(self.h_seq_lens[:b], non_blocking=True)


__all__ = ["ModelRunner", "batch_buckets"]
