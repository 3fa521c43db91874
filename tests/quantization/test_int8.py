"""--quantization int8: the layer math, the fused CPU kernels, and the quality of the demo model."""

from __future__ import annotations

import argparse

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.models.parallel_layers import ColumnParallelLinear, RowParallelLinear
from pagellm.quantization import int8
from pagellm.quantization.int8 import Int8Method, quantize_activations, quantize_weight
from tests.conftest import DEMO_MODEL


def test_weight_quantization_is_per_channel_and_within_half_a_step():
    w = torch.randn(48, 80) * torch.linspace(0.01, 3.0, 48)[:, None]  # very different row ranges
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert q.abs().max() == 127 and (q.abs().amax(1) == 127).all()  # every row uses its full range
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_quantized_linear_computes_the_dequantized_product(scheme, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    col = ColumnParallelLinear.single(96, 160, bias=True)
    row = RowParallelLinear(160, 96, bias=False)
    for layer in (col, row):
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
    x = torch.randn(rows, 96, generator=g)
    with torch.no_grad():
        col.bias.copy_(torch.randn(160, generator=g))
    ref_w = {}
    method = Int8Method(scheme)
    for layer in (col, row):
        method.finish(layer, dtype, torch.device("cpu"))
        ref_w[layer] = layer.qweight.float() * layer.wscale[:, None]
        assert not hasattr(layer, "weight") or layer.weight is None  # the float weight is gone
    col.bias.data = col.bias.data.to(dtype)
    h = col(x.to(dtype))
    y = row(h)
    assert h.dtype == dtype and y.dtype == dtype and y.shape == (rows, 96)
    if scheme == "w8a8":  # exactly the int8 product of the quantized activations, rescaled
        xq, xs = quantize_activations(x.to(dtype))
        want_h = (xq.float() * xs) @ ref_w[col].t() + col.bias.float()
    else:
        want_h = x.to(dtype).float() @ ref_w[col].t() + col.bias.float()
    tol = 1e-4 if dtype == torch.float32 and scheme == "w8a8" else 3e-2  # w8a16 multiplies in bf16
    assert torch.allclose(h.float(), want_h, atol=tol * want_h.abs().max().item(), rtol=tol)
    exact = x @ (ref_w[col].t()) + col.bias.float()  # unquantized activations: within int8 activation error
    assert (h.float() - exact).norm() / exact.norm() < 0.03


def test_fused_cpu_kernels_match_the_torch_ops():
    torch.manual_seed(0)
    ops = int8._cpu_ops()
    assert ops is not None, "the C++ extension should build on the test machines"
    for m, k in ((1, 16), (5, 21), (64, 768), (300, 3072)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dtype) * 3
            q, s = ops.quantize_rows_int8(x)
            q_ref, s_ref = quantize_activations(x)
            assert torch.allclose(s, s_ref, rtol=1e-6)
            # x * (1 / s) against x / s: the same integer but at a rounding tie's last bit
            assert (q.int() - q_ref.int()).abs().max() <= 1 and (q == q_ref).float().mean() > 0.999
            acc = torch.randint(-50000, 50000, (m, 40), dtype=torch.int32)
            ws, bias = torch.rand(40), torch.randn(40)
            got = ops.rescale_int32(acc, s, ws, bias.to(dtype), dtype)
            want = (acc.float() * s * ws + bias.to(dtype).float()).to(dtype)
            tol = (1e-2 if dtype != torch.float32 else 1e-6) * want.float().abs().max().item()  # FMA vs two ops
            assert got.dtype == dtype and torch.allclose(got.float(), want.float(), atol=tol, rtol=0)


def quality(**kw) -> dict:
    from pagellm.benchmarks.quality import main

    ns = argparse.Namespace(model=DEMO_MODEL, load_format="auto", dtype=kw.get("dtype", "auto"),
                            kv_cache_dtype=kw.get("kv_cache_dtype", "auto"), quantization=kw.get("quantization"),
                            reference_dtype="float32", text=__import__("pagellm.benchmarks.quality").benchmarks.quality
                            .VAL_TEXT, num_prompts=8, prompt_len=48, max_tokens=32, ppl_window=128, ppl_windows=12,
                            chunk=32, threads=None, output_json=None)
    return main(ns)


@pytest.mark.parametrize("int8_dot", [True, False], ids=["w8a8", "w8a16"])
def test_int8_demo_model_keeps_its_quality(monkeypatch, int8_dot):
    """The acceptance bar: greedy agreement >= 90% and perplexity within 2% of the float32 model, on held-out
    text of the demo model's corpus (both int8 schemes: the CPU's own, and the other one forced)."""
    monkeypatch.setattr(int8, "cpu_has_int8_dot", lambda: int8_dot)
    r = quality(quantization="int8")
    assert r["agreement_teacher_forced"] >= 0.90, r
    assert abs(r["perplexity_ratio"] - 1) <= 0.02, r


def test_int8_engine_serves_every_request_kind(tiny_models):
    """Sampling, n > 1, beam search and prompt logprobs run on an int8 model of each layer family."""
    for name in ("gpt2", "llama", "phi3", "opt", "qwen2_moe"):
        llm = LLM(tiny_models[name], quantization="int8", num_gpu_blocks_override=64)
        outs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                            SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=6, prompt_logprobs=1),
                            use_tqdm=False)
        assert len(outs[0].outputs) == 2 and all(len(o.token_ids) == 6 for o in outs[0].outputs)
        beams = llm.beam_search([{"prompt_token_ids": [5, 6, 7]}], __import__("pagellm").BeamSearchParams(
            beam_width=2, max_tokens=4))
        assert beams[0].sequences
        assert llm.llm_engine.get_stats().num_free_blocks == llm.llm_engine.get_stats().num_total_blocks


def test_int8_errors(tiny_models):
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(tiny_models["llama"], quantization="int3")
    with pytest.raises(ValueError, match="transformers fallback"):
        LLM(tiny_models["stablelm"], quantization="int8")
