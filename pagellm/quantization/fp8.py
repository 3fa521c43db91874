"""FP8 weights (float8 e4m3fn), held in 8 bits: half of bf16's memory, a quarter of float32's.

    --quantization fp8   any checkpoint, quantized at load time: one scale per output channel,
                         q = round_fp8(w / s), s (N,) = max|w[n, :]| / 448
    FP8 checkpoints      config.json quantization_config {"quant_method": "fp8", ...}, read as stored:
                         per-tensor   `weight_scale` (a scalar per checkpoint tensor; AutoFP8, vLLM's own)
                         block-wise   `weight_scale_inv` (N/bn, K/bk) with "weight_block_size": [bn, bk]
                                      (DeepSeek-V3, Qwen3-*-FP8: w = q * s per bn x bk block)

    w[n, k] = q[n, k] * scale(n, k)

A matmul dequantizes the layer's weight into the compute dtype and multiplies (weight-only): the memory is
saved, not time. Activation scales (`input_scale`) are not used. Packed projections keep each part's scales:
per-tensor scales become per-row, block scales are placed at their part's block rows, so tensor parallelism
slices them like the weight (shards must start on a block boundary).
"""

from __future__ import annotations

import logging

import torch

from pagellm.models.weight_utils import ckpt_full, ckpt_narrow, ckpt_shape, copy_into, set_weight_loader

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q float8_e4m3fn (N, K), scale float32 (N, 1)): per output channel."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


_LUT: dict[torch.device, torch.Tensor] = {}


