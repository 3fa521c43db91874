"""Block tables: allocation, copy-on-write after fork, prefix cache hits, tail-first freeing."""

from pagellm.core.kv_cache_manager import KVCacheManager, hash_block_tokens
from tests.core.helpers import check_block_invariants, make_request


def seq_of(tokens, **kw):
    return make_request(tokens, **kw).seqs[0]


def test_allocate_covers_exactly_the_tokens_asked_for():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    seq = seq_of(list(range(1, 10)))  # 9 tokens
    alloc = kv.allocate_slots(seq, 9)
    assert alloc.start == 0 and alloc.block_ids == [0, 1, 2] and alloc.copies == []
    seq.num_computed_tokens = 9
    seq.append_token(5, 0.0)
    alloc = kv.allocate_slots(seq, 1)  # position 9 still fits block 2
    assert alloc.block_ids == [] and alloc.start == 3
    seq.num_computed_tokens = 10
    for _ in range(2):
        seq.append_token(5, 0.0)
    alloc = kv.allocate_slots(seq, 2)  # positions 10, 11 fill block 2
    assert alloc.block_ids == []
    seq.num_computed_tokens = 12
    seq.append_token(5, 0.0)
    alloc = kv.allocate_slots(seq, 1)  # position 12 opens block 3
    assert alloc.start == 3 and alloc.block_ids == [3]
    check_block_invariants(kv)


def test_allocation_fails_without_side_effects_when_short():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_caching=False)
    seq = seq_of(list(range(1, 10)))
    assert kv.allocate_slots(seq, 9) is None
    assert kv.num_free_blocks == 2 and seq.seq_id not in kv.tables


def test_fork_shares_every_block_and_append_copies_only_the_partial_last_block():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    req = make_request(list(range(1, 7)))  # 6 tokens: blocks [0 full, 1 half]
    parent = req.seqs[0]
    kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = req.new_sequence(1, list(parent.token_ids))
    child.num_computed_tokens = 6
    kv.fork(parent, child)
    assert kv.block_ids(child.seq_id) == [0, 1]
    assert [b.ref_cnt for b in kv.tables[parent.seq_id]] == [2, 2]
    check_block_invariants(kv)

    child.append_token(9, 0.0)
    alloc = kv.allocate_slots(child, 1)  # writes position 6 in shared block 1 -> copy
    assert alloc.copies == [(1, 2)]
    assert alloc.start == 1 and alloc.block_ids == [2]
    assert kv.block_ids(child.seq_id) == [0, 2]
    assert kv.tables[parent.seq_id][1].ref_cnt == 1  # parent owns block 1 alone now
    parent.append_token(8, 0.0)
    alloc = kv.allocate_slots(parent, 1)  # no longer shared: no copy
    assert alloc.copies == []
    check_block_invariants(kv)

    kv.free(child)
    kv.free(parent)
    assert kv.num_free_blocks == 8
    check_block_invariants(kv)


def test_fork_at_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    req = make_request(list(range(1, 9)))  # 8 tokens = 2 full blocks
    parent = req.seqs[0]
    kv.allocate_slots(parent, 8)
    parent.num_computed_tokens = 8
    child = req.new_sequence(1, list(parent.token_ids))
    child.num_computed_tokens = 8
    kv.fork(parent, child)
    child.append_token(3, 0.0)
    alloc = kv.allocate_slots(child, 1)
    assert alloc.copies == [] and alloc.block_ids == [2]


def test_free_releases_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    seq = seq_of([1, 2, 3, 4, 5, 6, 7])  # blocks 0, 1, 2, 3
    kv.allocate_slots(seq, 7)
    kv.free(seq)
    assert kv.pool.free_queue.block_ids() == [3, 2, 1, 0]


def test_prefix_cache_hit_reuses_full_blocks_and_always_computes_the_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True)
    a = seq_of(list(range(1, 13)))  # 12 tokens = 3 full blocks
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    b = seq_of(list(range(1, 13)))  # same prompt
    match = kv.find_prefix(b)
    # At most num_tokens - 1 = 11 tokens from the cache: 2 full blocks.
    assert [blk.block_id for blk in match.blocks] == [0, 1]
    alloc = kv.allocate_slots(b, 12 - 8, match)
    assert alloc.start == 0 and alloc.block_ids == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.tables[a.seq_id]] == [2, 2, 1]
    check_block_invariants(kv)
    assert kv.prefix_hits == 8 and kv.prefix_queries == 12


def test_prefix_cache_distinguishes_different_prefixes_and_salts():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True)
    a = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9])
    kv.allocate_slots(a, 9)
    assert kv.find_prefix(seq_of([1, 2, 3, 4, 5, 6, 7, 0, 9])).blocks[0].block_id == 0
    assert len(kv.find_prefix(seq_of([1, 2, 3, 4, 5, 6, 7, 0, 9])).blocks) == 1
    assert kv.find_prefix(seq_of([9, 2, 3, 4, 5, 6, 7, 8, 9])).blocks == []
    salted = make_request([1, 2, 3, 4, 5, 6, 7, 8, 9])
    salted.cache_salt = "tenant-b"
    assert kv.find_prefix(salted.seqs[0]).blocks == []


