"""GPTQ and AWQ 4-bit checkpoints against transformers on the same model dequantized to float32.

transformers loads GPTQ/AWQ checkpoints only with extra packages (gptqmodel / autoawq, GPU kernels), so
the oracle is the checkpoint's dequantized weights, (q - zero) * scale, in a plain float32 checkpoint
(int4_checkpoints.py writes both from the same quantized integers).
"""

from __future__ import annotations

import os

import pytest

from pagellm import LLM, SamplingParams
from tests.conftest import MODELS_DIR
from tests.hf_reference import hf_greedy
from tests.quantization.int4_checkpoints import build_int4

PROMPTS = [[5, 17, 42, 99, 3], [200, 201, 7], list(range(30, 52))]


def _check_against_hf(path: str, deq: str, **kw) -> None:
    llm = LLM(path, num_gpu_blocks_override=64, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ref_tokens, ref_lps = hf_greedy(deq, prompt, 12)
        got = out.outputs[0]
        assert list(got.token_ids) == ref_tokens
        lps = [got.logprobs[i][t].logprob for i, t in enumerate(got.token_ids)]
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 2e-3


@pytest.mark.parametrize("method, group, desc_act, kernel", [
    ("gptq", 32, False, True),   # the CPU int4 kernel
    ("awq", 32, False, True),
    ("gptq", 16, False, False),  # a group size the kernel lacks: dequantized at load
    ("gptq", 32, True, False),   # act-order (shuffled g_idx): dequantized at load
    ("awq", -1, False, True),    # one group per output row (64 and 128 inputs: kernel group sizes)
])
def test_int4_checkpoint_matches_transformers_on_dequantized_weights(llama_path, method, group, desc_act, kernel):
    name = f"llama-{method}-g{group}{'-act' if desc_act else ''}"
    path, deq = build_int4(llama_path, os.path.join(MODELS_DIR, name), method, group, desc_act)
    _check_against_hf(path, deq)  # float32: the weights dequantized at load
    llm = check_bf16_kernel(path, deq, kernel)
    assert llm.llm_engine.config.model.quantization == method


def check_bf16_kernel(path: str, deq: str, kernel: bool) -> LLM:
    """In bf16 the layers that can run on the CPU int4 kernel do (float32 models dequantize: torch's float32 path of
    the kernel is 50-70x slower than a dense matmul), and the first token's logprobs are transformers' in bf16 on the
    dequantized weights, within bf16's rounding: transformers' greedy token among pagellm's top 5 with its logprob.
    (Whole outputs are not compared: near ties on these random weights tip either way under bf16 rounding.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from pagellm.quantization import quantized_layers
    from tests.hf_reference import hf_greedy_with

    llm = LLM(path, num_gpu_blocks_override=64, dtype="bfloat16")
    layers = [layer for _, layer in quantized_layers(llm.llm_engine.executor.runner.model)]
    assert layers and all(hasattr(layer, "int4_packed") == kernel for layer in layers)
    hf = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.bfloat16).eval()
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        (token,), (lp,) = hf_greedy_with(hf, prompt, 1)
        top = out.outputs[0].logprobs[0]
        assert token in top and abs(top[token].logprob - lp) < 0.1
    return llm


def test_int4_checkpoint_shards_over_two_ranks(llama_path):
    path, _ = build_int4(llama_path, os.path.join(MODELS_DIR, "llama-gptq-g32"), "gptq", 32)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, num_gpu_blocks_override=64).generate(
        [{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)]
    with LLM(path, tensor_parallel_size=2, num_gpu_blocks_override=64) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp,
                                                            use_tqdm=False)]
    assert got == want


def test_int4_checkpoint_in_pipeline_stages(llama_path):
    """Two pipeline stages, each reading only its layers' packed weights, scales and zeros: transformers' greedy
    tokens on the dequantized weights."""
    path, deq = build_int4(llama_path, os.path.join(MODELS_DIR, "llama-gptq-g32"), "gptq", 32)
    _check_against_hf(path, deq, pipeline_parallel_size=2)


def test_int4_config_errors(llama_path, tmp_path):
    import json
    import shutil

    bad = tmp_path / "gptq8"
    shutil.copytree(llama_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 8, "group_size": 32}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bits=8"):
        LLM(str(bad))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bitsandbytes"):
        LLM(str(bad))
    path, _ = build_int4(llama_path, os.path.join(MODELS_DIR, "llama-gptq-g32"), "gptq", 32)
    with pytest.raises(ValueError, match="gptq checkpoint"):
        LLM(path, quantization="awq")
    with pytest.raises(ValueError, match="needs a GPTQ checkpoint"):
        LLM(llama_path, quantization="gptq")


def test_int4_mixture_of_experts_checkpoints_are_refused(tiny_models):
    path, _ = build_int4(tiny_models["qwen3_moe"], os.path.join(MODELS_DIR, "qwen3_moe-gptq-g32"), "gptq", 32)
    with pytest.raises(ValueError, match=r"gptq checkpoints of mixture-of-experts models are not supported: pagellm "
                                         r"does not read 4-bit experts \(model.layers.0.mlp.experts\)"):
        LLM(path, num_gpu_blocks_override=16)