def _to_float32(q: torch.Tensor) -> torch.Tensor:
    """fp8 -> float32. On CPU through a 256-entry table (the byte's value): ~2.4x faster than torch's cast."""
    if q.device.type != "cpu":
        return q.to(torch.float32)
    lut = _LUT.get(q.device)
    if lut is None:
        lut = _LUT[q.device] = torch.arange(256, dtype=torch.uint8).view(FP8).to(torch.float32)
    return torch.take(lut, q.view(torch.uint8).to(torch.int64))


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """float32 weight of q with per-row (N, 1) scales, or (N/bn, K/bk) block scales."""
    w = _to_float32(q)
    if block is None:
        return w.mul_(scale)
    bn, bk = block
    n, k = w.shape
    return w.view(n // bn, bn, k // bk, bk).mul_(scale[:, None, :, None]).view(n, k)


class Fp8Method:
    name = "fp8"

    def __init__(self, qc: dict | None = None) -> None:
        self.checkpoint = qc is not None  # weights stored in fp8 (else: quantized at load time)
        block = (qc or {}).get("weight_block_size")
        self.block: tuple[int, int] | None = tuple(block) if block else None
        skip = (qc or {}).get("modules_to_not_convert") or (qc or {}).get("ignored_layers") or ()
        self.skip = tuple(skip)
        self.layers = 0

    @staticmethod
    def check_config(qc: dict) -> None:
        block = qc.get("weight_block_size")
        if block is not None and (not isinstance(block, (list, tuple)) or len(block) != 2
                                  or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"fp8 checkpoint: weight_block_size must be two positive integers, got {block!r}.")
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise ValueError(f"fp8 checkpoint with fmt={fmt!r}: pagellm reads float8 e4m3 weights.")

    def describe(self) -> str:
        how = (f"block-wise scales {self.block[0]}x{self.block[1]}" if self.block else "per-tensor scales") \
            if self.checkpoint else "per-channel scales, quantized at load"
        return f"fp8 e4m3 weights ({how}), dequantized in each matmul"

    # -- FP8 checkpoints: fp8 parameters and their scales in place of the dense weight --------------------

    def prepare(self, name: str, layer) -> None:
        if not self.checkpoint or any(name == m or name.endswith("." + m) or f".{m}." in f".{name}."
                                      for m in self.skip):
            return
        from pagellm.models.parallel_layers import ColumnParallelLinear

        n, k = layer.weight.shape  # this rank's shard
        column = isinstance(layer, ColumnParallelLinear)
        del layer.weight
        layer.register_parameter("weight", torch.nn.Parameter(torch.zeros(n, k, dtype=FP8), requires_grad=False))
        shard_ids = frozenset(range(len(layer.parts))) if column else None
        set_weight_loader(layer.weight, self._weight_loader(layer, column), shard_ids)
        if self.block is None:  # a scalar per checkpoint tensor, kept per output row
            layer.register_parameter("weight_scale", torch.nn.Parameter(torch.ones(n, 1), requires_grad=False))
            set_weight_loader(layer.weight_scale, self._tensor_scale_loader(layer, column), shard_ids)
        else:
            bn, bk = self.block
            if n % bn or k % bk:
                raise ValueError(f"{name}: its {n} x {k} weight (per rank) is not made of {bn} x {bk} blocks.")
            if column and any(p.start % bn or p.size % bn for p in layer.parts):
                raise ValueError(f"{name}: a part or tensor-parallel shard does not start on a {bn}-row block.")
            if not column and layer.in_start % bk:
                raise ValueError(f"{name}: a tensor-parallel shard does not start on a {bk}-column block.")
            layer.register_parameter("weight_scale_inv", torch.nn.Parameter(torch.ones(n // bn, k // bk),
                                                                            requires_grad=False))
            set_weight_loader(layer.weight_scale_inv, self._block_scale_loader(layer, column), shard_ids)
        layer.fp8_checkpoint = True

    def _weight_loader(self, layer, column: bool):
        def load(param: torch.Tensor, tensor, shard_id=None) -> None:
            if column:
                layer.load_rows(param, tensor, shard_id, out_dim=0)
            else:
                copy_into(param, ckpt_narrow(tensor, 1, layer.in_start, layer.in_features))
        return load

    def _tensor_scale_loader(self, layer, column: bool):
        def load(param: torch.Tensor, tensor, shard_id=None) -> None:
            s = ckpt_full(tensor).float().reshape(-1)
            if s.numel() != 1:  # per-channel (N,) or (N, 1): rows as the weight's
                if column:
                    layer.load_rows(param, s[:, None], shard_id, out_dim=0)
                else:
                    copy_into(param, s[:, None])
                return
            if not column or shard_id is None:
                param.data.fill_(float(s))
            else:
                off, size = layer.offsets[shard_id], layer.parts[shard_id].size
                param.data[off:off + size] = float(s)
        return load

    def _block_scale_loader(self, layer, column: bool):
        bn, bk = self.block

        def load(param: torch.Tensor, tensor, shard_id=None) -> None:
            if not column:
                copy_into(param, ckpt_narrow(tensor, 1, layer.in_start // bk, layer.in_features // bk).float())
                return
            parts = list(enumerate(layer.parts)) if shard_id is None else [(shard_id, layer.parts[shard_id])]
            for i, part in parts:
                src = ((layer.full_offsets[i] if shard_id is None else 0) + part.start) // bn
                have = ckpt_shape(tensor)[0]
                want = -(-(sum(p.full_size for p in layer.parts) if shard_id is None else part.full_size) // bn)
                if have != want:
                    raise ValueError(f"checkpoint has {have} block rows of scales, the model expects {want}")
                rows = ckpt_narrow(tensor, 0, src, part.size // bn).float()
                copy_into(param[layer.offsets[i] // bn:(layer.offsets[i] + part.size) // bn], rows)
        return load

    # -- after loading ---------------------------------------------------------------------------------

    def finish(self, layer, dtype: torch.dtype, device: torch.device) -> bool:
        if getattr(layer, "fp8_checkpoint", False):
            q = layer.weight.data
            scale = (layer.weight_scale_inv if self.block else layer.weight_scale).data.float()
            del layer.weight
            for pname in ("weight_scale", "weight_scale_inv"):
                if hasattr(layer, pname):
                    delattr(layer, pname)
            block = self.block
        elif self.checkpoint:
            return False  # a layer the checkpoint keeps unquantized
        else:
            q, scale = quantize_fp8(layer.weight.data)
            del layer.weight
            block = None
        layer.fp8_weight = q.to(device)  # plain attributes: model.to(dtype) must not cast them
        layer.fp8_scale = scale.to(device)
        layer.fp8_block = block
        layer.quant_method = self
        self.layers += 1
        return True

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.fp8_block is not None:
            w = dequantize_fp8(layer.fp8_weight, layer.fp8_scale, layer.fp8_block).to(x.dtype)
            return torch.nn.functional.linear(x, w, bias)
        # per-row scales: scale the (M, N) output instead of the (N, K) weight
        y = torch.nn.functional.linear(x, _to_float32(layer.fp8_weight).to(x.dtype))
        y = y * layer.fp8_scale.t().to(y.dtype)
        return y if bias is None else y + bias
