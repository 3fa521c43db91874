"""LoRA adapters served beside the base model: requests name an adapter (`LoRARequest`), the worker adds each
adapted layer's low-rank update to the base layer's output for that request's tokens (lora/layers.py)."""

from pagellm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
