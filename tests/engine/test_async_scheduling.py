"""Async scheduling: step N+1 is scheduled and launched before step N's results are back.

The oracle is Hugging Face greedy output for greedy requests, and the same engine run one step at a time for
seeded sampling (a token's random draw depends only on the request's seed and the token's index, so both
schedules must pick the same tokens). Every test also checks that steps really overlapped, and that every KV
block is free at the end.
"""

import pytest

from pagellm import LLM, SamplingParams
from pagellm.config import SchedulerConfig
from pagellm.core.request import Request
from pagellm.core.scheduler import Scheduler
from pagellm.engine.arg_utils import EngineArgs
from tests.engine.test_failures import fail_nth_call
from tests.worker.test_cuda_graphs import DEMO, PARAMS, PROMPTS, assert_same, hf_results


def make(async_scheduling, **kw):
    kw.setdefault("max_num_seqs", 4)  # fewer rows than prompts: requests join and leave the batch
    return LLM(DEMO, async_scheduling=async_scheduling, seed=0, **kw)


def generate(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def tokens_and_logprobs(outs):
    return [(c.token_ids, [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]) for o in outs for c in o.outputs]


def assert_all_free(llm):
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.llm_engine.has_unfinished_requests()


def overlapped(llm):
    return llm.llm_engine.stats.overlapped_steps


@pytest.mark.parametrize("backend", ["torch_ref", "cpu_paged"])
def test_greedy_output_equals_hf(backend):
    llm = make(True, attention_backend=backend)
    got = tokens_and_logprobs(generate(llm, PROMPTS, PARAMS))
    assert_same(hf_results(), got)
    assert overlapped(llm) > 20
    assert_all_free(llm)


def test_emulated_cuda_graphs_take_placeholders_from_the_previous_step(monkeypatch):
    """The GPU path: inputs staged in StepBuffers, decode steps replayed as (emulated) graphs, and the token a step
    computes but the host does not hold yet written into the graph's static input from the previous step's
    sampled tokens."""
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    llm = make(True, attention_backend="torch_ref", max_num_seqs=6)
    got = tokens_and_logprobs(generate(llm, PROMPTS, PARAMS))
    assert_same(hf_results(), got)
    runner = llm.llm_engine.executor.runner
    assert sum(runner.graphs.replays.values()) > 10
    assert overlapped(llm) > 20
    assert_all_free(llm)


def test_emulated_cuda_graphs_with_penalties_and_logprobs_match_one_step_at_a_time(monkeypatch):
    """The GPU path again with sampled, penalized rows asking for logprobs: the device penalty counts and the
    placeholder copy into the graph's static input give the same tokens as one step at a time."""
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=30, ignore_eos=True,
                             frequency_penalty=0.5 if i % 2 else 0.0, logprobs=i % 3 or None)
              for i in range(len(PROMPTS))]
    results = []
    for mode in (False, True):
        llm = make(mode, attention_backend="torch_ref", max_num_seqs=6)
        results.append([o.outputs[0].token_ids for o in generate(llm, PROMPTS, params)])
        assert sum(llm.llm_engine.executor.runner.graphs.replays.values()) > 40
        assert (overlapped(llm) > 40) if mode else (overlapped(llm) == 0)
        assert_all_free(llm)
    assert results[1] == results[0]


SAMPLED = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7 + i, max_tokens=12, logprobs=2)
           for i in range(len(PROMPTS))]


def test_seeded_sampling_n_and_stops_match_one_step_at_a_time():
    """Random sampling with seeds, n > 1 forks, EOS, stop strings, stop token ids and min_tokens: the same
    outputs and finish reasons as running one step at a time."""
    params = SAMPLED[:4] + [
        SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=10),
        SamplingParams(temperature=1.0, seed=5, max_tokens=30, stop=["e", "the"]),
        SamplingParams(temperature=0.7, seed=11, max_tokens=30, stop_token_ids=[13, 30], min_tokens=3),
    ]
    results = []
    for mode in (False, True):
        llm = make(mode)
        outs = generate(llm, PROMPTS, params)
        results.append([(c.text, c.token_ids, c.finish_reason, c.stop_reason,
                         c.logprobs and [sorted(d) for d in c.logprobs]) for o in outs for c in o.outputs])
        assert_all_free(llm)
        if mode:
            assert overlapped(llm) > 10
    sync, asynchronous = results
    assert asynchronous == sync
    assert {r[2] for r in sync} >= {"stop", "length"}  # both kinds of ending occurred


