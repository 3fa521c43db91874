"""The worker's LoRA state: loaded adapters, and per step which tokens run with which.

    LoRAManager(model, ...)            names every linear layer (`lora_name`)
    add(request) -> bool               loads an adapter once (ValueError if pagellm cannot serve it) and hooks the
                                       layers it adapts (a layer no adapter adapts keeps its plain matmul)
    set_step(token_lora_ids)           this step's tokens -> adapters
    apply(layer, x, out)               called after a hooked layer's matmul: out += update

A layer's update for the step's adapters is two matmuls whatever the mix: the A of every adapter in the
step that adapts the layer stacked, (T, in) x (in, R1 + R2 + ...), each token's row masked to its own
adapter's columns (no mask when one adapter serves every token), then (T, R1 + R2 + ...) x the stacked B
(out, R1 + R2 + ...). Tokens without an adapter have all-zero rows. The stacks are built once per layer
and set of adapters in the step (cached until the set changes), the masks once per step and rank layout.

    tokens [t0 t1 t2] with adapters [1, 0, 2], layer adapted by 1 (rank 2) and 2 (rank 3):
    mask   t0 [1 1 0 0 0]   t1 [0 0 0 0 0]   t2 [0 0 1 1 1]
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
        self.active: tuple[int, ...] = ()  # this step's adapter ids, ascending
        self._onehot: torch.Tensor | None = None  # (T, len(active)): token t runs with active[j]; None: all, one
        self._masks: dict[tuple, torch.Tensor] = {}  # (rank layout, rows) -> (rows, R) column mask, this step
        self.layers: dict[str, Linear] = {}
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                module.lora_name = name
                self.layers[name] = module

    def add(self, request: LoRARequest) -> bool:
        """Load the adapter unless it is loaded. False when it was."""
        known = self.adapters.get(request.lora_int_id)
        if known is not None:
            if known.request.lora_path != request.lora_path:
                raise ValueError(f"lora_int_id {request.lora_int_id} is already adapter {known.request.lora_path!r}; "
                                 f"give {request.lora_path!r} another id.")
            return False
        adapter = load_adapter(self.model, request, self.max_rank, self.device, self.dtype)
        self.adapters[request.lora_int_id] = adapter
        self._forget_stacks()  # an id may come back with other weights
        for name in adapter.weights:
            layer = self.layers[name]
            if "_matmul" not in layer.__dict__:
                layer._matmul = self._hooked(layer, layer._matmul)  # this instance only
        return True

    def remove(self, lora_int_id: int) -> bool:
        """Drop a loaded adapter (no running sequence may use it). False when it was not loaded."""
        if self.adapters.pop(lora_int_id, None) is None:
            return False
        self._forget_stacks()
        return True

    def _forget_stacks(self) -> None:
        for layer in self.layers.values():
            if getattr(layer, "lora_stack", None) is not None:
                layer.lora_stack = None

    def _hooked(self, layer: Linear, matmul):
        def lora_matmul(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = matmul(x, bias)
            return self.apply(layer, x, out) if self.active else out

        layer.lora_stack = None  # (active ids, (A, B, rank layout) or None) for the last set of adapters
        return lora_matmul

    def set_step(self, token_lora_ids: np.ndarray) -> None:
        """token_lora_ids: the adapter id of each of the step's tokens (0: none), in batch order."""
        self._masks = {}
        if not token_lora_ids.any():
            self.active = ()
            return
        ids = np.unique(token_lora_ids)
        ids = ids[ids > 0]
        for lid in ids:
            if int(lid) not in self.adapters:
                raise RuntimeError(f"LoRA adapter {lid} is not loaded in the worker")
        self.active = tuple(int(i) for i in ids)
        if len(ids) == 1 and (token_lora_ids == ids[0]).all():
            self._onehot = None
        else:
            self._onehot = to_device((token_lora_ids[:, None] == ids[None, :]).astype(np.float32), self.device)

    def _stack(self, layer: Linear):
        """(A (R, in), B (out, R), rank layout ((j, r), ...)) of the active adapters that adapt the layer."""
        cached = layer.lora_stack
        if cached is not None and cached[0] == self.active:
            return cached[1]
        found = [(j, self.adapters[lid].weights.get(layer.lora_name)) for j, lid in enumerate(self.active)]
        found = [(j, w) for j, w in found if w is not None]
        stack = None
        if found:
            if len(found) == 1:
                a, b = found[0][1]
            else:
                a, b = torch.cat([w[0] for _, w in found]), torch.cat([w[1] for _, w in found], dim=1)
            stack = (a, b, tuple((j, w[0].shape[0]) for j, w in found))
        layer.lora_stack = (self.active, stack)
        return stack

    def _mask(self, layout: tuple, rows: int) -> torch.Tensor:
        key = (layout, rows)
        mask = self._masks.get(key)
        if mask is None:
            cols = torch.tensor([j for j, r in layout for _ in range(r)], device=self.device)
            onehot = self._onehot
            mask = torch.zeros(rows, len(cols), dtype=self.dtype, device=self.device)
            mask[:onehot.shape[0]] = onehot.index_select(1, cols).to(self.dtype)  # padding rows stay 0
            self._masks[key] = mask
        return mask

    def apply(self, layer: Linear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        stack = self._stack(layer)
        if stack is None:
            return out
        a, b, layout = stack
        h = x @ a.t()
        if self._onehot is not None:
            h = h * self._mask(layout, x.shape[0])
        out += h @ b.t()
        return out
