"""Scheduler unit tests with fake model outputs: budgets, chunked prefill, preemption, freeing."""

import pytest

from pagellm.config import SchedulerConfig
from pagellm.core.request import RequestStatus
from pagellm.core.scheduler import Scheduler
from tests.core.helpers import check_block_invariants, fake_output, make_request


def make_scheduler(num_blocks=32, block_size=4, max_tokens=64, max_seqs=8, max_len=128, caching=False):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens, max_model_len=max_len)
    return Scheduler(cfg, block_size, num_blocks, caching)


def run_step(s, token=7, known=None):
    out = s.schedule()
    updates = s.update_from_output(out, fake_output(out, token, known))
    check_block_invariants(s.kv)
    return out, updates


def test_prefill_and_decode_share_one_flat_batch():
    s = make_scheduler()
    a = make_request([1, 2, 3], max_tokens=3)
    s.add_request(a)
    known = {}
    out, _ = run_step(s, known=known)
    assert out.num_scheduled_tokens == {a.seqs[0].seq_id: 3}
    b = make_request([4, 5, 6, 7, 8])
    s.add_request(b)
    out, _ = run_step(s, known=known)
    # a decodes one token, b prefills five: one step, no padding.
    assert out.num_scheduled_tokens == {a.seqs[0].seq_id: 1, b.seqs[0].seq_id: 5}
    assert out.total_num_scheduled_tokens == 6


def test_token_budget_chunks_a_long_prompt():
    s = make_scheduler(max_tokens=8)
    a = make_request(list(range(1, 21)), max_tokens=2)  # 20 tokens
    s.add_request(a)
    known = {}
    sizes = []
    for _ in range(3):
        out, ups = run_step(s, known=known)
        sizes.append(out.num_scheduled_tokens[a.seqs[0].seq_id])
        if sizes[-1] < 8:
            assert ups and ups[0].deltas  # the last chunk samples
    assert sizes == [8, 8, 4]
    assert a.seqs[0].num_output_tokens == 1


def test_finished_requests_free_their_blocks_at_once():
    s = make_scheduler()
    a = make_request([1, 2, 3], max_tokens=2)
    s.add_request(a)
    known = {}
    run_step(s, known=known)
    _, ups = run_step(s, known=known)
    assert ups[0].finished and ups[0].deltas[0].finish_reason == "length"
    assert s.kv.num_free_blocks == 32 and not s.has_unfinished_requests()


def test_eos_stops_unless_ignored_and_respects_min_tokens():
    s = make_scheduler()
    a = make_request([1, 2], max_tokens=5)
    b = make_request([1, 2], max_tokens=5, ignore_eos=True)
    c = make_request([1, 2], max_tokens=5, min_tokens=2)
    for r in (a, b, c):
        s.add_request(r)
    _, ups = run_step(s, token=0)  # token 0 is EOS
    by_id = {u.request_id: u for u in ups}
    assert by_id[a.request_id].finished and by_id[a.request_id].deltas[0].finish_reason == "stop"
    assert not by_id[b.request_id].finished
    assert not by_id[c.request_id].finished


def test_stop_token_ids_report_the_token_as_stop_reason():
    s = make_scheduler()
    a = make_request([1, 2], max_tokens=5, stop_token_ids=[7])
    s.add_request(a)
    _, ups = run_step(s, token=7)
    assert ups[0].deltas[0].finish_reason == "stop" and ups[0].deltas[0].stop_reason == 7


