"""Custom logits processors (vLLM's programming model): user classes that change the logits of the whole batch.

    LLM(model, logits_processors=[MyProcessor])            (or "my_pkg.module.MyProcessor"; the server:
                                                            --logits-processors my_pkg.module.MyProcessor)
    SamplingParams(extra_args={"my_arg": ...})             (the server: "vllm_xargs" in the request body)

A processor is built once per engine, on the rank that samples: `cls(config, device, is_pin_memory)`. Before each
step that samples it gets `update_state(BatchUpdate)` when the batch changed (requests added or removed), then
`apply(logits)` on a (batch_size, vocab) tensor whose row i is the request at batch index i; it changes the rows of
the requests it is enabled for (in place or not) and returns the tensor. Each added request comes as
(index, SamplingParams, prompt token ids, output token ids): the output list is the engine's own, extended as
tokens are sampled, so the processor reads the latest tokens there. A request's batch index stays the same while it
runs (pagellm's rows never move, so `moved` is always empty); a preempted request leaves and comes back as added.
Rows of requests that do not sample this step (a prompt chunk) are in the tensor too and are ignored.

`validate_params(params)` (a classmethod) runs when a request arrives: its ValueError refuses the request (400 on
the server). `is_argmax_invariant()`: True when the processor never changes which token is the most likely; such
processors are skipped for steps whose every row is greedy.

Where it runs in the sampler: after logit_bias, allowed_token_ids, bad words, min_tokens and the grammar, before the
penalties, temperature and top-k/top-p/min-p. Raw logprobs (the default logprobs_mode) are taken before it, processed
ones after everything, as in vLLM.

`AdapterLogitsProcessor` turns per-request functions into one: `new_req_logits_processor(params)` returns a function
`(output_ids, logits_row) -> logits_row` (or `(prompt_ids, output_ids, logits_row)`) for a request, or None.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch

from pagellm.config import import_by_name
from pagellm.sampling_params import SamplingParams


class MoveDirectionality(Enum):
    UNIDIRECTIONAL = 0  # a -> b, a left empty
    SWAP = 1  # a <-> b


AddedRequest = tuple[int, SamplingParams, "list[int] | None", "list[int]"]  # (index, params, prompt ids, output ids)
RemovedRequest = int
MovedRequest = tuple[int, int, MoveDirectionality]


@dataclass(frozen=True)
class BatchUpdate:
    """How the batch changed since the last update. Apply removed, then added, then moved."""

    batch_size: int
    removed: Sequence[RemovedRequest]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(ABC):
    """The interface (module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ValueError for a request this processor cannot take."""
        return None

    @abstractmethod
    def __init__(self, config: Any, device: torch.device, is_pin_memory: bool) -> None: ...

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def is_argmax_invariant(self) -> bool: ...

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None: ...


RequestLogitsProcessor = Callable[..., torch.Tensor]


class AdapterLogitsProcessor(LogitsProcessor):
    """Per-request functions as one batch processor: subclasses give `new_req_logits_processor(params)` (a function
    for the request, or None) and `is_argmax_invariant()`."""

    def __init__(self, config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.req_info: dict[int, tuple[RequestLogitsProcessor, list[int] | None, list[int], int]] = {}

    @abstractmethod
    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None: ...

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.req_info.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            fn = self.new_req_logits_processor(params)
            if fn is None:
                self.req_info.pop(index, None)
            else:
                takes = len(inspect.signature(fn).parameters)
                self.req_info[index] = (fn, prompt_ids, output_ids, takes)
        for a, b, direction in batch_update.moved:
            ia, ib = self.req_info.pop(a, None), self.req_info.pop(b, None)
            if ia is not None:
                self.req_info[b] = ia
            if ib is not None and direction == MoveDirectionality.SWAP:
                self.req_info[a] = ib

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (fn, prompt_ids, output_ids, takes) in self.req_info.items():
            row = logits[index]
            out = fn(prompt_ids, output_ids, row) if takes == 3 else fn(output_ids, row)
            if out is not row:
                logits[index] = out
        return logits


def load_logits_processors(specs: Sequence[Any]) -> list[type]:
    """The classes of --logits-processors / LLM(logits_processors=...): classes, or "module.Class" ("module:Class")."""
    out = []
    for spec in specs:
        cls = spec
        if isinstance(spec, bytes):  # a class without an importable name, by value (EngineArgs)
            import cloudpickle

            cls = spec = cloudpickle.loads(spec)
        if isinstance(spec, str):
            cls = import_by_name(spec, "logits processor")
        if not inspect.isclass(cls) or not all(callable(getattr(cls, m, None))
                                               for m in ("apply", "update_state", "is_argmax_invariant")):
            raise ValueError(f"logits processor {spec!r} must be a class with apply, update_state and "
                             "is_argmax_invariant (pagellm.sample.logits_processor.LogitsProcessor).")
        out.append(cls)
    return out


def validate_request(classes: Sequence[type], params: SamplingParams) -> None:
    """Each processor's validate_params on a request (ValueError refuses it)."""
    for cls in classes:
        check = getattr(cls, "validate_params", None)
        if check is not None:
            check(params)


class BatchLogitsProcessors:
    """The engine's side: the processors of one sampling rank, the batch changes they have not seen, and the output
    token lists they read. Indices are the model runner's batch rows."""

    def __init__(self, classes: Sequence[type], config: Any, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.procs = [cls(config, device, pin) for cls in classes]
        self.outputs: dict[int, list[int]] = {}  # row -> the request's output token ids (live)
        self.removed: list[int] = []
        self.added: list[AddedRequest] = []

    def add(self, row: int, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> None:
        self.outputs[row] = output_ids
        self.added.append((row, params, prompt_ids, output_ids))

    def remove(self, row: int) -> None:
        if self.outputs.pop(row, None) is not None:
            self.added = [a for a in self.added if a[0] != row]
            self.removed.append(row)

    def extend(self, row: int, tokens: list[int]) -> None:
        self.outputs[row].extend(tokens)

    def apply(self, logits: torch.Tensor, rows: np.ndarray, all_greedy: bool) -> torch.Tensor:
        """`logits` (len(rows), V) of the batch rows sampling now -> the processed rows."""
        size = max(self.outputs, default=-1) + 1
        update = BatchUpdate(size, self.removed, self.added, []) if self.removed or self.added else None
        self.removed, self.added = [], []
        for p in self.procs:
            p.update_state(update)
        active = [p for p in self.procs if not (all_greedy and p.is_argmax_invariant())]
        if not active:
            return logits
        rows = np.asarray(rows, dtype=np.int64)
        if np.array_equal(rows, np.arange(size)):  # every row samples, in order: the batch as it is
            for p in active:
                logits = p.apply(logits)
            return logits
        index = torch.from_numpy(rows).to(logits.device)
        batch = logits.new_zeros((max(size, int(rows.max()) + 1), logits.shape[-1]))
        batch[index] = logits
        for p in active:
            batch = p.apply(batch)
        return batch[index]
