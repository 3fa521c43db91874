"""The pool of KV cache blocks: free queue, reference counts, prefix-cache index.

    BlockPool.get_new_blocks(n) -> [KVBlock]        (pops the LRU end of the free queue)
    BlockPool.free_blocks(blocks)                   (ref_cnt -= 1; at 0 the block joins the MRU end)
    BlockPool.touch(blocks)                         (ref_cnt += 1; a cached free block leaves the queue)
    BlockPool.get_cached_block(hash) -> KVBlock     (prefix-cache lookup)

Eviction order. A freed block keeps its contents and its hash: it is still a
prefix-cache hit until it is handed out again. Free blocks form one queue;
new allocations take from the head (least recently freed), frees append to
the tail. Callers free a sequence's blocks tail first (last block of the
sequence first), so for one sequence the blocks deep in its prefix are the
last to be evicted: a prefix is useless without its beginning, and the
beginning is the part most likely to be shared.

    head (evict next)                                   tail (evict last)
      [ b7 ] <-> [ b3 ] <-> [ b9 (hash h2) ] <-> [ b4 (hash h1) ]
                             freed seq: ...h1, h2 freed as h2, then h1

Pure Python: no torch import.
"""

from __future__ import annotations

from collections.abc import Iterable

BlockHash = bytes  # chained hash of a full block (see kv_cache_manager.hash_block_tokens)


class KVBlock:
    """One block of `block_size` token slots in every layer's K and V cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id  # index into the per-layer cache tensors
        self.ref_cnt = 0  # sequences whose block table holds this block
        self.block_hash: BlockHash | None = None  # set once the block is full and cached
        self.prev_free: KVBlock | None = None  # free-queue links, None when not in the queue
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) popleft, append and remove."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise RuntimeError("no free KV blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, "block is not free"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free += 1

    def block_ids(self) -> list[int]:
        """Free block ids in eviction order (for tests and debugging)."""
        out, b = [], self._head.next_free
        while b is not None and b is not self._tail:
            out.append(b.block_id)
            b = b.next_free
        return out


class BlockPool:
    """Owns every KVBlock: hands them out, takes them back, indexes cached ones by hash."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}  # full blocks by chained hash
        self.num_evictions = 0  # cached blocks reused for new contents

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            self.num_evictions += 1

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference; a free (cached) block leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each, in the given order (callers pass tail-first)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def cache_full_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Index a block that has just become full. The first block with a hash wins."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self.cached:
            self.cached[block_hash] = block
            block.block_hash = block_hash

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only possible when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True
