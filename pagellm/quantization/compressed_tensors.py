"""compressed-tensors checkpoints (quantization_config {"quant_method": "compressed-tensors", ...}: what llm-compressor
writes, and most quantized checkpoints made for vLLM), read as stored.

The config lists `config_groups`, each a scheme (weights, input_activations) for the modules its `targets` name
("Linear", "re:<regex>" or a module name), and `ignore` (names or regexes) for modules kept in full precision. A
scheme runs on the method that holds its weights the way the checkpoint stores them:

    int weights, 4 or 8 bits, groups or rows, no activation quantization (W4A16, W8A16; format pack-quantized)
        weight_packed (N, K * bits / 32) int32   32 / bits values per int32 along K, low bits first, each + 2^(bits-1)
        weight_scale  (N, K / g)                 (g = K: one scale per row)
        weight_zero_point (N * bits / 32, K / g) int32, packed along N (asymmetric only; symmetric: zero 0)
        weight_g_idx  (K,)                       activation order (optional)
        w[n, k] = (q[n, k] - zero[n, group(k)]) * scale[n, group(k)]
      -> quantization/int4.py's layers: 4 bits on the CPU int4 kernel where it applies, else dequantized at load
    int8 weights per row with int8 activations per token (W8A8; format int-quantized)
        weight (N, K) int8, weight_scale (N, 1)
      -> quantization/int8.py's layers (per-token activation quantization where the CPU has int8 dot products)
    fp8 e4m3 weights per tensor, row or block (FP8, FP8_DYNAMIC, FP8_BLOCK; format float-quantized)
        weight (N, K) float8_e4m3fn, weight_scale (1,) | (N, 1) | (N / bn, K / bk)
      -> quantization/fp8.py's layers (weight-only: activation scales are not used)

Other schemes (4-bit floats, int4 weights with int8 activations, sparsity, ...) are refused when the config is read.
Experts of mixtures of experts follow the fp8 method's support (fp8: one tensor per expert and projection); int
experts are refused. A layer pagellm packs (q/k/v, gate/up) is quantized when all its parts are, with one scheme.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from pagellm.models.weight_utils import ckpt_full, ckpt_narrow, copy_into, set_weight_loader
from pagellm.quantization.fp8 import Fp8Method
from pagellm.quantization.int4 import Int4Config, Int4Method
from pagellm.quantization.int8 import Int8Method

FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")


def unpack_bits(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """int32 tensor with 32 / bits values per element along `dim` (low bits first) -> uint8, `count` long there."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    p = packed.to(torch.int32).movedim(dim, -1)
    vals = (p[..., None] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*p.shape[:-1], p.shape[-1] * per)[..., :count].to(torch.uint8).movedim(-1, dim)


