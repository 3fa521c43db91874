"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5) against transformers: each query attends to the index_topk (8
in the fixtures) earlier tokens its indexer scores highest, so every prompt longer than 8 tokens goes sparse. The
indexer's keys travel in the latent cache rows, through prefill chunks, cached prefixes and preemption."""

from __future__ import annotations

import pytest

from pagellm import LLM
from pagellm.models import deepseek_v32
from tests.models.test_hybrid import GREEDY, assert_matches_hf, prefix_hits_and_preemption_match_hf, prompts


@pytest.mark.parametrize("arch, backend, batched", [
    ("deepseek_v32", "cpu_paged", 5), ("deepseek_v32", "torch_ref", 13), ("glm_moe_dsa", "cpu_paged", 2048),
    ("glm_moe_dsa", "torch_ref", 5)])
def test_prefill_chunks_and_decode_match_hf(tiny_models, arch, backend, batched, monkeypatch):
    """Prompts of 1 to 47 tokens, in prefill chunks of 5 or 13 or whole; short sequences (dense) and long ones
    (sparse) in the same steps. A score budget of 64 splits the queries of a sequence into groups of one."""
    monkeypatch.setattr(deepseek_v32, "SCORE_BUDGET", 64)
    path = tiny_models[arch]
    llm = LLM(path, block_size=4, num_gpu_blocks_override=256, max_num_batched_tokens=batched,
              attention_backend=backend)
    calls = []
    sparse = deepseek_v32.DSAttention.sparse
    monkeypatch.setattr(deepseek_v32.DSAttention, "sparse",
                        lambda self, *a: calls.append((len(a[-1]), a[-2].num_seqs)) or sparse(self, *a))
    ps = prompts(llm.llm_engine.config.model.vocab_size)
    assert_matches_hf(path, ps, llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False))
    assert any(k < n for k, n in calls)  # steps with short (dense) and long (sparse) sequences together


def test_cache_rows_hold_the_indexer_keys_and_shared_layers_have_no_indexer(tiny_models):
    llm = LLM(tiny_models["glm_moe_dsa"], block_size=4, num_gpu_blocks_override=32)
    runner = llm.llm_engine.executor.runner
    assert {tuple(k.shape[1:]) for k, _ in runner.kv_caches} == {(4, 1, 32 + 8 + 16)}  # [c, k_pe, k_idx]
    assert [layer.self_attn.indexer is not None for layer in runner.model.model.layers] == [True, False, True, False]


def test_prefix_hits_and_preemption_match_hf(tiny_models):
    """Cached prefixes (their rows' indexer keys reused), then sequences preempted for lack of blocks."""
    prefix_hits_and_preemption_match_hf(tiny_models["deepseek_v32"])
