"""Tiny FP8 checkpoints built from a float checkpoint, the way FP8 tools store them.

    build_fp8(src, dst, block=None | (bn, bk)) -> (dst, dequantized_dir)

Every q/k/v/o/gate/up/down projection (experts' too; or the names given) becomes float8 e4m3 with its scales; the
other tensors are copied.
    per-tensor (block None)   weight (N, K) fp8, weight_scale () float32, input_scale () float32 (AutoFP8)
    block-wise (bn, bk)       weight (N, K) fp8, weight_scale_inv (ceil(N/bn), ceil(K/bk)) float32
                              ("weight_block_size"; the last block row / column may be cut short)
Beside it, `dequantized_dir` holds the same model with each projection replaced by q * scale in float32: the
model a correct FP8 loader computes, and one transformers loads as a plain checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(w: torch.Tensor, block: tuple[int, int] | None):
    """(q fp8, the scale tensor as stored, the dequantized float32 weight)."""
    w = w.float()
    if block is None:
        s = w.abs().max() / 448.0
        q = (w / s).to(torch.float8_e4m3fn)
        return q, s.reshape(()), q.float() * s
    bn, bk = block
    n, k = w.shape
    pn, pk = -(-n // bn) * bn, -(-k // bk) * bk  # a last block cut short: computed on a zero-padded copy
    padded = torch.zeros(pn, pk)
    padded[:n, :k] = w
    blocks = padded.view(pn // bn, bn, pk // bk, bk)
    s = blocks.abs().amax(dim=(1, 3)) / 448.0  # (ceil(N/bn), ceil(K/bk))
    q = (blocks / s[:, None, :, None]).view(pn, pk).to(torch.float8_e4m3fn)
    deq = (q.float().view(pn // bn, bn, pk // bk, bk) * s[:, None, :, None]).view(pn, pk)
    return q[:n, :k].contiguous(), s, deq[:n, :k].contiguous()


def build_fp8(src: str, dst: str, block: tuple[int, int] | None = None,
              projections: tuple[str, ...] = PROJECTIONS) -> tuple[str, str]:
    from safetensors.torch import load_file

    deq_dir = dst + "-dequantized"
    if os.path.isfile(os.path.join(dst, "model.safetensors")) and os.path.isdir(deq_dir):
        return dst, deq_dir
    state = load_file(os.path.join(src, "model.safetensors"))
    out, deq = {}, {}
    for name, t in state.items():
        if name.endswith(".weight") and name.split(".")[-2] in projections:
            q, s, d = quantize(t, block)
            base = name.removesuffix(".weight")
            out[name] = q
            if block is None:
                out[base + ".weight_scale"] = s
                out[base + ".input_scale"] = torch.tensor(0.05)  # a static activation scale: not used
            else:
                out[base + ".weight_scale_inv"] = s
            deq[name] = d
        else:
            out[name] = deq[name] = t
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic" if block else "static"}
    if block:
        qc["weight_block_size"] = list(block)
    return write_pair(src, dst, out, deq, qc)


def write_pair(src: str, dst: str, quantized: dict, dequantized: dict, quantization_config: dict) -> tuple[str, str]:
    """`src` copied to dst (with the quantized tensors and config.json's quantization_config) and to
    dst-dequantized (with the dequantized tensors): (dst, dst-dequantized)."""
    from safetensors.torch import save_file

    deq_dir = dst + "-dequantized"
    for d in (dst, deq_dir):
        shutil.copytree(src, d, dirs_exist_ok=True)
    save_file(quantized, os.path.join(dst, "model.safetensors"))
    save_file(dequantized, os.path.join(deq_dir, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dst, deq_dir
