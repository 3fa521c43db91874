"""compressed-tensors checkpoints (llm-compressor's format) against transformers on the same model with the weights
the compressed-tensors library decompresses them to (ct_checkpoints.py writes both, with the library): int4 groups
(symmetric, with zero points, one scale per row), int8 weight-only, int8 W8A8, FP8 per row and per tensor; tensor
parallelism; experts in FP8; the schemes pagellm does not read refused when the config is read."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pagellm import LLM, SamplingParams
from pagellm.quantization import quantized_layers
from tests.conftest import MODELS_DIR
from tests.hf_reference import hf_greedy
from tests.quantization.ct_checkpoints import build_compressed

pytest.importorskip("compressed_tensors")

PROMPTS = [[5, 17, 42, 99, 3], [200, 201, 7], list(range(30, 52))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)


def ct_model(src: str, scheme: str) -> tuple[str, str]:
    name = os.path.basename(src.rstrip("/"))
    return build_compressed(src, os.path.join(MODELS_DIR, "compressed-tensors", f"{name}-{scheme}"), scheme)


def int8_activations(model):
    """transformers' model with every quantized projection's input quantized per token to int8 first, as the W8A8
    scheme computes it (dynamic, symmetric: scale = max |x| / 127 per token, as vLLM's kernels take it)."""
    import torch

    def hook(module, args):
        x = args[0]
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
        return (torch.round(x / s).clamp(-127, 127) * s,)

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(hook)
    return model


def check_against_hf(path: str, deq: str, tol: float, **kw) -> LLM:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.hf_reference import hf_greedy_with

    llm = LLM(path, num_gpu_blocks_override=64, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    methods = {type(getattr(layer, "quant_method", None)).__name__: layer.quant_method
               for _, layer in quantized_layers(llm.llm_engine.executor.runner.model)}
    hf = None
    if "CtInt8" in methods and methods["CtInt8"].scheme == "w8a8":  # (w8a16 where the CPU lacks int8 dot products)
        hf = int8_activations(AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval())
        hf.generation_config.eos_token_id = None
    for prompt, out in zip(PROMPTS, outs):
        ref_tokens, ref_lps = hf_greedy(deq, prompt, 12) if hf is None else hf_greedy_with(hf, prompt, 12)
        got = out.outputs[0]
        assert list(got.token_ids) == ref_tokens
        lps = [got.logprobs[i][t].logprob for i, t in enumerate(got.token_ids)]
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < tol
    return llm


# w4a16*: the CPU int4 kernel in bf16 (groups of 32, or one per row of 64 / 128 inputs); w8a16: dequantized at load;
# w8a8: int8 weights and (on CPUs with int8 dot products) per-token int8 activations, the reference's too (whose
# rounding of x / s differs from the fused kernel's in a few elements: a looser bound)
@pytest.mark.parametrize("scheme, layer_kind, tol", [
    ("w4a16", "int4_packed", 2e-3), ("w4a16-asym", "int4_packed", 2e-3), ("w4a16-channel", "int4_packed", 2e-3),
    ("w8a16", "weight", 2e-3), ("w8a8", "qweight", 1e-2), ("fp8", "fp8_weight", 2e-3),
    ("fp8-tensor", "fp8_weight", 2e-3)])
def test_checkpoint_matches_transformers_on_decompressed_weights(llama_path, scheme, layer_kind, tol):
    from tests.quantization.test_int4 import check_bf16_kernel

    path, deq = ct_model(llama_path, scheme)
    llm = check_against_hf(path, deq, tol)
    if layer_kind == "int4_packed":  # the int4 kernel runs bf16 models (float32 ones dequantize at load)
        llm = check_bf16_kernel(path, deq, True)
    layers = [layer for _, layer in quantized_layers(llm.llm_engine.executor.runner.model)]
    assert layers and all(hasattr(layer, layer_kind) for layer in layers)
    assert llm.llm_engine.config.model.quantization == "compressed-tensors"


# (not w8a8: a row-parallel layer quantizes each rank's slice of a token with its own scale, as vLLM's, so the
# sharded model's numbers are not the unsharded one's)
@pytest.mark.parametrize("scheme", ["w4a16", "w4a16-channel", "w8a16", "fp8"])
def test_checkpoint_shards_over_two_ranks(llama_path, scheme):
    """Row-parallel layers take their share of the inputs (whole groups; a per-row scale on every rank)."""
    path, _ = ct_model(llama_path, scheme)
    ps = [{"prompt_token_ids": p} for p in PROMPTS]
    want = [o.outputs[0].token_ids for o in LLM(path, num_gpu_blocks_override=64).generate(ps, GREEDY,
                                                                                          use_tqdm=False)]
    with LLM(path, tensor_parallel_size=2, num_gpu_blocks_override=64) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]
    assert got == want


def test_fp8_experts(tiny_models):
    """Qwen3-MoE with FP8 projections and experts (one scale per row of each expert's tensors), the routers kept
    in full precision (ignored), as llm-compressor's FP8_DYNAMIC checkpoints of MoE models ship."""
    path, deq = build_compressed(tiny_models["qwen3_moe"], os.path.join(MODELS_DIR, "compressed-tensors",
                                                                       "qwen3_moe-fp8"), "fp8",
                                 ignore=("lm_head", "re:.*mlp.gate$"))
    llm = check_against_hf(path, deq, 2e-3)
    moes = [m for m in llm.llm_engine.executor.runner.model.modules() if hasattr(m, "fp8_w13")]
    assert moes and all(m.fp8_w13_scale.shape[1] == m.fp8_w13.shape[1] for m in moes)  # a scale per row


def test_ignored_modules_stay_dense(llama_path, tmp_path):
    """Modules in `ignore` (here every MLP projection, by regex) load in full precision; the rest quantized (the int4
    kernel of a bf16 model)."""
    path, deq = build_compressed(llama_path, str(tmp_path / "ct"), "w4a16",
                                 ignore=("lm_head", "re:.*mlp\\..*_proj$"))
    check_against_hf(path, deq, 2e-3)
    llm = LLM(path, num_gpu_blocks_override=16, dtype="bfloat16")
    kinds = {name.rsplit(".", 1)[-1]: hasattr(layer, "int4_packed")
             for name, layer in quantized_layers(llm.llm_engine.executor.runner.model)}
    assert kinds == {"qkv_proj": True, "o_proj": True, "gate_up_proj": False, "down_proj": False}


def test_unsupported_schemes_are_refused(llama_path, tmp_path):
    path, _ = ct_model(llama_path, "w4a16")
    for change, match in [
        ({"weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}},
         "not supported"),
        ({"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32},
          "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}},
         "not supported"),
        ({"format": "marlin-24"}, "format 'marlin-24' is not supported")]:
        dst = str(tmp_path / f"bad{len(os.listdir(tmp_path))}")
        shutil.copytree(path, dst)
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        cfg["quantization_config"]["config_groups"]["group_0"].update(change)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
        with pytest.raises(ValueError, match=match):
            LLM(dst, num_gpu_blocks_override=16)


def test_fp8_block_scales(tmp_path):
    """FP8_BLOCK: 128 x 128 blocks of scales (stored as weight_scale) on a model whose projections are made of whole
    blocks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.fixtures.make_models import make_tokenizer

    src = str(tmp_path / "dense")
    torch.manual_seed(11)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 initializer_range=0.1, tie_word_embeddings=False)).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    path, deq = build_compressed(src, str(tmp_path / "ct"), "fp8-block")
    llm = check_against_hf(path, deq, 2e-3)
    layers = [layer for _, layer in quantized_layers(llm.llm_engine.executor.runner.model)]
    assert layers and all(layer.fp8_block == (128, 128) for layer in layers)


def test_a_packed_layer_whose_parts_differ_is_refused(llama_path, tmp_path):
    """q_proj ignored, k_proj / v_proj quantized: pagellm packs them into one layer, so it says so at load."""
    path, _ = build_compressed(llama_path, str(tmp_path / "ct"), "w4a16", ignore=("lm_head", "re:.*q_proj$"))
    with pytest.raises(ValueError, match="qkv_proj: its parts are stored with different"):
        LLM(path, num_gpu_blocks_override=16)
