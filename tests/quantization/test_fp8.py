"""FP8 weights: checkpoints (per-tensor and block-wise scales) against transformers on the same model
dequantized to float32, under tensor parallelism too; `--quantization fp8` at load time."""

from __future__ import annotations

import os

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.quantization.fp8 import dequantize_fp8, quantize_fp8
from tests.conftest import MODELS_DIR
from tests.quantization.fp8_checkpoints import PROJECTIONS, build_fp8
from tests.quantization.test_int4 import PROMPTS, _check_against_hf

# DeepSeek's latent projections too (kv_a_proj_with_mqa's rows end in a block cut short)
MLA_PROJECTIONS = (*PROJECTIONS, "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


@pytest.mark.parametrize("block", [None, (16, 16), (32, 64)])
def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(llama_path, block):
    name = "llama-fp8-" + ("tensor" if block is None else f"b{block[0]}x{block[1]}")
    path, deq = build_fp8(llama_path, os.path.join(MODELS_DIR, name), block)
    _check_against_hf(path, deq)
    llm = LLM(path, num_gpu_blocks_override=16)
    assert llm.llm_engine.config.model.quantization == "fp8"
    from pagellm.quantization import quantized_layers

    layers = [layer for _, layer in quantized_layers(llm.llm_engine.executor.runner.model)]
    assert layers and all(layer.fp8_weight.dtype == torch.float8_e4m3fn for layer in layers)
    assert all(not hasattr(layer, "weight") for layer in layers)  # only the 8-bit weight stays resident


@pytest.mark.parametrize("arch, ep", [("llama", False), ("deepseek_v3", False), ("deepseek_v3", True)])
def test_fp8_checkpoint_shards_over_two_ranks(tiny_models, arch, ep):
    """Tensor parallel, and for DeepSeek-V3's experts expert parallel too (each rank loads its experts' scales)."""
    path, _ = build_fp8(tiny_models[arch], os.path.join(MODELS_DIR, f"{arch}-fp8-b16x16"), (16, 16), MLA_PROJECTIONS)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    want = [o.outputs[0].token_ids for o in LLM(path, num_gpu_blocks_override=64).generate(prompts, sp,
                                                                                        use_tqdm=False)]
    with LLM(path, tensor_parallel_size=2, num_gpu_blocks_override=64, enable_expert_parallel=ep) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] == want


def test_load_time_fp8_is_per_channel_and_computes_the_dequantized_product(llama_path):
    torch.manual_seed(0)
    w = torch.randn(48, 32) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different sizes
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (48, 1)
    rel = ((dequantize_fp8(q, s, None) - w).abs() / w.abs().amax(dim=1, keepdim=True)).max()
    assert rel <= 2 ** -4  # e4m3: 3 mantissa bits, relative to each row's own range
    llm = LLM(llama_path, quantization="fp8", num_gpu_blocks_override=64)
    from pagellm.quantization import quantized_layers

    layer = next(layer for _, layer in quantized_layers(llm.llm_engine.executor.runner.model))
    x = torch.randn(5, layer.fp8_weight.shape[1])
    ref = x @ dequantize_fp8(layer.fp8_weight, layer.fp8_scale, None).t()
    torch.testing.assert_close(layer(x), ref if layer.bias is None else ref + layer.bias)
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8


def test_fp8_errors(llama_path, tmp_path):
    import json
    import shutil

    path, _ = build_fp8(llama_path, os.path.join(MODELS_DIR, "llama-fp8-b16x16"), (16, 16))
    with pytest.raises(ValueError, match="quantization='int8', but the checkpoint is a fp8 checkpoint"):
        LLM(path, quantization="int8")
    bad = tmp_path / "fp8-odd-block"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [24, 16]  # k_proj's 32 rows are not 24-row blocks
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="qkv_proj: a part or tensor-parallel shard of its 128 rows .* not made of "
                                         "24-row blocks"):
        LLM(str(bad))
    cfg["quantization_config"]["weight_block_size"] = [16]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weight_block_size must be two positive integers"):
        LLM(str(bad))



@pytest.mark.parametrize("arch, block", [("qwen3_moe", (16, 16)), ("qwen3_moe", None), ("deepseek_v3", (16, 16)),
                                         ("deepseek_v2", None)])
def test_fp8_mixture_of_experts_checkpoints_keep_their_experts_in_8_bits(tiny_models, arch, block):
    """Experts stored one fp8 tensor per expert and projection with their scales (DeepSeek-V3, Qwen3-MoE FP8), and
    DeepSeek's latent projections: kv_a_proj_with_mqa's 40 rows end in a block cut short (V3's 576 rows of 128)."""
    name = f"{arch}-fp8-" + ("tensor" if block is None else f"b{block[0]}x{block[1]}")
    path, deq = build_fp8(tiny_models[arch], os.path.join(MODELS_DIR, name), block, MLA_PROJECTIONS)
    _check_against_hf(path, deq)
    llm = LLM(path, num_gpu_blocks_override=16)
    model = llm.llm_engine.executor.runner.model
    experts = [m for m in model.modules() if hasattr(m, "fp8_w13")]
    assert experts and all(m.fp8_w13.dtype == m.fp8_w2.dtype == torch.float8_e4m3fn for m in experts)
    assert all(not hasattr(m, "w13") for m in experts)  # only the 8-bit experts stay resident


def test_load_time_fp8_quantizes_the_experts_per_row(tiny_models):
    """--quantization fp8 on a mixture of experts: each expert's rows get their own scale, as the dense layers'."""
    path = tiny_models["deepseek_v3"]
    dense = LLM(path, num_gpu_blocks_override=16).llm_engine.executor.runner.model
    llm = LLM(path, quantization="fp8", num_gpu_blocks_override=16)
    model = llm.llm_engine.executor.runner.model
    moe, ref = model.model.layers[1].mlp.experts, dense.model.layers[1].mlp.experts
    assert moe.fp8_w13.dtype == torch.float8_e4m3fn and not hasattr(moe, "w13")
    for e in range(ref.w13.shape[0]):
        w13, w2 = moe.quant_method.expert_weights(moe, e, torch.float32)
        torch.testing.assert_close(w13, dequantize_fp8(*quantize_fp8(ref.w13[e]), None), rtol=0, atol=0)
        torch.testing.assert_close(w2, dequantize_fp8(*quantize_fp8(ref.w2[e]), None), rtol=0, atol=0)
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8
