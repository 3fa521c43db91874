"""The worker's LoRA state: loaded adapters, the slots they run from, and per step which tokens use which slot.

    LoRAManager(model, max_loras, max_rank, ...)   every linear layer gets max_loras slots of LoRA weights
    add(request) / remove(id)                      load (ValueError if pagellm cannot serve it) / drop an adapter
    set_step(token_lora_ids)                       the step's adapters into slots; each token's slot into a buffer
    apply(layer, x, out)                           after the layer's matmul: out += its tokens' updates

Each linear layer holds, for max_loras slots side by side, A stacked (max_loras * W, in) and B^T (max_loras
* W, out), W = max_lora_rank x the layer's packed parts (q/k/v: 3), zero where an adapter's rank
is smaller or it does not adapt the layer. `tok_slot` holds the slot of each token of the step (-1: the
base model). A layer's update, for any mix of adapters in the step, is

    out += ((x @ A^T) * mask) @ B^T,    mask[t, c] = (tok_slot[t] == the slot of column c)

(eager steps, without graphs, use only the columns of the slots the step needs, and no mask when one adapter
serves every token).

    tokens with slots [0, -1, 1], max_loras 2, W 2:   mask t0 [1 1 0 0]   t1 [0 0 0 0]   t2 [0 0 1 1]

Fixed shapes and addresses, so CUDA graphs capture it: a replay reads the step's tok_slot from the same
buffer. Without graphs, a step in which no token uses an adapter skips the update; with graphs it always
runs (zero for the base model's tokens). An adapter gets a slot when a step first needs it, taking a free
slot or the one least recently needed by no token of this step; the scheduler keeps at most max_loras
adapters among running requests.
"""

from __future__ import annotations

import numpy as np
import torch

from pagellm.lora.adapter import LoRAAdapter, load_adapter
from pagellm.lora.request import LoRARequest
from pagellm.models.parallel_layers import ColumnParallelLinear, Linear
from pagellm.worker.step_buffers import to_device


class _Slots:
    """One layer's LoRA weights for every slot, and which slot each column belongs to."""

    __slots__ = ("a", "bt", "col_slot", "width")

    def __init__(self, layer: Linear, max_loras: int, max_rank: int, device, dtype) -> None:
        parts = len(layer.parts) if isinstance(layer, ColumnParallelLinear) else 1
        self.width = max_rank * parts
        n = max_loras * self.width
        self.a = torch.zeros(n, layer.in_features, device=device, dtype=dtype)
        self.bt = torch.zeros(n, layer.out_features, device=device, dtype=dtype)  # B^T: a slot's rows contiguous
        self.col_slot = torch.arange(n, device=device) // self.width


