"""Prefix caching for models with a recurrent state per sequence (Mamba / linear-attention layers).

A cached prefix's KV blocks restore the attention layers, not the recurrent ones: their state after token p holds
the whole prefix. So the state is checkpointed every `interval` tokens (mamba_block_size, a multiple of the block
size) into a slot, keyed by the chained hash of the block that ends there; a prefix hit is cut back to the last
checkpointed boundary of the cached run, and the sequence's state row starts as a copy of that slot.

    interval 8, block_size 4, prompt of 21 tokens, checkpoints at 8 and 16 (hashes of blocks 1 and 3):
    position   0 ... 7 | 8 ... 15 | 16 ... 20
    a later prompt with the same first 18 tokens: KV blocks 0-3 cached, state restored from the 16 checkpoint,
    tokens 16.. computed

The worker writes a checkpoint while it computes the step's chunk (a layer saves its state at each boundary the
chunk crosses), and restores one before the step's forward pass. Steps run in order on the worker, and within a
step restores come before saves, so a slot may be reused by the very step that restores from it; a checkpoint
becomes visible to lookups only once the step that writes it has been scheduled (`commit`), never to a sequence of
the same step. A hit whose sequence is not sent at once (its whole hit is cached: it waits for its samples to fork)
pins its slot until it is sent.

Pure Python: no torch import.
"""

from __future__ import annotations

from collections import OrderedDict

from pagellm.core.block_pool import BlockHash


class StateCheckpoints:
    """Slot bookkeeping on the engine side; the worker holds the slots' contents."""

    def __init__(self, num_slots: int, interval: int, block_size: int) -> None:
        assert num_slots > 0 and interval % block_size == 0
        self.num_slots, self.interval, self.block_size = num_slots, interval, block_size
        self._ready: OrderedDict[BlockHash, int] = OrderedDict()  # least recently used first
        self._pending: dict[BlockHash, int] = {}  # written by the step being scheduled
        self._free = list(range(num_slots - 1, -1, -1))
        self._pins: dict[int, int] = {}  # slot -> sequences that will start from it, not sent to the worker yet

    def __len__(self) -> int:
        return len(self._ready) + len(self._pending)

    def lookup(self, hashes: list[BlockHash], num_blocks: int) -> tuple[int, int | None]:
        """Of a cached run of `num_blocks` blocks (hashes: the sequence's chained block hashes), the longest
        prefix that ends at a checkpoint: (its blocks, the slot), or (0, None)."""
        per = self.interval // self.block_size
        for k in range(num_blocks - num_blocks % per, 0, -per):
            slot = self._ready.get(hashes[k - 1])
            if slot is not None:
                self._ready.move_to_end(hashes[k - 1])
                return k, slot
        return 0, None

    def plan_saves(self, hashes: list[BlockHash], start: int, end: int) -> list[tuple[int, int]]:
        """Checkpoints for the boundaries in (start, end] of a chunk computing positions start .. end - 1 (hashes
        cover the blocks up to `end`): [(tokens of the chunk before the boundary, slot)]. A boundary already
        checkpointed is skipped; when this step's checkpoints take every slot, the latest boundaries (the longest
        hits) are kept."""
        saves = []
        first = (start // self.interval + 1) * self.interval
        for boundary in range(end - end % self.interval, first - 1, -self.interval):
            h = hashes[boundary // self.block_size - 1]
            if h in self._ready or h in self._pending:
                continue
            slot = self._take_slot()
            if slot is None:
                break
            saves.append((boundary - start, slot, h))
        saves.reverse()
        self._pending.update((h, slot) for _, slot, h in saves)  # in position order: the earliest replaced first
        return [(offset, slot) for offset, slot, _ in saves]

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for h, slot in self._ready.items():  # the least recently used one no waiting sequence starts from
            if slot not in self._pins:
                del self._ready[h]
                return slot
        return None

    def pin(self, slot: int) -> None:
        """A sequence will start from this slot (its restore is not sent yet): it is not replaced meanwhile."""
        self._pins[slot] = self._pins.get(slot, 0) + 1

    def unpin(self, slot: int) -> None:
        n = self._pins.pop(slot) - 1
        if n:
            self._pins[slot] = n
        elif slot not in self._free and slot not in self._ready.values() and slot not in self._pending.values():
            self._free.append(slot)  # its checkpoint was dropped while pinned

    def commit(self) -> None:
        """The step being scheduled is complete: its checkpoints may serve the steps after it."""
        self._ready.update(self._pending)
        self._pending.clear()

    def invalidate(self, slots: set[int]) -> None:
        """These slots were not (or not wholly) written: a failed step. They go back to the free list."""
        for table in (self._ready, self._pending):
            for h in [h for h, s in table.items() if s in slots]:
                del table[h]
        self._free.extend(sorted(slots - set(self._free) - set(self._pins), reverse=True))

    def reset(self) -> None:
        """Forget every checkpoint (a pinned slot's contents stay until its sequences are sent)."""
        self._ready.clear()
        self._pending.clear()
        self._free = [s for s in range(self.num_slots - 1, -1, -1) if s not in self._pins]
