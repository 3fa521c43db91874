"""The fused elementwise kernels (models/triton_ops.py) equal the torch formulas of layers.py: under Triton's
interpreter on CPU, and compiled on a GPU when there is one."""

import pytest
import torch

from tests.triton_script import run_script

CHECK = """
import sys, torch
sys.path.insert(0, {root!r})
from pagellm.models import triton_ops as ops
from pagellm.models.layers import GemmaRMSNorm, RMSNorm, _rotate
device = {device!r}
torch.manual_seed(0)
for dtype, tol in [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)]:
    for n in (256, 80, 2048):  # a power of two, one that is not, a model's hidden size
        x = torch.randn(5, n).to(device=device, dtype=dtype)
        for cls, gemma in ((RMSNorm, False), (GemmaRMSNorm, True)):
            m = cls(n, 1e-6).to(device=device, dtype=dtype)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n))
            x32 = x.float()
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
            ref = (x32 * (1.0 + m.weight.float())).to(dtype) if gemma else m.weight * x32.to(dtype)
            got = ops.rms_norm(x, m.weight, 1e-6, gemma=gemma)
            err = (got.float() - ref.float()).abs().max().item()
            assert err <= tol * ref.float().abs().max().item(), (dtype, n, cls, err)
    gu = torch.randn(7, 2 * 300).to(device=device, dtype=dtype)
    ref = torch.nn.functional.silu(gu[:, :300]) * gu[:, 300:]
    got = ops.silu_and_mul(gu)
    assert (got.float() - ref.float()).abs().max().item() <= tol * 4, ("silu_and_mul", dtype)
    for d, rd in ((64, 64), (80, 40), (128, 128)):  # full rotary, partial (GPT-NeoX), head_dim 128
        x = torch.randn(6, 3, d).to(device=device, dtype=dtype)
        pos = torch.tensor([0, 5, 17, 3, 100, 2], device=device)
        ang = torch.arange(128)[:, None] * (1.0 / 10000 ** (torch.arange(0, rd, 2) / rd))[None]
        emb = torch.cat((ang, ang), -1).to(device)
        cos, sin = emb.cos(), emb.sin()
        ref = _rotate(x, cos[pos].to(dtype)[:, None, :], sin[pos].to(dtype)[:, None, :], rd)
        got = ops.rotary(pos, x, cos, sin, rd)
        if dtype == torch.float32:
            assert torch.equal(got, ref), ("rotary", d, rd, (got - ref).abs().max())
        else:
            assert (got.float() - ref.float()).abs().max().item() <= tol * 8, ("rotary", dtype, d, rd)
print("ok")
"""


def _run(device: str, interpret: bool) -> None:
    run_script(CHECK, interpret=interpret, device=device)


def test_fused_elementwise_kernels_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    _run("cpu", interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA GPU (run on a GPU machine)")
def test_fused_elementwise_kernels_on_cuda():
    _run("cuda", interpret=False)


def test_cpu_tensors_keep_the_torch_formulas():
    from pagellm.models.layers import fused_ops

    assert fused_ops(torch.zeros(2)) is None
