"""Kimi Linear's layout: one latent cache tensor for its one attention layer (kv_lora_rank + qk_rope_head_dim wide,
V its K), a recurrent state for each KDA layer, and A_log stored either as the released (1, 1, heads, 1) or flat."""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from pagellm import LLM
from tests.models.test_hybrid import GREEDY, assert_matches_hf, prompts


def test_one_latent_cache_and_a_state_per_kda_layer(tiny_models):
    llm = LLM(tiny_models["kimi_linear"], block_size=8, num_gpu_blocks_override=32)
    runner = llm.llm_engine.executor.runner
    assert [tuple(k.shape[1:]) for k, _ in runner.kv_caches] == [(8, 1, 32 + 8)]
    model = runner.model
    assert [layer.is_recurrent for layer in model.model.layers] == [True, False, True, True]
    assert [tuple(s.shape[1:]) for s, _ in model.states] == [(3 * 64, 3)] * 3  # the convolution's last 3 inputs
    assert [tuple(s.shape[1:]) for _, s in model.states] == [(4, 16, 16)] * 3  # S per head


def test_a_flat_a_log_loads_as_the_released_shape(tiny_models, tmp_path):
    src, dst = tiny_models["kimi_linear"], str(tmp_path / "kimi")
    shutil.copytree(src, dst)
    weights = load_file(os.path.join(dst, "model.safetensors"))
    weights = {k: v.flatten() if k.endswith("A_log") else v for k, v in weights.items()}
    assert weights["model.layers.0.self_attn.A_log"].shape == (4,)
    save_file(weights, os.path.join(dst, "model.safetensors"))
    llm = LLM(dst, block_size=8, num_gpu_blocks_override=128)
    ps = prompts(llm.llm_engine.config.model.vocab_size)
    assert_matches_hf(src, ps, llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False))
    assert torch.equal(llm.llm_engine.executor.runner.model.model.layers[0].self_attn.A_log.flatten(),
                       weights["model.layers.0.self_attn.A_log"])
