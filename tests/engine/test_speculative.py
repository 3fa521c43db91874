"""Speculative decoding (speculative_config, method ngram): a decoding sequence computes its last token and the
draft tokens the n-gram proposer found, and keeps the samples up to the first that differs from a draft.

The oracles: Hugging Face greedy output for greedy requests, and the same engine without speculation for
everything else (a sampled token's random draw depends only on the request's seed and the token's output index,
and a position's sample is kept only when every draft before it was the token sampled there, so both must give
the same tokens, logprobs, texts and finish reasons). Every test checks that drafts were accepted (or, where a
request rules them out, that none were checked) and that every KV block is free at the end.
"""

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.arg_utils import EngineArgs
from tests.engine.test_async_scheduling import assert_all_free, tokens_and_logprobs
from tests.engine.test_multi_step import MIXED, assert_same_outputs, summary
from tests.worker.test_cuda_graphs import DEMO, PROMPTS, assert_same

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
LONG = [SamplingParams(temperature=0, max_tokens=30 + 4 * i, ignore_eos=True, logprobs=1) for i in range(len(PROMPTS))]


def make(spec=SPEC, **kw):
    kw.setdefault("max_num_seqs", 4)  # fewer rows than prompts: requests join and leave between steps
    kw.setdefault("async_scheduling", False)
    return LLM(DEMO, speculative_config=spec, seed=0, **kw)


def generate(llm, params, prompts=PROMPTS):
    return llm.generate(prompts, params, use_tqdm=False)


def accepted(llm):
    return llm.llm_engine.get_stats().spec_num_accepted_tokens


def hf_long_outputs():
    """Hugging Face's greedy tokens and logprobs for PROMPTS under LONG (the demo model)."""
    from transformers import AutoTokenizer

    from tests.hf_reference import hf_greedy

    tok = AutoTokenizer.from_pretrained(DEMO)
    return [hf_greedy(DEMO, tok(p)["input_ids"], sp.max_tokens) for p, sp in zip(PROMPTS, LONG)]


@pytest.fixture(scope="module")
def hf_long():
    return hf_long_outputs()


@pytest.mark.parametrize("backend", ["torch_ref", "cpu_paged"])
def test_greedy_output_equals_hf(backend, hf_long):
    llm = make(attention_backend=backend)
    got = tokens_and_logprobs(generate(llm, LONG))
    assert_same(hf_long, got)
    stats, counters = llm.llm_engine.get_stats(), llm.llm_engine.stats
    assert stats.spec_num_accepted_tokens > 20 and stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens
    assert counters.generation_tokens == sum(sp.max_tokens for sp in LONG)
    assert_all_free(llm)


def test_sampling_stops_and_parallel_samples_match_plain_decoding():
    """Seeded sampling with top-p / top-k / min-p, logprobs, stop token ids, stop strings (a step's accepted
    tokens running past a stop are dropped), n / best_of, streamed (DELTA) outputs, min_tokens, logit bias."""
    params = MIXED + [
        SamplingParams(temperature=0.8, seed=7, max_tokens=40, min_tokens=12, stop_token_ids=[203, 294, 18]),
        SamplingParams(temperature=0.6, seed=8, max_tokens=35, logit_bias={203: -5.0, 18: 3.0}, logprobs=3),
        SamplingParams(temperature=0, max_tokens=45, stop=[" the"], include_stop_str_in_output=True),
    ]
    prompts = (PROMPTS * 2)[:len(params)]
    ref = summary(generate(make(None), params, prompts))
    llm = make()
    assert_same_outputs(summary(generate(llm, params, prompts)), ref)
    assert accepted(llm) > 10
    assert_all_free(llm)


def test_penalized_requests_speculate_with_the_same_outputs():
    """Presence, frequency and repetition penalties: each position's penalties count the drafts before it, so the
    kept tokens are plain decoding's (greedy too: the penalties move the argmax), and so are the processed
    logprobs, which show the penalties even where they do not change the token."""
    frequency, presence, repetition = (0.4, 0.0, 0.0, 0.3), (0.0, 0.3, 0.0, 0.2), (1.0, 1.0, 1.1, 1.05)
    params = [SamplingParams(temperature=0.8 if i % 2 else 0.0, seed=i, max_tokens=40, ignore_eos=True, logprobs=1,
                             logprobs_mode="processed_logprobs", frequency_penalty=frequency[i % 4],
                             presence_penalty=presence[i % 4], repetition_penalty=repetition[i % 4])
              for i in range(len(PROMPTS))]
    llm = make()
    assert_same_outputs(summary(generate(llm, params)), summary(generate(make(None), params)))
    assert accepted(llm) > 5
    assert_all_free(llm)


