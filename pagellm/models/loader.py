"""Weights from a Hugging Face directory into a pagellm model.

    iterate_weights(dir, load_format) -> (name, tensor) ...     (safetensors, sharded or not, or .bin)
    load_weights(model, weights, update=False)                   (HF names, packed parts, Conv1D transposes; update:
                                                                  some weights of a loaded model, RL weight sync)
    init_dummy_weights(model, seed)                              (load_format="dummy", for benchmarks)
    finish_loading(model, device, dtype)                         (the cast, float32 where a model keeps it,
                                                                  the model's own after_load())

Models keep Hugging Face's module names. The model routes a checkpoint name to
(parameter, shard) with `map_weight` (models/base.py); the parameter's own
`weight_loader` puts the tensor in place (models/layers.py): a packed part, an
expert, a transposed Conv1D.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from pagellm.models.weight_utils import CheckpointTensor, default_weight_loader

logger = logging.getLogger(__name__)


def weight_files(model_dir: str, load_format: str = "auto") -> tuple[str, list[str]]:
    """('safetensors' | 'pt', files). Raises FileNotFoundError naming what was looked for."""
    if load_format in ("auto", "safetensors"):
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return "safetensors", [os.path.join(model_dir, s) for s in shards]
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        if files:
            return "safetensors", files
        if load_format == "safetensors":
            raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    if load_format in ("auto", "pt"):
        index = os.path.join(model_dir, "pytorch_model.bin.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return "pt", [os.path.join(model_dir, s) for s in shards]
        files = sorted(glob.glob(os.path.join(model_dir, "pytorch_model*.bin")))
        if files:
            return "pt", files
    raise FileNotFoundError(
        f"no weights in {model_dir}: looked for model.safetensors(.index.json), *.safetensors and "
        "pytorch_model.bin(.index.json); use load_format='dummy' for random weights")


def iterate_weights(model_dir: str, load_format: str = "auto",
                    progress: bool = True) -> Iterator[tuple[str, CheckpointTensor]]:
    """(name, tensor) for every checkpoint tensor. Safetensors come as lazy slices: a weight loader
    reads only the rows its tensor-parallel rank keeps (models/weight_utils.py)."""
    kind, files = weight_files(model_dir, load_format)
    for path in tqdm(files, desc="Loading weights", disable=not progress or len(files) < 2):
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], update: bool = False) -> set[str]:
    """Copy checkpoint tensors into the model through each parameter's weight loader; the names of the parameters
    written.

    At load, every parameter must be covered: by one whole tensor, or by every shard it lists in `shard_ids`, and a
    checkpoint's tensors without a parameter are skipped. `update` (new weights for a loaded model): some or all of
    them, and a name that maps to no parameter is an error (an update that would silently miss a weight).
    """
    from pagellm.models.parallel_layers import pp_missing_prefixes

    params = dict(model.named_parameters())
    elsewhere = pp_missing_prefixes(model)  # modules another pipeline stage holds: their tensors are its own
    loaded: dict[str, set] = {}
    skipped = []
    for ckpt_name, tensor in weights:
        target = model.map_weight(ckpt_name)
        if target is None:
            continue
        name, shard = target
        param = params.get(name)
        if param is None:
            if elsewhere and name.startswith(elsewhere):
                continue
            if update:
                raise ValueError(f"weight {ckpt_name!r}: the model has no parameter {name!r} to update")
            skipped.append(ckpt_name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            with torch.no_grad():
                loader(param, tensor, shard)
        except ValueError as e:
            raise ValueError(f"weight {ckpt_name}: {e}") from None
        loaded.setdefault(name, set()).add(shard)
    if update:
        return set(loaded)
    missing = sorted(n for n, p in params.items() if not _covered(p, loaded.get(n, set())))
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if skipped:
        logger.warning("ignored %d checkpoint tensors with no matching parameter: %s", len(skipped), skipped[:5])
    return set(loaded)


def _covered(param: torch.Tensor, shards: set) -> bool:
    if None in shards:
        return True
    need = getattr(param, "shard_ids", None)
    return need is not None and need <= shards


def finish_loading(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The loaded model on `device` in `dtype`, except the parameters a model (or a model inside it: a
    multimodal model's language model) lists in `keep_float32` (DeepSeek's routers: Hugging Face keeps them in
    float32), then `model.after_load()` (work on the final weights: DeepSeek splits kv_b_proj)."""
    kept = {}
    for prefix, module in model.named_modules():
        keep = getattr(module, "keep_float32", ())
        if keep:
            kept.update((n, p.detach().float()) for n, p in module.named_parameters(prefix=prefix) if n.endswith(keep))
    model = model.to(device=device, dtype=dtype).eval()
    params = dict(model.named_parameters())
    for n, t in kept.items():
        params[n].data = t.to(device)
    model.after_load()
    return model


def init_dummy_weights(model: nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3) -> None:
    """Random weights (uniform, like vLLM's dummy format); norms keep weight 1 so activations stay sane."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(low, high, generator=gen))
