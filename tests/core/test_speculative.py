"""Speculative decoding on the host: the n-gram proposer, and what the scheduler does with drafts and verdicts."""

import random

import pytest

from pagellm.config import SchedulerConfig, SpeculativeConfig
from pagellm.core.sched_output import ModelRunnerOutput, SampleResult
from pagellm.core.scheduler import Scheduler
from pagellm.core.speculative import NgramProposer
from tests.core.helpers import check_block_invariants, make_request


def reference_drafts(tokens, n_max, n_min, k):
    """By definition: the longest n (n_max down to n_min) whose last-n tokens occur earlier, ending before the last
    token; the latest such occurrence; the k tokens after it."""
    last = len(tokens) - 1
    for n in range(n_max, n_min - 1, -1):
        if n > last:
            continue
        suffix = tokens[last - n + 1:]
        for end in range(last - 1, n - 2, -1):
            if tokens[end - n + 1:end + 1] == suffix:
                return tokens[end + 1:end + 1 + k]
    return []


def proposer(k=3, n_max=3, n_min=1):
    return NgramProposer(SpeculativeConfig("ngram", k, n_max, n_min))


def test_the_documented_example():
    p = proposer()
    tokens = list("abcdxbcdybc")
    assert p.propose(1, tokens, 3) == list("dyb")
    tokens.append("d")  # now (b c d) matches at 5..7: the longest wins
    assert p.propose(1, tokens, 3) == list("ybc")


def test_limits():
    p = proposer(k=2, n_max=2, n_min=2)
    assert p.propose(1, [5, 6, 7, 5, 6], 10) == [7, 5]  # at most num_speculative_tokens
    assert p.propose(2, [5, 6, 7, 5, 6], 1) == [7]  # at most what the caller allows
    assert p.propose(3, [5, 6, 7, 5, 6], 0) == []
    assert p.propose(4, [1, 2, 3, 9, 3], 2) == []  # a match shorter than prompt_lookup_min
    assert p.propose(5, [3], 2) == []
    assert p.propose(6, [4, 4], 2) == []  # (4 4) does not occur before the end


@pytest.mark.parametrize("seed", range(6))
def test_incremental_index_agrees_with_the_definition(seed):
    """Growing sequences over small vocabularies (many repeats), proposals after every appended token."""
    rng = random.Random(seed)
    n_max, n_min, k = rng.randint(1, 4), 1, rng.randint(1, 5)
    n_min = rng.randint(1, n_max)
    p = proposer(k, n_max, n_min)
    tokens = [rng.randrange(4) for _ in range(3)]
    for _ in range(55):  # < MAX_CANDIDATES occurrences of any token: every candidate is checked
        assert p.propose(0, tokens, k) == reference_drafts(tokens, n_max, n_min, k), tokens
        tokens.extend(rng.randrange(4) for _ in range(rng.randint(1, 3)))
    p.forget(0)
    assert p.propose(0, tokens[:20], k) == reference_drafts(tokens[:20], n_max, n_min, k)


def make_scheduler(num_blocks=64, block_size=4, k=3, **kw):
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=kw.pop("max_len", 128),
                          speculative=SpeculativeConfig("ngram", k, 2, 1))
    return Scheduler(cfg, block_size, num_blocks, kw.pop("caching", False))


def verdict(sched, accept: dict[int, int], sampled=9) -> ModelRunnerOutput:
    """Sample for every sampling sequence: the first `accept[seq]` drafts agree, then `sampled`."""
    out = ModelRunnerOutput()
    for sid in sched.sampling_seq_ids:
        drafts = sched.spec_token_ids.get(sid, [])
        a = min(accept.get(sid, 0), len(drafts))
        results = [SampleResult(t, -0.1) for t in drafts[:a]] + [SampleResult(sampled, -0.1)]
        out.samples[sid] = results[0]
        if len(results) > 1:
            out.extra_samples[sid] = results[1:]
    return out


