"""Allocator unit tests: tiny pools, exact block ids, exact free-queue order."""

import pytest

from pagellm.core.block_pool import BlockPool


def test_new_blocks_come_from_the_head_in_id_order():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.free_queue.block_ids() == [3]
    assert pool.num_free_blocks == 1


def test_freed_blocks_join_the_tail_in_the_order_given():
    pool = BlockPool(4, enable_caching=True)
    a, b, c = pool.get_new_blocks(3)
    pool.free_blocks([c, b, a])  # a sequence frees tail first
    assert pool.free_queue.block_ids() == [3, 2, 1, 0]


def test_shared_block_is_free_only_after_the_last_reference():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a])
    assert pool.num_free_blocks == 1 and a.ref_cnt == 1
    pool.free_blocks([a])
    assert pool.num_free_blocks == 2


def test_asking_for_more_than_free_raises():
    pool = BlockPool(2, enable_caching=False)
    pool.get_new_blocks(2)
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(1)


def test_cached_free_block_is_revived_by_touch_and_evicted_on_reuse():
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_block(a, b"h-a")
    pool.free_blocks([b, a])
    assert pool.get_cached_block(b"h-a") is a  # still a hit while free
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.free_queue.block_ids() == [2, 1]
    pool.free_blocks([a])
    # LRU: 2, 1, then a (0); taking 3 blocks reuses a last and evicts its hash
    got = pool.get_new_blocks(3)
    assert [x.block_id for x in got] == [2, 1, 0]
    assert pool.get_cached_block(b"h-a") is None
    assert pool.num_evictions == 1


def test_double_free_is_caught():
    pool = BlockPool(1, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.free_blocks([a])
    with pytest.raises(AssertionError):
        pool.free_blocks([a])
