"""SamplingParams (validated) and the on-device sampler: penalties, temperature, top-k/top-p/min-p,
per-request seeded generators and logprobs, for a batch of rows with different settings.

Randomness: a row samples by the exponential race (argmax p / q with q ~ Exp(1)), which is an exact
draw from p and needs no host sync. A seeded request draws its q from its own generator, one draw
of vocabulary size per token, so its samples do not depend on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1          # -1 or 0: off
    min_p: float = 0.0
    max_tokens: int | None = 16   # None: up to max_model_len
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None   # number of alternatives besides the sampled token
    skip_special_tokens: bool = True
    cache_salt: str | None = None   # prefix-cache blocks are shared only between requests with the same salt

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} = {getattr(self, name)!r} is invalid: must be {allowed}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a number >= 0 (0 = greedy)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an integer >= 1, or -1 / 0 to disable")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative integer token ids")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "an integer or None")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                raise bad(name, "in [-2, 2]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0 (1 = off)")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "an integer in [0, 20] or None")
        if self.cache_salt is not None and not (isinstance(self.cache_salt, str) and self.cache_salt):
            raise bad("cache_salt", "a non-empty string or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class SamplingBatch:
    """Per-row sampling settings for one step, gathered on the host, moved with one copy each."""
    temperature: torch.Tensor        # [B] fp32 (0 = greedy)
    top_k: torch.Tensor              # [B] int64, vocab size when off
    top_p: torch.Tensor              # [B] fp32
    min_p: torch.Tensor              # [B] fp32
    generators: list[torch.Generator | None]
    need_top_k: bool = False
    need_top_p: bool = False
    need_min_p: bool = False
    all_greedy: bool = False
    penalties: tuple[torch.Tensor, ...] | None = None  # presence, frequency, repetition [B]; ids
    prompt_ids: torch.Tensor | None = None   # [B, Lp] padded with -1 (repetition penalty)
    output_ids: torch.Tensor | None = None   # [B, Lo] padded with -1
    max_logprobs: int = -1           # -1: none wanted

    @staticmethod
    def build(params: list[SamplingParams], generators: list[torch.Generator | None],
              prompt_ids: list[list[int]], output_ids: list[list[int]], vocab_size: int,
              device: torch.device) -> "SamplingBatch":
        def to_dev(values, dtype):
            t = torch.tensor(values, dtype=dtype)
            if device.type == "cuda":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        temps = [p.temperature for p in params]
        top_k = [vocab_size if p.top_k in (-1, 0) else min(p.top_k, vocab_size) for p in params]
        sb = SamplingBatch(
            temperature=to_dev(temps, torch.float32), top_k=to_dev(top_k, torch.int64),
            top_p=to_dev([float(p.top_p) for p in params], torch.float32),
            min_p=to_dev([float(p.min_p) for p in params], torch.float32), generators=generators,
            need_top_k=any(k < vocab_size for k in top_k) and not all(t == 0 for t in temps),
            need_top_p=any(p.top_p < 1 for p in params), need_min_p=any(p.min_p > 0 for p in params),
            all_greedy=all(t == 0 for t in temps))
        if any(p.uses_penalties for p in params):
            sb.penalties = (to_dev([float(p.presence_penalty) for p in params], torch.float32),
                            to_dev([float(p.frequency_penalty) for p in params], torch.float32),
                            to_dev([float(p.repetition_penalty) for p in params], torch.float32))
            sb.prompt_ids = to_dev(_pad(prompt_ids), torch.int64)
            sb.output_ids = to_dev(_pad(output_ids), torch.int64)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        sb.max_logprobs = max(wanted) if wanted else -1
        return sb


def _pad(rows: list[list[int]]) -> list[list[int]]:
    width = max(1, max(len(r) for r in rows))
    return [r + [-1] * (width - len(r)) for r in rows]


def _token_counts(ids_BL: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Occurrences of each token per row -> [B, V] fp32 (padding -1 lands in an extra column)."""
    B = ids_BL.shape[0]
    counts = torch.zeros(B, vocab_size + 1, dtype=torch.float32, device=ids_BL.device)
    idx = torch.where(ids_BL < 0, vocab_size, ids_BL)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output, divides positive / multiplies negative logits), then
    frequency and presence (output only, subtracted by count / once)."""
    presence, frequency, repetition = sb.penalties
    V = logits.shape[-1]
    out_counts = _token_counts(sb.output_ids, V)
    seen = (out_counts + _token_counts(sb.prompt_ids, V)) > 0
    rep = repetition[:, None].expand_as(logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - frequency[:, None] * out_counts - presence[:, None] * (out_counts > 0).float()


def _argmax_chunk(V: int) -> int | None:
    """The largest divisor of V in [256, 2048], or None (then one pass is as good as any)."""
    return next((c for c in range(min(V // 2, 2048), 255, -1) if V % c == 0), None)


def argmax_rows(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x [B, V] -> the index of each row's maximum (the first, where several are equal), as x.argmax(-1).

    On CUDA, torch's arg-max of a few long rows reduces each row in one thread block: 24 us for V = 102,400 at
    batch 1 on an H200, every decode step. Here each row is cut into chunks of `chunk` columns (by default a
    divisor of V), each chunk's maximum taken in parallel, then the best chunk: the first maximum of the
    first best chunk is the row's first maximum."""
    B, V = x.shape
    chunk = chunk if chunk is not None else (_argmax_chunk(V) if x.is_cuda else None)
    if not chunk or V % chunk:
        return x.argmax(dim=-1)
    vals, idx = x.view(B, V // chunk, chunk).max(dim=-1)
    best = vals.argmax(dim=-1, keepdim=True)
    return (best * chunk + idx.gather(1, best)).squeeze(1)


def sample(logits: torch.Tensor, sb: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """logits [B, V] -> (tokens [B] int64, top logprobs [B, k] | None, their ids [B, k] | None,
    sampled-token logprob included as column 0). All on device; nothing here waits for the GPU."""
    logits = logits.float()
    lp_vals = lp_ids = None
    raw_logprobs = logits.log_softmax(dim=-1) if sb.max_logprobs >= 0 else None
    if sb.penalties is not None:
        logits = apply_penalties(logits, sb)
    greedy_tok = argmax_rows(logits)
    if sb.all_greedy:
        tokens = greedy_tok
    else:
        temp = torch.where(sb.temperature > 0, sb.temperature, torch.ones_like(sb.temperature))
        scaled = logits / temp[:, None]
        if sb.need_top_k or sb.need_top_p:
            scaled = _top_k_top_p(scaled, sb.top_k if sb.need_top_k else None, sb.top_p if sb.need_top_p else None)
        probs = scaled.softmax(dim=-1)
        if sb.need_min_p:
            top = probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < sb.min_p[:, None] * top, 0.0)
        q = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(sb.generators) if g is None]
        if len(unseeded) == len(sb.generators):
            q.exponential_()
        else:
            q.exponential_()  # unseeded rows: the global generator
            for i, g in enumerate(sb.generators):
                if g is not None:  # seeded rows: a fixed draw from their own generator
                    q[i].exponential_(generator=g)
        sampled = argmax_rows(probs / q)
        tokens = torch.where(sb.temperature > 0, sampled, greedy_tok)
    if raw_logprobs is not None:
        chosen = raw_logprobs.gather(1, tokens[:, None])
        if sb.max_logprobs > 0:
            top_vals, top_ids = raw_logprobs.topk(sb.max_logprobs, dim=-1)
            lp_vals = torch.cat([chosen, top_vals], dim=1)
            lp_ids = torch.cat([tokens[:, None], top_ids], dim=1)
        else:
            lp_vals, lp_ids = chosen, tokens[:, None]
    return tokens, lp_vals, lp_ids


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (smallest set with mass >= top_p)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        rank = torch.arange(V, device=logits.device)[None]
        mask |= rank >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs   # mass strictly before each token
        mask |= before >= top_p[:, None]        # the top token always stays (before = 0)
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


__all__ = ["SamplingParams", "SamplingBatch", "sample", "apply_penalties"]
