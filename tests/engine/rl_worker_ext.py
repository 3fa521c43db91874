"""A worker extension for the tests (worker_extension_cls="tests.engine.rl_worker_ext.Probe"): the methods a
trainer's weight-sync code adds to vLLM's workers, written the way they are written for vLLM."""

from __future__ import annotations

import time

import torch


class Probe:
    def where(self) -> tuple[int, int]:
        """(rank, this rank's rows of the first layer's fused q/k/v projection)."""
        w = dict(self.model_runner.model.named_parameters())["model.layers.0.self_attn.qkv_proj.weight"]
        return self.rank, w.shape[0]

    def load_weight(self, name: str, tensor: torch.Tensor) -> list[str]:
        """vLLM's recipe: model.load_weights with the checkpoint name and a whole tensor, each rank its slice."""
        hf = self.model_runner.model
        return sorted(hf.load_weights([(name, tensor)]))

    def weight_bytes(self) -> int:
        """Bytes the model's parameters hold now (0 while asleep)."""
        return sum(p.untyped_storage().nbytes() for p in self.model_runner.model.parameters())

    def fail(self) -> None:
        raise ValueError(f"refused on rank {self.rank}")

    def stall(self, seconds: float) -> None:
        """Hold the engine core (its loop waits for this call): messages queue behind it."""
        time.sleep(seconds)
