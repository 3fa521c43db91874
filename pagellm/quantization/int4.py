"""4-bit GPTQ and AWQ checkpoints, read through config.json's `quantization_config` (as vLLM does).

What the checkpoint stores for a linear layer with K inputs, N outputs and groups of g inputs:

    GPTQ  qweight (K/8, N) int32    eight 4-bit values per int32 along K, low bits first
          qzeros  (K/g, N/8) int32  eight zero points per int32 along N; format "gptq" (v1) stores zero - 1
          scales  (K/g, N)
          g_idx   (K,)              group of each input (desc_act reorders it)
    AWQ   qweight (K, N/8) int32    eight values per int32 along N, in the order 0 2 4 6 1 3 5 7
          qzeros  (K/g, N/8) int32  same packing
          scales  (K/g, N)

    w[n, k] = (q[n, k] - zero[group(k), n]) * scale[group(k), n]

The loader unpacks each tensor to a plain (N, ...) layout with N first (qweight (N, K) uint8, zeros
and scales (N, K/g)), so the column- and row-parallel layers slice it like a dense weight: packed
q/k/v parts land at their row offsets, a row-parallel rank keeps its K range (whole groups).
After loading, each layer becomes one of:

    int4 kernel   CPU, bf16 compute, groups of 32/64/128/256, N a multiple of 16: torch._weight_int4pack_mm_for_cpu
                  (dequantizes in the matmul): w = (q - 8) * scale + (8 - zero) * scale
    dequantized   anything else (float32 compute, CUDA, desc_act with a shuffled g_idx, odd shapes): the weight is
                  dequantized once into the compute dtype; correct, without the memory saving
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagellm.models.weight_utils import ckpt_full, set_weight_loader

logger = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ nibble i of a packed int32 holds column AWQ_ORDER[i] of its 8
CPU_KERNEL_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class Int4Config:
    method: str  # gptq | awq
    group_size: int  # -1: one group over all inputs
    zero_offset: int  # added to stored zeros (1 for GPTQ v1 checkpoints)
    desc_act: bool
    modules_to_not_convert: tuple[str, ...]

    @classmethod
    def from_config(cls, method: str, qc: dict) -> Int4Config:
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise ValueError(f"{method} checkpoint with bits={bits}: pagellm runs 4-bit GPTQ/AWQ checkpoints.")
        group = int(qc.get("group_size", qc.get("q_group_size", -1)))
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(f"AWQ version {version!r} is not supported (pagellm reads the GEMM layout).")
            if qc.get("zero_point", True) is False:
                raise ValueError("AWQ without zero points is not supported.")
            offset = 0
        else:
            fmt = str(qc.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2).")
            offset = 1 if fmt == "gptq" else 0
        skip = tuple(qc.get("modules_to_not_convert") or ())
        return cls(method, group, offset, bool(qc.get("desc_act", False)), skip)


def unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 tensor with eight 4-bit values per element along `dim` (low bits first) -> uint8, 8x longer."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    p = packed.to(torch.int32).movedim(dim, -1)
    vals = (p[..., None] >> shifts) & 0xF  # (..., n, 8)
    return vals.reshape(*p.shape[:-1], -1).to(torch.uint8).movedim(-1, dim)


def awq_columns(unpacked: torch.Tensor) -> torch.Tensor:
    """Undo AWQ's nibble order along the last dim: column 8c + AWQ_ORDER[i] sits at nibble position 8c + i."""
    n = unpacked.shape[-1]
    inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])
    index = (torch.arange(n // 8)[:, None] * 8 + inverse[None, :]).reshape(-1)
    return unpacked[..., index]


class Int4Method:
    # our parameters' names (the checkpoint's): the 4-bit values, the zero points, the scales, the input groups
    names = {"qweight": "qweight", "qzeros": "qzeros", "scales": "scales", "g_idx": "g_idx"}
    bits = 4
    stored_zeros = True  # the checkpoint stores zero points (else every zero is `fixed_zero`)
    fixed_zero = 8

    def __init__(self, method: str, qc: dict, cfg: Int4Config | None = None) -> None:
        self.cfg = cfg or Int4Config.from_config(method, qc)
        self.name = method
        self.kernel_layers = 0
        self.dense_layers = 0

    def describe(self) -> str:
        return (f"4-bit, group {self.cfg.group_size}: {self.kernel_layers} on the int4 kernel, "
                f"{self.dense_layers} dequantized")

    # -- before loading: packed parameters in place of the dense weight -------------------------------

    def prepare_experts(self, name: str, moe) -> None:
        raise ValueError(f"{self.name} checkpoints of mixture-of-experts models are not supported: pagellm does not "
                         f"read 4-bit experts ({name}); an FP8 or unquantized checkpoint of the model is.")

    def finish_experts(self, moe, device) -> bool:
        return False

    def prepare(self, name: str, layer) -> None:
        if any(name == m or name.startswith(m + ".") or name.endswith("." + m) or f".{m}." in f".{name}."
               for m in self.cfg.modules_to_not_convert):
            return
        from pagellm.models.parallel_layers import ColumnParallelLinear

        n, k = layer.weight.shape  # this rank's shard
        g = self._group(layer)
        if k % g:
            raise ValueError(f"{name}: {k} inputs per rank do not split into groups of {g}")
        column = isinstance(layer, ColumnParallelLinear)
        if not column and layer.in_start % g:
            raise ValueError(f"{name}: a tensor-parallel shard starts inside a quantization group (group size {g})")
        if not column and self.cfg.desc_act and layer.tp.size > 1:
            raise ValueError(f"{name}: desc_act GPTQ checkpoints cannot be split over tensor_parallel_size > 1")
        shard_ids = frozenset(range(len(layer.parts))) if column else None
        del layer.weight
        nm = self.names
        layer.register_parameter(nm["qweight"], torch.nn.Parameter(torch.zeros(n, k, dtype=torch.uint8),
                                                                    requires_grad=False))
        layer.register_parameter(nm["qzeros"], torch.nn.Parameter(
            torch.full((n, k // g), self.fixed_zero, dtype=torch.uint8), requires_grad=False))
        layer.register_parameter(nm["scales"], torch.nn.Parameter(torch.zeros(n, k // g)))
        for pname in ("qweight", "qzeros", "scales"):
            ids = shard_ids if pname != "qzeros" or self.stored_zeros else frozenset()  # (frozenset: optional)
            set_weight_loader(getattr(layer, nm[pname]), self._loader(layer, pname, g, column), ids)
        if self.cfg.method != "awq":  # optional in a checkpoint: the default is input k in group k // g
            layer.register_parameter(nm["g_idx"], torch.nn.Parameter(torch.arange(k, dtype=torch.int32) // g,
                                                                      requires_grad=False))
            set_weight_loader(getattr(layer, nm["g_idx"]), self._g_idx_loader(layer, column), frozenset())
        layer.int4_group = g

    def _group(self, layer) -> int:
        g = self.cfg.group_size
        from pagellm.models.parallel_layers import ColumnParallelLinear

        full_k = layer.in_features if isinstance(layer, ColumnParallelLinear) else None
        if g == -1:
            if full_k is None:  # row-parallel: one group over the whole (unsharded) input
                if layer.tp.size > 1:
                    raise ValueError("group_size -1 checkpoints cannot be split over tensor_parallel_size > 1")
                return layer.in_features
            return full_k
        return g

    def _natural(self, pname: str, tensor) -> torch.Tensor:
        """A checkpoint tensor in the (N, ...) layout of our parameters."""
        t = ckpt_full(tensor)
        if pname == "scales":
            return t.float().t()
        if self.cfg.method == "gptq":
            if pname == "qweight":
                return unpack_int32(t, 0).t()  # (K/8, N) -> (K, N) -> (N, K)
            return (unpack_int32(t, 1).to(torch.int16) + self.cfg.zero_offset).to(torch.uint8).t()
        return awq_columns(unpack_int32(t, 1)).t()  # AWQ qweight (K, N/8) and qzeros (K/g, N/8)

    def _loader(self, layer, pname: str, g: int, column: bool):
        def load(param: torch.Tensor, tensor, shard_id=None) -> None:
            from pagellm.models.weight_utils import copy_into

            t = self._natural(pname, tensor)
            if column:
                layer.load_rows(param, t, shard_id, out_dim=0)
            else:
                per = 1 if pname == "qweight" else g  # qweight is per input; zeros and scales per group
                copy_into(param, t.narrow(1, layer.in_start // per, layer.in_features // per))
        return load

    def _g_idx_loader(self, layer, column: bool):
        def load(param: torch.Tensor, tensor, shard_id=None) -> None:
            from pagellm.models.weight_utils import copy_into

            t = ckpt_full(tensor).to(torch.int32)
            if not column:
                t = t.narrow(0, layer.in_start, layer.in_features) - layer.in_start // layer.int4_group
            elif getattr(layer, "g_idx_loaded", False) and not torch.equal(param.data, t):
                # q/k/v (gate/up) share their input, and act-order derives g_idx from it: one g_idx per layer
                raise ValueError("the packed projections of one layer have different g_idx")
            copy_into(param, t)
            layer.g_idx_loaded = True
        return load

    # -- after loading: the kernel layout, or a dequantized weight -----------------------------------

    def finish(self, layer, dtype: torch.dtype, device: torch.device) -> bool:
        nm = self.names
        if not hasattr(layer, nm["qweight"]) or not hasattr(layer, "int4_group"):
            return False
        g = layer.int4_group
        q = getattr(layer, nm["qweight"]).data
        n, k = q.shape
        groups = torch.arange(k, dtype=torch.int32) // g
        g_idx = getattr(layer, nm["g_idx"]).data if hasattr(layer, nm["g_idx"]) else groups
        ordered = bool(torch.equal(g_idx, groups))
        scale = getattr(layer, nm["scales"]).data.float()  # (N, K/g)
        zero = getattr(layer, nm["qzeros"]).data.float()
        for pname in nm.values():
            if hasattr(layer, pname):
                delattr(layer, pname)
        # bf16 only: torch's float32 path of this kernel runs ~0.9 ms per row for a 1024 x 1024 layer (50-70x the
        # dense float32 matmul of 8-64 rows; measured beside it), so a float32 model gets the dequantized weight
        kernel_dtype = dtype if dtype == torch.bfloat16 else None
        if (device.type == "cpu" and self.bits == 4 and ordered and g in CPU_KERNEL_GROUPS and n % 16 == 0
                and kernel_dtype):
            layer.int4_packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
            # kernel: w = (q - 8) * scale + zero_f, so zero_f = (8 - zero) * scale
            layer.int4_scales_zeros = torch.stack([scale.t(), ((8.0 - zero) * scale).t()], dim=-1).to(
                kernel_dtype).contiguous()  # (K/g, N, 2)
            layer.quant_method = self
            self.kernel_layers += 1
        else:
            cols = g_idx.long()
            w = (q.float() - zero[:, cols]) * scale[:, cols]
            layer.weight = torch.nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
            self.dense_layers += 1
        return True

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        act = layer.int4_scales_zeros.dtype
        x2 = x.reshape(-1, shape[-1]).to(act).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(x2, layer.int4_packed, layer.int4_group, layer.int4_scales_zeros)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
