"""LoRARequest: which adapter a request runs with (vLLM's class and fields)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str  # a name for logs and the API (the request's `model` online)
    lora_int_id: int  # engine-unique id >= 1; requests with the same id share the loaded adapter
    lora_path: str  # local directory: adapter_config.json + adapter_model.safetensors (or .bin)

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}.")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty.")