def _matches(pattern: str, name: str, cls_name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == cls_name


def classify(scheme: dict, fmt: str | None) -> str:
    """The method a scheme runs on: "int" (weight-only int), "int8" (W8A8), "fp8"; ValueError otherwise."""
    w, a = scheme.get("weights") or {}, scheme.get("input_activations")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (pagellm reads {', '.join(FORMATS)}).")
    bits, kind, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
    if kind == "float" and bits == 8 and strategy in ("tensor", "channel", "block"):
        return "fp8"
    if kind == "int" and a is None and bits in (4, 8) and strategy in ("group", "channel"):
        if fmt not in (None, "pack-quantized"):
            raise ValueError(f"compressed-tensors int{bits} weight-only checkpoints are read in the pack-quantized "
                             f"format, not {fmt!r}.")
        return "int"
    if (kind == "int" and bits == 8 and strategy == "channel" and w.get("symmetric", True) and a is not None
            and a.get("type", "int") == "int" and a.get("num_bits") == 8):
        return "int8"
    raise ValueError(f"compressed-tensors scheme with weights {w} and input activations {a} is not supported: "
                     "pagellm reads int4/int8 weight-only (W4A16, W8A16), int8 W8A8 and FP8 checkpoints.")


class CtIntWeightOnly(Int4Method):
    """pack-quantized int weights (4 or 8 bits) on int4.py's layers, under the checkpoint's names."""

    names = {"qweight": "weight_packed", "qzeros": "weight_zero_point", "scales": "weight_scale",
             "g_idx": "weight_g_idx"}

    def __init__(self, weights: dict) -> None:
        self.bits = int(weights["num_bits"])
        self.stored_zeros = not weights.get("symmetric", True)
        self.fixed_zero = 1 << (self.bits - 1)  # stored values carry this offset; a symmetric zero is 0
        group = int(weights.get("group_size") or -1) if weights.get("strategy") == "group" else -1
        super().__init__("compressed-tensors", {}, Int4Config("compressed-tensors", group, 0, False, ()))
        self.name = f"compressed-tensors w{self.bits}a16"

    def _natural(self, pname: str, tensor) -> torch.Tensor:
        t = ckpt_full(tensor)
        if pname == "scales":
            return t.float()
        if pname == "qweight":
            return unpack_bits(t, self.bits, t.shape[1] * 32 // self.bits, 1)
        return unpack_bits(t, self.bits, t.shape[0] * 32 // self.bits, 0)  # zero points, packed along N

    def _group(self, layer) -> int:
        return self.cfg.group_size if self.cfg.group_size != -1 else layer.in_features  # -1: a scale per row

    def _loader(self, layer, pname: str, g: int, column: bool):
        inner = super()._loader(layer, pname, g, column)

        def load(param: torch.Tensor, tensor, shard_id=None) -> None:
            if not column and self.cfg.group_size == -1 and pname != "qweight":  # a row's scale: every rank's
                copy_into(param, self._natural(pname, tensor))
                return
            inner(param, tensor, shard_id)
        return load


class CtInt8(Int8Method):
    """int-quantized int8 weights with one scale per row (W8A8) on int8.py's layers."""

    name = "compressed-tensors w8a8"

    def prepare(self, name: str, layer) -> None:
        from pagellm.models.parallel_layers import ColumnParallelLinear

        n, k = layer.weight.shape
        column = isinstance(layer, ColumnParallelLinear)
        shard_ids = frozenset(range(len(layer.parts))) if column else None
        del layer.weight
        layer.register_parameter("weight", torch.nn.Parameter(torch.zeros(n, k, dtype=torch.int8),
                                                              requires_grad=False))
        layer.register_parameter("weight_scale", torch.nn.Parameter(torch.ones(n, 1), requires_grad=False))
        for pname in ("weight", "weight_scale"):
            set_weight_loader(getattr(layer, pname), self._loader(layer, column), shard_ids)
        layer.ct_int8 = True

    @staticmethod
    def _loader(layer, column: bool):
        def load(param: torch.Tensor, tensor, shard_id=None) -> None:
            t = ckpt_full(tensor)
            t = t.reshape(-1, 1).float() if param.dtype != torch.int8 else t
            if column:
                layer.load_rows(param, t, shard_id, out_dim=0)
            elif param.dtype == torch.int8:
                copy_into(param, ckpt_narrow(tensor, 1, layer.in_start, layer.in_features))
            else:
                copy_into(param, t)
        return load

    def finish(self, layer, dtype: torch.dtype, device: torch.device) -> bool:
        if not getattr(layer, "ct_int8", False):
            return False
        if self.scheme is None:
            from pagellm.quantization.int8 import cpu_has_int8_dot

            self.scheme = "w8a8" if device.type == "cuda" or cpu_has_int8_dot() else "w8a16"
        q, scale = layer.weight.data, layer.weight_scale.data.float().reshape(-1)
        del layer.weight, layer.weight_scale
        layer.qweight = q.to(device)
        layer.wscale = scale.to(device)
        layer.wscale_act = scale.to(device=device, dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
        layer.quant_method = self
        return True


class CompressedTensorsMethod:
    """Each projection to the method of its scheme (or none: kept in full precision)."""

    name = "compressed-tensors"
    skip_weights = (".weight_shape", ".input_scale", ".input_zero_point", ".output_scale", ".output_zero_point")

    def __init__(self, qc: dict) -> None:
        self.ignore = tuple(qc.get("ignore") or ())
        top = qc.get("format")
        self.groups: list[tuple[tuple[str, ...], Any]] = []  # (targets, method)
        for group in (qc.get("config_groups") or {}).values():
            kind = classify(group, group.get("format") or top)
            if kind == "fp8":
                strategy = group["weights"].get("strategy")
                block = group["weights"].get("block_structure") if strategy == "block" else None
                method = Fp8Method({"weight_block_size": block} if block else {}, block_scale_name="weight_scale",
                                   expert_row_scales=strategy == "channel")
            elif kind == "int8":
                method = CtInt8()
            else:
                method = CtIntWeightOnly(group["weights"])
            self.groups.append((tuple(group.get("targets") or ()), method))
        if not self.groups:
            raise ValueError("compressed-tensors checkpoint without config_groups: nothing to read.")
        self.parts: dict[str, tuple[str, ...]] = {}  # our packed module name -> the checkpoint's part names

    @staticmethod
    def check_config(qc: dict) -> None:
        CompressedTensorsMethod(qc)

    def describe(self) -> str:
        return "; ".join(m.describe() for _, m in self.groups)

    def bind_model(self, model) -> None:
        """The checkpoint's names of each packed projection's parts (q/k/v, gate/up), from the model's classes."""
        for m in model.modules():
            for hf, (ours, _) in (getattr(m, "packed_modules", None) or {}).items():
                self.parts.setdefault(ours, ())
                if hf not in self.parts[ours]:
                    self.parts[ours] = (*self.parts[ours], hf)

    def _names(self, name: str) -> list[list[str]]:
        """The checkpoint's module names for our module `name`: one list per part of a packed one, each with the
        name in either layout of a multimodal checkpoint's language model."""
        head, _, last = name.rpartition(".")
        parts = [f"{head}.{p}" if head else p for p in self.parts.get(last, ())] or [name]
        return [[n, "model.language_model." + n[len("language_model.model."):]]
                if n.startswith("language_model.model.") else [n] for n in parts]

    def _part_method(self, names: list[str]) -> Any | None:
        if any(_matches(p, n, "Linear") for p in self.ignore for n in names):
            return None
        return next((m for targets, m in self.groups for n in names if any(_matches(t, n, "Linear") for t in targets)),
                    None)

    def method_for(self, name: str) -> Any | None:
        """The method of our module `name`: its parts' one (None: kept in full precision); a ValueError when the
        parts pagellm packs into it are stored differently."""
        methods = [self._part_method(names) for names in self._names(name)]
        if any(m is not methods[0] for m in methods):
            raise ValueError(f"{name}: its parts are stored with different compressed-tensors schemes (or some "
                             "ignored); pagellm packs them into one layer.")
        return methods[0]

    def prepare(self, name: str, layer) -> None:
        method = self.method_for(name)
        if method is not None:
            method.prepare(name, layer)
            layer.ct_method = method

    def finish(self, layer, dtype: torch.dtype, device: torch.device) -> bool:
        method = getattr(layer, "ct_method", None)
        return method is not None and method.finish(layer, dtype, device)

    def _expert_method(self, name: str):
        method = self.method_for(name + ".0.gate_proj")  # the experts' checkpoint names: experts.<e>.<proj>
        if method is not None and not isinstance(method, Fp8Method):
            raise ValueError(f"compressed-tensors {method.name} experts ({name}) are not supported: pagellm reads "
                             "fp8 experts, or unquantized ones.")
        return method

    def prepare_experts(self, name: str, moe) -> None:
        method = self._expert_method(name)
        if method is not None:
            method.prepare_experts(name, moe)
            moe.ct_method = method

    def finish_experts(self, moe, device: torch.device) -> bool:
        method = getattr(moe, "ct_method", None)
        return method is not None and method.finish_experts(moe, device)
