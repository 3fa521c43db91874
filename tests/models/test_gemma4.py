"""Gemma 4 against transformers on the same checkpoints: two head sizes (a cache tensor per layer shaped by its
own K/V heads and head_dim), K/V shared between layers (the last layers read an earlier layer's cache and have
none), per-layer input embeddings, experts beside the dense MLP, sliding windows shorter than the prompts."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pagellm import LLM
from tests.models.test_hybrid import GREEDY, assert_matches_hf, prefix_hits_and_preemption_match_hf, prompts


@pytest.mark.parametrize("arch, backend, batched", [("gemma4", "cpu_paged", 2048), ("gemma4", "torch_ref", 5),
                                                    ("gemma4", "cpu_paged", 13), ("gemma4_moe", "cpu_paged", 13),
                                                    ("gemma4_moe", "torch_ref", 2048)])
def test_greedy_tokens_and_logprobs_match_hf(tiny_models, arch, backend, batched):
    """Prompts of 1 to 47 tokens (windows of 8), whole or in prefill chunks of 5 or 13 tokens."""
    path = tiny_models[arch]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=256, max_num_batched_tokens=batched,
              attention_backend=backend)
    ps = prompts(llm.llm_engine.config.model.vocab_size)
    assert_matches_hf(path, ps, llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False))


def test_each_cache_layer_has_its_own_shape_and_shared_layers_none(tiny_models):
    """gemma4: six layers, the last two reading the caches of layers 2 and 3: four cache tensors, sliding layers
    (2 K/V heads of 16) and global ones (1 K/V head of 32); the block budget counts each at its size."""
    from pagellm.worker.kv_cache import bytes_per_block

    llm = LLM(tiny_models["gemma4"], block_size=8, num_gpu_blocks_override=64)
    engine = llm.llm_engine
    shapes = [tuple(k.shape[1:]) for k, _ in engine.executor.runner.kv_caches]
    assert shapes == [(8, 2, 16), (8, 1, 32)] * 2
    assert bytes_per_block(engine.config) == 2 * 4 * 8 * (2 * 16 + 32) * 2
    model = engine.executor.runner.model
    assert model.cache_of == [0, 1, 2, 3, None, None]  # layers 4 and 5 read the K/V layers 2 and 3 store
    assert model.stores == [False, False, True, True, False, False]


def test_prefix_hits_and_preemption_match_hf(tiny_models):
    """Cached prefixes (the blocks of every cache layer reused), then sequences preempted for lack of blocks."""
    prefix_hits_and_preemption_match_hf(tiny_models["gemma4"])


def test_an_encoder_configuration_is_refused(tiny_models, tmp_path):
    path = tmp_path / "bidirectional"
    shutil.copytree(tiny_models["gemma4_moe"], path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["use_bidirectional_attention"] = "all"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="use_bidirectional_attention='all'"):
        LLM(str(path), num_gpu_blocks_override=16)
