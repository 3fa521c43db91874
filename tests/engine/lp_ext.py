"""Custom logits processors for the tests, written against pagellm's LogitsProcessor interface (vLLM's)."""

from __future__ import annotations

import torch

from pagellm.sample.logits_processor import AdapterLogitsProcessor, BatchUpdate, LogitsProcessor


class PerRequest(LogitsProcessor):
    """A processor that keeps what `state(params, output_ids)` gives for each enabled request (None: not enabled)."""

    def __init__(self, config, device, is_pin_memory) -> None:
        self.rows: dict = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, output_ids in batch_update.added:
            value = self.state(params.extra_args or {}, output_ids)
            if value is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = value
        assert not batch_update.moved  # pagellm's rows never move


class TargetToken(PerRequest):
    """Rows whose request gives extra_args {"target_token": t} can only sample t (vLLM's example processor)."""

    @classmethod
    def validate_params(cls, params) -> None:
        t = (params.extra_args or {}).get("target_token")
        if t is not None and (not isinstance(t, int) or t < 0):
            raise ValueError(f"target_token must be a token id, got {t!r}")

    @staticmethod
    def state(extra: dict, output_ids: list[int]):
        return extra.get("target_token")

    @property
    def targets(self) -> dict:
        return self.rows

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, t in self.rows.items():
            keep = logits[index, t].item()
            logits[index] = float("-inf")
            logits[index, t] = keep
        return logits


class NoRepeat(PerRequest):
    """Rows whose request gives extra_args {"no_repeat": true} never sample a token they have sampled before: it
    reads the live output lists."""

    @staticmethod
    def state(extra: dict, output_ids: list[int]):
        return output_ids if extra.get("no_repeat") else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, out in self.rows.items():
            if out:
                logits[index, torch.tensor(out)] = float("-inf")
        return logits


class BanPrompt(AdapterLogitsProcessor):
    """Per-request functions (prompt_ids, output_ids, row): extra_args {"ban_prompt": true} bans the prompt's tokens."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        if not (params.extra_args or {}).get("ban_prompt"):
            return None

        def ban(prompt_ids, output_ids, row):
            row[torch.tensor(prompt_ids)] = float("-inf")
            return row

        return ban
