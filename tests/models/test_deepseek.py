"""DeepSeek-V2 / V3 beyond the parity tests every architecture runs (tests/models/test_hf_parity.py): the latent
KV cache's size, the routers against transformers' own, preemption, bf16, checkpoints with multi-token-prediction
layers, and what LoRA can and cannot adapt."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from pagellm import LLM, LoRARequest, SamplingParams
from pagellm.worker.kv_cache import bytes_per_block
from tests.hf_reference import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def prompts(n: int = 4, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 500) for _ in range(length)] for length in (3, 17, 40, 66)[:n]]


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_the_cache_holds_one_latent_vector_per_token_and_layer(tiny_models, arch):
    """kv_lora_rank + qk_rope_head_dim numbers per token and layer, in one tensor that is both K and V: against
    plain attention's 2 x heads x head size, 32 + 8 = 40 here instead of 2 x 4 x (16 + 8 | 16)."""
    llm = LLM(tiny_models[arch], num_gpu_blocks_override=32, block_size=8)
    cfg = llm.llm_engine.config
    hf = cfg.model.hf_config
    assert (cfg.model.num_kv_heads, cfg.model.head_dim, cfg.model.kv_shared) == (1, 32 + 8, True)
    assert bytes_per_block(cfg) == hf.num_hidden_layers * 8 * (32 + 8) * 4  # float32, K and V one tensor
    caches = llm.llm_engine.executor.runner.kv_caches
    assert len(caches) == hf.num_hidden_layers and all(k is v for k, v in caches)
    assert tuple(caches[0][0].shape) == (32, 8, 1, 40)


@pytest.mark.parametrize("v3", [False, True])
def test_routers_choose_the_experts_and_weights_transformers_does(tiny_models, v3):
    from transformers import AutoConfig

    from pagellm.models.deepseek import DeepseekRouter

    cfg = AutoConfig.from_pretrained(tiny_models["deepseek_v3" if v3 else "deepseek_v2"])
    if v3:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as HFRouter
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as HFRouter
    gen = torch.Generator().manual_seed(0)
    ref, ours = HFRouter(cfg), DeepseekRouter(cfg, v3)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(ref.weight.shape, generator=gen))
        ours.weight.copy_(ref.weight)
        if v3:
            ref.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen))
            ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
    x = torch.randn(200, cfg.hidden_size, generator=gen)
    _, ref_w, ref_ids = ref(x)
    w, ids = ours(x)
    order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)  # both unordered within a token
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order))
    if v3:  # the bias changes which experts win, and the groups limit them: neither is a plain top-k
        plain = torch.nn.functional.linear(x, ref.weight).sigmoid().topk(cfg.num_experts_per_tok, dim=-1)[1]
        assert not torch.equal(plain.sort(dim=-1)[0], ids.sort(dim=-1)[0])


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_preempted_and_recomputed_sequences_still_match_transformers(tiny_models, arch):
    path = tiny_models[arch]
    llm = LLM(path, block_size=8, num_gpu_blocks_override=14, max_num_seqs=4)  # 4 x 3 blocks admitted, then full
    rng = random.Random(2)
    ps = [[rng.randrange(4, 500) for _ in range(20)] for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=36, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    assert llm.llm_engine.get_stats().num_preemptions > 0
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == hf_greedy(path, p, params.max_tokens)[0]


def test_bfloat16_keeps_the_router_in_float32_and_follows_transformers(tiny_models):
    from transformers import AutoModelForCausalLM

    path = tiny_models["deepseek_v3"]
    llm = LLM(path, dtype="bfloat16", num_gpu_blocks_override=64)
    model = llm.llm_engine.executor.runner.model
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].self_attn.w_uk.dtype == torch.bfloat16
    assert llm.llm_engine.executor.runner.kv_caches[0][0].dtype == torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert hf.model.layers[1].mlp.gate.weight.dtype == torch.float32  # transformers keeps it so too
    agree = total = 0
    for p in prompts():
        got = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].token_ids
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        agree += sum(a == b for a, b in zip(got, ref))
        total += len(ref)
        assert got[0] == ref[0]  # bf16 rounding may part the two later, never at the first token
    assert agree / total >= 0.75


def test_multi_token_prediction_layers_in_the_checkpoint_are_skipped(tiny_models, tmp_path):
    """V3 checkpoints carry their MTP module as layer num_hidden_layers (model.layers.61.*): not served, not an
    error, not a warning about unknown tensors."""
    from safetensors.torch import load_file, save_file

    src = tiny_models["deepseek_v3"]
    dst = str(tmp_path / "with-mtp")
    shutil.copytree(src, dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        n = json.load(f)["num_hidden_layers"]
    extra = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v.clone()
             for k, v in state.items() if k.startswith(f"model.layers.{n - 1}.")}
    extra[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(64, 128)
    save_file({**state, **extra}, os.path.join(dst, "model.safetensors"))
    p = prompts(1)[0]
    out = LLM(dst, num_gpu_blocks_override=32).generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(src, p, GREEDY.max_tokens)[0]


def test_lora_on_the_latent_up_projection_is_a_clear_error(tiny_models, tmp_path):
    """kv_b_proj is split into the absorbed W_UK / W_UV at load: an adapter on it cannot be applied (the other
    projections take adapters: tests/lora/test_lora.py runs every architecture)."""
    from safetensors.torch import save_file

    out = tmp_path / "kv_b"
    out.mkdir()
    name = "base_model.model.model.layers.0.self_attn.kv_b_proj"
    save_file({f"{name}.lora_A.weight": torch.randn(4, 32), f"{name}.lora_B.weight": torch.randn(4 * 32, 4)},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "target_modules": ["kv_b_proj"]}))
    llm = LLM(tiny_models["deepseek_v2"], enable_lora=True, max_lora_rank=8, num_gpu_blocks_override=32)
    with pytest.raises(ValueError, match="targets model.layers.0.self_attn.kv_b_proj"):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, lora_request=LoRARequest("kv", 1, str(out)))
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not llm.llm_engine.has_unfinished_requests()
