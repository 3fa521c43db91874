"""Recurrent-state checkpoints (prefix caching for models with Mamba layers): which boundaries are saved, which hit
is taken, slot reuse, and the scheduler's use of them (no model: fake outputs)."""

from pagellm.config import SchedulerConfig
from pagellm.core.scheduler import Scheduler
from pagellm.core.state_checkpoints import StateCheckpoints
from tests.core.helpers import fake_output, make_request

HASHES = [bytes([i]) for i in range(16)]  # block i's chained hash


def test_saves_every_interval_boundary_a_chunk_crosses_once():
    cp = StateCheckpoints(num_slots=8, interval=8, block_size=4)
    # positions 3 .. 20: boundaries 8 and 16 (offsets 5 and 13 into the chunk)
    assert cp.plan_saves(HASHES, 3, 21) == [(5, 1), (13, 0)]
    assert cp.plan_saves(HASHES, 0, 16) == []  # already planned: not saved twice, even in the same step
    assert cp.plan_saves(HASHES, 16, 24) == [(8, 2)]  # the boundary at the chunk's very end
    assert cp.plan_saves(HASHES, 24, 31) == []


def test_lookup_sees_a_checkpoint_only_after_its_step_and_takes_the_last_one_in_the_hit():
    cp = StateCheckpoints(num_slots=8, interval=8, block_size=4)
    saves = cp.plan_saves(HASHES, 0, 24)
    assert cp.lookup(HASHES, 6) == (0, None)  # same step: not written yet when this step's sequences start
    cp.commit()
    assert cp.lookup(HASHES, 6) == (6, saves[2][1])  # 24 tokens
    assert cp.lookup(HASHES, 5) == (4, saves[1][1])  # a hit of 20 tokens resumes at 16
    assert cp.lookup(HASHES, 1) == (0, None)
    assert cp.lookup([b"x"] * 6, 6) == (0, None)  # another prefix


def test_least_recently_used_slot_is_replaced():
    cp = StateCheckpoints(num_slots=2, interval=4, block_size=4)
    assert cp.plan_saves(HASHES, 0, 8) == [(4, 1), (8, 0)]
    cp.commit()
    assert cp.lookup(HASHES, 1) == (1, 1)  # touches the first
    assert cp.plan_saves(HASHES, 8, 12) == [(4, 0)]  # replaces the second (least recently used)
    cp.commit()
    assert cp.lookup(HASHES, 2) == (1, 1)
    assert cp.lookup(HASHES, 3) == (3, 0)
    # every slot taken by this step's own checkpoints: the latest boundaries are kept, none overwritten
    other = [bytes([100 + i]) for i in range(16)]
    assert cp.plan_saves(other, 0, 16) == [(12, 0), (16, 1)]
    assert cp.lookup(HASHES, 3) == (0, None)


def test_invalidated_slots_are_forgotten_and_free():
    cp = StateCheckpoints(num_slots=3, interval=4, block_size=4)
    assert cp.plan_saves(HASHES, 0, 12) == [(4, 2), (8, 1), (12, 0)]
    cp.commit()
    cp.invalidate({1})
    assert cp.lookup(HASHES, 2) == (1, 2) and len(cp) == 2
    assert cp.plan_saves([b"y"] * 4, 0, 4) == [(4, 1)]  # the freed slot first
    cp.reset()
    assert len(cp) == 0 and cp.lookup(HASHES, 3) == (0, None)


def make_scheduler(interval=8, slots=4, caching=True, max_tokens=64):
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_tokens, max_model_len=128)
    return Scheduler(cfg, 4, 64, caching, stateful=True, state_checkpoints=(interval, slots))


def step(s, known):
    out = s.schedule()
    s.update_from_output(out, fake_output(out, 7, known))
    return out


def test_a_hit_is_cut_back_to_its_last_checkpoint_and_names_the_slot():
    s = make_scheduler(max_tokens=7)
    known = {}
    a = make_request(list(range(1, 23)), max_tokens=1)  # 22 tokens, chunks of 7: boundaries 8 and 16 mid-chunk
    s.add_request(a)
    saves = []
    while s.has_unfinished_requests():
        out = step(s, known)
        saves += [(out.num_scheduled_tokens[a.seqs[0].seq_id], *x) for x in out.state_saves.get(a.seqs[0].seq_id, ())]
    assert saves == [(7, 1, 0), (7, 2, 1)]  # chunk 7..13 saves after 1 token (8), chunk 14..20 after 2 (16)
    b = make_request(list(range(1, 21)) + [99, 98], max_tokens=1)  # the first 20 tokens shared: 5 blocks cached
    s.add_request(b)
    out = s.schedule()
    (new,) = out.new_seqs
    assert new.num_computed_tokens == 16 and new.state_checkpoint == 1
    assert b.seqs[0].num_cached_tokens == 16


def test_without_prefix_caching_nothing_is_checkpointed():
    s = make_scheduler(caching=False)
    assert s.checkpoints is None
    a = make_request(list(range(1, 23)), max_tokens=1)
    s.add_request(a)
    assert s.schedule().state_saves == {}


def test_a_failed_step_drops_its_checkpoints_and_the_requests_that_started_from_them():
    s = make_scheduler()
    a = make_request(list(range(1, 23)), max_tokens=4)
    s.add_request(a)
    first = s.schedule()  # in flight (async scheduling): its results are not back
    assert first.state_saves
    b = make_request(list(range(1, 21)) + [50], max_tokens=4)
    c = make_request([60, 61, 62], max_tokens=4)
    s.add_request(b)
    s.add_request(c)
    later = s.schedule()
    assert {d.seq_id: d.state_checkpoint for d in later.new_seqs}[b.seqs[0].seq_id] >= 0
    failed = s.fail_step(first, [later])
    assert {r.request_id for r in failed} == {a.request_id, b.request_id}
    assert len(s.checkpoints) == 0 and c.request_id in s.requests


def test_a_pinned_slot_is_never_replaced_and_comes_back_once_unpinned():
    cp = StateCheckpoints(num_slots=2, interval=4, block_size=4)
    cp.plan_saves(HASHES, 0, 8)
    cp.commit()
    _, slot = cp.lookup(HASHES, 1)  # boundary 4 (slot 1), then pinned: a sequence will start from it
    cp.pin(slot)
    other = [bytes([100 + i]) for i in range(16)]
    assert cp.plan_saves(other, 0, 8) == [(8, 0)]  # only the unpinned slot is taken
    cp.commit()
    cp.invalidate({slot})  # e.g. a failed step: forgotten, but not free while pinned
    assert cp.plan_saves([b"z"] * 4, 0, 4) == [(4, 0)]
    cp.unpin(slot)
    assert cp.plan_saves([b"w"] * 4, 0, 4) == [(4, slot)]