def test_freed_cached_blocks_stay_hits_until_evicted_in_lru_order():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    a = seq_of([1, 2, 3, 4, 5])  # blocks 0 [1,2] 1 [3,4] 2 [5]
    kv.allocate_slots(a, 5)
    kv.free(a)  # queue: 3, 2, 1, 0 (tail first)
    assert kv.pool.free_queue.block_ids() == [3, 2, 1, 0]
    b = seq_of([1, 2, 3, 4, 9])
    match = kv.find_prefix(b)
    assert [blk.block_id for blk in match.blocks] == [0, 1]
    # A request with different tokens takes blocks 3 and 2 first: 0 and 1 survive.
    c = seq_of([7, 7, 7, 7])
    kv.allocate_slots(c, 4)
    assert kv.block_ids(c.seq_id) == [3, 2]
    assert [blk.block_id for blk in kv.find_prefix(b).blocks] == [0, 1]


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True)
    a = seq_of(list(range(1, 10)))
    kv.allocate_slots(a, 9)
    b = seq_of(list(range(1, 10)), prompt_logprobs=1)
    assert kv.find_prefix(b).blocks == []


def test_uncache_unwritten_forgets_hashes_of_blocks_a_failed_step_would_have_filled():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    a = seq_of([1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)  # hashes for blocks 0 and 1 registered at schedule time
    assert len(kv.pool.cached) == 2
    kv.uncache_unwritten(a)  # num_computed is still 0: nothing was written
    assert kv.pool.cached == {}


def test_hash_chain_depends_on_parent():
    h1 = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(None, [1, 2]) == h1


# ---- sliding window ---------------------------------------------------------------------

def decode_to(kv, seq, total):
    """Computed so far -> one token per step until the sequence has `total` tokens; returns live counts."""
    live = []
    while seq.num_tokens < total:
        seq.append_token(5, 0.0)
        assert kv.allocate_slots(seq, 1) is not None
        seq.num_computed_tokens += 1
        live.append(kv.num_live_blocks(seq.seq_id))
        check_block_invariants(kv)
    return live


def test_sliding_window_releases_blocks_no_query_can_see():
    from pagellm.core.kv_cache_manager import NULL_BLOCK

    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False, sliding_window=6)
    seq = seq_of(list(range(1, 11)))  # 10 tokens: blocks 0, 1, 2
    kv.allocate_slots(seq, 10)
    seq.num_computed_tokens = 10
    seq.append_token(5, 0.0)
    kv.allocate_slots(seq, 1)  # the query at position 10 sees keys 5..10: block 0 (positions 0-3) is dead
    assert kv.tables[seq.seq_id][0] is NULL_BLOCK and kv.block_ids(seq.seq_id) == [-1, 1, 2]
    assert kv.num_free_blocks == 6
    seq.num_computed_tokens = 11
    live = decode_to(kv, seq, 200)  # 200 tokens would need 50 blocks; the pool has 8
    assert max(live) <= kv.max_blocks_per_seq(200, 1) == 3
    kv.free(seq)
    assert kv.num_free_blocks == 8
    check_block_invariants(kv)


def test_without_a_window_nothing_is_released():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=False)
    seq = seq_of(list(range(1, 11)))
    kv.allocate_slots(seq, 10)
    seq.num_computed_tokens = 10
    decode_to(kv, seq, 40)
    assert kv.num_live_blocks(seq.seq_id) == 10 and -1 not in kv.block_ids(seq.seq_id)


def test_windowed_prefix_hit_needs_only_the_blocks_the_next_query_sees():
    from pagellm.core.kv_cache_manager import NULL_BLOCK

    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True, sliding_window=6)
    prompt = list(range(100, 121))  # 21 tokens: blocks b0..b5
    a = seq_of(prompt)
    kv.allocate_slots(a, 21)
    a.num_computed_tokens = 21
    a.append_token(5, 0.0)
    kv.allocate_slots(a, 1)  # query at 21 sees 16..21: blocks 0-3 (positions 0-15) released, oldest first
    held = kv.block_ids(a.seq_id)
    assert held[:4] == [-1] * 4
    # Another sequence takes the 2 never-used blocks and then the 2 oldest released ones (blocks 0 and 1).
    other = seq_of(list(range(500, 516)))
    kv.allocate_slots(other, 16)
    assert kv.pool.num_evictions == 2
    # The same 20-token prefix: blocks 0 and 1 are gone, but 2, 3 (free, cached) and 4 (held by a) are
    # what a query at position 20 sees (keys 15..20), so all 20 tokens are a hit.
    b = seq_of(prompt[:20] + [7, 8, 9])
    match = kv.find_prefix(b)
    assert match.num_tokens(4) == 20
    assert match.blocks[:3] == [NULL_BLOCK] * 3 and match.blocks[4].block_id == held[4]
    alloc = kv.allocate_slots(b, 3, match)
    assert alloc is not None and kv.block_ids(b.seq_id)[:3] == [-1, -1, -1]
    check_block_invariants(kv)
    for s in (a, other, b):
        kv.free(s)
    assert kv.num_free_blocks == 8
    check_block_invariants(kv)