class LoRAManager:
    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int, max_tokens: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.max_rank, self.device, self.dtype = model, max_rank, device, dtype
        self.adapters: dict[int, LoRAAdapter] = {}
        self.slot_of: dict[int, int] = {}  # adapter id -> its slot
        self.slots: list[int | None] = [None] * max_loras  # slot -> adapter id
        self._last_used = [0] * max_loras  # step counter when each slot was last needed
        self._step = 0
        self.tok_slot = torch.full((max_tokens,), -1, dtype=torch.long, device=device)
        self.active = False  # some token of this step uses an adapter
        self._span = (0, 0)  # eager steps: the slots [first, last + 1) this step uses
        self._uniform = False  # eager steps: one adapter serves every token (no mask)
        self.always = False  # CUDA graphs: the update is part of every forward pass
        self.layers: dict[str, Linear] = {}
        self._slots: dict[str, _Slots] = {}
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                module.lora_name = name
                self.layers[name] = module
                self._slots[name] = _Slots(module, max_loras, max_rank, device, dtype)
                module._matmul = self._hooked(module, module._matmul)  # this instance only

    def _hooked(self, layer: Linear, matmul):
        slots = self._slots[layer.lora_name]

        def lora_matmul(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = matmul(x, bias)
            if self.always:  # every slot, masked: fixed shapes for the graphs
                mask = (self.tok_slot[:x.shape[0], None] == slots.col_slot[None, :]).to(x.dtype)
                out += ((x @ slots.a.t()) * mask) @ slots.bt
            elif self.active:  # eager: only the slots this step uses; no mask when one adapter serves every token
                cols = slice(self._span[0] * slots.width, self._span[1] * slots.width)
                h = x @ slots.a[cols].t()
                if not self._uniform:
                    h = h * (self.tok_slot[:x.shape[0], None] == slots.col_slot[None, cols]).to(x.dtype)
                out += h @ slots.bt[cols]
            return out

        return lora_matmul

    def add(self, request: LoRARequest) -> bool:
        """Load the adapter unless it is loaded. False when it was."""
        known = self.adapters.get(request.lora_int_id)
        if known is not None:
            if known.request.lora_path != request.lora_path:
                raise ValueError(f"lora_int_id {request.lora_int_id} is already adapter {known.request.lora_path!r}; "
                                 f"give {request.lora_path!r} another id.")
            return False
        adapter = load_adapter(self.model, request, self.max_rank, torch.device("cpu"), self.dtype)
        if self.device.type == "cuda":  # host memory (the device holds only the max_loras slots): pinned, so a
            adapter.weights = {n: (a.pin_memory(), b.pin_memory()) for n, (a, b) in adapter.weights.items()}
        self.adapters[request.lora_int_id] = adapter  # slot fill is one fast copy
        return True

    def remove(self, lora_int_id: int) -> bool:
        """Drop a loaded adapter (no running sequence may use it). False when it was not loaded."""
        if self.adapters.pop(lora_int_id, None) is None:
            return False
        slot = self.slot_of.pop(lora_int_id, None)
        if slot is not None:
            self.slots[slot] = None
        return True

    def set_step(self, token_lora_ids: np.ndarray) -> None:
        """token_lora_ids: the adapter id of each of the step's tokens (0: none), in batch order."""
        self._step += 1
        n = len(token_lora_ids)
        self.active = bool(token_lora_ids.any())
        if not self.active:
            if self.always:
                self.tok_slot.fill_(-1)
            return
        uniq = np.unique(token_lora_ids)  # sorted
        ids = [int(i) for i in uniq if i > 0]
        slot = np.array([self._slot_for(int(i), ids) if i > 0 else -1 for i in uniq], dtype=np.int64)
        used = slot[slot >= 0]
        for s in used:
            self._last_used[s] = self._step
        self._span = (int(used.min()), int(used.max()) + 1)
        self._uniform = len(uniq) == 1
        self.tok_slot[:n].copy_(to_device(slot[np.searchsorted(uniq, token_lora_ids)], self.device))
        self.tok_slot[n:].fill_(-1)

    def _slot_for(self, lid: int, step_ids: list[int]) -> int:
        slot = self.slot_of.get(lid)
        if slot is not None:
            return slot
        adapter = self.adapters.get(lid)
        if adapter is None:
            raise RuntimeError(f"LoRA adapter {lid} is not loaded in the worker")
        free = [s for s, owner in enumerate(self.slots) if owner is None or owner not in step_ids]
        if not free:
            raise RuntimeError(f"more than max_loras={len(self.slots)} adapters in one step")
        slot = min(free, key=lambda s: (self.slots[s] is not None, self._last_used[s]))  # free first, then LRU
        if self.slots[slot] is not None:
            del self.slot_of[self.slots[slot]]
        self.slots[slot], self.slot_of[lid] = lid, slot
        for name, s in self._slots.items():  # the adapter's weights into the slot, zeros where it has none
            cols = slice(slot * s.width, (slot + 1) * s.width)
            s.a[cols].zero_()
            s.bt[cols].zero_()
            w = adapter.weights.get(name)
            if w is not None:
                a, b = w
                r = a.shape[0]
                s.a[slot * s.width:slot * s.width + r].copy_(a)
                s.bt[slot * s.width:slot * s.width + r].copy_(b.t())
        return slot
