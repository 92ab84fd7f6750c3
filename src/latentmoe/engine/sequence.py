"""One generated sequence: its tokens, how many have their latent in the cache, its block table,
and the request-level outputs the engine returns (RequestOutput / CompletionOutput)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch

from .sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()

# The host's stand-in for a token a launched step has not returned yet (LLM.step, looking ahead): never an id.
PENDING_TOKEN = -1


class Sequence:
    """Token ids = prompt + generated. `num_computed_tokens` of them have their latent in the
    cache (prefix-cache hits included); the rest still need a forward pass. The last `num_pending`
    ids are PENDING_TOKEN: sampled by a launched step, not read yet; they count in len() (what the
    scheduler plans with), not in the outputs."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 generator: torch.Generator | None, max_tokens: int, arrival: float):
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index                      # which of the request's n samples
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0              # prefix-cache hits at the last admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0              # leading blocks registered in the prefix cache
        self.block_hashes: list[bytes] = []
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.text = ""                          # detokenized output (cut at a stop string)
        self.detok = None                       # incremental decoder, set by the engine
        self.num_preemptions = 0
        self.num_pending = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens - self.num_pending

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def append_pending(self) -> int:
        """A placeholder for the token a launched step samples for this sequence; returns its index."""
        self.token_ids.append(PENDING_TOKEN)
        self.num_pending += 1
        return len(self.token_ids) - 1

    def fill(self, index: int, token_id: int) -> None:
        """The placeholder at `index` (the oldest pending) becomes the sampled token."""
        self.token_ids[index] = token_id
        self.num_pending -= 1

    def drop_pending(self, index: int) -> None:
        """A finished sequence's placeholders from `index` on are discarded (their tokens are not its)."""
        del self.token_ids[index:]
        self.num_pending = 0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None          # 'stop' | 'length' | 'abort' | None while running
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


class Request:
    """A user request: one prompt, n sequences sampled from it."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 seqs: list[Sequence]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.seqs = seqs

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @staticmethod
    def _visible_text(s: Sequence) -> str:
        # While running, hold back what could still become the start of a stop string, so a
        # streamed prefix never has to be taken back.
        if s.is_finished or not s.params.stop:
            return s.text
        hold = max(len(x) for x in s.params.stop) - 1
        return s.text[: max(0, len(s.text) - hold)]

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(s.index, self._visible_text(s), s.output_token_ids, s.finish_reason,
                                 list(s.logprobs) if s.logprobs is not None else None) for s in self.seqs]
        # prompt_token_ids is shared, not copied: outputs are built every step for every request.
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs,
                             all(o.finish_reason is not None for o in outs))


__all__ = ["Sequence", "SequenceStatus", "Request", "RequestOutput", "CompletionOutput", "PENDING_TOKEN"]
