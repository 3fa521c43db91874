"""--kv-cache-dtype fp8: twice the blocks in the same memory, every cache operation on fp8, bounded quality cost."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM, SamplingParams
from tests.quantization.test_int8 import quality


def test_fp8_cache_holds_twice_the_blocks_of_bf16_in_the_same_memory(llama_path):
    budget = 4 << 20
    blocks = {}
    for kv in ("bfloat16", "fp8"):
        llm = LLM(llama_path, kv_cache_dtype=kv, kv_cache_memory=budget)
        blocks[kv] = llm.llm_engine.get_stats().num_total_blocks
        cache = llm.llm_engine.executor.runner.kv_caches[0][0]
        assert cache.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16)
    assert blocks["fp8"] == 2 * blocks["bfloat16"]


@pytest.mark.parametrize("backend", ["torch_ref", "cpu_paged"])
def test_fp8_cache_under_forks_prefix_hits_and_preemption(llama_path, backend):
    """Copy-on-write block copies, prefix-cache hits and recompute after preemption all run on an fp8 cache
    (CPU torch has no fp8 index_copy_: the cache is moved as bytes), and every block comes back."""
    llm = LLM(llama_path, kv_cache_dtype="fp8", num_gpu_blocks_override=40, block_size=4, max_num_seqs=8,
              attention_backend=backend)
    prefix = list(range(10, 30))
    prompts = [{"prompt_token_ids": prefix + [i, i + 1]} for i in range(6)]
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert all(len(c.token_ids) == 24 for o in outs for c in o.outputs)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0  # 40 blocks of 4 tokens cannot hold 18 sequences of 46 tokens
    assert stats.num_free_blocks == stats.num_total_blocks
    again = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0 and len(again[0].outputs[0].token_ids) == 4


def test_fp8_cache_backends_agree_in_the_engine(llama_path):
    prompts = [{"prompt_token_ids": list(range(40, 40 + n))} for n in (3, 17, 33)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    runs = {}
    for backend in ("torch_ref", "cpu_paged"):
        llm = LLM(llama_path, kv_cache_dtype="fp8", num_gpu_blocks_override=64, attention_backend=backend,
                  max_num_batched_tokens=8)  # chunked prefill: later chunks read fp8 context
        runs[backend] = llm.generate(prompts, sp, use_tqdm=False)
    for a, b in zip(runs["torch_ref"], runs["cpu_paged"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(la[t].logprob - lb[t].logprob) < 1e-4


def test_fp8_cache_keeps_the_demo_models_quality():
    """The measured accuracy cost of an 8-bit cache on held-out text: agreement >= 90%, perplexity within 2%."""
    r = quality(kv_cache_dtype="fp8")
    assert r["agreement_teacher_forced"] >= 0.90, r
    assert abs(r["perplexity_ratio"] - 1) <= 0.02, r
