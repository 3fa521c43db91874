"""The worker's LoRA state: loaded adapters, and per step which tokens run with which.

    LoRAManager(model, ...)            names every linear layer (`lora_name`) and hooks its matmul
    add(request) -> bool               loads an adapter once (ValueError if pagellm cannot serve it)
    set_step(token_lora_ids)           this step's tokens -> adapters
    apply(layer, x, out)               called by Linear after its matmul: out[tokens] += x A^T B^T

One step may mix requests of several adapters and of none. For each adapter in the step, its tokens
(all of them when the whole step uses it: no gather) go through A then B for every part of the layer the
adapter adapts; the base matmul itself is shared by every token.
"""

from __future__ import annotations

import numpy as np
import torch

from pagellm.lora.adapter import LoRAAdapter, load_adapter
from pagellm.lora.request import LoRARequest
from pagellm.models.parallel_layers import Linear
from pagellm.worker.step_buffers import to_device


class LoRAManager:
    def __init__(self, model: torch.nn.Module, max_rank: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.max_rank, self.device, self.dtype = model, max_rank, device, dtype
        self.adapters: dict[int, LoRAAdapter] = {}
        self.active: list[tuple[LoRAAdapter, torch.Tensor | None]] = []  # this step: (adapter, its token rows)
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                module.lora_name = name
                module._matmul = self._hooked(module, module._matmul)  # this instance only: no cost without LoRA

    def _hooked(self, layer: Linear, matmul):
        def lora_matmul(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = matmul(x, bias)
            return self.apply(layer, x, out) if self.active else out

        return lora_matmul

    def add(self, request: LoRARequest) -> bool:
        """Load the adapter unless it is loaded. False when it was."""
        known = self.adapters.get(request.lora_int_id)
        if known is not None:
            if known.request.lora_path != request.lora_path:
                raise ValueError(f"lora_int_id {request.lora_int_id} is already adapter {known.request.lora_path!r}; "
                                 f"give {request.lora_path!r} another id.")
            return False
        self.adapters[request.lora_int_id] = load_adapter(self.model, request, self.max_rank, self.device, self.dtype)
        return True

    def remove(self, lora_int_id: int) -> bool:
        return self.adapters.pop(lora_int_id, None) is not None

    def set_step(self, token_lora_ids: np.ndarray) -> None:
        """token_lora_ids: the adapter id of each of the step's tokens (0: none), in batch order."""
        self.active = []
        if not token_lora_ids.any():
            return
        for lid in np.unique(token_lora_ids):
            if lid == 0:
                continue
            adapter = self.adapters.get(int(lid))
            if adapter is None:
                raise RuntimeError(f"LoRA adapter {lid} is not loaded in the worker")
            mine = token_lora_ids == lid
            self.active.append((adapter, None if mine.all() else to_device(np.flatnonzero(mine), self.device)))

    def apply(self, layer: Linear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for adapter, rows in self.active:
            parts = adapter.weights.get(layer.lora_name)
            if parts is None:
                continue
            xs = x if rows is None else x.index_select(0, rows)
            for start, size, a, b in parts:
                delta = (xs @ a.t()) @ b.t()
                view = out[:, start:start + size]
                if rows is None:
                    view += delta
                else:
                    view.index_add_(0, rows, delta)
        return out