def test_preemption_takes_the_latest_arrival_and_requeues_it_first():
    s = make_scheduler(num_blocks=6, block_size=2, max_tokens=64)
    a = make_request([1, 2, 3], max_tokens=8)  # needs up to 6 blocks alone
    b = make_request([4, 5, 6], max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    known = {}
    preempted_b = False
    for _ in range(12):
        out, _ = run_step(s, known=known)
        if b.num_preemptions:
            preempted_b = True
            assert a.num_preemptions == 0
            assert s.waiting[0] is b
            break
    assert preempted_b
    # Run to the end: both finish with their full length.
    for _ in range(40):
        if not s.has_unfinished_requests():
            break
        run_step(s, known=known)
    assert a.seqs[0].num_output_tokens == 8 and b.seqs[0].num_output_tokens == 8
    assert s.kv.num_free_blocks == 6


def test_preempted_request_recomputes_prompt_and_output():
    s = make_scheduler(num_blocks=6, block_size=2, max_tokens=64)
    a = make_request([1, 2, 3], max_tokens=8)
    b = make_request([4, 5, 6], max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    known = {}
    while not b.num_preemptions:
        run_step(s, known=known)
    out_before = b.seqs[0].num_tokens
    while b.status != RequestStatus.RUNNING:
        out, _ = run_step(s, known=known)
    # The first step after readmission recomputes every known token of b.
    assert out.num_scheduled_tokens[b.seqs[0].seq_id] == out_before
    assert b.seqs[0].seq_id in {d.seq_id for d in out.new_seqs}


def test_abort_frees_every_block_and_tells_the_worker():
    s = make_scheduler()
    a = make_request([1, 2, 3, 4, 5], max_tokens=10)
    s.add_request(a)
    run_step(s)
    s.abort_requests([a.request_id])
    assert s.kv.num_free_blocks == 32
    out = s.schedule()
    assert a.seqs[0].seq_id in out.finished_seq_ids


def test_requests_that_can_never_fit_are_rejected():
    s = make_scheduler(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="KV cache blocks"):
        s.add_request(make_request([1] * 10, max_tokens=10))  # 20 tokens > 16 slots
    with pytest.raises(ValueError, match="max_num_seqs"):
        s.add_request(make_request([1], max_tokens=1, n=9, temperature=1.0))


def test_max_num_seqs_caps_the_running_batch():
    s = make_scheduler(max_seqs=2)
    reqs = [make_request([1, 2], max_tokens=5) for _ in range(3)]
    for r in reqs:
        s.add_request(r)
    out, _ = run_step(s)
    assert len(out.num_scheduled_tokens) == 2
    assert reqs[2].status == RequestStatus.WAITING


def test_parallel_sampling_forks_before_the_last_prompt_token():
    s = make_scheduler(caching=False)
    a = make_request([1, 2, 3, 4, 5, 6], max_tokens=3, n=3, temperature=1.0)
    s.add_request(a)
    known = {}
    out, ups = run_step(s, known=known)
    parent = a.seqs[0]
    assert out.num_scheduled_tokens == {parent.seq_id: 5} and not ups
    out, ups = run_step(s, known=known)
    # Three sequences share blocks [0, 1]; each computes position 5 into its own copy of block 1.
    assert len(a.seqs) == 3 and all(n == 1 for n in out.num_scheduled_tokens.values())
    assert sorted(dst for _, dst in out.blocks_to_copy) == [2, 3] and all(src == 1 for src, _ in out.blocks_to_copy)
    assert [d.index for d in ups[0].deltas] == [0, 1, 2]


def test_abort_of_a_forked_request_leaks_nothing():
    s = make_scheduler(caching=True)
    a = make_request([1, 2, 3, 4, 5, 6], max_tokens=8, n=4, temperature=1.0)
    s.add_request(a)
    known = {}
    for _ in range(4):
        run_step(s, known=known)
    assert len(a.seqs) == 4 and any(b.ref_cnt > 1 for t in s.kv.tables.values() for b in t)
    s.abort_requests([a.request_id])
    check_block_invariants(s.kv)
    assert s.kv.num_free_blocks == 32 and not s.kv.tables
    out = s.schedule()
    assert {q.seq_id for q in a.seqs} <= out.finished_seq_ids


def test_pipeline_micro_batches_hold_disjoint_sequences():
    """micro_batches=2 (two pipeline stages): two steps in flight hold different sequences, about half the live ones
    each; a request whose token is in flight waits for it (nothing to schedule while both steps are out); a prompt
    chunk that samples nothing may go on in the next micro-batch."""
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128)
    s = Scheduler(cfg, 4, 64, False, micro_batches=2)
    reqs = [make_request([1, 2, 3, 4, 5], max_tokens=3) for _ in range(5)]
    for r in reqs:
        s.add_request(r)
    assert s.can_schedule_ahead()
    known = {}

    def ids(out):
        return set(out.num_scheduled_tokens)

    a, b = s.schedule(), s.schedule()
    assert (len(ids(a)), len(ids(b))) == (3, 2) and not ids(a) & ids(b)
    assert not s.schedule().has_work  # every request has its token in flight
    s.update_from_output(a, fake_output(a, tables=known))
    c = s.schedule()
    assert ids(c) == ids(a) and all(n == 1 for n in c.num_scheduled_tokens.values())
    s.update_from_output(b, fake_output(b, tables=known))
    d = s.schedule()
    assert ids(d) == ids(b)
    for out in (c, d):
        s.update_from_output(out, fake_output(out, tables=known))
    check_block_invariants(s.kv)

    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8, max_model_len=128), 4, 64, False,
                  micro_batches=2)
    long = make_request(list(range(1, 21)), max_tokens=2)
    s.add_request(long)
    first, second = s.schedule(), s.schedule()
    sid = long.seqs[0].seq_id
    assert first.num_scheduled_tokens == {sid: 8} and second.num_scheduled_tokens == {sid: 8}
    assert not first.sampling_seq_ids and not second.sampling_seq_ids
    third = s.schedule()  # the last chunk samples: nothing more until it is back
    assert third.num_scheduled_tokens == {sid: 4} and third.sampling_seq_ids == [sid]
    assert not s.schedule().has_work
