"""Block tables per sequence: allocation, prefix-cache lookup, fork and copy-on-write.

    find_prefix(seq)            -> PrefixMatch      (longest cached run of full blocks)
    allocate_slots(seq, n, pm)  -> SlotAllocation   (or None when the pool is short; nothing changed then)
    fork(parent, child)                            (child shares every block; ref counts + 1)
    free(seq)                                      (tail first, see block_pool's eviction order)

Slot of the token at position p (block_size 4, table [7, 2, 9]):

    position:  0 1 2 3 | 4 5 6 7 | 8 9
    block:        7    |    2    |  9
    slot(p) = table[p // 4] * 4 + p % 4      slot(5) = 2 * 4 + 1 = 9

Copy-on-write: a sequence only ever writes at positions >= num_computed_tokens.
If the block holding that position is shared (ref_cnt > 1, e.g. after a fork),
a fresh block replaces it in this sequence's table and (src, dst) is returned
so that the worker copies the contents before the forward pass.

Prefix caching: a full block is keyed by a hash chained over its parent's
hash, its token ids and the request's cache salt (and, for a block that holds
image positions, those images' content hashes), so equal keys mean equal
prefixes. Blocks are indexed when they are scheduled to become full: the
forward pass writes every layer's new K/V before that layer's attention reads
the cache, so even a sequence in the same batch may reuse them.

Sliding window (every layer's window <= W): the query at position p sees keys
p - W + 1 .. p, so once num_computed_tokens = c, no future query reads a key
before c - W + 1, and every block wholly before that position is handed back (NULL_BLOCK takes its
place in the table; backends never read it). A sequence then holds at most
ceil((W - 1 + chunk) / block_size) + 1 blocks, however long it grows.

    W = 6, block_size 4, c = 13 (next query at 13 sees keys 8..13):
    table  [ NULL | NULL | b9 | b4 ]     positions 0-7 released, 8-11 in b9, 12-15 in b4

A prefix-cache hit of k blocks then needs only the blocks the next query sees
(those from position k * block_size - W + 1 on) to be cached, not the whole prefix.

Pure Python: no torch import.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

from pagellm.core.block_pool import BlockHash, BlockPool, KVBlock
from pagellm.core.request import Sequence

_ROOT_HASH = b"pagellm-prefix-root"

# Stands in a block table for a block the sliding window handed back; never read, never freed.
NULL_BLOCK = KVBlock(-1)


def hash_block_tokens(parent: BlockHash | None, token_ids: list[int], extra: str | None = None) -> BlockHash:
    """Hash of a full block, chained over every block before it."""
    h = hashlib.sha256(parent or _ROOT_HASH)
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(extra.encode())
    return h.digest()


def max_blocks_per_seq(num_tokens: int, max_chunk: int, block_size: int, sliding_window: int | None) -> int:
    """The most blocks one sequence of up to num_tokens tokens holds at once, computing at most
    max_chunk tokens per step (bounded by the window when blocks behind it are released)."""
    full = -(-num_tokens // block_size)
    if sliding_window is None:
        return full
    return min(full, (sliding_window - 1 + max_chunk) // block_size + 2)


@dataclass
class PrefixMatch:
    """Cached full blocks that cover the first `num_tokens` tokens of a sequence."""

    blocks: list[KVBlock] = field(default_factory=list)
    counted: bool = True  # a real lookup: counts in the hit-rate stats once the sequence is admitted

    def num_tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size


@dataclass(slots=True)
class SlotAllocation:
    """What changed in one sequence's block table; the worker applies it as is.

    `block_ids` replace the table from index `start` on (an append when `start`
    is the old length; a copy-on-write replaces the block at `start`).
    """

    start: int  # first table index that changed
    block_ids: list[int]  # new ids for table[start:start + len(block_ids)]
    copies: list[tuple[int, int]]  # (src, dst) block copies to run before the forward pass


class KVCacheManager:
    """Owns every sequence's block table."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 sliding_window: int | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window  # every layer's window is at most this (None: full attention)
        self.tables: dict[int, list[KVBlock]] = {}  # seq_id -> blocks, in position order (NULL_BLOCK: released)
        self._first_live: dict[int, int] = {}  # seq_id -> index of its first block not released
        self._hashes: dict[int, list[BlockHash]] = {}  # seq_id -> chained hashes of its full blocks
        self.num_cached_blocks: dict[int, int] = {}  # seq_id -> leading blocks already indexed
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    def has_table(self, seq_id: int) -> bool:
        return seq_id in self.tables

    def block_ids(self, seq_id: int) -> list[int]:
        return [b.block_id for b in self.tables.get(seq_id, ())]

    def block_map(self) -> bytes:
        """One byte per block, for dashboards: 0 free, 1 used by one sequence, 2 shared (forks, beams, prefix
        hits held twice), 3 free but holding a cached prefix (reused on a hit, evicted last-freed-last)."""
        return bytes(0 if b.ref_cnt == 0 and b.block_hash is None else 3 if b.ref_cnt == 0
                     else 1 if b.ref_cnt == 1 else 2 for b in self.pool.blocks)

    def num_live_blocks(self, seq_id: int) -> int:
        """Blocks the sequence holds (released ones not counted)."""
        return sum(1 for b in self.tables.get(seq_id, ()) if b is not NULL_BLOCK)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_blocks_per_seq(self, num_tokens: int, max_chunk: int) -> int:
        return max_blocks_per_seq(num_tokens, max_chunk, self.block_size, self.sliding_window)

    # ---- prefix cache -------------------------------------------------------------

    def block_hashes(self, seq: Sequence, num_full_blocks: int, ahead: list[int] = ()) -> list[BlockHash]:
        """Chained hashes of (at least) the first `num_full_blocks` blocks of seq, computed once. `ahead`: tokens
        that follow seq.token_ids and will be appended to them (drafts that a speculative step kept)."""
        hashes = self._hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        req = seq.request
        tokens, n = seq.token_ids, len(seq.token_ids)
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            extra = req.cache_salt if i == 0 else None
            if req.mm_features and i * bs < req.mm_end:  # the images whose positions the block holds
                ids = [f.identifier for f in req.mm_features if f.overlaps(i * bs, (i + 1) * bs)]
                extra = "\x00".join([extra or "", *ids]) if ids else extra
            lo, hi = i * bs, (i + 1) * bs
            block = tokens[lo:hi] if hi <= n else list(tokens[lo:hi]) + list(ahead[max(0, lo - n):hi - n])
            hashes.append(hash_block_tokens(parent, block, extra))
        return hashes

    def find_prefix(self, seq: Sequence) -> PrefixMatch:
        """Longest run of cached blocks for a sequence with nothing computed.

        At most num_tokens - 1 tokens come from the cache: the last token is
        always computed so that the step produces logits for it. Requests that need
        every prompt position (prompt logprobs, pooling other than LAST) compute all.
        """
        req = seq.request
        if (not self.enable_caching or req.sampling_params.prompt_logprobs is not None
                or (req.pooling_params is not None and req.pooling_params.needs_all_hidden)):
            return PrefixMatch(counted=False)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self.block_hashes(seq, max_blocks)
        blocks = self._windowed_prefix(hashes) if self.sliding_window is not None else self._full_prefix(hashes)
        return PrefixMatch(blocks)

    def cut_prefix(self, seq: Sequence, prefix: PrefixMatch, num_blocks: int) -> PrefixMatch:
        """The first num_blocks blocks of a hit (a model with recurrent layers resumes at a state checkpoint).
        Under a sliding window the cut hit must still hold the blocks its next query sees: else no hit."""
        if num_blocks == len(prefix.blocks):
            return prefix
        if self.sliding_window is None:
            return PrefixMatch(prefix.blocks[:num_blocks], prefix.counted)
        blocks = self._windowed_prefix(self.block_hashes(seq, num_blocks)[:num_blocks])
        return PrefixMatch(blocks if len(blocks) == num_blocks else [], prefix.counted)

    def _full_prefix(self, hashes: list[BlockHash]) -> list[KVBlock]:
        blocks = []
        for h in hashes:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _windowed_prefix(self, hashes: list[BlockHash]) -> list[KVBlock]:
        """The longest hit whose last blocks, those the next query sees, are cached; blocks before them
        may have been evicted (NULL_BLOCK in the match). The chained hash of block k - 1 vouches for
        every token before it."""
        hits = [self.pool.get_cached_block(h) for h in hashes]
        best, run = 0, 0  # run: cached blocks ending at index k - 1
        for k in range(1, len(hits) + 1):
            run = run + 1 if hits[k - 1] is not None else 0
            if run >= k - self._first_needed_block(k * self.block_size):
                best = k
        first = self._first_needed_block(best * self.block_size)
        return [NULL_BLOCK] * first + hits[first:best]

    def _first_needed_block(self, num_computed: int) -> int:
        """Index of the first block a query at position num_computed (or later) still reads."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed - self.sliding_window + 1) // self.block_size

    def _cache_full_blocks(self, seq: Sequence, table: list[KVBlock], num_tokens: int, ahead: list[int] = ()) -> None:
        if not self.enable_caching:
            return
        num_full = min(num_tokens, seq.num_tokens + len(ahead)) // self.block_size
        start = self.num_cached_blocks.get(seq.seq_id, 0)
        if num_full <= start:
            return
        hashes = self.block_hashes(seq, num_full, ahead)
        for i in range(start, num_full):
            if table[i] is not NULL_BLOCK:
                self.pool.cache_full_block(table[i], hashes[i])
        self.num_cached_blocks[seq.seq_id] = num_full

    def cache_kept_drafts(self, seq: Sequence, kept: list[int]) -> None:
        """A speculative step's verdict: the blocks filled by its last known token and the drafts it kept (`kept`,
        not appended to the sequence yet) hold tokens of the sequence now; they enter the prefix cache, even if the
        sequence ends here."""
        table = self.tables.get(seq.seq_id)
        if table is not None:
            self._cache_full_blocks(seq, table, seq.num_computed_tokens, kept)

    def uncache_unwritten(self, seq: Sequence) -> None:
        """Forget hashes of blocks whose contents were never written (the step that fills them failed)."""
        table = self.tables.get(seq.seq_id, [])
        first = seq.num_computed_tokens // self.block_size
        for block in table[first:]:
            if block.block_hash is not None and self.pool.cached.get(block.block_hash) is block:
                del self.pool.cached[block.block_hash]
            block.block_hash = None
        self.num_cached_blocks[seq.seq_id] = min(self.num_cached_blocks.get(seq.seq_id, 0), first)

    # ---- allocation ---------------------------------------------------------------

    def fits_in_place(self, seq: Sequence, num_new_tokens: int) -> bool:
        """The common decode step, checked for every sequence every step: the new tokens fit the blocks seq
        holds, none of them shared (no copy-on-write), no sliding window. Then the table stays as it is (blocks
        that fill up are entered in the prefix cache) and True; else nothing changes."""
        table = self.tables.get(seq.seq_id)
        if not table or self.sliding_window is not None:
            return False
        bs = self.block_size
        total = seq.num_computed_tokens + num_new_tokens
        n = len(table)
        if total > n * bs:
            return False
        i = seq.num_computed_tokens // bs
        while i < n and table[i].ref_cnt == 1:
            i += 1
        if i < n:
            return False
        if self.enable_caching and min(total, len(seq.token_ids)) // bs > self.num_cached_blocks.get(seq.seq_id, 0):
            self._cache_full_blocks(seq, table, total)
        return True

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       prefix: PrefixMatch | None = None) -> SlotAllocation | None:
        """Grow seq's table to hold num_computed_tokens + num_new_tokens tokens.

        `prefix` (only for a sequence with no table yet) is adopted as the head
        of the table. Returns None when the pool is short, having changed nothing
        but the release of blocks that fell out of the sliding window (dead either way).
        """
        bs = self.block_size
        table = self.tables.get(seq.seq_id, [])
        if prefix is None and self.fits_in_place(seq, num_new_tokens):
            return SlotAllocation(len(table), [], [])
        if table:
            self._release_outside_window(seq.seq_id, table, seq.num_computed_tokens)
        prefix_blocks = prefix.blocks if prefix is not None else []
        assert not (prefix_blocks and table), "a prefix is only adopted by an empty table"
        num_computed = seq.num_computed_tokens + len(prefix_blocks) * bs
        total = num_computed + num_new_tokens
        have = len(table) + len(prefix_blocks)
        num_new_blocks = max(0, self.num_blocks_for(total) - have)
        first_write = num_computed // bs
        cow = [i for i in range(first_write, len(table)) if table[i].ref_cnt > 1]
        # Cached blocks sitting in the free queue stop being free once adopted.
        revived = sum(1 for b in prefix_blocks if b.ref_cnt == 0 and b is not NULL_BLOCK)
        if num_new_blocks + len(cow) + revived > self.pool.num_free_blocks:
            return None

        if prefix_blocks:
            self.pool.touch(b for b in prefix_blocks if b is not NULL_BLOCK)
            table = list(prefix_blocks)
            self.num_cached_blocks[seq.seq_id] = len(prefix_blocks)
            self._first_live[seq.seq_id] = self._first_needed_block(num_computed)
        start = len(table) if not cow else cow[0]
        copies = []
        for i in cow:
            (dst,) = self.pool.get_new_blocks(1)
            src = table[i]
            self.pool.free_blocks([src])
            table[i] = dst
            copies.append((src.block_id, dst.block_id))
        table.extend(self.pool.get_new_blocks(num_new_blocks))
        self.tables[seq.seq_id] = table
        self._cache_full_blocks(seq, table, total)
        if prefix_blocks:
            start = 0
        if prefix is not None and prefix.counted:  # once per admitted sequence, not per admission attempt
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(prefix_blocks) * bs
        return SlotAllocation(start, [b.block_id for b in table[start:]], copies)

    def _release_outside_window(self, seq_id: int, table: list[KVBlock], num_computed: int) -> None:
        """Hand back the blocks no future query of this sequence reads (sliding window)."""
        first_live = self._first_live.get(seq_id, 0)
        dead = min(self._first_needed_block(num_computed), len(table))
        if dead <= first_live:
            return
        released = [b for b in table[first_live:dead] if b is not NULL_BLOCK]
        table[first_live:dead] = [NULL_BLOCK] * (dead - first_live)
        self._first_live[seq_id] = dead
        # Oldest first, so evicted first: under a window a prefix hit needs only the last blocks before it.
        self.pool.free_blocks(released)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (a parent with no table yet: the child gets none either, and
        looks up the prefix cache itself)."""
        if parent.seq_id not in self.tables:
            return
        table = self.tables[parent.seq_id]
        self.pool.touch(b for b in table if b is not NULL_BLOCK)
        self.tables[child.seq_id] = list(table)
        if parent.seq_id in self._first_live:
            self._first_live[child.seq_id] = self._first_live[parent.seq_id]
        if parent.seq_id in self._hashes:
            self._hashes[child.seq_id] = list(self._hashes[parent.seq_id])
        self.num_cached_blocks[child.seq_id] = self.num_cached_blocks.get(parent.seq_id, 0)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks, last block first (evicted first)."""
        table = self.tables.pop(seq.seq_id, None)
        if table:
            self.pool.free_blocks(b for b in reversed(table) if b is not NULL_BLOCK)
        self.num_cached_blocks.pop(seq.seq_id, None)
        self._first_live.pop(seq.seq_id, None)

    def forget_hashes(self, seq: Sequence) -> None:
        """Drop the per-sequence hash memo (the sequence is gone for good)."""
        self._hashes.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
