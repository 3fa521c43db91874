"""SamplingMetadata: one step's sampling parameters as batched tensors, one row per sampled sequence.

Built by the worker's InputBatch from its persistent per-sequence arrays;
optional parts are None when no row of the step uses them, so a plain batch
pays for nothing it does not use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SamplingMetadata:
    num_rows: int
    temperature: torch.Tensor  # (B,) float32; greedy rows hold 1.0 (their temperature is never applied)
    greedy: torch.Tensor  # (B,) bool
    all_greedy: bool
    all_random: bool
    all_temperature_one: bool  # no row needs dividing by its temperature
    uniforms: torch.Tensor  # (B,) float64 in [0, 1): one counter-based draw per row (seed, output index)
    top_k: torch.Tensor | None  # (B,) int64; vocab size where top-k is off
    top_p: torch.Tensor | None  # (B,) float32; 1.0 where off
    min_p: torch.Tensor | None  # (B,) float32; 0.0 where off
    # Penalties: None unless some row uses them.
    presence_penalties: torch.Tensor | None  # (B,)
    frequency_penalties: torch.Tensor | None  # (B,)
    repetition_penalties: torch.Tensor | None  # (B,)
    prompt_mask: torch.Tensor | None  # (B, V) bool, token occurs in the prompt
    output_counts: torch.Tensor | None  # (B, V) float32, occurrences among generated tokens
    # Logits processors.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, biases)
    allowed_mask: torch.Tensor | None  # (B, V) bool, True = may be sampled; rows without a list are all True
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) forced to -inf (bad words, min_tokens)
    # Structured output: (bitmask (G, ceil(V / 32)) int32, rows (G,) int64): bit t of a row = token t allowed.
    # Logprobs.
    num_logprobs: list[int | None]  # per row: top-k logprobs requested (None = none)
    max_num_logprobs: int | None  # max over rows, None if no row asked
    processed_logprobs: torch.Tensor | None  # (B,) bool, row reports the processed distribution
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None  # see above; set by the runner for this step
    # Custom logits processors (sample/logits_processor.py): logits -> logits, set by the runner for this step.
    custom: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def needs_sort(self) -> bool:
        return self.top_k is not None or self.top_p is not None
