"""Multi-step decode (num_scheduler_steps=K): decoding sequences get up to K tokens per scheduling round,
computed one per device step on the device, each step fed the tokens the one before sampled.

The oracles: Hugging Face greedy output for greedy requests, and the same engine one step per round for
everything else (a seeded token's random draw depends only on the request's seed and the token's index, so
both schedules must give the same tokens, logprobs, texts and finish reasons). Every test checks that the
rounds really ran several device steps (or, where a request rules them out, that none did), and that every
KV block is free at the end.
"""

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.arg_utils import EngineArgs
from pagellm.sampling_params import RequestOutputKind
from tests.engine.test_async_scheduling import assert_all_free, tokens_and_logprobs
from tests.worker.test_cuda_graphs import DEMO, PARAMS, PROMPTS, assert_same, hf_results


def make(steps, async_scheduling=False, **kw):
    kw.setdefault("max_num_seqs", 4)  # fewer rows than prompts: requests join and leave between rounds
    return LLM(DEMO, num_scheduler_steps=steps, async_scheduling=async_scheduling, seed=0, **kw)


def generate(llm, params, prompts=PROMPTS):
    return llm.generate(prompts, params, use_tqdm=False)


def extra_device_steps(llm):
    stats = llm.llm_engine.stats
    return stats.device_steps - stats.num_steps


def summary(outs):
    """Everything a user sees of each completion (cumulative logprob and logprobs last, compared with a tolerance:
    a different batch composition changes the logits in their last bits)."""
    return [(o.request_id, c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason, c.cumulative_logprob or 0.0,
             [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)] if c.logprobs else [])
            for o in outs for c in o.outputs]


def assert_same_outputs(got, ref, tol=1e-3):
    assert [g[:6] for g in got] == [r[:6] for r in ref]
    for g, r in zip(got, ref):
        assert g[6] == pytest.approx(r[6], abs=tol) and g[7] == pytest.approx(r[7], abs=tol)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("backend", ["torch_ref", "cpu_paged"])
def test_greedy_output_equals_hf(backend, async_scheduling):
    llm = make(4, async_scheduling, attention_backend=backend)
    got = tokens_and_logprobs(generate(llm, PARAMS))
    assert_same(hf_results(), got)
    assert extra_device_steps(llm) > 20
    assert_all_free(llm)


MIXED = [
    SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=37, logprobs=2),
    SamplingParams(temperature=1.0, seed=2, max_tokens=40, stop_token_ids=[203, 294]),
    SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=33, stop=["e", "th"]),
    SamplingParams(temperature=0.9, seed=4, max_tokens=20, n=2, best_of=3),
    SamplingParams(temperature=0, max_tokens=29, ignore_eos=True, output_kind=RequestOutputKind.DELTA),
    SamplingParams(temperature=1.0, seed=6, min_p=0.05, max_tokens=50),
    SamplingParams(temperature=0, max_tokens=3),
]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("steps", [3, 8])
def test_sampling_stops_and_parallel_samples_match_one_step_per_round(steps, async_scheduling):
    """Seeded sampling with top-p / top-k / min-p, logprobs, stop token ids (stopping mid-round drops the tokens
    computed past the stop), stop strings, n / best_of and streamed (DELTA) outputs."""
    ref_llm = make(1, async_scheduling)
    ref = summary(generate(ref_llm, MIXED))
    llm = make(steps, async_scheduling)
    assert_same_outputs(summary(generate(llm, MIXED)), ref)
    assert extra_device_steps(ref_llm) == 0 and extra_device_steps(llm) > 20
    assert_all_free(llm)


