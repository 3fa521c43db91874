"""Pieces every `pagellm bench` subcommand shares: model flags, tokenizer detection, the JSON report."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]
KV_DTYPE_CHOICES = DTYPE_CHOICES + ["fp8", "fp8_e4m3"]


def add_model_args(p: argparse.ArgumentParser, dtypes: bool = True) -> None:
    """--model (default: the demo model), --load-format and, with dtypes, --dtype / --kv-cache-dtype /
    --quantization."""
    from pagellm.entrypoints.cli import DEMO_MODEL

    p.add_argument("--model", default=DEMO_MODEL, help="HF checkpoint directory (default: the demo model).")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "pt", "dummy"])
    if dtypes:
        p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
        p.add_argument("--kv-cache-dtype", default="auto", choices=KV_DTYPE_CHOICES)
        p.add_argument("--quantization", "-q", default=None, choices=["int8", "fp8", "gptq", "awq"],
                       help="Quantized weights (int8 at load time; gptq/awq come from the checkpoint).")


def has_tokenizer(model: str) -> bool:
    return any(os.path.isfile(os.path.join(model, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def llm_kwargs(model: str, **kwargs: Any) -> dict[str, Any]:
    """LLM(...) keywords for a benchmark: a config-only directory (dummy weights) runs without a tokenizer."""
    if not has_tokenizer(model):
        kwargs["skip_tokenizer_init"] = True
    return kwargs


def write_report(report: dict, path: str | None) -> dict:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def median_times(runs: dict[str, Any], inputs: list[Any], device: str) -> dict[str, float]:
    """Median seconds of each run over the rounds' inputs (one round per input), the runs taking turns first
    (alternate order each round) so that neither always runs on a warmer or a busier machine."""
    import statistics
    import time

    times: dict[str, list[float]] = {name: [] for name in runs}
    for r, x in enumerate(inputs):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            sync_device(device)
            t = time.perf_counter()
            runs[name](x)
            sync_device(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def sync_device(device: str) -> None:
    """Wait for the device's queued work before reading a clock (nothing to wait for on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