def test_a_hit_cut_back_to_a_state_checkpoint_keeps_the_blocks_its_next_query_sees():
    """A model with recurrent layers resumes at a checkpoint before the end of the hit (cut_prefix): without a
    window the cut hit is its first blocks; under one it must still hold the blocks a query at the cut sees,
    else there is no hit."""
    from pagellm.core.kv_cache_manager import NULL_BLOCK

    plain = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    prompt = list(range(100, 121))
    a = seq_of(prompt)
    plain.allocate_slots(a, 21)
    b = seq_of(prompt)
    match = plain.find_prefix(b)
    assert plain.cut_prefix(b, match, 5) is match
    cut = plain.cut_prefix(b, match, 2)
    assert cut.blocks == match.blocks[:2]

    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True, sliding_window=6)
    a = seq_of(prompt)
    kv.allocate_slots(a, 21)
    a.num_computed_tokens = 21
    a.append_token(5, 0.0)
    kv.allocate_slots(a, 1)  # blocks 0-3 released (free, still cached)
    kv.allocate_slots(seq_of(list(range(500, 516))), 16)  # evicts blocks 0 and 1
    b = seq_of(prompt)
    match = kv.find_prefix(b)
    assert len(match.blocks) == 5
    assert match.blocks[2] is NULL_BLOCK  # a query at 20 sees keys 15..20: blocks 3 and 4
    cut = kv.cut_prefix(b, match, 4)  # a query at 16 sees keys 11..16: blocks 2 and 3, both cached
    cached = [kv.pool.get_cached_block(h) for h in kv.block_hashes(b, 4)[:4]]
    assert cut.blocks == [NULL_BLOCK, NULL_BLOCK, cached[2], cached[3]] and cached[2] is not None
    assert kv.cut_prefix(b, match, 2).blocks == []  # keys 3..8 need block 0: evicted


def test_fork_under_a_window_shares_live_blocks_only():
    kv = KVCacheManager(num_blocks=12, block_size=4, enable_caching=False, sliding_window=5)
    parent = seq_of(list(range(1, 17)))
    kv.allocate_slots(parent, 16)
    parent.num_computed_tokens = 16
    parent.append_token(5, 0.0)
    kv.allocate_slots(parent, 1)  # keys 12..16 visible: blocks 0-2 released
    child = make_request([1]).seqs[0]
    kv.fork(parent, child)
    check_block_invariants(kv)
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 12


def test_fits_in_place_only_for_unshared_blocks_with_room_and_no_window():
    """The scheduler's decode fast path: True leaves the table as it is; every other case goes through
    allocate_slots (a new block, a shared block to copy, a sliding window, no table yet)."""
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    req = make_request(list(range(1, 7)))  # 6 tokens: blocks [0 full, 1 half]
    seq = req.seqs[0]
    assert not kv.fits_in_place(seq, 6)  # no table yet
    kv.allocate_slots(seq, 6)
    seq.num_computed_tokens = 6
    seq.append_token(9, 0.0)
    table = list(kv.block_ids(seq.seq_id))
    assert kv.fits_in_place(seq, 1) and kv.block_ids(seq.seq_id) == table  # position 6 fits block 1
    seq.num_computed_tokens = 7
    seq.append_token(9, 0.0)
    assert kv.fits_in_place(seq, 1)  # position 7 fills block 1: entered in the prefix cache
    assert kv.tables[seq.seq_id][1].block_hash is not None
    seq.num_computed_tokens = 8
    seq.append_token(9, 0.0)
    assert not kv.fits_in_place(seq, 1)  # position 8 needs block 2
    assert kv.allocate_slots(seq, 1).block_ids == [2]
    seq.num_computed_tokens = 9

    child = req.new_sequence(1, list(seq.token_ids))
    child.num_computed_tokens = 9
    kv.fork(seq, child)
    child.append_token(5, 0.0)
    assert not kv.fits_in_place(child, 1)  # block 2 is shared: copy-on-write first
    assert kv.allocate_slots(child, 1).copies
    check_block_invariants(kv)

    windowed = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False, sliding_window=4)
    s = seq_of([1, 2, 3])
    windowed.allocate_slots(s, 3)
    s.num_computed_tokens = 3
    s.append_token(4, 0.0)
    assert not windowed.fits_in_place(s, 1)  # a window may hand blocks back: the general path
