"""How a checkpoint tensor lands in a parameter: the loaders and the lazy-tensor helpers they share.

A checkpoint tensor reaches a loader either as a torch.Tensor or as a lazy safetensors slice (the
loader reads only the rows or columns its rank keeps: a tensor-parallel rank never holds the whole
model). Loaders touch it only through these helpers:

    ckpt_shape(t)                   -> tuple of ints
    ckpt_narrow(t, dim, start, n)   -> torch.Tensor, only that range read
    ckpt_full(t)                    -> torch.Tensor, all of it

A parameter may carry `weight_loader(param, tensor, shard_id)` and `shard_ids` (the parts a
checkpoint must provide; one whole tensor, shard None, covers them all); without one, the
tensor must be the whole parameter.
"""

from __future__ import annotations

from typing import Any

import torch

CheckpointTensor = Any  # torch.Tensor | safetensors PySafeSlice


def ckpt_shape(t: CheckpointTensor) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())


def ckpt_narrow(t: CheckpointTensor, dim: int, start: int, size: int) -> torch.Tensor:
    index = [slice(None)] * len(ckpt_shape(t))
    index[dim] = slice(start, start + size)
    return t[tuple(index)]


def ckpt_full(t: CheckpointTensor) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t[...]  # `...`: a 0-dim tensor (a scale) too


def copy_into(param: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)


def default_weight_loader(param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
    """The checkpoint tensor is the whole parameter."""
    copy_into(param, ckpt_full(tensor))


def set_weight_loader(param: torch.Tensor, loader, shard_ids=None) -> None:
    param.weight_loader = loader  # (param, tensor, shard_id) -> None
    param.shard_ids = shard_ids  # every shard a checkpoint must provide; None: one whole tensor


def transposed_loader(param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
    """GPT-2's Conv1D stores (in, out); nn.Linear holds (out, in)."""
    t = ckpt_full(tensor)
    copy_into(param, t.t() if t.dim() == 2 else t)
