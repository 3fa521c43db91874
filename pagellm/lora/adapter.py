"""A PEFT LoRA adapter directory, read and fitted to a pagellm model.

    read_adapter_config(path, max_rank) -> dict      (checks what pagellm can serve; no model needed)
    load_adapter(model, request, max_rank, device, dtype) -> LoRAAdapter

PEFT stores, per adapted module, `base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r); the update is out += scale * x A^T B^T with scale = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora). A module's checkpoint name goes through the model's own `map_weight`, as the base weights do,
and B through the layer's own row loader, so q_proj lands on part 0 of the packed qkv_proj and GPT-2's c_attn
on the whole packed layer, each rank keeping its rows. B is stored pre-scaled, and the parts of one packed
layer are stacked (see LoRAAdapter).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from pagellm.lora.request import LoRARequest
from pagellm.models.parallel_layers import ColumnParallelLinear, Linear, RowParallelLinear, pp_missing_prefixes
from pagellm.models.weight_utils import default_weight_loader


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


def _place(layer: Linear, shard, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A (r, in), B (out, r)) of one layer, split as tensor parallelism splits the layer. B's rows are
    the weight's rows, so they land where the layer's own weight loader puts checkpoint rows (a packed part, this
    rank's slice, GPT-NeoX's per-head interleaving, a Conv1D's transpose); a row-parallel layer takes its slice of
    A's inputs instead (its output rows are whole). ValueError when the shapes do not fit the layer."""
    r = a.shape[0]
    if isinstance(layer, RowParallelLinear):
        if b.shape[0] != layer.out_features or layer.tp.shard(a.shape[1]) != (layer.in_start, layer.in_features):
            raise ValueError(f"the layer takes {layer.in_features} inputs (this rank's) to {layer.out_features} "
                             "outputs")
        return a[:, layer.in_start:layer.in_start + layer.in_features], b
    if a.shape[1] != layer.in_features:
        raise ValueError(f"the layer takes {layer.in_features} inputs")
    if isinstance(layer, ColumnParallelLinear):
        loader = layer.load_part
    elif hasattr(layer, "weight"):
        loader = getattr(layer.weight, "weight_loader", default_weight_loader)
    else:
        raise ValueError("its weight is quantized in a layout of its own")
    placed = torch.zeros(layer.out_features, r)
    loader(placed, b.t() if getattr(layer, "transposed", False) else b, shard)  # the checkpoint's orientation
    return a, placed


def load_adapter(model: torch.nn.Module, request: LoRARequest, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> LoRAAdapter:
    path = request.lora_path
    cfg = read_adapter_config(path, max_rank)
    alpha = cfg.get("lora_alpha", cfg["r"])
    rslora = bool(cfg.get("use_rslora"))
    tensors = _adapter_tensors(path)
    modules = dict(model.named_modules())
    elsewhere = pp_missing_prefixes(model)  # layers of other pipeline stages: their ranks load those parts
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
    adapter = LoRAAdapter(request)
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> (A, B placed at its part's rows)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {path!r}: {module} lacks its lora_A or lora_B weight.")
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise ValueError(f"LoRA adapter {path!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}.")
        target = model.map_weight(module + ".weight")
        if elsewhere and target and target[0].startswith(elsewhere):
            continue
        layer = modules.get(target[0].removesuffix(".weight")) if target else None
        if not isinstance(layer, Linear) or getattr(layer, "lora_name", None) is None:
            raise ValueError(f"LoRA adapter {path!r} targets {module}, which is not a linear layer of the decoder "
                             "that pagellm can adapt (embeddings and the LM head are not).")
        scale = alpha / (r ** 0.5 if rslora else r)
        try:
            a, b = _place(layer, target[1], a.float(), b.float() * scale)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"LoRA adapter {path!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}: "
                             f"{e}.") from None
        parts.setdefault(layer.lora_name, []).append((a, b))
    if not parts and not elsewhere:
        raise ValueError(f"LoRA adapter {path!r} holds no LoRA weights.")
    for name, ab in parts.items():
        adapter.weights[name] = (torch.cat([a for a, _ in ab]).to(device=device, dtype=dtype),
                                 torch.cat([b for _, b in ab], dim=1).to(device=device, dtype=dtype))
    return adapter
