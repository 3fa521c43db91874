"""Tiny GPTQ and AWQ checkpoints built from a float checkpoint, written the way those tools store them.

    build_int4(src, dst, method, group_size, desc_act=False) -> (dst, dequantized_dir)

Every q/k/v/o/gate/up/down projection is quantized to 4 bits with a scale and a zero point per group of
inputs (asymmetric, as GPTQ and AWQ do); the other tensors are copied. Beside it, `dequantized_dir` holds
the same model with each projection replaced by its dequantized float32 weight, (q - zero) * scale with the
float16 scale the checkpoint stores: the model a correct 4-bit loader must compute, and one transformers
loads without GPTQ/AWQ packages.

The packing is written out bit by bit from the formats' definitions, independently of pagellm's unpacking:
    GPTQ qweight (K/8, N): input k at bits 4*(k%8) of row k//8;  qzeros (K/g, N/8): output n at bits
         4*(n%8) of column n//8, holding zero - 1 (checkpoint_format "gptq");  scales (K/g, N);  g_idx (K,)
    AWQ  qweight (K, N/8) and qzeros (K/g, N/8): output 8c + ORDER[i] at bits 4*i of column c,
         ORDER = 0 2 4 6 1 3 5 7;  scales (K/g, N)
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize(w: torch.Tensor, g_idx: np.ndarray, groups: int):
    """w (N, K) -> q (N, K) in 0..15, zero (N, groups) in 1..15, scale (N, groups) float16, dequantized (N, K)."""
    w = w.float().numpy()
    n, k = w.shape
    q = np.zeros((n, k), dtype=np.int64)
    zero = np.zeros((n, groups), dtype=np.int64)
    scale = np.zeros((n, groups), dtype=np.float16)
    deq = np.zeros((n, k), dtype=np.float32)
    for j in range(groups):
        cols = np.nonzero(g_idx == j)[0]
        block = w[:, cols]
        lo = np.minimum(block.min(axis=1), 0.0)
        hi = np.maximum(block.max(axis=1), 0.0)
        s = np.maximum((hi - lo) / 15.0, 1e-6).astype(np.float16)
        s32 = s.astype(np.float32)
        z = np.clip(np.round(-lo / s32), 1, 15).astype(np.int64)
        qb = np.clip(np.round(block / s32[:, None]) + z[:, None], 0, 15).astype(np.int64)
        q[:, cols], zero[:, j], scale[:, j] = qb, z, s
        deq[:, cols] = (qb - z[:, None]).astype(np.float32) * s32[:, None]
    return q, zero, scale, torch.from_numpy(deq)


def pack_gptq(q, zero, scale, g_idx):
    n, k = q.shape
    qweight = np.zeros((k // 8, n), dtype=np.uint32)
    for kk in range(k):
        qweight[kk // 8] |= (q[:, kk].astype(np.uint32) << np.uint32(4 * (kk % 8)))
    groups = zero.shape[1]
    qzeros = np.zeros((groups, n // 8), dtype=np.uint32)
    for nn in range(n):
        qzeros[:, nn // 8] |= (((zero[nn] - 1) & 0xF).astype(np.uint32) << np.uint32(4 * (nn % 8)))
    return {"qweight": torch.from_numpy(qweight.view(np.int32)), "qzeros": torch.from_numpy(qzeros.view(np.int32)),
            "scales": torch.from_numpy(scale.T.copy()), "g_idx": torch.from_numpy(g_idx.astype(np.int32))}


def pack_awq(q, zero, scale):
    n, k = q.shape
    groups = zero.shape[1]
    qweight = np.zeros((k, n // 8), dtype=np.uint32)
    qzeros = np.zeros((groups, n // 8), dtype=np.uint32)
    for c in range(n // 8):
        for i, col in enumerate(AWQ_PACK_ORDER):
            qweight[:, c] |= q[8 * c + col].astype(np.uint32) << np.uint32(4 * i)
            qzeros[:, c] |= zero[8 * c + col].astype(np.uint32) << np.uint32(4 * i)
    return {"qweight": torch.from_numpy(qweight.view(np.int32)), "qzeros": torch.from_numpy(qzeros.view(np.int32)),
            "scales": torch.from_numpy(scale.T.copy())}


def build_int4(src: str, dst: str, method: str, group_size: int, desc_act: bool = False) -> tuple[str, str]:
    from safetensors.torch import load_file, save_file

    deq_dir = dst + "-dequantized"
    if os.path.isfile(os.path.join(dst, "model.safetensors")) and os.path.isfile(
            os.path.join(deq_dir, "model.safetensors")):
        return dst, deq_dir
    state = load_file(os.path.join(src, "model.safetensors"))
    quantized, dequantized = {}, {}
    rng = np.random.default_rng(0)
    perms: dict[str, np.ndarray] = {}
    for name, t in state.items():
        module = name.rsplit(".", 2)
        if not (name.endswith(".weight") and module[-2] in PROJECTIONS):
            quantized[name] = dequantized[name] = t.clone()
            continue
        base = name[:-len(".weight")]
        n, k = t.shape
        g = group_size if group_size > 0 else k
        groups = k // g
        g_idx = np.arange(k) // g
        if desc_act:  # act-order: a group's inputs scattered; projections of one input share the order
            shared = base.rsplit(".", 1)[0] + ("/qkv" if module[-2] in ("q_proj", "k_proj", "v_proj") else
                                               "/gate_up" if module[-2] in ("gate_proj", "up_proj") else module[-2])
            perms.setdefault(shared, rng.permutation(k))
            g_idx = g_idx[perms[shared]]
        q, zero, scale, deq = quantize(t, g_idx, groups)
        packed = pack_gptq(q, zero, scale, g_idx) if method == "gptq" else pack_awq(q, zero, scale)
        for suffix, tensor in packed.items():
            quantized[f"{base}.{suffix}"] = tensor
        dequantized[name] = deq
    for out, tensors in ((dst, quantized), (deq_dir, dequantized)):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(tensors, os.path.join(out, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    if method == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                      "desc_act": desc_act, "sym": False, "checkpoint_format": "gptq"}
    else:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                      "zero_point": True, "version": "gemm"}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dst, deq_dir
