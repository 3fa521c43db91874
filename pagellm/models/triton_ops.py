"""Fused elementwise kernels for CUDA (Triton): RMSNorm, SiLU-and-mul, rotary embedding.

Each replaces a chain of small torch kernels (RMSNorm: about 7; rotary over q and k: about 16;
SiLU-and-mul: 2) with one launch, and rounds where the torch formula in layers.py rounds, so the
results equal it (bitwise in float32; in bf16/fp16 up to the last-place differences of fp32 exp and
reduction order):

    RMSNorm       y = w * to_dtype(x32 * rsqrt(mean(x32^2) + eps))        (Gemma: to_dtype(x32 * r * (1 + w32)))
    silu_and_mul  to_dtype(to_dtype(silu(g32)) * u32)                     for x = [g | u] along the last dim
    rotary        o1 = to_dtype(to_dtype(x1 c1) - to_dtype(x2 s1)),  o2 = to_dtype(to_dtype(x2 c2) + to_dtype(x1 s2))
                  with c, s = cos, sin[position] cast to the dtype first (NeoX rotate-half; partial rotary
                  copies the rest)

layers.py calls them for CUDA tensors when Triton imports (PAGELLM_FUSED_ELEMENTWISE=0 turns them off,
to measure what they save); the tests run them under Triton's interpreter on CPU against the torch
formulas.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_o,
                     BLOCK: tl.constexpr, GEMMA: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    if GEMMA:
        y = x32 * rstd * (1.0 + w.to(tl.float32))
    else:
        y = w.to(tl.float32) * (x32 * rstd).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0)
    g32 = g.to(tl.float32)
    s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (s * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, pos_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ot, stride_oh,
                   stride_c, HALF: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   PARTIAL: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, HP)
    ok = i < HALF
    src = x_ptr + t * stride_xt + h * stride_xh
    dst = out_ptr + t * stride_ot + h * stride_oh
    x1 = tl.load(src + i, mask=ok, other=0.0)
    x2 = tl.load(src + HALF + i, mask=ok, other=0.0)
    dt = x1.dtype
    c1 = tl.load(cos_ptr + pos * stride_c + i, mask=ok, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_c + HALF + i, mask=ok, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_c + i, mask=ok, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_c + HALF + i, mask=ok, other=0.0).to(dt).to(tl.float32)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    o1 = (a * c1).to(dt).to(tl.float32) - (b * s1).to(dt).to(tl.float32)
    o2 = (b * c2).to(dt).to(tl.float32) + (a * s2).to(dt).to(tl.float32)
    tl.store(dst + i, o1.to(dt), mask=ok)
    tl.store(dst + HALF + i, o2.to(dt), mask=ok)
    if PARTIAL:  # channels past the rotary dims pass through
        j = 2 * HALF + tl.arange(0, DP)
        keep = j < D
        tl.store(dst + j, tl.load(src + j, mask=keep, other=0.0), mask=keep)


def _pow2(n: int) -> int:
    return max(1, 1 << (n - 1).bit_length())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    n = shape[-1]
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, n, eps, x2.stride(0), out.stride(0), BLOCK=_pow2(n),
                                         GEMMA=gemma, num_warps=4 if n <= 4096 else 8)
    return out.view(shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(T, 2I) = [gate | up] -> silu(gate) * up, (T, I)."""
    t, two_i = x.shape
    n = two_i // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    block = min(1024, _pow2(n))
    if t:
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block)
    return out


def rotary(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           rotary_dim: int) -> torch.Tensor:
    """x (T, H, D) rotated by the rows of the (max_len, rotary_dim) float32 cos/sin tables at `positions`."""
    t, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(t, h, d, dtype=x.dtype, device=x.device)
    half = rotary_dim // 2
    if t:
        _rotary_kernel[(t, h)](x, out, positions, cos, sin, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                               cos.stride(0), HALF=half, HP=_pow2(half), D=d, DP=_pow2(max(1, d - rotary_dim)),
                               PARTIAL=rotary_dim < d)
    return out
