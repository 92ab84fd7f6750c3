"""Runs one scheduled step on the device: allocates the paged latent cache from a memory budget,
builds the step's inputs and attention metadata, runs the model (decode-only steps replay a CUDA
graph captured per batch-size / context bucket), and samples on device.
"""

from __future__ import annotations

import logging

import torch

from ..config import ModelConfig
from .attention import AttentionMetadata, PagedLatentAttention, PrefillChunk
from .block_manager import NULL_BLOCK
from .sampling import SamplingBatch, sample
from .scheduler import ScheduledBatch

log = logging.getLogger("latentmoe.engine")

GiB = 1024 ** 3


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.kv_cache_elements_per_token() * torch.empty(0, dtype=dtype).element_size()


def mha_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """What a per-head K/V cache of the same model would take (K: nope+rope, V: v per head)."""
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return per_layer * cfg.num_hidden_layers * torch.empty(0, dtype=dtype).element_size()


def set_fused_experts(model, enable: bool) -> int:
    """Run the routed experts of every MoE layer through `latentmoe.kernels.fused_moe` (or back).

    An override applied from outside the model: it serves only forward passes without autograd on
    CUDA (the engine's); anything else still reaches the model's own grouped-GEMM path. Returns the
    number of layers switched (0 when the kernels are unavailable).
    """
    try:
        from ..kernels import fused_moe
        from .fused_ops import FEW_TOKENS, fused_moe_few_tokens
    except Exception:
        return 0
    from ..model import Experts
    n = 0
    for layer in model.model.layers:
        if not layer.is_moe or not isinstance(layer.mlp.experts, Experts):   # e.g. experts sharded over devices
            continue
        ex = layer.mlp.experts
        if "forward" in ex.__dict__:
            del ex.forward                       # back to the class's forward
        if enable:
            def forward(x_MD, topk_idx_MK, topk_weight_MK, _ex=ex, _own=ex.forward):
                if torch.is_grad_enabled() or not x_MD.is_cuda:
                    return _own(x_MD, topk_idx_MK, topk_weight_MK)
                if 0 < x_MD.shape[0] <= FEW_TOKENS:   # batch-1/2 decode: skip the expert sort (2 kernels, not ~14)
                    return fused_moe_few_tokens(x_MD, _ex.gate_up_proj, _ex.down_proj, topk_idx_MK, topk_weight_MK)
                return fused_moe(x_MD, _ex.gate_up_proj, _ex.down_proj, topk_idx_MK, topk_weight_MK)
            ex.forward = forward
        n += 1
    return n


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class ModelRunner:
    def __init__(self, model, block_size: int, num_blocks: int, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool, kv_cache: str = "latent"):
        self.model = model
        self.cfg: ModelConfig = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        if kv_cache == "mha":   # the per-head K/V baseline (MLA vs MHA at equal memory)
            from .mha_attention import PagedMHAAttention
            self.backend = PagedMHAAttention.allocate(self.cfg, num_blocks, block_size, self.dtype, self.device)
            self.kv_caches = self.backend.kv_caches
        else:
            width = self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim
            # The whole cache: per layer [num_blocks, block_size, C + R] — no per-head K or V anywhere.
            self.kv_caches = [torch.zeros(num_blocks, block_size, width, dtype=self.dtype, device=self.device)
                              for _ in range(self.cfg.num_hidden_layers)]
            self.backend = PagedLatentAttention(self.kv_caches)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        # Emulation runs the graph body eagerly on the same static, bucket-padded buffers: the
        # graph path's inputs and padding exercised where CUDA is absent (tests).
        self.emulate_graphs = False
        self.buckets = batch_buckets(max_num_seqs)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        if self.use_cuda_graphs:
            self._alloc_graph_buffers()

    def enable_graph_emulation(self) -> None:
        self.emulate_graphs = True
        self._alloc_graph_buffers()

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
        if all_decode and (self.use_cuda_graphs or self.emulate_graphs) and len(batch.seqs) <= self.buckets[-1]:
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

    def _forward_graph_body(self, b: int, mb: int) -> None:
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
        self._forward_graph_body(b, mb)   # warm-up: lazy initialisation must not happen while capturing
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            self._forward_graph_body(b, mb)
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
        key = (b, mb)
        if self.emulate_graphs:
            self._copy_graph_inputs(b, mb)
            self._forward_graph_body(b, mb)
            return self.g_logits[:n]
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(b, mb)
            except Exception as e:   # e.g. a host sync somewhere in the model: run eagerly instead
                log.warning("CUDA graph capture failed (%s); decoding eagerly from now on", e)
                self.use_cuda_graphs = False
                return None
        self._copy_graph_inputs(b, mb)
        self.graphs[key].replay()
        return self.g_logits[:n]

    def _copy_graph_inputs(self, b: int, mb: int) -> None:
        self.g_ids[:b, 0].copy_(self.h_ids[:b], non_blocking=True)
        self.g_pos[:b, 0].copy_(self.h_pos[:b], non_blocking=True)
        self.g_slots[:b].copy_(self.h_slots[:b], non_blocking=True)
        self.g_block_table[:b, :mb].copy_(self.h_block_table[:b, :mb], non_blocking=True)
        self.g_seq_lens[:b].copy_(self.h_seq_lens[:b], non_blocking=True)


def plan_cache(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, block_size: int,
               cache_memory_gb: float | None, num_blocks: int | None, max_num_seqs: int,
               max_model_len: int | None, reserve_gb: float = 4.0, kv_cache: str = "latent") -> tuple[int, int]:
    """(num_blocks incl. the reserved one, max_model_len) from a memory budget, and the start-up log.

    Budget: `cache_memory_gb` if given; on CUDA otherwise 90% of the free memory after the
    weights minus `reserve_gb` for activations and graphs; on CPU enough for `max_num_seqs`
    sequences of max_model_len (at most 1 GiB).
    """
    per_token = mha_bytes_per_token(cfg, dtype) if kv_cache == "mha" else cache_bytes_per_token(cfg, dtype)
    per_block = per_token * block_size
    want_len = max_model_len or cfg.max_position_embeddings
    if num_blocks is None:
        if cache_memory_gb is not None:
            budget = cache_memory_gb * GiB
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = 0.9 * free - reserve_gb * GiB
        else:
            budget = min(GiB, max_num_seqs * want_len * per_token)
        num_blocks = int(budget // per_block) + 1
    if num_blocks < 2:
        raise ValueError(f"cache budget too small: {per_block} bytes per block, got {num_blocks - 1} blocks")
    capacity = (num_blocks - 1) * block_size
    if max_model_len is None:
        max_model_len = min(cfg.max_position_embeddings, capacity)
    elif max_model_len > capacity:
        raise ValueError(f"max_model_len {max_model_len} does not fit in the cache ({capacity} tokens); "
                         f"raise cache_memory_gb or lower max_model_len")
    mha = mha_bytes_per_token(cfg, dtype)
    seqs = capacity // max_model_len
    log.info(f"{kv_cache} cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%d bytes/token); "
             "max concurrent sequences at max_model_len %d: %d (a per-head MHA cache of the same bytes: %d, "
             "%d bytes/token, %.1fx more)",
             num_blocks - 1, block_size, capacity, num_blocks * per_block / GiB, per_token, max_model_len, seqs,
             (capacity * per_token // mha) // max_model_len, mha, mha / per_token)
    return num_blocks, max_model_len


__all__ = ["plan_cache", "set_fused_experts", "ModelRunner", "cache_bytes_per_token", "mha_bytes_per_token", "batch_buckets"]
