"""`--quantization int8`: int8 weights with one scale per output channel, quantized at load time.

    w (N, K) float  ->  qweight (N, K) int8 = round(w / s_w),  s_w (N,) = max|w[n, :]| / 127

Two ways to multiply, picked per CPU when the model loads:

    w8a8   (CPU with VNNI or AMX-int8, and CUDA) each step quantizes the activations per token,
           x ~ s_x * round(x / s_x), multiplies int8 x int8 -> int32 (torch._int_mm, oneDNN), and
           rescales: y = (x_q @ qweight^T) * s_x * s_w. On an avx512_vnni Xeon this runs 1.3-1.5x
           faster than bf16 at decode batch sizes (GPT-2 shapes, 16-256 rows).
    w8a16  (elsewhere) weight-only: activations stay bf16, weights are dequantized in the kernel
           (torch._weight_int8pack_mm); it halves weight memory, not time.

The numbers are measured by `pagellm bench quality` (agreement and perplexity) and
`pagellm bench throughput --quantization int8`.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

INT8_MAX = 127.0


def cpu_has_int8_dot() -> bool:
    """VNNI (AVX512 or AVX) or AMX-int8: int8 dot products in hardware, per /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (qweight int8 (N, K), scale float32 (N,)), symmetric per output channel."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (int8 (M, K), scale float32 (M, 1)), symmetric per token."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12).div_(INT8_MAX)
    return torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class Int8Method:
    name = "int8"

    def __init__(self, scheme: str | None = None) -> None:
        self.scheme = scheme  # "w8a8" | "w8a16"; None: picked for the device when the model loads

    def describe(self) -> str:
        return {"w8a8": "int8 weights and per-token int8 activations",
                "w8a16": "weight-only int8"}.get(self.scheme or "", "")

    def prepare(self, name: str, layer) -> None:
        pass  # weights load in full precision, then finish() quantizes them

    def prepare_experts(self, name: str, moe) -> None:
        pass  # mixture-of-experts experts stay in the compute dtype

    def finish_experts(self, moe, device: torch.device) -> bool:
        return False

    def finish(self, layer, dtype: torch.dtype, device: torch.device) -> bool:
        if self.scheme is None:
            self.scheme = "w8a8" if device.type == "cuda" or cpu_has_int8_dot() else "w8a16"
        q, scale = quantize_weight(layer.weight.data)
        del layer.weight  # the float weight is gone: only int8 stays resident
        layer.qweight = q.to(device)
        layer.wscale = scale.to(device)  # float32: the rescale stays exact
        layer.wscale_act = scale.to(device=device, dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
        layer.quant_method = self
        return True

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.scheme == "w8a8":
            y = self._w8a8(layer, x2, bias)
        else:
            act = layer.wscale_act.dtype
            y = torch._weight_int8pack_mm(x2.to(act).contiguous(), layer.qweight, layer.wscale_act).to(x.dtype)
            if bias is not None:
                y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def _w8a8(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = x.shape[0]
        ops = _cpu_ops() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) else None
        xq, xs = ops.quantize_rows_int8(x) if ops is not None else quantize_activations(x)
        if x.device.type == "cuda" and m <= 16:  # cuBLASLt int8 GEMMs need more than 16 rows
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 32 - m))
        acc = torch._int_mm(xq.contiguous(), layer.qweight.t())[:m]  # (M, N) int32
        if ops is not None:  # one fused pass: int32 * row scale * column scale + bias, in the compute dtype
            return ops.rescale_int32(acc, xs, layer.wscale, bias if bias is not None else torch.empty(0), x.dtype)
        y = acc.float().mul_(xs).mul_(layer.wscale).to(x.dtype)
        return y if bias is None else y + bias


@functools.lru_cache(maxsize=1)
def _cpu_ops():
    """The compiled CPU helpers (attention/csrc/int8_ops.cpp), or None if the extension cannot be built."""
    try:
        from pagellm.attention.cpu_paged import load_extension

        return load_extension()
    except Exception as e:  # a machine without a compiler: torch ops do the same, slower
        logger.warning("int8 activation kernels unavailable (%s); using torch ops", e)
        return None