def test_a_short_pool_preempts_and_recomputes_with_the_same_results():
    """Few KV blocks: a sequence whose drafts the pool cannot hold decodes one token, requests are preempted and
    recomputed, and the outputs are still those of plain decoding."""
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=60, ignore_eos=True)
    ref = summary(generate(make(None, num_gpu_blocks_override=14, block_size=8), params))
    llm = make(num_gpu_blocks_override=14, block_size=8)
    assert_same_outputs(summary(generate(llm, params)), ref)
    assert llm.llm_engine.get_stats().num_preemptions > 0 and accepted(llm) > 0
    assert_all_free(llm)


def test_drafts_stop_at_max_model_len():
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    outs = [generate(make(spec, max_model_len=40), params) for spec in (None, SPEC)]
    assert_same_outputs(summary(outs[1]), summary(outs[0]))
    assert all(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 40 for o in outs[1])


def test_abort_mid_generation_frees_every_block():
    llm = make()
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(12):
        engine.step()
    assert accepted(llm) > 0
    engine.abort_request([str(i) for i in range(len(PROMPTS))])
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_free(llm)


def test_async_scheduling_steps_one_at_a_time_while_a_request_speculates():
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=30, ignore_eos=True) for i in range(len(PROMPTS))]
    ref = summary(generate(make(None, async_scheduling=True), params))
    llm = make(async_scheduling=True)
    assert_same_outputs(summary(generate(llm, params)), ref)
    assert accepted(llm) > 0 and llm.llm_engine.stats.overlapped_steps == 0
    # constrained requests do not speculate: they overlap steps as usual
    from pagellm.sampling_params import StructuredOutputsParams

    constrained = [p.clone(structured_outputs=StructuredOutputsParams(regex="[a-z ]{20,40}")) for p in params]
    generate(llm, constrained)
    assert llm.llm_engine.stats.overlapped_steps > 20
    assert_all_free(llm)


def test_emulated_cuda_graphs_run_speculative_steps_eagerly(monkeypatch, hf_long):
    """The GPU path: decode batches without drafts replay the graphs, steps with drafts (several query tokens per
    sequence) run eagerly, and the greedy output is still Hugging Face's."""
    monkeypatch.setenv("PAGELLM_EMULATE_CUDA_GRAPHS", "1")
    llm = make(attention_backend="torch_ref", max_num_seqs=6)
    got = tokens_and_logprobs(generate(llm, LONG))
    assert_same(hf_long, got)
    assert accepted(llm) > 20 and sum(llm.llm_engine.executor.runner.graphs.replays.values()) > 0
    assert_all_free(llm)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "mistral", "mixtral", "stablelm"])
def test_every_kind_of_model_gives_the_same_tokens(tiny_models, arch):
    """Learned positions (gpt2), sliding windows whose blocks are released as sequences move on (gemma2, mistral),
    MoE layers (mixtral), the transformers fallback (stablelm). Prompts that repeat themselves, so drafts agree."""
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": list(range(10 + 7 * i, 20 + 7 * i)) * 3} for i in range(5)]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outs = []
    for spec in (None, SPEC):
        llm = LLM(tiny_models[arch], speculative_config=spec, max_num_seqs=3, num_gpu_blocks_override=64,
                  block_size=8)
        outs.append(summary(generate(llm, params, prompts)) + summary(generate(llm, greedy, prompts)))
        assert (accepted(llm) > 0) == (spec is not None)
        assert_all_free(llm)
    assert_same_outputs(outs[1], outs[0])


def test_shared_prompt_prefixes_are_cached_and_reused():
    prefix = " ".join(PROMPTS) * 2
    prompts = [prefix + tail for tail in (" ROMEO.", " JULIET.", " Enter", " Exit")]
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=40, ignore_eos=True)
    outs, hits = [], []
    for spec in (None, SPEC):
        llm = make(spec, max_num_seqs=2, block_size=8)
        outs.append(summary(generate(llm, params, prompts)))
        hits.append(llm.llm_engine.get_stats().prefix_cache_hits)
        assert_all_free(llm)
    assert_same_outputs(outs[1], outs[0])
    assert hits[1] == hits[0] > 0