def test_streamed_outputs_match_one_step_per_round():
    """Streaming through the engine: the text delivered piece by piece adds up to the same text, a stop string
    that a round's tokens run past included."""
    texts = []
    for steps in (1, 4):
        llm = make(steps)
        engine = llm.llm_engine
        for i, p in enumerate(PROMPTS[:3]):
            params = SamplingParams(temperature=0.9, seed=i, max_tokens=25, stop=["th"] if i else [],
                                    output_kind=RequestOutputKind.DELTA)
            engine.add_request(str(i), p, params)
        pieces, reasons = {}, {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                pieces[out.request_id] = pieces.get(out.request_id, "") + "".join(c.text for c in out.outputs)
                if out.finished:
                    reasons[out.request_id] = out.outputs[0].stop_reason
        texts.append((pieces, reasons))
        assert_all_free(llm)
    assert texts[1] == texts[0]
    assert list(texts[0][1].values()).count("th") == 2


@pytest.mark.parametrize("async_scheduling, graphs", [(False, False), (True, False), (True, True)])
def test_penalties_count_every_step_of_a_round(async_scheduling, graphs, monkeypatch):
    """Presence, frequency and repetition penalties read the counts of the tokens generated so far: each step of a
    round counts its tokens on the device before the next samples (rows past their count add nothing), so the
    tokens are those of one step per round (with emulated CUDA graphs too: the GPU path)."""
    if graphs:
        monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    frequency, presence, repetition = (0.9, 0.0, 0.0, 1.5), (0.0, 0.8, 0.0, 0.5), (1.0, 1.0, 1.4, 1.2)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=30 + 7 * i, ignore_eos=True, logprobs=1,
                             frequency_penalty=frequency[i % 4], presence_penalty=presence[i % 4],
                             repetition_penalty=repetition[i % 4])
              for i in range(len(PROMPTS))]
    ref = summary(generate(make(1, async_scheduling), params))
    llm = make(8, async_scheduling)
    assert_same_outputs(summary(generate(llm, params)), ref)
    assert extra_device_steps(llm) > 20
    assert_all_free(llm)
    greedy = [p.clone(temperature=0.0) for p in params]  # the penalties change the argmax too
    assert_same_outputs(summary(generate(make(8, async_scheduling), greedy)),
                        summary(generate(make(1, async_scheduling), greedy)))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_min_tokens_bans_stops_by_each_steps_output_length(async_scheduling):
    """min_tokens bans EOS and the stop tokens until the output is that long: each step of a round bans by its own
    output length, so a stop token can end a sequence mid-round right after min_tokens, as with one step per
    round."""
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=40, stop_token_ids=[203, 294, 18],
                             min_tokens=(0, 3, 9, 14)[i % 4], bad_words=["the"] if i == 2 else None)
              for i in range(len(PROMPTS))]
    ref = summary(generate(make(1, async_scheduling), params))
    llm = make(6, async_scheduling)
    got = summary(generate(llm, params))
    assert_same_outputs(got, ref)
    assert extra_device_steps(llm) > 5
    stopped = [len(g[2]) for g in got if g[4] == "stop"]
    assert stopped and all(n >= 3 for n in stopped)
    assert_all_free(llm)


def test_rounds_stop_at_max_model_len():
    """Sequences that run into max_model_len: a round never computes past it, outputs as one step per round."""
    params = SamplingParams(temperature=0.5, seed=9, max_tokens=None, ignore_eos=True)
    outs = [generate(make(steps, max_model_len=40), params) for steps in (1, 8)]
    assert_same_outputs(summary(outs[1]), summary(outs[0]))
    assert {c.finish_reason for o in outs[1] for c in o.outputs} == {"length"}
    assert all(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 40 for o in outs[1])


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_short_pool_preempts_and_recomputes_with_the_same_results(async_scheduling):
    """Few KV blocks: rounds allocate what they can (a sequence the pool cannot grow decodes one token, and with a
    penalty counts only that token), requests are preempted and recomputed, and the outputs are still those of
    one step per round."""
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=60, ignore_eos=True, frequency_penalty=1.0)
    ref = summary(generate(make(1, async_scheduling, num_gpu_blocks_override=14, block_size=8), params))
    llm = make(8, async_scheduling, num_gpu_blocks_override=14, block_size=8)
    assert_same_outputs(summary(generate(llm, params)), ref)
    assert llm.llm_engine.get_stats().num_preemptions > 0
    assert extra_device_steps(llm) > 0
    assert_all_free(llm)


