"""The OpenAI shapes of what a generation produces: envelopes, stream deltas, logprobs."""

from __future__ import annotations

import time
import uuid


class Envelope:
    """(choices, usage) -> a response, or a stream chunk, with the id, time and model shared by all of them."""

    def __init__(self, prefix: str, kind: str, model: str, req):
        self.fields = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                       "model": model}
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

    def __call__(self, choices: list, usage: dict | None = None) -> dict:
        out = {**self.fields, "choices": choices}
        if self.include_usage or usage is not None:   # with include_usage every chunk has the key, null until the end
            out["usage"] = usage
        return out


class Detokenizer:
    """Token id -> text for logprobs (each token decoded on its own, as the OpenAI API reports them)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _top(lp: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(lp.items(), key=lambda kv: -kv[1])[:k]


def _top_by_text(lp: dict[int, float], k: int, detok: Detokenizer) -> dict[str, float]:
    """The top `k` as {token text: logprob}; tokens that decode alike (e.g. partial UTF-8) keep the likeliest."""
    out: dict[str, float] = {}
    for t, v in _top(lp, k):
        out.setdefault(detok(t), v)
    return out


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], k: int, detok: Detokenizer,
                        offset: int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(token_ids, logprobs):
        s = detok(tid)
        tokens.append(s)
        token_lps.append(lp[tid])
        tops.append(_top_by_text(lp, k, detok) if k > 0 else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(token_ids: list[int], chosen: list[float], tops: list[dict[int, float]] | None, k: int,
                    detok: Detokenizer) -> dict:
    """The legacy shape for an echoed prompt: the first token has no logprob (nothing precedes it), as in OpenAI's
    and vLLM's answers; `tops` from evaluation.scoring.token_logprobs."""
    tokens = [detok(t) for t in token_ids]
    offsets, offset = [], 0
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    top = [None] + ([_top_by_text(row, len(row), detok) for row in tops] if k > 0 and tops is not None
                    else [None] * len(chosen))
    return {"tokens": tokens, "token_logprobs": [None] + list(chosen), "top_logprobs": top, "text_offset": offsets}


def join_logprobs(first: dict, then: dict) -> dict:
    """Two legacy logprobs blocks one after the other (`then`'s text offsets shifted past `first`'s text)."""
    shift = sum(len(t) for t in first["tokens"])
    return {"tokens": first["tokens"] + then["tokens"],
            "token_logprobs": first["token_logprobs"] + then["token_logprobs"],
            "top_logprobs": first["top_logprobs"] + then["top_logprobs"],
            "text_offset": first["text_offset"] + [o + shift for o in then["text_offset"]]}


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], k: int, detok: Detokenizer) -> dict:
    def entry(tid, v):
        s = detok(tid)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(tid, lp[tid]), "top_logprobs": [entry(t, v) for t, v in _top(lp, k)]}
                        for tid, lp in zip(token_ids, logprobs)]}


def delta_chunks(choice, make_chunk, first: dict | None = None, every_token: bool = False):
    """A function (prompt index, cumulative output) -> chunks with what is new since the last call."""
    sent: dict[tuple[int, int], tuple[int, int, bool]] = {}   # (prompt, choice) -> (tokens, chars, finished)

    def chunks(i, out):
        if out is None:
            return [first] if first is not None else []
        pieces = []
        for c in out.outputs:
            toks, chars, done = sent.get((i, c.index), (0, 0, False))
            if done or c.finish_reason is None and (len(c.token_ids) == toks or
                                                    not every_token and len(c.text) == chars):
                continue   # nothing new to show (text held back mid-character or before a possible stop string)
            pieces.append(choice(i, c, toks, chars))
            sent[(i, c.index)] = (len(c.token_ids), len(c.text), c.finish_reason is not None)
        return [make_chunk(pieces)] if pieces else []

    return chunks