def test_preemption_and_recompute():
    """A KV cache too small for every request at once: sequences are preempted (some while a step computing them
    is in flight) and recomputed, and the output still equals HF's."""
    llm = make(True, max_num_seqs=6, num_gpu_blocks_override=12, block_size=4, enable_prefix_caching=False)
    got = tokens_and_logprobs(generate(llm, PROMPTS, PARAMS))
    assert llm.llm_engine.get_stats().num_preemptions > 0
    assert_same(hf_results(), got, tol=1e-3)
    assert overlapped(llm) > 10
    assert_all_free(llm)


def test_abort_while_steps_are_in_flight():
    llm = make(True)
    engine = llm.llm_engine
    for i, (p, sp) in enumerate(zip(PROMPTS[:4], PARAMS[:4])):
        engine.add_request(str(i), p, sp)
    for _ in range(4):
        engine.step()
    assert engine.core._in_flight  # a step is running while we abort
    done = {o.request_id: o for o in engine.abort_request("1")}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["1"].outputs[0].finish_reason == "abort"
    hf = hf_results()
    for i in (0, 2, 3):
        assert done[str(i)].outputs[0].token_ids == hf[i][0]
    assert_all_free(llm)


def test_repetition_penalty_overlaps_and_equals_hf():
    """Penalties count sampled tokens on the device, so penalized requests overlap too; greedy output with a
    repetition penalty equals Hugging Face's (which applies it to prompt and output tokens, as pagellm does)."""
    import torch
    from transformers import AutoTokenizer

    from tests.hf_reference import hf_model

    tok = AutoTokenizer.from_pretrained(DEMO)
    params = [SamplingParams(temperature=0, max_tokens=8 + 2 * i, repetition_penalty=1.4, ignore_eos=True)
              for i in range(len(PROMPTS))]
    llm = make(True)
    outs = generate(llm, PROMPTS, params)
    assert overlapped(llm) > 10
    assert_all_free(llm)
    model = hf_model(DEMO)
    for p, sp, out in zip(PROMPTS, params, outs):
        ids = torch.tensor([tok(p)["input_ids"]])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=sp.max_tokens,
                             repetition_penalty=1.4, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref


def check_penalty_counts(batch):
    """For every penalized row: the device counts are the host's known output tokens plus the tokens sampled on the
    device and not confirmed yet: exactly the last one when it is the only one outstanding (one step at a time);
    with two steps in flight, the last one and one more."""
    import numpy as np
    import torch

    from pagellm.worker.input_batch import _PENALTIES

    for row in batch.row_of.values():
        if not batch.extras[row] & _PENALTIES:
            continue
        known = batch.token_ids[row, batch.num_prompt[row]:batch.num_known[row]]
        extra = batch.output_counts[row] - torch.from_numpy(np.bincount(known, minlength=batch.vocab_size)).float()
        outstanding = int(batch.counted_upto[row] - batch.num_known[row])
        assert 0 <= outstanding <= 2 and (extra >= 0).all() and extra.sum() == outstanding, row
        if outstanding:
            assert extra[batch._last_sampled[row]] >= 1, row
        if outstanding == 1:
            assert extra[batch._last_sampled[row]] == 1, row


@pytest.mark.parametrize("mode", ["async sampling", "beam search"])
def test_device_penalty_counts_follow_the_tokens(mode):
    """The bookkeeping itself, after every step: sampled tokens counted at once, then confirmed (async: two steps in
    flight, and the outputs equal one step at a time), or swapped when a beam keeps another candidate than the one
    it sampled (beam search)."""
    from pagellm.core.beam_search import BeamSearchPolicy
    from pagellm.sampling_params import BeamSearchParams

    results = []
    for overlap in ((True, False) if mode == "async sampling" else (False,)):
        llm = make(overlap, max_num_seqs=8)
        engine = llm.llm_engine
        batch = engine.executor.runner.batch
        if mode == "beam search":
            params = BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True, repetition_penalty=1.5,
                                      frequency_penalty=0.3)
            engine.add_request("b", {"prompt_token_ids": list(range(40, 60))}, params.sampling_params(6),
                               policy=BeamSearchPolicy(beam_width=3, num_eos=0))
        else:
            for i in range(5):
                engine.add_request(str(i), PROMPTS[i], SamplingParams(temperature=0.8, seed=i, max_tokens=10 + i,
                                                                      frequency_penalty=0.7, presence_penalty=0.2))
        steps, outs = 0, {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: [c.token_ids for c in o.outputs] for o in engine.step() if o.finished})
            check_penalty_counts(batch)
            steps += 1
        assert steps > 10 and batch.output_counts is not None
        assert_all_free(llm)
        results.append(outs)
    if mode == "async sampling":
        assert results[0] == results[1]


