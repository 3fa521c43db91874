"""Greedy output equals Hugging Face transformers token for token; logprobs match closely."""

import random

import pytest

from pagellm import LLM, SamplingParams
from tests.conftest import ARCHS, FALLBACK_ARCHS
from tests.hf_reference import hf_greedy

MAX_TOKENS = 32


def random_prompts(vocab: int, n: int = 10, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 5, 9, 17, 31, 48, 64, 85, 100][:n]
    # token ids >= 4: skip the special tokens
    return [[rng.randrange(4, vocab) for _ in range(n_tok)] for n_tok in lengths]


@pytest.mark.parametrize("arch", ARCHS + FALLBACK_ARCHS)
def test_greedy_batch_matches_hf_generate(tiny_models, arch):
    path = tiny_models[arch]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256)
    vocab = llm.llm_engine.config.model.vocab_size
    prompts = random_prompts(vocab)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        ref_tokens, ref_lps = hf_greedy(path, p, MAX_TOKENS)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"prompt of {len(p)} tokens diverged"
        lps = [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)]
        assert lps == pytest.approx(ref_lps, abs=2e-4)
        assert got.cumulative_logprob == pytest.approx(sum(ref_lps), abs=2e-3)
        assert got.finish_reason == "length"


def test_text_prompts_match_hf_and_report_prompt(llama_path):
    llm = LLM(llama_path)
    tok = llm.get_tokenizer()
    prompts = ["The quick brown fox", "Paged attention stores keys"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for text, out in zip(prompts, outs):
        ids = tok.encode(text)
        assert out.prompt == text and out.prompt_token_ids == ids
        ref, _ = hf_greedy(llama_path, ids, 12)
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ARCHS + FALLBACK_ARCHS)
def test_chunked_prefill_and_prefix_hits_match_hf(tiny_models, arch):
    """Prompts computed in chunks of at most 24 tokens, and prompts whose first blocks come from the
    prefix cache, still give HF's greedy tokens (a model with Mamba layers caches no prefix: it recomputes it)."""
    path = tiny_models[arch]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256, max_num_batched_tokens=24, max_num_seqs=4)
    vocab = llm.llm_engine.config.model.vocab_size
    rng = random.Random(1)
    shared = [rng.randrange(4, vocab) for _ in range(45)]
    prompts = [shared + [rng.randrange(4, vocab) for _ in range(n)] for n in (3, 11, 30)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0]
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
    assert first.num_cached_tokens == 0
    hits = 0 if llm.llm_engine.config.model.stateful else 40  # the 5 full blocks of the shared prefix
    assert [o.num_cached_tokens for o in rest] == [hits, hits]
    for p, out in zip(prompts, [first, *rest]):
        assert out.outputs[0].token_ids == hf_greedy(path, p, 12)[0]
