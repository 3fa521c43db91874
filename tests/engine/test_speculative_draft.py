"""Speculative decoding with a draft model (speculative_config {"model": DIR}, method draft_model): the draft
model proposes k tokens greedily, one pass per token, from its own paged KV cache (kept in step with the
target's), and the target checks them in one step.

The oracles are those of tests/engine/test_speculative.py: Hugging Face greedy output, and the same engine
without speculation for everything else. Two drafts: the demo model cut to its first 2 layers (it agrees with
the target on some tokens: partial acceptance), and the demo model itself, which must agree on every greedy
draft when its cache holds what the target's holds (after prefix-cache hits, copy-on-write and preemption too):
a draft cache that went out of step would show as rejected drafts.
"""

import json
import os
import shutil

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.arg_utils import EngineArgs
from tests.engine.test_async_scheduling import assert_all_free, tokens_and_logprobs
from tests.engine.test_multi_step import MIXED, assert_same_outputs, summary
from tests.engine.test_speculative import LONG, accepted, generate, hf_long_outputs
from tests.worker.test_cuda_graphs import DEMO, PROMPTS, assert_same


@pytest.fixture(scope="module")
def draft2(tmp_path_factory) -> str:
    """The demo model's first 2 of 6 layers, with its embeddings, final norm, LM head and tokenizer."""
    from safetensors.torch import load_file, save_file

    out = str(tmp_path_factory.mktemp("draft2"))
    for f in os.listdir(DEMO):
        if f not in ("model.safetensors", "config.json"):
            shutil.copy(os.path.join(DEMO, f), out)
    with open(os.path.join(DEMO, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 2
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    weights = load_file(os.path.join(DEMO, "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2},
              os.path.join(out, "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def hf_long():
    return hf_long_outputs()


def spec(draft, k=4):
    return {"model": draft, "num_speculative_tokens": k}


def make(draft=None, k=4, **kw):
    kw.setdefault("max_num_seqs", 4)  # fewer rows than prompts: requests join and leave between steps
    kw.setdefault("async_scheduling", False)
    return LLM(DEMO, speculative_config=spec(draft, k) if draft else None, seed=0, **kw)


def acceptance(llm):
    s = llm.llm_engine.get_stats()
    return s.spec_num_accepted_tokens / max(s.spec_num_draft_tokens, 1)


@pytest.mark.parametrize("backend", ["torch_ref", "cpu_paged"])
def test_greedy_output_equals_hf(backend, draft2, hf_long):
    llm = make(draft2, attention_backend=backend)
    assert_same(hf_long, tokens_and_logprobs(generate(llm, LONG)))
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_accepted_tokens > 10 and stats.spec_num_draft_tokens > 2 * stats.spec_num_accepted_tokens
    assert llm.llm_engine.stats.generation_tokens == sum(sp.max_tokens for sp in LONG)
    assert_all_free(llm)


def test_the_model_as_its_own_draft_agrees_on_every_greedy_token(hf_long):
    """The draft cache holds exactly what the target's does, so the draft's greedy tokens are the target's: each
    step yields k + 1 tokens (the steps are those of the tokens over k + 1, sequence by sequence)."""
    llm = make(DEMO, k=3)
    assert_same(hf_long, tokens_and_logprobs(generate(llm, LONG)))
    assert acceptance(llm) == 1.0
    assert_all_free(llm)


def test_tensor_parallel_target_with_a_whole_draft_on_every_rank(draft2, hf_long):
    """TP=2: each rank runs the unsharded draft on the same batch, rank 0's proposals broadcast; greedy output
    still equals transformers, and the model as its own draft still agrees on every token (both ranks' draft
    caches in step)."""
    with make(draft2, tensor_parallel_size=2) as llm:
        assert_same(hf_long, tokens_and_logprobs(generate(llm, LONG)))
        assert accepted(llm) > 10
    with make(DEMO, k=3, tensor_parallel_size=2) as llm:
        assert_same(hf_long, tokens_and_logprobs(generate(llm, LONG)))
        assert acceptance(llm) == 1.0


def test_sampling_stops_and_parallel_samples_match_plain_decoding(draft2):
    """Seeded sampling with top-p / top-k / min-p, logprobs, stop token ids and strings, n / best_of, streamed
    outputs, min_tokens, logit bias, penalties: the draft only decides how many tokens a step keeps."""
    params = MIXED + [
        SamplingParams(temperature=0.8, seed=7, max_tokens=40, min_tokens=12, stop_token_ids=[203, 294, 18]),
        SamplingParams(temperature=0.6, seed=8, max_tokens=35, logit_bias={203: -5.0, 18: 3.0}, logprobs=3),
        SamplingParams(temperature=0, max_tokens=45, stop=[" the"], include_stop_str_in_output=True),
        SamplingParams(temperature=0.7, seed=9, max_tokens=40, presence_penalty=0.4, frequency_penalty=0.3,
                       repetition_penalty=1.1, ignore_eos=True, logprobs=1),
    ]
    prompts = (PROMPTS * 2)[:len(params)]
    ref = summary(generate(make(None), params, prompts))
    llm = make(draft2)
    assert_same_outputs(summary(generate(llm, params, prompts)), ref)
    assert accepted(llm) > 10
    assert_all_free(llm)


def test_prefix_cache_hits_and_forks_keep_the_draft_cache_in_step():
    """Blocks computed for one request and hit by the next, and prompt blocks shared by n = 3 samples (their
    first divergent block copied on write) hold the draft's K/V as well: the model as its own draft still agrees
    on every greedy token."""
    prefix = " ".join(PROMPTS) * 2
    prompts = [prefix + tail for tail in (" ROMEO.", " JULIET.", " Enter", " Exit")]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    llm = make(DEMO, max_num_seqs=3, block_size=8)
    ref = make(None, max_num_seqs=3, block_size=8)
    assert_same_outputs(summary(generate(llm, greedy, prompts)), summary(generate(ref, greedy, prompts)))
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0 and acceptance(llm) == 1.0
    forks = SamplingParams(n=3, temperature=0.8, seed=2, max_tokens=25, ignore_eos=True)
    assert_same_outputs(summary(generate(llm, forks, prompts[:2])), summary(generate(ref, forks, prompts[:2])))
    assert_all_free(llm)


def test_a_short_pool_preempts_and_recomputes_with_the_same_results(draft2):
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=60, ignore_eos=True)
    ref = summary(generate(make(None, num_gpu_blocks_override=14, block_size=8), params))
    llm = make(draft2, num_gpu_blocks_override=14, block_size=8)
    assert_same_outputs(summary(generate(llm, params)), ref)
    assert llm.llm_engine.get_stats().num_preemptions > 0 and accepted(llm) > 0
    assert_all_free(llm)
    # recomputed sequences rebuild the draft's cache with the target's
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    own = make(DEMO, num_gpu_blocks_override=14, block_size=8)
    generate(own, greedy)
    assert own.llm_engine.get_stats().num_preemptions > 0 and acceptance(own) == 1.0


def test_drafts_stop_at_max_model_len(draft2):
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    outs = [generate(make(d, max_model_len=40), params) for d in (None, draft2)]
    assert_same_outputs(summary(outs[1]), summary(outs[0]))
    assert all(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 40 for o in outs[1])


def test_abort_mid_generation_frees_every_block(draft2):
    llm = make(draft2)
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(12):
        engine.step()
    assert engine.get_stats().spec_num_draft_tokens > 0
    engine.abort_request([str(i) for i in range(len(PROMPTS))])
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_free(llm)


def test_requests_that_do_not_speculate_and_async_scheduling(draft2):
    """Constrained, beam-search and prompt_logprobs requests share batches with speculating ones (the draft model
    computes their tokens into its cache all the same); with async scheduling, steps run one at a time while a
    request speculates, and overlap when only requests that do not speculate run."""
    from pagellm import BeamSearchParams
    from pagellm.sampling_params import StructuredOutputsParams
    from tests.engine.test_structured_outputs import PERSON

    params = [
        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=StructuredOutputsParams(json=PERSON)),
        SamplingParams(temperature=0.8, seed=3, max_tokens=50, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=20, prompt_logprobs=2, ignore_eos=True),
    ]
    prompts = ["My lord,", "ROMEO. ", "To be, or not to be", " ".join(PROMPTS) * 3]
    results = []
    for draft in (None, draft2):
        llm = make(draft, max_num_seqs=8, max_num_batched_tokens=40, async_scheduling=True)
        outs = generate(llm, params, prompts)
        beams = llm.beam_search(["Now is the winter"], BeamSearchParams(beam_width=3, max_tokens=12))
        prompt_lps = [{t: round(lp.logprob, 3) for t, lp in d.items()} for d in outs[3].prompt_logprobs[1:]]
        results.append((summary(outs), prompt_lps,
                        [[s.tokens for s in b.sequences] for b in beams]))
        if draft:
            assert accepted(llm) > 0
            overlapped = llm.llm_engine.stats.overlapped_steps  # the constrained request's, once alone
            constrained = [p.clone(structured_outputs=StructuredOutputsParams(regex="[a-z ]{20,40}"))
                           for p in params[:1]]
            generate(llm, constrained, prompts[:1])
            assert llm.llm_engine.stats.overlapped_steps > overlapped + 10
        assert_all_free(llm)
    assert_same_outputs(results[1][0], results[0][0])
    assert results[1][1:] == results[0][1:]


@pytest.mark.parametrize("arch", ["gpt2", "gpt_bigcode", "qwen3", "gemma", "phi3", "mixtral", "opt"])
def test_every_kind_of_model_as_its_own_draft(tiny_models, arch):
    """The draft passes on other architectures (learned positions, multi-query attention, q/k norms, packed
    projections, MoE): greedy output is plain decoding's and every draft is accepted."""
    prompts = [{"prompt_token_ids": list(range(10 + 7 * i, 30 + 7 * i))} for i in range(5)]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outs = []
    for draft in (None, tiny_models[arch]):
        llm = LLM(tiny_models[arch], speculative_config=spec(draft, 3) if draft else None, max_num_seqs=3,
                  num_gpu_blocks_override=64, block_size=8)
        outs.append(summary(generate(llm, greedy, prompts)))
        if draft:
            assert acceptance(llm) == 1.0
        assert_all_free(llm)
    assert_same_outputs(outs[1], outs[0])


def test_a_draft_of_another_size_and_family(tiny_models):
    """Any text model with the target's tokenizer: a 2-layer LLaMA drafting for a Qwen2 of the same vocabulary
    (the pairing's agreement does not matter; the output is the target's own)."""
    prompts = [{"prompt_token_ids": list(range(10 + 7 * i, 30 + 7 * i))} for i in range(4)]
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=30, ignore_eos=True, logprobs=1)
    outs = []
    for draft in (None, tiny_models["llama"]):
        llm = LLM(tiny_models["qwen2"], speculative_config=spec(draft, 2) if draft else None, max_model_len=128)
        outs.append(summary(generate(llm, params, prompts)))
        assert_all_free(llm)
    assert_same_outputs(outs[1], outs[0])


@pytest.mark.parametrize("extra, match", [
    ({"method": "draft_model", "model": None}, "speculative_config.model must be the draft checkpoint's directory"),
    ({"model": "/no/such/dir"}, "speculative_config.model: model directory '/no/such/dir' does not exist"),
    ({"prompt_lookup_max": 3}, "prompt_lookup_max applies to method 'ngram'"),
    ({"draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size must be 1"),
    ({"method": "medusa"}, "method must be 'ngram', 'draft_model', 'mtp', 'eagle' or 'eagle3'"),
])
def test_bad_draft_config(extra, match):
    cfg = {"model": DEMO, "num_speculative_tokens": 2, **extra}
    with pytest.raises(ValueError, match=match):
        EngineArgs(model=DEMO, speculative_config=cfg).create_engine_config()


def test_draft_models_that_cannot_serve(tiny_models):
    def cfg(model, draft, **kw):
        return EngineArgs(model=model, speculative_config=spec(draft, 2), **kw).create_engine_config()

    with pytest.raises(ValueError, match=r"draft model's vocabulary \(512 tokens\) is smaller than the model's"):
        cfg(DEMO, tiny_models["llama"], max_model_len=128)
    with pytest.raises(ValueError, match=r"draft model's maximum length \(256\) is below max_model_len \(512\)"):
        cfg(DEMO, tiny_models["llama"], max_model_len=512)
    with pytest.raises(ValueError, match="sliding window"):
        cfg(tiny_models["mistral"], tiny_models["mistral"], max_model_len=256)
    sharded = cfg(DEMO, DEMO, tensor_parallel_size=2)  # the target sharded, the draft whole on every rank
    assert sharded.model.num_kv_heads * 2 == sharded.scheduler.speculative.draft.num_kv_heads
    with pytest.raises(ValueError, match="num_scheduler_steps must be 1"):
        cfg(DEMO, DEMO, num_scheduler_steps=4)
    c = cfg(DEMO, DEMO, dtype="float32").scheduler.speculative
    assert (c.method, c.model, c.draft.num_layers, c.draft.max_model_len) == ("draft_model", DEMO, 6, 512)
    from pagellm.worker.kv_cache import bytes_per_block

    both = cfg(DEMO, DEMO)
    assert bytes_per_block(both) == 2 * bytes_per_block(EngineArgs(model=DEMO).create_engine_config())


def test_the_shipped_draft_model_of_the_demo_model():
    """pagellm/assets/shakespeare-llama-draft: trained on the demo model's texts with its tokenizer, it proposes
    what the demo model writes often enough that greedy decoding takes far fewer steps than tokens."""
    draft = os.path.join(os.path.dirname(DEMO), "shakespeare-llama-draft")
    with open(os.path.join(draft, "tokenizer.json")) as a, open(os.path.join(DEMO, "tokenizer.json")) as b:
        assert a.read() == b.read()
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    runs = []
    for d in (None, draft):
        llm = make(d)
        out = generate(llm, params, ["My lord,"])[0]
        runs.append((llm.llm_engine.stats.num_steps, out.outputs[0].token_ids))
    assert runs[1][1] == runs[0][1]
    assert runs[0][0] == 100 and runs[1][0] < 50 and acceptance(llm) > 0.3