def test_drafts_are_scheduled_and_rejected_ones_rolled_back():
    s = make_scheduler()
    req = make_request([1, 2, 3, 1, 2, 3, 1, 2], max_tokens=20)
    s.add_request(req)
    seq = req.seqs[0]
    first = s.schedule()  # the prompt: no drafts
    assert not first.spec_token_ids
    s.update_from_output(first, verdict(first, {}, sampled=3))
    assert not s.can_schedule_ahead()  # drafts come from the host's tokens
    step = s.schedule()
    assert step.spec_token_ids == {seq.seq_id: [1, 2, 3]}  # after (2, 3), as at positions 1..2
    assert step.num_scheduled_tokens == {seq.seq_id: 4}
    assert seq.num_computed_tokens == 12
    s.update_from_output(step, verdict(step, {seq.seq_id: 1}))  # keeps 1, rejects (2, 3), samples 9
    assert seq.output_token_ids == [3, 1, 9]
    assert seq.num_computed_tokens == 10 == seq.num_tokens - 1
    check_block_invariants(s.kv)
    assert s.stats().spec_num_drafts == 1
    assert (s.stats().spec_num_draft_tokens, s.stats().spec_num_accepted_tokens) == (3, 1)


def test_drafts_stop_at_max_tokens_and_the_last_output_token():
    s = make_scheduler(k=5)
    req = make_request([4, 5, 6, 4, 5, 6, 4, 5], max_tokens=3)
    s.add_request(req)
    first = s.schedule()
    s.update_from_output(first, verdict(first, {}, sampled=6))
    step = s.schedule()
    # two tokens left: the last token's sample plus one draft
    assert step.spec_token_ids == {req.seqs[0].seq_id: [4]}
    updates = s.update_from_output(step, verdict(step, {req.seqs[0].seq_id: 1}, sampled=5))
    assert req.seqs[0].output_token_ids == [6, 4, 5]
    assert updates[0].finished and updates[0].deltas[0].finish_reason == "length"
    assert s.kv.num_free_blocks == s.kv.num_total_blocks


def test_a_stop_among_accepted_tokens_drops_the_rest_and_frees_the_blocks():
    s = make_scheduler()
    req = make_request([7, 8, 0, 7, 8, 0, 7], max_tokens=20)  # eos 0
    s.add_request(req)
    first = s.schedule()
    s.update_from_output(first, verdict(first, {}, sampled=8))
    step = s.schedule()
    assert step.spec_token_ids == {req.seqs[0].seq_id: [0, 7, 8]}
    updates = s.update_from_output(step, verdict(step, {req.seqs[0].seq_id: 3}))
    assert req.seqs[0].output_token_ids == [8, 0]  # EOS ends it: the accepted tokens after it are dropped
    assert updates[0].finished
    assert s.kv.num_free_blocks == s.kv.num_total_blocks


def test_drafts_never_enter_the_prefix_cache():
    """Blocks are indexed only up to the known tokens: a block whose slots hold drafts is not hashed, so a later
    prompt that continues with those very drafts does not hit the block the rejected drafts were written to."""
    s = make_scheduler(caching=True)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4]  # two full blocks of 4
    req = make_request(prompt, max_tokens=8)
    s.add_request(req)
    first = s.schedule()
    s.update_from_output(first, verdict(first, {}, sampled=1))
    step = s.schedule()
    assert step.spec_token_ids == {req.seqs[0].seq_id: [2, 3, 4]}  # block 2 = (1 | 2 3 4 drafted)
    assert s.kv.num_cached_blocks[req.seqs[0].seq_id] == 2
    s.update_from_output(step, verdict(step, {}))  # every draft rejected: the sequence goes on with 9
    assert req.seqs[0].output_token_ids == [1, 9]
    other = make_request(prompt + [1, 2, 3, 4, 5], max_tokens=2)
    s.add_request(other)
    s.schedule()
    assert other.seqs[0].num_cached_tokens == 8  # not 12: block 2 was never entered with the drafts
    check_block_invariants(s.kv)


def test_requests_that_cannot_speculate():
    from pagellm.core.policies import SamplingPolicy

    s = make_scheduler()
    for params in (dict(bad_words=None), dict(repetition_penalty=1.2)):
        req = make_request([1, 2, 1, 2, 1], max_tokens=5, **params)
        if params.get("bad_words", 1) is None:
            req.sampling_params._bad_words_token_ids = [[3, 4]]  # a bad word of two tokens: its prefix is host state
        s.add_request(req)
        first = s.schedule()
        s.update_from_output(first, verdict(first, {}, sampled=2))
        assert bool(s.schedule().spec_token_ids) == ("repetition_penalty" in params)  # penalties do speculate
        s.abort_requests([req.request_id])
    assert s.can_schedule_ahead() and isinstance(req.policy, SamplingPolicy)
