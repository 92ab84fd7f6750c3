"""Paged latent cache bookkeeping: a free list of blocks, reference counts, and prefix caching by
hashing full blocks (hash of the previous block's hash + this block's token ids). A request's
`cache_salt` seeds the chain, so only requests with the same salt (e.g. the same API key) can share
blocks: another tenant cannot time a cache hit to learn that someone sent a given prefix.

Block 0 is reserved: padded rows of a batch (CUDA-graph buckets) write their latent there, so no
real sequence ever owns it. A freed block keeps its hash until it is handed out again, so a
repeated prefix is found even after the request that computed it has finished.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict

from .sequence import Sequence

NULL_BLOCK = 0


def salt_hash(cache_salt: str | None) -> bytes | None:
    """The `prev` of a sequence's first block: None unsalted, else a digest of the salt."""
    if cache_salt is None:
        return None
    return hashlib.blake2b(b"cache_salt:" + cache_salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def block_hash(prev: bytes | None, token_ids: list[int]) -> bytes:
    """Digest of the previous block's hash and these ids as 4-byte little-endian words. The words come from a
    typed array (a per-token to_bytes took ~15 ms a step of 16K prompt tokens in 16-token blocks on a CPU)."""
    h = hashlib.blake2b(digest_size=16)
    if prev is not None:
        h.update(prev)
    words = array("I", token_ids)   # OverflowError for ids outside [0, 2**32), as to_bytes(signed=False)
    if sys.byteorder == "big":
        words.byteswap()
    h.update(words.tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Free blocks in eviction order (oldest freed first); O(1) removal on a prefix hit.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.num_prefix_hits = 0   # tokens served from the cache, for stats and tests

    # ------------------------------------------------------------------ queries
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # ------------------------------------------------------------------ allocation
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.hash_to_block.get(old) == block:
            del self.hash_to_block[old]   # its content is about to be overwritten
        self.block_hash[block] = None
        self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def match_prefix(self, seq: Sequence) -> int:
        """Point a fresh sequence's leading blocks at cached ones; returns tokens hit.

        Only blocks wholly inside tokens[:-1] are looked up, so at least one token is always
        computed (its logits are needed) and a shared block is never written to.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        prev, hit = salt_hash(seq.params.cache_salt), 0
        for i in range((len(seq) - 1) // bs):
            ids = seq.token_ids[i * bs:(i + 1) * bs]
            h = block_hash(prev, ids)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tuple(ids):
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            prev, hit = h, hit + bs
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = seq.num_cached_tokens = hit
        self.num_prefix_hits += hit
        return hit

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` slots for its first `num_tokens` tokens; False (and no change) if out of blocks."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first: they go to the front of the eviction order, the shared prefix last.
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} freed twice"
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish blocks whose every token now has its latent in the cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        while seq.num_hashed_blocks < n_full:
            i = seq.num_hashed_blocks
            ids = seq.token_ids[i * bs:(i + 1) * bs]
            prev = seq.block_hashes[i - 1] if i else salt_hash(seq.params.cache_salt)
            h = block_hash(prev, ids)
            block = seq.block_table[i]
            seq.block_hashes.append(h)
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                self.block_tokens[block] = tuple(ids)
            seq.num_hashed_blocks += 1


__all__ = ["BlockManager", "NULL_BLOCK", "block_hash", "salt_hash"]
