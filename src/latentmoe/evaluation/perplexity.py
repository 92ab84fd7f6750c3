"""Perplexity and bits per byte of a model on documents, for `latentmoe eval perplexity` and the experiments.

Each document is scored as `[BOS] + tokens` (how training packs documents), so with a BOS every text token is
predicted exactly once and bits per byte = total NLL / ln 2 / UTF-8 bytes of the text, comparable across
tokenizers. A document longer than `max_len` is scored in windows of `max_len` tokens that each score the next
`stride` tokens, so every token is predicted once with at least `max_len - stride` tokens of context (default
stride max_len - 1: windows overlap by one token, the cheapest; smaller strides give more context and a lower,
fairer number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .scoring import sequence_logprobs


@dataclass
class PerplexityResult:
    nll: float          # summed negative log-likelihood, nats
    tokens: int         # tokens predicted
    bytes: int          # UTF-8 bytes of the text those tokens spell (0 when scoring token ids only)
    documents: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "nll_per_token": self.nll / self.tokens if self.tokens else None, "tokens": self.tokens,
                "bytes": self.bytes, "documents": self.documents}


def windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a document of n tokens: the first window scores
    positions 1..max_len-1, each next one the `stride` positions after, with the max_len - stride tokens before them
    as context. Every position 1..n-1 is scored exactly once."""
    out = [(0, min(max_len, n), 1)] if n > 1 else []
    while out and out[-1][1] < n:
        scored = out[-1][1]
        end = min(scored + stride, n)
        out.append((max(0, end - max_len), end, scored))
    return out


@torch.no_grad()
def score_documents(model, documents: list[list[int]], max_len: int, stride: int | None = None, batch_size: int = 8,
                    num_bytes: int = 0, progress: bool = False) -> PerplexityResult:
    """Summed NLL of every token after the first of each document (token ids, BOS included by the caller)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    stride = stride or max_len - 1
    if not 1 <= stride < max_len:
        raise ValueError(f"stride must be in [1, max_len - 1 = {max_len - 1}], got {stride}")
    device = next(model.parameters()).device
    jobs = [(doc, w) for doc in documents for w in windows(len(doc), max_len, stride)]
    # Equal lengths batch together (all but each document's last window are max_len long).
    jobs.sort(key=lambda j: j[1][1] - j[1][0], reverse=True)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="scoring", unit="window")
    nll, tokens = 0.0, 0
    i = 0
    while i < len(jobs):
        length = jobs[i][1][1] - jobs[i][1][0]
        group = [j for j in jobs[i:i + batch_size] if j[1][1] - j[1][0] == length]
        ids_BT = torch.tensor([doc[b:e] for doc, (b, e, _) in group], dtype=torch.long, device=device)
        chosen_BT = sequence_logprobs(model, ids_BT)
        for row, (_, (b, e, first)) in zip(chosen_BT, group):
            scored = row[first - b - 1:]       # row[k] is the logprob of window token k+1
            nll -= scored.double().sum().item()
            tokens += scored.numel()
        i += len(group)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return PerplexityResult(nll, tokens, num_bytes, len(documents))


def text_perplexity(model, tokenizer, texts: list[str], max_len: int, stride: int | None = None, batch_size: int = 8,
                    progress: bool = False) -> PerplexityResult:
    """Perplexity and bits per byte of `texts` (one document each), tokenized by `tokenizer`."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    texts = [t for t in texts if t]
    docs = [bos + ids for ids in tokenizer.encode_batch(texts, add_special_tokens=False)]
    # Without a BOS the first token of each document is not predicted: its bytes are not counted either.
    num_bytes = sum(len(t.encode("utf-8")) for t in texts) if bos else \
        sum(len(t.encode("utf-8")) - len(tokenizer.decode(d[:1], skip_special_tokens=False).encode("utf-8"))
            for t, d in zip(texts, docs))
    return score_documents(model, docs, max_len, stride, batch_size, num_bytes, progress)


__all__ = ["PerplexityResult", "score_documents", "text_perplexity", "windows"]
