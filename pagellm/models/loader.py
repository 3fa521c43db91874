"""Weights from a Hugging Face directory into a pagellm model.

    iterate_weights(dir, load_format) -> (name, tensor) ...     (safetensors, sharded or not, or .bin)
    load_weights(model, weights)                                 (HF names, packed parts, Conv1D transposes)
    init_dummy_weights(model, seed)                              (load_format="dummy", for benchmarks)

Models keep Hugging Face's module names. What differs is declared on the
model class, not coded in the loader:
    packed_modules = {"q_proj": ("qkv_proj", 0), ...}   HF part -> (our packed module, shard index)
    transposed_weights = ("c_attn", ...)                  GPT-2 Conv1D weights stored (in, out)
    def hf_name(name) -> str | None                        rename or skip (None) a checkpoint name
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
                    progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    kind, files = weight_files(model_dir, load_format)
    for path in tqdm(files, desc="Loading weights", disable=not progress or len(files) < 2):
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model; every parameter must be covered."""
    packed: dict[str, tuple[str, int]] = getattr(model, "packed_modules", {})
    transposed: tuple[str, ...] = getattr(model, "transposed_weights", ())
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    shards_loaded: dict[str, set[int]] = {}
    skipped = []
    for ckpt_name, tensor in weights:
        name = model.hf_name(ckpt_name)
        if name is None:
            continue
        parts = name.split(".")
        module_name = parts[-2] if len(parts) >= 2 else ""
        if module_name in packed:
            target, shard = packed[module_name]
            path = ".".join(parts[:-2] + [target])
            module = model.get_submodule(path)
            module.load_shard(shard, parts[-1], tensor)
            shards_loaded.setdefault(f"{path}.{parts[-1]}", set()).add(shard)
            continue
        param = params.get(name)
        if param is None:
            skipped.append(ckpt_name)
            continue
        if module_name in transposed and tensor.dim() == 2:
            tensor = tensor.t()
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"weight {ckpt_name}: checkpoint shape {tuple(tensor.shape)}, "
                             f"model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    for pname, shards in shards_loaded.items():
        module = model.get_submodule(pname.rsplit(".", 1)[0])
        if len(shards) == len(module.out_sizes):
            loaded.add(pname)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if skipped:
        logger.warning("ignored %d checkpoint tensors with no matching parameter: %s", len(skipped), skipped[:5])


def init_dummy_weights(model: nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3) -> None:
    """Random weights (uniform, like vLLM's dummy format); norms keep weight 1 so activations stay sane."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(low, high, generator=gen))
