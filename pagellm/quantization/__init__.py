"""Quantized weights: which method a model runs with, and the pass that applies it to the linear layers.

    --quantization int8          any checkpoint; weights quantized at load time (quantization/int8.py)
    --quantization fp8           any checkpoint; fp8 e4m3 weights, per-channel scales, at load time (fp8.py)
    config.json quantization_config {"quant_method": "gptq" | "awq", "bits": 4, ...}
                                 a 4-bit checkpoint, read as it is stored (quantization/int4.py)
    config.json quantization_config {"quant_method": "fp8", ...}
                                 an FP8 checkpoint (per-tensor or block-wise scales), read as stored (fp8.py)
    config.json quantization_config {"quant_method": "compressed-tensors", ...}
                                 llm-compressor's W4A16 / W8A16 / W8A8 / FP8 checkpoints (compressed_tensors.py)

A method touches only the projection layers (ColumnParallelLinear, RowParallelLinear): embeddings,
the LM head, norms, MoE routers and experts stay in the compute dtype. Each quantized layer gets a
`quant_method` whose `apply(layer, x, bias)` replaces the dense matmul (parallel_layers.Linear).

    before loading   prepare_model(model, method, hf_config)   int4: swap dense weights for packed params
    after loading    finish_model(model, method)                int8: quantize; int4: build kernel layouts
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("int8", "fp8", "gptq", "awq", "compressed-tensors")
# read from config.json (fp8 also applies to any checkpoint at load time)
CHECKPOINT_METHODS = ("gptq", "awq", "fp8", "compressed-tensors")


def checkpoint_quant_config(hf_config) -> dict[str, Any] | None:
    """The checkpoint's `quantization_config` as a dict, or None for an unquantized checkpoint."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    return qc


def resolve_quantization(requested: str | None, hf_config) -> str | None:
    """The method to run: the checkpoint's own (GPTQ/AWQ) or the requested load-time one (int8).

    Raises ValueError for an unknown method, a checkpoint format pagellm cannot run, or a request that
    contradicts the checkpoint.
    """
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {requested!r}.")
    qc = checkpoint_quant_config(hf_config)
    if qc is None:
        if requested in CHECKPOINT_METHODS and requested != "fp8":
            raise ValueError(f"quantization={requested!r} needs a {requested.upper()} checkpoint: config.json has no "
                             "quantization_config.")
        return requested
    method = str(qc.get("quant_method", "")).lower()
    if method == "mxfp4":  # GPT-OSS's experts: the model widens them as they load (models/gpt_oss.py)
        if getattr(hf_config, "model_type", None) != "gpt_oss":
            raise ValueError("the checkpoint is quantized with 'mxfp4', which pagellm reads only for GPT-OSS's "
                             f"experts (this is a {getattr(hf_config, 'model_type', '?')!r} checkpoint).")
        return requested
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"the checkpoint is quantized with {method or 'an unnamed method'!r}; pagellm runs "
                         f"{', '.join(CHECKPOINT_METHODS)} checkpoints (or --quantization int8 on an unquantized one).")
    if requested is not None and requested != method:
        raise ValueError(f"quantization={requested!r}, but the checkpoint is a {method} checkpoint.")
    if method == "fp8":
        from pagellm.quantization.fp8 import Fp8Method

        Fp8Method.check_config(qc)
        return method
    if method == "compressed-tensors":
        from pagellm.quantization.compressed_tensors import CompressedTensorsMethod

        CompressedTensorsMethod.check_config(qc)  # every scheme one pagellm reads: a clear error before loading
        return method
    from pagellm.quantization.int4 import Int4Config

    Int4Config.from_config(method, qc)  # validate bits, group size, format now: a clear error before loading
    return method


def get_method(name: str, hf_config):
    if name == "int8":
        from pagellm.quantization.int8 import Int8Method

        return Int8Method()
    if name == "fp8":
        from pagellm.quantization.fp8 import Fp8Method

        return Fp8Method(checkpoint_quant_config(hf_config))
    if name == "compressed-tensors":
        from pagellm.quantization.compressed_tensors import CompressedTensorsMethod

        return CompressedTensorsMethod(checkpoint_quant_config(hf_config))
    from pagellm.quantization.int4 import Int4Method

    return Int4Method(name, checkpoint_quant_config(hf_config))


def quantized_layers(model):
    """(name, layer) for every projection a method quantizes."""
    from pagellm.models.parallel_layers import ColumnParallelLinear, RowParallelLinear

    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            yield name, module


def expert_layers(model):
    """(name, FusedMoE) for every mixture of experts: FP8 checkpoints store the experts in 8 bits too."""
    from pagellm.models.layers import FusedMoE

    for name, module in model.named_modules():
        if isinstance(module, FusedMoE):
            yield name, module


def prepare_model(model, method) -> None:
    """Before weights load: let the method replace the layers' parameters (int4 and fp8 checkpoints)."""
    extra = getattr(method, "skip_weights", ())  # checkpoint tensors the method does not use (activation scales)
    for m in model.modules():  # (a multimodal model's language model maps its own names)
        if extra and isinstance(getattr(m, "skip_weights", None), tuple):
            m.skip_weights = (*m.skip_weights, *extra)
    if hasattr(method, "bind_model"):
        method.bind_model(model)
    for name, layer in quantized_layers(model):
        method.prepare(name, layer)
    for name, moe in expert_layers(model):
        method.prepare_experts(name, moe)


def finish_model(model, method, dtype, device) -> None:
    """After weights load (and the move to device/dtype): quantize or repack every layer."""
    n = 0
    for _, layer in quantized_layers(model):
        if method.finish(layer, dtype, device):
            n += 1
    experts = sum(method.finish_experts(moe, device) for _, moe in expert_layers(model))
    logger.info("quantization %s: %d linear layers%s (%s)", method.name, n,
                f", {experts} mixtures of experts" if experts else "", method.describe())
