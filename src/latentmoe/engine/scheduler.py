"""Continuous batching: every step picks, under a token budget, one token for each decoding
sequence and chunks of prompts still being prefilled, admits waiting requests while blocks and
the budget last, and preempts (by recompute) the newest running sequence when blocks run out.

Arrivals can be batched (off by default): while sequences decode and no prompt is being prefilled, a newly
arrived request may wait up to `prefill_hold_steps` steps (or until the waiting prompts fill the step's
budget). A step of decodes alone replays a CUDA graph; a step with any prefill chunk runs eagerly, so a server
whose requests arrive one at a time would otherwise run nearly every step eagerly for a small chunk. Holding
trades a few decode steps of time to first token for prefills that run together.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]           # decodes first, then prefill chunks
    num_new_tokens: list[int]      # tokens computed this step, per sequence
    num_decodes: int               # leading sequences that take the absorbed (decode) path
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


def _is_decode(seq: Sequence, n: int) -> bool:
    """One new token after a computed context: the absorbed (decode) path."""
    return n == 1 and seq.num_computed_tokens > 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_hold_steps: int = 0):
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if prefill_hold_steps < 0:
            raise ValueError(f"prefill_hold_steps must be >= 0, got {prefill_hold_steps}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_hold_steps = prefill_hold_steps
        self.held_steps = 0            # consecutive steps the waiting requests have been held so far
        self.num_held_steps = 0        # steps that held arrivals, in all
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit_prefilled(self, seq: Sequence) -> None:
        """Run `seq` from the next step with all but its last token taken as cached (placeholder
        contents: LLM.add_request_without_prefill). ValueError when max_num_seqs or the blocks run out."""
        if len(self.running) >= self.max_num_seqs:
            raise ValueError(f"max_num_seqs ({self.max_num_seqs}) sequences are already running")
        if not self.bm.allocate(seq, len(seq)):
            raise ValueError(f"the cache has no room for another {len(seq)} tokens")
        seq.num_computed_tokens = len(seq) - 1
        seq.num_hashed_blocks = sys.maxsize   # past any block count: never published as a prefix
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        # Recompute: drop its cache; on readmission prompt + generated tokens are prefilled
        # again (prefix caching usually finds most of them still in the cache).
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and len(seq) - seq.num_prompt_tokens >= seq.max_tokens:
                i += 1   # its pending token (a launched step's) is its last: it ends when that is read
                continue
            n = min(len(seq) - seq.num_computed_tokens, budget)
            while not self.bm.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # it preempted itself: nothing after it remains either
            chosen.append((seq, n))
            budget -= n
            i += 1
        decodes_only = bool(chosen) and all(_is_decode(s, n) for s, n in chosen)
        if not preempted and self._admit_now(decodes_only, budget):
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if self._sibling_prefilling(seq):
                    break   # n > 1: wait for the first sample's prompt blocks, then hit them in the cache
                self.bm.match_prefix(seq)
                n = min(len(seq) - seq.num_computed_tokens, budget)
                if not self.bm.allocate(seq, seq.num_computed_tokens + n):
                    self.bm.free_seq(seq)   # undo the prefix hits; try again next step
                    self.bm.num_prefix_hits -= seq.num_cached_tokens
                    seq.num_cached_tokens = 0
                    break
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                chosen.append((seq, n))
                budget -= n
        decodes = [(s, n) for s, n in chosen if _is_decode(s, n)]
        prefills = [(s, n) for s, n in chosen if not _is_decode(s, n)]
        ordered = decodes + prefills
        return ScheduledBatch([s for s, _ in ordered], [n for _, n in ordered], len(decodes), preempted)

    def _admit_now(self, decodes_only: bool, budget: int) -> bool:
        """Whether waiting requests join this step, or are held so that arrivals prefill together: held only
        while the step is decodes alone (nothing running, or a prefill chunk in the step anyway: they join),
        until their prompts fill the rest of the budget or for `prefill_hold_steps` steps."""
        if not self.waiting:
            return False
        if decodes_only and self.held_steps < self.prefill_hold_steps:
            waiting_tokens = 0
            for seq in self.waiting:
                waiting_tokens += len(seq) - seq.num_computed_tokens
                if waiting_tokens >= budget:
                    break
            else:
                self.held_steps += 1
                self.num_held_steps += 1
                return False
        self.held_steps = 0
        return True

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        if not self.bm.enable_prefix_caching or seq.index == 0 or seq.num_preemptions:
            return False
        return any(s.request_id == seq.request_id and s.num_computed_tokens < s.num_prompt_tokens
                   for s in self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (stop, length or abort): blocks go back at once."""
        seq.finish_reason = reason
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED


__all__ = ["Scheduler", "ScheduledBatch"]
