"""compressed-tensors checkpoints (llm-compressor's format, quant_method "compressed-tensors") of a test model, written
by the compressed-tensors library itself: the quantization config applied to transformers' model, each weight's
scales (and zero points) from its own range, as a minimum-maximum observer sets them, then the model compressed in
the scheme's format (pack-quantized, int-quantized, float-quantized) and saved with its config.

    build_compressed(src, dst, scheme) -> dst
    schemes: w4a16 (int4 groups of 32, symmetric), w4a16-asym (int4 groups of 32 with zero points), w4a16-channel
    (int4, one scale per row), w8a16 (int8 per row), w8a8 (int8 per row, int8 activations per token, dynamic),
    fp8 (per row, activations per token, dynamic), fp8-tensor (one scale per tensor), fp8-block (128 x 128 blocks
    of scales; needs 128-multiple shapes)
"""

from __future__ import annotations

import os
import shutil

import torch

SCHEMES = {
    "w4a16": dict(weights=dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True)),
    "w4a16-asym": dict(weights=dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False)),
    "w4a16-channel": dict(weights=dict(num_bits=4, type="int", strategy="channel", symmetric=True)),
    "w8a16": dict(weights=dict(num_bits=8, type="int", strategy="channel", symmetric=True)),
    "w8a8": dict(weights=dict(num_bits=8, type="int", strategy="channel", symmetric=True),
                 input_activations=dict(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)),
    "fp8": dict(weights=dict(num_bits=8, type="float", strategy="channel", symmetric=True),
                input_activations=dict(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)),
    "fp8-tensor": dict(weights=dict(num_bits=8, type="float", strategy="tensor", symmetric=True)),
    "fp8-block": dict(weights=dict(num_bits=8, type="float", strategy="block", block_structure=[128, 128],
                                   symmetric=True),
                      input_activations=dict(num_bits=8, type="float", strategy="group", group_size=128,
                                             symmetric=True, dynamic=True)),
}
FORMATS = {"w4a16": "pack-quantized", "w4a16-asym": "pack-quantized", "w4a16-channel": "pack-quantized",
           "w8a16": "pack-quantized", "w8a8": "int-quantized", "fp8": "float-quantized",
           "fp8-tensor": "float-quantized", "fp8-block": "float-quantized"}


def _observe(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a weight from its minimum and maximum, per the scheme's strategy."""
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.detach().float()
    n, k = w.shape
    if args.strategy == "tensor":
        lo, hi = w.min().reshape(1), w.max().reshape(1)
    elif args.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif args.strategy == "group":
        g = w.view(n, k // args.group_size, args.group_size)
        lo, hi = g.amin(-1), g.amax(-1)
    else:  # block
        bn, bk = args.block_structure
        b = w.view(n // bn, bn, k // bk, bk)
        lo, hi = b.amin((1, 3)), b.amax((1, 3))
    return calculate_qparams(lo, hi, args)


def build_compressed(src: str, dst: str, scheme: str, ignore: tuple[str, ...] = ("lm_head",)) -> tuple[str, str]:
    """The compressed checkpoint and the oracle: the same model with every quantized weight as the library
    decompresses it (dequantized), in a plain float32 checkpoint (dst + "-deq")."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from transformers import AutoModelForCausalLM

    deq = dst + "-deq"
    if all(os.path.isfile(os.path.join(d, "model.safetensors")) for d in (dst, deq)):
        return dst, deq
    shutil.rmtree(dst, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **SCHEMES[scheme])},
                            ignore=list(ignore))
    apply_quantization_config(model, qc)
    with torch.no_grad():
        for module in model.modules():
            s = getattr(module, "quantization_scheme", None)
            if s is None or s.weights is None:
                continue
            scale, zero = _observe(module.weight, s.weights)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMATS[scheme])
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    compressor.decompress_model(model)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if getattr(module, "quantization_scheme", None) is not None:
                dense.get_submodule(name).weight.copy_(module.weight.float())
    dense.save_pretrained(deq)
    _quantize_experts(dst, deq, scheme)
    for out in (dst, deq):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), out)
    return dst, deq


def _quantize_experts(dst: str, deq: str, scheme: str) -> None:
    """Experts saved one tensor per expert and projection but held fused by transformers' model (so not quantized
    by the library, which quantizes Linear modules): quantized here with the library's own quantize / dequantize
    under the scheme's weight arguments, as llm-compressor stores the experts of Qwen3-MoE / Mixtral FP8 models."""
    import re

    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from safetensors.torch import load_file, save_file

    path, deq_path = os.path.join(dst, "model.safetensors"), os.path.join(deq, "model.safetensors")
    weights, dense = load_file(path), load_file(deq_path)
    names = [k for k in weights if re.search(r"experts\.\d+\.(gate|up|down)_proj\.weight$", k)]
    if not names:
        return
    args = QuantizationArgs(**SCHEMES[scheme]["weights"])
    if args.type != "float":
        raise ValueError("test experts are quantized in fp8 schemes only")
    for k in names:
        w = weights[k].float()
        scale, zero = _observe(w, args)
        q = quantize(x=w, scale=scale, zero_point=zero, args=args, dtype=torch.float8_e4m3fn)
        weights[k], weights[k.removesuffix("weight") + "weight_scale"] = q, scale
        dense[k] = dequantize(x_q=q, scale=scale, zero_point=zero, args=args).float()
    save_file(weights, path, metadata={"format": "pt"})
    save_file(dense, deq_path, metadata={"format": "pt"})
