"""GPT-OSS beyond the parity tests every architecture runs: OpenAI's MXFP4 expert checkpoints (against transformers
on the same model with the experts dequantized, and the dequantization against transformers' own), and the MXFP4
method refused elsewhere."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.models.gpt_oss import FP4_VALUES, dequantize_mxfp4
from tests.hf_reference import hf_greedy
from tests.quantization.fp8_checkpoints import write_pair


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) float -> MXFP4 blocks (..., K / 32, 16) uint8 and scales (..., K / 32) uint8: per 32 values a power
    of two that brings the largest to at most 6, each value rounded to the nearest e2m1 magnitude, its sign bit 8."""
    *pre, k = w.shape
    g = w.float().reshape(*pre, k // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0))
    scaled = g / torch.exp2(exp)[..., None]
    magnitudes = torch.tensor(FP4_VALUES[:8])
    code = (scaled.abs()[..., None] - magnitudes).abs().argmin(-1) + 8 * (scaled < 0)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def build_mxfp4(src: str, dst: str) -> tuple[str, str]:
    """The checkpoint with its experts in MXFP4 (the hub's gpt-oss layout), and beside it the same model with those
    experts dequantized, which transformers loads as a plain checkpoint."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(src, "model.safetensors"))
    out, deq = {}, {}
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = to_mxfp4(t.transpose(1, 2))  # stored as (E, out, in)
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
            deq[name] = dequantize_mxfp4(blocks, scales).transpose(1, 2).contiguous()
        else:
            out[name] = deq[name] = t
    return write_pair(src, dst, out, deq, {"quant_method": "mxfp4",
                                           "modules_to_not_convert": ["model.layers.*.self_attn"]})


def test_mxfp4_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 136, (3, 8, 4), generator=g, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers transposes to (E, in, out)
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales), ref.transpose(1, 2), rtol=0, atol=0)


def test_mxfp4_expert_checkpoint_matches_transformers_on_the_dequantized_model(tiny_models, tmp_path):
    path, deq = build_mxfp4(tiny_models["gpt_oss"], str(tmp_path / "gpt_oss-mxfp4"))
    llm = LLM(path, num_gpu_blocks_override=64, block_size=8)
    assert llm.llm_engine.config.model.quantization is None  # the experts were widened as they loaded
    prompts = [[5, 9, 23, 100, 7, 8], list(range(60, 95)), [300, 2, 301, 2, 302]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_lps = hf_greedy(deq, prompt, 12)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens
        lps = [got.logprobs[i][t].logprob for i, t in enumerate(got.token_ids)]
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 2e-4
    # the quantization changed the model: the dense original gives other logprobs
    dense_tokens, dense_lps = hf_greedy(tiny_models["gpt_oss"], prompts[1], 12)
    got = outs[1].outputs[0]
    assert got.token_ids != dense_tokens or max(
        abs(got.logprobs[i][t].logprob - lp) for i, (t, lp) in enumerate(zip(got.token_ids, dense_lps))) > 1e-3


def test_mxfp4_is_refused_for_other_models(tiny_models, tmp_path):
    dst = tmp_path / "llama-mxfp4"
    shutil.copytree(tiny_models["llama"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'mxfp4', which pagellm reads only for GPT-OSS's experts"):
        LLM(str(dst))