def test_bad_words_of_several_tokens_run_one_step_at_a_time():
    """A banned word of several tokens is judged on the last tokens on the host: while such a request lives no step
    is scheduled ahead, and every output equals the one-step-at-a-time run's."""
    params = [SamplingParams(temperature=0, max_tokens=10, bad_words=["the king", "my good lord"],
                             ignore_eos=True)] + PARAMS[1:4]
    results = []
    for mode in (False, True):
        llm = make(mode)
        engine = llm.llm_engine
        for i, (p, sp) in enumerate(zip(PROMPTS[:4], params)):
            engine.add_request(str(i), p, sp)
        outs = {}
        while engine.has_unfinished_requests():
            if "0" in engine.scheduler.requests:
                assert len(engine.core._in_flight) == 0  # stepped one at a time while request 0 lives
            outs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        results.append(outs)
        assert_all_free(llm)
        if mode:
            assert engine.scheduler.can_schedule_ahead()
    assert results[0] == results[1]


def test_beam_search_under_async_scheduling_matches():
    from pagellm.sampling_params import BeamSearchParams

    outs = []
    for mode in (False, True):
        llm = make(mode)
        res = llm.beam_search(PROMPTS[:2], BeamSearchParams(beam_width=3, max_tokens=6), use_tqdm=False)
        outs.append([[s.tokens for s in r.sequences] for r in res])
        assert_all_free(llm)
    assert outs[0] == outs[1]


def test_failed_step_while_another_is_in_flight(monkeypatch):
    llm = make(True)
    engine = llm.llm_engine
    fail_nth_call(monkeypatch, engine.executor.runner, "execute_model_async", 4)
    engine.add_request("a", PROMPTS[0], PARAMS[0])
    failed = []
    while engine.has_unfinished_requests():
        failed += [o for o in engine.step() if o.error]
    assert [o.request_id for o in failed] == ["a"]
    assert_all_free(llm)
    monkeypatch.undo()
    out = generate(llm, [PROMPTS[1]], [PARAMS[1]])[0]
    assert out.outputs[0].token_ids == hf_results()[1][0]
    assert_all_free(llm)