def test_abort_mid_round_frees_every_block():
    llm = make(8, True)
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(temperature=0.8, seed=i, max_tokens=200, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert extra_device_steps(llm) > 0
    engine.abort_request([str(i) for i in range(len(PROMPTS))])
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_free(llm)
    out = generate(llm, SamplingParams(temperature=0, max_tokens=5), PROMPTS[:1])[0]
    assert len(out.outputs[0].token_ids) == 5


def test_emulated_cuda_graphs_replay_every_step_of_a_round(monkeypatch):
    """The GPU path: each step of a round replays the decode graph on its static buffers (positions, slots and
    context lengths rewritten on the device, input tokens the previous step's samples)."""
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    llm = make(4, True, attention_backend="torch_ref", max_num_seqs=6)
    got = tokens_and_logprobs(generate(llm, PARAMS))
    assert_same(hf_results(), got)
    replays = sum(llm.llm_engine.executor.runner.graphs.replays.values())
    assert extra_device_steps(llm) > 10 and replays > extra_device_steps(llm)
    assert_all_free(llm)


@pytest.mark.parametrize("value", [0, -2])
def test_bad_num_scheduler_steps(value):
    with pytest.raises(ValueError, match="num_scheduler_steps must be a positive integer"):
        EngineArgs(model=DEMO, num_scheduler_steps=value).create_engine_config()


def test_multi_step_needs_one_rank():
    with pytest.raises(ValueError, match="num_scheduler_steps > 1 needs tensor_parallel_size=1"):
        EngineArgs(model=DEMO, num_scheduler_steps=4, tensor_parallel_size=2).create_engine_config()


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "mistral", "mixtral", "stablelm"])
def test_every_kind_of_model_gives_the_same_tokens(tiny_models, arch):
    """Other layouts under multi-step rounds: learned positions (gpt2), sliding windows whose blocks are released
    as a round moves on (gemma2, mistral), MoE layers (mixtral), the transformers fallback (stablelm)."""
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": list(range(10 + 7 * i, 30 + 11 * i))} for i in range(5)]
    outs = []
    for steps in (1, 5):
        llm = LLM(tiny_models[arch], num_scheduler_steps=steps, max_num_seqs=3, num_gpu_blocks_override=64,
                  block_size=8)
        outs.append(summary(generate(llm, params, prompts)))
        assert (extra_device_steps(llm) > 10) == (steps > 1)
        assert_all_free(llm)
    assert_same_outputs(outs[1], outs[0])


def test_beam_search_runs_one_step_at_a_time_under_rounds():
    """Beam search needs its tokens on the host every step: its requests run with rounds of one step, and the
    beams equal those of an engine that never runs multi-step rounds."""
    from pagellm import BeamSearchParams

    params = BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True)
    beams = []
    for steps in (1, 6):
        llm = make(steps, max_num_seqs=8)
        outs = llm.beam_search(PROMPTS[:2], params, use_tqdm=False)
        beams.append([[(s.tokens, round(s.cum_logprob, 4)) for s in o.sequences] for o in outs])
        assert extra_device_steps(llm) == 0
        assert_all_free(llm)
    assert beams[1] == beams[0]


def test_shared_prompt_prefixes_are_cached_and_reused_under_rounds():
    """Requests sharing a long prompt prefix: the prefix cache serves it (blocks filled by rounds are hashed once
    their tokens are known), and the outputs are those of one step per round."""
    prefix = " ".join(PROMPTS) * 2
    prompts = [prefix + tail for tail in (" ROMEO.", " JULIET.", " Enter", " Exit")]
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=40, ignore_eos=True)
    outs, hits = [], []
    for steps in (1, 8):
        llm = make(steps, max_num_seqs=2, block_size=8)
        outs.append(summary(generate(llm, params, prompts)))
        hits.append(llm.llm_engine.get_stats().prefix_cache_hits)
        assert_all_free(llm)
    assert_same_outputs(outs[1], outs[0])
    assert hits[1] == hits[0] > 0
