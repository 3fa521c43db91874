"""MiniMax-M2 as released: a config in the original format (rope_theta and rotary_dim at the top, the
multi-token-prediction modules declared) and those modules' tensors stored after the decoder's layers, which are not
served; the router and its bias kept in float32 at a lower compute dtype."""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from pagellm import LLM
from tests.models.test_hybrid import GREEDY, assert_matches_hf, prompts


def released_layout(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope["rope_theta"], rotary_dim=cfg["rotary_dim"], num_mtp_modules=1,
               mtp_transformer_layers=1, use_mtp=True, use_qk_norm=True, qk_norm_type="per_layer",
               scoring_func="sigmoid", use_routing_bias=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    weights = load_file(os.path.join(dst, "model.safetensors"))
    last = cfg["num_hidden_layers"]
    mtp = {k.replace("model.layers.0.", f"model.layers.{last}."): torch.randn_like(v)
           for k, v in weights.items() if k.startswith("model.layers.0.")}
    save_file({**weights, **mtp}, os.path.join(dst, "model.safetensors"))
    return dst


def test_released_config_and_mtp_tensors_load_and_match_hf(tiny_models, tmp_path, caplog):
    path = released_layout(tiny_models["minimax_m2"], str(tmp_path / "m2"))
    with caplog.at_level(logging.WARNING):
        llm = LLM(path, block_size=8, num_gpu_blocks_override=128)
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]  # the MTP tensors are skipped by name
    rotary = llm.llm_engine.executor.runner.model.model.rotary
    assert rotary.rotary_dim == 8  # half of each 16-wide head, from rotary_dim
    ps = prompts(llm.llm_engine.config.model.vocab_size)
    assert_matches_hf(tiny_models["minimax_m2"], ps, llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY,
                                                                   use_tqdm=False))


def test_router_and_its_bias_stay_in_float32(tiny_models):
    llm = LLM(tiny_models["minimax_m2"], dtype="bfloat16", num_gpu_blocks_override=32)
    mlp = llm.llm_engine.executor.runner.model.model.layers[0].mlp
    assert mlp.gate.weight.dtype == mlp.e_score_correction_bias.dtype == torch.float32
    assert mlp.experts.w13.dtype == torch.bfloat16
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