def test_scheduler_counts_placeholders():
    """Scheduled twice without results: the second step computes the placeholder token; a sequence whose token in
    flight is its last is not scheduled again."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                                      async_scheduling=True), block_size=4, num_blocks=32, enable_prefix_caching=False)
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=5), 0.0)
    b = Request("b", [4, 5], SamplingParams(max_tokens=1), 0.0)
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()
    assert first.num_scheduled_tokens == {a.seqs[0].seq_id: 3, b.seqs[0].seq_id: 2}
    assert first.sampling_seq_ids == [a.seqs[0].seq_id, b.seqs[0].seq_id]
    second = sched.schedule()  # before the first step's results
    assert second.num_scheduled_tokens == {a.seqs[0].seq_id: 1}  # b's only token is in flight
    assert a.seqs[0].num_output_placeholders == 2 and a.seqs[0].num_computed_tokens == 4
    from pagellm.core.sched_output import ModelRunnerOutput, SampleResult

    out = ModelRunnerOutput({a.seqs[0].seq_id: SampleResult(7, -0.1), b.seqs[0].seq_id: SampleResult(8, -0.2)})
    updates = sched.update_from_output(first, out)
    assert {u.request_id: u.finished for u in updates} == {"a": False, "b": True}
    assert a.seqs[0].token_ids == [1, 2, 3, 7] and a.seqs[0].num_output_placeholders == 1
    third = sched.schedule()  # computes the second step's placeholder (7 is now known, the next one is not)
    assert third.num_scheduled_tokens == {a.seqs[0].seq_id: 1} and a.seqs[0].num_output_placeholders == 2


def test_default_and_flags():
    assert EngineArgs(model=DEMO).create_engine_config().scheduler.async_scheduling is False  # CPU
    assert EngineArgs(model=DEMO, async_scheduling=True).create_engine_config().scheduler.async_scheduling is True
    with pytest.raises(ValueError, match="async_scheduling needs tensor_parallel_size=1"):
        EngineArgs(model=DEMO, async_scheduling=True, tensor_parallel_size=2).create_engine_config()
    import argparse

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert parser.parse_args([DEMO]).async_scheduling is None
    assert parser.parse_args([DEMO, "--async-scheduling"]).async_scheduling is True
    assert parser.parse_args([DEMO, "--no-async-scheduling"]).async_scheduling is False


@pytest.mark.parametrize("scenario", [0, 2, 4, 5])  # mixes under which sequences get preempted
def test_random_mixes_match_one_step_at_a_time(scenario):
    """Random request mixes (lengths, n, seeds, stops, logprobs, prompt logprobs, shared prefixes, the odd penalty
    request) on a small KV cache with chunked prefill, added while the engine runs: async scheduling gives the
    same outputs as one step at a time, and frees every block."""
    import random

    rng = random.Random(scenario)
    base = "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    reqs = []
    for _ in range(14):
        prompt = base[:rng.randrange(4, len(base))] if rng.random() < 0.5 else rng.choice(PROMPTS) * rng.randint(1, 4)
        kw = dict(max_tokens=rng.randint(1, 24), seed=rng.randrange(1000), logprobs=rng.choice([None, 0, 2]),
                  temperature=rng.choice([0.0, 0.7, 1.0]), n=rng.choice([1, 1, 1, 2]))
        if rng.random() < 0.2:
            kw["stop"] = [rng.choice(["e", "th", "\n"])]
        if rng.random() < 0.15:
            kw["prompt_logprobs"] = 1
        if rng.random() < 0.1:
            kw["presence_penalty"] = 0.5
        if rng.random() < 0.3:
            kw["ignore_eos"] = True
        reqs.append((prompt, SamplingParams(**kw), rng.randint(0, 6)))  # (prompt, params, steps before adding it)
    results = []
    for mode in (False, True):
        llm = make(mode, max_num_seqs=5, num_gpu_blocks_override=24, block_size=4, max_num_batched_tokens=24)
        engine = llm.llm_engine
        done = {}
        for i, (prompt, params, wait) in enumerate(reqs):
            for _ in range(wait):
                done.update({o.request_id: o for o in engine.step() if o.finished})
            engine.add_request(str(i), prompt, params)
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        results.append({rid: ([(c.text, c.token_ids, c.finish_reason, c.logprobs and [sorted(d) for d in c.logprobs])
                               for c in o.outputs],
                              o.prompt_logprobs and [d and sorted(d) for d in o.prompt_logprobs],
                              [c.cumulative_logprob for c in o.outputs])
                        for rid, o in done.items()})
        assert_all_free(llm)
        if mode:
            assert overlapped(llm) > 0
            assert engine.get_stats().num_preemptions > 0
    # Steps group sequences differently in the two modes, so float sums may round differently in the last digits:
    # logprobs within 1e-3, everything else exactly.
    sync, asynchronous = results
    assert sorted(sync) == sorted(asynchronous) and len(sync) == len(reqs)
    for rid in sync:
        assert asynchronous[rid][:2] == sync[rid][:2]
        assert max(abs(a - b) for a, b in zip(asynchronous[rid][2], sync[rid][2])) < 1e-3


def test_grammars_overlap_with_deferred_masks_and_match_one_step_at_a_time():
    """A constrained sequence's next mask depends on its token in flight: the step is launched without sampling and
    sampled once the masks arrive. JSON, regex, choice and EBNF outputs (greedy and sampled, n > 1, beside plain
    requests) stay in their languages and equal the one-step-at-a-time outputs."""
    from tests.engine.test_structured_outputs import SPECS, check

    kinds = list(SPECS)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, n=1 + i % 2, max_tokens=300,
                             structured_outputs=SPECS[kind]) for i, kind in enumerate(kinds)]
    prompts = PROMPTS[:len(kinds)] + PROMPTS[:2]
    params += PARAMS[:2]  # unconstrained neighbours
    results = []
    for mode in (False, True):
        llm = make(mode, max_num_seqs=6, num_gpu_blocks_override=1024)
        executor = llm.llm_engine.executor
        finish, deferred = executor.finish_sampling, []
        executor.finish_sampling = lambda pending, mask, finish=finish, deferred=deferred: (
            deferred.append(len(mask)), finish(pending, mask))
        outs = generate(llm, prompts, params)
        results.append([(c.text, c.token_ids, c.finish_reason) for o in outs for c in o.outputs])
        for kind, o in zip(kinds, outs):
            for c in o.outputs:
                check(kind, c.text)
        assert_all_free(llm)
        if mode:
            assert overlapped(llm) > 20 and len(deferred) > 20  # masks sent after the step was launched
        else:
            assert not deferred
    assert results[1] == results[0]
