"""Builders for core tests: requests, sequences and fake model outputs, no torch."""

from __future__ import annotations

import itertools

from pagellm.core.block_pool import BlockPool
from pagellm.core.kv_cache_manager import NULL_BLOCK, KVCacheManager
from pagellm.core.request import Request
from pagellm.core.sched_output import ModelRunnerOutput, SampleResult, SchedulerOutput
from pagellm.sampling_params import SamplingParams

_ids = itertools.count()


def make_request(prompt: list[int], arrival: float | None = None, **params) -> Request:
    params.setdefault("max_tokens", 4)
    p = SamplingParams(**params)
    n = next(_ids)
    req = Request(f"req-{n}", list(prompt), p, float(n if arrival is None else arrival), eos_token_ids=frozenset({0}))
    req.seqs = [req.new_sequence(0, list(prompt))]
    return req


def fake_output(sched: SchedulerOutput, token: int = 7, tables: dict | None = None) -> ModelRunnerOutput:
    """Sample `token` for every sequence whose chunk reaches its last known token."""
    out = ModelRunnerOutput()
    known = tables if tables is not None else {}
    for d in sched.new_seqs:
        known[d.seq_id] = len(d.token_ids)
    for sid, toks in zip(sched.cached_seqs.seq_ids, sched.cached_seqs.new_token_ids):
        known[sid] = known.get(sid, 0) + len(toks)
    computed = {d.seq_id: d.num_computed_tokens for d in sched.new_seqs}
    computed.update(zip(sched.cached_seqs.seq_ids, sched.cached_seqs.num_computed_tokens))
    for sid, n in sched.num_scheduled_tokens.items():
        if computed[sid] + n == known[sid]:
            out.samples[sid] = SampleResult(token, -0.5)
    return out


def check_block_invariants(kv: KVCacheManager) -> None:
    """Every block's ref count equals the number of tables that hold it; free blocks are exactly ref 0."""
    pool: BlockPool = kv.pool
    holders: dict[int, int] = {}
    for table in kv.tables.values():
        for b in table:
            if b is NULL_BLOCK:
                continue  # released by the sliding window
            holders[b.block_id] = holders.get(b.block_id, 0) + 1
    for b in pool.blocks:
        assert b.ref_cnt == holders.get(b.block_id, 0), (b, holders.get(b.block_id))
    free = set(pool.free_queue.block_ids())
    assert free == {b.block_id for b in pool.blocks if b.ref_cnt == 0}
