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
slices them like the weight (shards must start on a block boundary; an unsharded tensor's last block row and
column may be cut short, as DeepSeek-V3's kv_a_proj_with_mqa: 576 rows of 128-row blocks). Mixtures of experts
keep their experts in fp8 as well (checkpoints: one tensor per expert and projection, as DeepSeek-V3 and Qwen3-MoE
FP8 store them; at load time: per-row scales), each expert widened when a step routes tokens to it.
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
    if n % bn or k % bk:  # a last block row / column cut short (DeepSeek-V3's 576-row kv_a_proj_with_mqa)
        return w.mul_(scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k])
    return w.view(n // bn, bn, k // bk, bk).mul_(scale[:, None, :, None]).view(n, k)


class Fp8Method:
    name = "fp8"
    skip_weights = (".input_scale", ".activation_scale")  # static activation scales: not used (weight-only)

    def __init__(self, qc: dict | None = None, block_scale_name: str = "weight_scale_inv",
                 expert_row_scales: bool = False) -> None:
        self.block_scale_name = block_scale_name  # compressed-tensors names the block scales weight_scale
        self.expert_row_scales = expert_row_scales  # experts' scales per row (compressed-tensors' channel scheme)
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

    def _converts(self, name: str) -> bool:
        """Whether the checkpoint stores module `name` in fp8 (not in its modules_to_not_convert)."""
        return self.checkpoint and not any(name == m or name.endswith("." + m) or f".{m}." in f".{name}."
                                           for m in self.skip)

    def prepare(self, name: str, layer) -> None:
        if not self._converts(name):
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
            # The dimension that is split (a column-parallel layer's rows over ranks or packed parts, a row-parallel
            # layer's columns over ranks) must be made of whole blocks; a dimension held whole may end in a block cut
            # short (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows of 128-row blocks).
            split = column and (len(layer.parts) > 1 or layer.parts[0].size != layer.parts[0].full_size)
            if split and any(p.start % bn or p.size % bn for p in layer.parts):
                raise ValueError(f"{name}: a part or tensor-parallel shard of its {n} rows (per rank) is not "
                                 f"made of {bn}-row blocks.")
            if not column and layer.tp.size > 1 and (layer.in_start % bk or k % bk):
                raise ValueError(f"{name}: a tensor-parallel shard of its {k} columns (per rank) is not made of "
                                 f"{bk}-column blocks.")
            layer.register_parameter(self.block_scale_name, torch.nn.Parameter(
                torch.ones(-(-n // bn), -(-k // bk)), requires_grad=False))
            set_weight_loader(getattr(layer, self.block_scale_name), self._block_scale_loader(layer, column),
                              shard_ids)
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
                copy_into(param, ckpt_narrow(tensor, 1, layer.in_start // bk, param.shape[1]).float())
                return
            parts = list(enumerate(layer.parts)) if shard_id is None else [(shard_id, layer.parts[shard_id])]
            for i, part in parts:
                src = ((layer.full_offsets[i] if shard_id is None else 0) + part.start) // bn
                have = ckpt_shape(tensor)[0]
                want = -(-(sum(p.full_size for p in layer.parts) if shard_id is None else part.full_size) // bn)
                if have != want:
                    raise ValueError(f"checkpoint has {have} block rows of scales, the model expects {want}")
                rows = ckpt_narrow(tensor, 0, src, -(-part.size // bn)).float()
                copy_into(param[layer.offsets[i] // bn:-(-(layer.offsets[i] + part.size) // bn)], rows)
        return load

    # -- FP8 checkpoints of mixtures of experts: experts.<e>.<gate|up|down>_proj.weight and their scales ------

    def prepare_experts(self, name: str, moe) -> None:
        """FusedMoE's w13 (E, 2I, H) and w2 (E, H, I) in fp8, with w13_scale / w2_scale (one scalar per expert
        tensor: (E, 2) and (E, 1)) or w13_scale_inv (E, 2I / bn, H / bk) / w2_scale_inv (E, H / bn, I / bk)."""
        if not self._converts(name):
            return
        e, rows, h = moe.w13.shape
        local = moe.intermediate_size
        for pname in ("w13", "w2"):
            old = getattr(moe, pname)
            loader, ids = old.weight_loader, old.shard_ids
            delattr(moe, pname)
            moe.register_parameter(pname, torch.nn.Parameter(torch.zeros(old.shape, dtype=FP8), requires_grad=False))
            set_weight_loader(getattr(moe, pname), loader, ids)
        if self.block is None:
            shapes = {"w13_scale": (e, 2 * local, 1), "w2_scale": (e, h, 1)} if self.expert_row_scales else \
                {"w13_scale": (e, 2), "w2_scale": (e, 1)}
        else:
            bn, bk = self.block
            if local % bn or local % bk or h % bn or h % bk or moe.i_start % bn or moe.i_start % bk:
                raise ValueError(f"{name}: its experts ({local} intermediate rows per rank, hidden {h}) are not made "
                                 f"of {bn} x {bk} blocks.")
            shapes = {"w13_scale_inv": (e, 2 * local // bn, h // bk), "w2_scale_inv": (e, h // bn, local // bk)}
        for pname, shape in shapes.items():
            moe.register_parameter(pname, torch.nn.Parameter(torch.ones(shape), requires_grad=False))
            target = moe.w13 if pname.startswith("w13") else moe.w2
            set_weight_loader(getattr(moe, pname), self._expert_scale_loader(moe, pname), target.shard_ids)
        moe.fp8_checkpoint = True

    def _expert_scale_loader(self, moe, pname: str):
        block = self.block

        def load(param: torch.Tensor, tensor, shard_id=None) -> None:
            if shard_id is None:
                raise ValueError("FP8 experts stored stacked (experts.gate_up_proj) are not supported: pagellm reads "
                                 "one tensor per expert and projection.")
            e, part = shard_id if isinstance(shard_id, tuple) else (shard_id, None)
            e = moe.local_expert(e)
            if e is None:
                return  # another rank's expert (expert parallel)
            if block is None and self.expert_row_scales:  # (rows, 1): gate / up this rank's rows, down every row
                if part is not None:
                    n = param.shape[1] // 2
                    copy_into(param[e, part * n:(part + 1) * n], ckpt_narrow(tensor, 0, moe.i_start, n).float()
                              .reshape(n, 1))
                else:
                    copy_into(param[e], ckpt_full(tensor).float().reshape(-1, 1))
                return
            if block is None:
                with torch.no_grad():
                    param[e, part or 0] = float(ckpt_full(tensor).float().reshape(-1)[0])
                return
            bn, bk = block
            if part is not None:  # gate (0) or up (1): (I / bn, H / bk) of this rank's rows
                n = param.shape[1] // 2
                copy_into(param[e, part * n:(part + 1) * n], ckpt_narrow(tensor, 0, moe.i_start // bn, n).float())
            else:  # down: (H / bn, I / bk), this rank's columns
                copy_into(param[e], ckpt_narrow(tensor, 1, moe.i_start // bk, param.shape[2]).float())
        return load

    def finish_experts(self, moe, device: torch.device) -> bool:
        """FP8 checkpoint experts as loaded; with --quantization fp8 (no FP8 checkpoint), every expert quantized
        here, one scale per output row as the dense layers."""
        if self.checkpoint and not getattr(moe, "fp8_checkpoint", False):
            return False  # experts the checkpoint keeps unquantized
        local = moe.intermediate_size
        if not self.checkpoint:
            q13, s13 = quantize_fp8(moe.w13.data.flatten(0, 1))
            q2, s2 = quantize_fp8(moe.w2.data.flatten(0, 1))
            e = moe.w13.shape[0]
            w13, w2 = q13.view(moe.w13.shape), q2.view(moe.w2.shape)
            s13, s2 = s13.view(e, -1, 1), s2.view(e, -1, 1)
        elif self.block is None and self.expert_row_scales:  # stored per row already
            w13, w2 = moe.w13.data, moe.w2.data
            s13, s2 = moe.w13_scale.data.float(), moe.w2_scale.data.float()
        elif self.block is None:  # per-row scales (E, rows, 1): gate rows, up rows; down rows
            w13, w2 = moe.w13.data, moe.w2.data
            s13 = moe.w13_scale.data.float().repeat_interleave(local, dim=1)[..., None]
            s2 = moe.w2_scale.data.float().expand(-1, moe.w2.shape[1])[..., None]
        else:
            w13, w2 = moe.w13.data, moe.w2.data
            s13, s2 = moe.w13_scale_inv.data.float(), moe.w2_scale_inv.data.float()
        moe.fp8_w13, moe.fp8_w2 = w13.to(device), w2.to(device)  # plain attributes: not cast
        moe.fp8_w13_scale, moe.fp8_w2_scale = s13.to(device), s2.to(device)
        for pname in ("w13", "w2", "w13_scale", "w2_scale", "w13_scale_inv", "w2_scale_inv"):
            if hasattr(moe, pname):
                delattr(moe, pname)
        moe.quant_method = self
        return True

    def expert_weights(self, moe, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (2I, H) gate/up and (H, I) down weights in the compute dtype."""
        block = self.block if self.checkpoint else None
        return (dequantize_fp8(moe.fp8_w13[e], moe.fp8_w13_scale[e], block).to(dtype),
                dequantize_fp8(moe.fp8_w2[e], moe.fp8_w2_scale[e], block).to(dtype))

    # -- after loading ---------------------------------------------------------------------------------

    def finish(self, layer, dtype: torch.dtype, device: torch.device) -> bool:
        if getattr(layer, "fp8_checkpoint", False):
            q = layer.weight.data
            scale = getattr(layer, self.block_scale_name if self.block else "weight_scale").data.float()
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
