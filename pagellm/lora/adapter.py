"""A PEFT LoRA adapter directory, read and fitted to a pagellm model.

    read_adapter_config(path, max_rank) -> dict      (checks what pagellm can serve; no model needed)
    load_adapter(model, request, max_rank, device, dtype) -> LoRAAdapter

PEFT stores, per adapted module, `base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r); the update is out += scale * x A^T B^T with scale = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora). A module's checkpoint name goes through the model's own `map_weight`, as the base weights do,
so q_proj lands on part 0 of the packed qkv_proj (rows offsets[0] .. + out_sizes[0]) and GPT-2's c_attn on
the whole packed layer. B is stored pre-scaled, and the parts of one packed layer are stacked (see LoRAAdapter).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from pagellm.lora.request import LoRARequest
from pagellm.models.parallel_layers import ColumnParallelLinear, Linear, RowParallelLinear


def read_adapter_config(path: str, max_rank: int) -> dict:
    """The adapter's adapter_config.json, or a ValueError that names what pagellm cannot serve."""
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"LoRA adapter {path!r}: no adapter_config.json (a PEFT LoRA adapter directory is expected).")
    with open(cfg_file) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {path!r}: peft_type {cfg.get('peft_type')!r} is not LORA.")
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA adapter {path!r}: r must be a positive integer, got {r!r}.")
    ranks = [r, *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise ValueError(f"LoRA adapter {path!r} has rank {max(ranks)}, more than max_lora_rank={max_rank}; "
                         "raise --max-lora-rank.")
    unsupported = [k for k in ("modules_to_save", "alpha_pattern", "layers_to_transform") if cfg.get(k)]
    if cfg.get("use_dora"):
        unsupported.append("use_dora")
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    if unsupported:
        raise ValueError(f"LoRA adapter {path!r} uses {', '.join(unsupported)}, which pagellm does not serve.")
    return cfg


@dataclass
class LoRAAdapter:
    request: LoRARequest
    rank: int
    # module name (the model's) -> (A (R, in), B (out, R)): the A of every adapted part stacked, and B scaled and
    # placed at each part's output rows (zeros elsewhere), so one layer's update is two matmuls however packed
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    pt = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise ValueError(f"LoRA adapter {path!r}: no adapter_model.safetensors or adapter_model.bin.")


def _shard(layer: Linear, shard, a: torch.Tensor):
    """This rank's part of an adapter for one layer, as tensor parallelism splits the layer: A's input columns
    (row-parallel layers), and B's rows as (local row, checkpoint row, rows) pieces (column-parallel layers, a
    packed part or all of them). Returns (A or None if its inputs do not fit, pieces, inputs, checkpoint rows)."""
    if isinstance(layer, RowParallelLinear):
        full_in = a.shape[1]
        if layer.tp.shard(full_in) != (layer.in_start, layer.in_features):
            return None, [], f"{layer.in_features} (this rank's)", layer.out_features
        return a[:, layer.in_start:layer.in_start + layer.in_features], [(0, 0, layer.out_features)], full_in, \
            layer.out_features
    ok = a if a.shape[1] == layer.in_features else None
    if not isinstance(layer, ColumnParallelLinear):
        if getattr(layer.weight, "weight_loader", None) is not None:  # rows in a layout of its own (GPT-NeoX's q/k/v)
            return ok, None, layer.in_features, "its checkpoint's"
        return ok, [(0, 0, layer.out_features)], layer.in_features, layer.out_features
    if shard is not None:
        part = layer.parts[shard]
        return ok, [(layer.offsets[shard], part.start, part.size)], layer.in_features, part.full_size
    pieces = [(layer.offsets[i], layer.full_offsets[i] + p.start, p.size) for i, p in enumerate(layer.parts)]
    return ok, pieces, layer.in_features, sum(p.full_size for p in layer.parts)


def load_adapter(model: torch.nn.Module, request: LoRARequest, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> LoRAAdapter:
    path = request.lora_path
    cfg = read_adapter_config(path, max_rank)
    alpha = cfg.get("lora_alpha", cfg["r"])
    rslora = bool(cfg.get("use_rslora"))
    tensors = _adapter_tensors(path)
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key.removeprefix("base_model.model.")
        for ab in ("lora_A", "lora_B"):
            marker = f".{ab}."
            if marker in name:
                module, rest = name.split(marker, 1)
                if rest not in ("weight", "default.weight"):
                    raise ValueError(f"LoRA adapter {path!r}: unexpected tensor {key!r}.")
                pairs.setdefault(module, {})[ab] = t
                break
        else:
            raise ValueError(f"LoRA adapter {path!r}: tensor {key!r} is not a LoRA A/B weight.")
    adapter = LoRAAdapter(request, cfg["r"])
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> (A, B placed at its part's rows)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {path!r}: {module} lacks its lora_A or lora_B weight.")
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise ValueError(f"LoRA adapter {path!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}.")
        target = model.map_weight(module + ".weight")
        layer = modules.get(target[0].removesuffix(".weight")) if target else None
        if not isinstance(layer, Linear) or getattr(layer, "lora_name", None) is None:
            raise ValueError(f"LoRA adapter {path!r} targets {module}, which is not a linear layer of the decoder "
                             "that pagellm can adapt (embeddings and the LM head are not).")
        a, pieces, want_in, want_out = _shard(layer, target[1], a)
        if a is None or (pieces is not None and b.shape[0] != want_out):
            raise ValueError(f"LoRA adapter {path!r}: {module} has A {tuple(ab['lora_A'].shape)} and B "
                             f"{tuple(b.shape)}, the model's layer takes {want_in} inputs to {want_out} outputs.")
        scale = alpha / (r ** 0.5 if rslora else r)
        full_b = torch.zeros(layer.out_features, r)
        if pieces is None:  # B's rows are the weight's rows: the weight's own loader puts them in place
            try:
                layer.weight.weight_loader(full_b, b.float() * scale, target[1])
            except (ValueError, RuntimeError) as e:
                raise ValueError(f"LoRA adapter {path!r}: {module}'s B {tuple(b.shape)}: {e}") from None
        for dst, src, n in pieces or ():
            full_b[dst:dst + n] = b[src:src + n].float() * scale
        parts.setdefault(layer.lora_name, []).append((a.float(), full_b))
    if not parts:
        raise ValueError(f"LoRA adapter {path!r} holds no LoRA weights.")
    for name, ab in parts.items():
        adapter.weights[name] = (torch.cat([a for a, _ in ab]).to(device=device, dtype=dtype),
                                 torch.cat([b for _, b in ab], dim=1).to(device=device, dtype=dtype))
    return adapter