def test_blocks_filled_by_kept_drafts_are_cached_even_when_the_request_ends():
    """A conversation's next turn (prompt, reply, more) finds every full block of the first turn cached, as without
    speculation: the blocks that kept drafts filled enter the prefix cache with the verdict, not with the next
    step, which a finished request never has."""
    cached = []
    for spec in (None, SPEC):
        llm = make(spec, block_size=4)
        firsts = generate(llm, SamplingParams(temperature=0, max_tokens=37, ignore_eos=True))
        turns = [{"prompt_token_ids": list(o.prompt_token_ids) + list(o.outputs[0].token_ids) + [5, 6]}
                 for o in firsts]
        cached.append([o.num_cached_tokens for o in llm.generate(turns, SamplingParams(max_tokens=1),
                                                                   use_tqdm=False)])
        if spec is not None:
            assert accepted(llm) > 20
    # computed by the first turn: the prompt and 36 of the 37 tokens; cached: its full blocks
    assert cached[1] == cached[0] == [(len(o.prompt_token_ids) + 36) // 4 * 4 for o in firsts]


def test_steps_with_drafts_yield_several_tokens():
    """The point of it: text that repeats itself (this small model's greedy output falls into a loop of lines)
    needs far fewer steps than tokens, for the same tokens."""
    params = SamplingParams(temperature=0, max_tokens=100)
    runs = []
    for spec in (None, SPEC):
        llm = make(spec)
        out = generate(llm, params, ["My lord,"])[0]
        runs.append((llm.llm_engine.stats.num_steps, out.outputs[0].token_ids))
    assert runs[1][1] == runs[0][1] and len(runs[0][1]) == 100
    assert runs[0][0] == 100 and runs[1][0] < 60


@pytest.mark.parametrize("spec, match", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be 'ngram'"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min .4. must be"),
    ({"num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max must be a positive integer"),
    ({"num_speculative_tokens": 2, "model": "draft"}, "speculative_config.model: model directory 'draft' does not"),
    ({"num_speculative_tokens": 2, "drafter": "x"}, "unknown fields \\['drafter'\\]"),
    ({"num_speculative_tokens": 2, "disable_by_batch_size": 1}, "disable_by_batch_size must be an integer >= 2"),
    ("ngram", "must be a dict"),
])
def test_bad_speculative_config(spec, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(model=DEMO, speculative_config=spec).create_engine_config()


def test_speculative_config_defaults_as_vllm():
    def spec(**kw):
        return EngineArgs(model=DEMO, speculative_config=kw).create_engine_config().scheduler.speculative

    s = spec(num_speculative_tokens=3)
    assert (s.num_speculative_tokens, s.prompt_lookup_min, s.prompt_lookup_max) == (3, 5, 5)
    s = spec(num_speculative_tokens=3, prompt_lookup_max=4)
    assert (s.method, s.prompt_lookup_min, s.prompt_lookup_max) == ("ngram", 4, 4)
    s = spec(method="[ngram]", num_speculative_tokens=3, prompt_lookup_min=2)
    assert (s.method, s.prompt_lookup_min, s.prompt_lookup_max) == ("ngram", 2, 2)


def test_disable_by_batch_size_drafts_only_in_small_batches():
    """disable_by_batch_size 2 with four requests: no drafts while more than two run; the long request speculates
    once the short ones are done. The outputs are plain decoding's."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 6, 6, 60)]
    llm = make({**SPEC, "disable_by_batch_size": 2})
    sched = llm.llm_engine.scheduler
    running_when_drafting = []
    speculate = sched._speculate

    def spy(seq, plan):
        drafted = speculate(seq, plan)
        if drafted:
            running_when_drafting.append(len(sched.running))
        return drafted

    sched._speculate = spy
    got = summary(generate(llm, params, PROMPTS[:4]))
    assert running_when_drafting and max(running_when_drafting) <= 2
    assert accepted(llm) > 0
    assert_same_outputs(got, summary(generate(make(None), params, PROMPTS[:4])))


def test_requests_that_do_not_speculate_share_batches_with_those_that_do():
    """One engine, one batch: greedy and seeded requests that speculate beside a JSON-schema request (its grammar
    mask goes to its own sampling row among the drafts' rows), a prompt_logprobs request, a penalized one and
    beam search (which keeps the engine at one step at a time too); a small token budget caps the drafts and chunks
    the long prompt. Every output equals plain decoding's."""
    import json

    from pagellm import BeamSearchParams
    from pagellm.sampling_params import StructuredOutputsParams
    from tests.engine.test_structured_outputs import PERSON, check

    params = [
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=StructuredOutputsParams(json=PERSON)),
        SamplingParams(temperature=0.8, seed=3, max_tokens=50, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=20, prompt_logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=4, max_tokens=30, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
    ]
    prompts = ["My lord,", "ROMEO. ", "To be, or not to be", " ".join(PROMPTS) * 3, "Now is the winter",
               "Is this a dagger"]
    results = []
    for spec in (None, SPEC):
        llm = make(spec, max_num_seqs=8, max_num_batched_tokens=40)
        engine = llm.llm_engine
        beams = llm.beam_search(["O Romeo"], BeamSearchParams(beam_width=2, max_tokens=8), use_tqdm=False)
        outs = generate(llm, params, prompts)
        prompt_lps = [round(next(iter(d.values())).logprob, 3) for d in outs[3].prompt_logprobs[1:]]
        results.append((summary(outs), prompt_lps, [[s.tokens for s in b.sequences] for b in beams]))
        check("person", outs[1].outputs[0].text)
        json.loads(outs[1].outputs[0].text)
        assert_all_free(llm)
        if spec is not None:
            assert engine.get_stats().spec_num_accepted_tokens > 10
    assert_same_outputs(results[1][0], results[0][0])
    assert results[1][1:] == results[0][1:]
