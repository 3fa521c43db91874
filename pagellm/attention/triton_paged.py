"""Paged attention on CUDA GPUs with a Triton kernel for decode tokens.

One program per (sequence, K/V head): it walks the sequence's block table a
block at a time, scores the block's keys against the G query heads that share
the K/V head, and keeps an online softmax (running max and sum) in float32,
so K/V are read once, straight from the paged cache. Sliding windows start the walk
at the block of the first visible key; soft-capping and head sizes that are not a
power of two (80, 96) are handled in the kernel. An fp8 cache is read as fp8 and widened to
float32 in registers (k_scale folded into the query, v_scale into the output). Fresh prompts use SDPA on
their own K/V; prefill chunks over cached context (several query tokens) use
the torch_ref path. Triton is imported only when this backend is chosen.
"""

from __future__ import annotations

import torch

from pagellm.attention.backend import AttentionMetadata, AttentionParams, KVCache, PagedBackendBase
from pagellm.attention.torch_ref import paged_attention_ref


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, qstart_ptr, ids_ptr, scale, window,
                     soft_cap, v_scale, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_tab,
                     BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                     SOFT_CAP: tl.constexpr):
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.load(ids_ptr + pid)
        tok = tl.load(qstart_ptr + s)
        n = tl.load(lens_ptr + s)
        # The query sits at position n - 1 and sees keys lo .. n - 1; blocks before lo are not read.
        lo = tl.maximum(n - window, 0)  # window = 2**30 without a sliding window
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)  # head_dim padded to a power of two (80, 96 -> 128), masked
        t = tl.arange(0, BLOCK)
        g_ok = g < G
        d_ok = d < D
        q = tl.load(q_ptr + tok * stride_qt + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale  # (GP, DP)
        m = tl.full((GP,), float("-inf"), tl.float32)
        l_sum = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DP), tl.float32)
        for b0 in range((lo // BLOCK) * BLOCK, n, BLOCK):
            blk = tl.load(tables_ptr + s * stride_tab + b0 // BLOCK)
            pos = b0 + t
            t_ok = (pos < n) & (pos >= lo)
            off = blk * stride_kb + t[:, None] * stride_kt + kvh * stride_kh + d[None, :]
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)  # (BLOCK, DP)
            v = tl.load(v_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
            qk = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (GP, BLOCK)
            if SOFT_CAP:
                # cap * tanh(qk / cap), tanh(x) = 1 - 2 / (exp(2x) + 1)
                qk = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * qk / soft_cap) + 1.0))
            qk = tl.where(t_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, axis=1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        res = acc / l_sum[:, None] * v_scale
        tl.store(out_ptr + tok * stride_qt + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                 res.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])

    return paged_decode


def _pow2(x: int) -> int:
    return max(1, 1 << (x - 1).bit_length())


class TritonPagedBackend(PagedBackendBase):
    name = "triton_paged"

    def __init__(self) -> None:
        self.kernel = _kernel()

    def paged(self, out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
              params: AttentionParams) -> None:
        qsl = meta.query_start_loc_cpu
        decode = [i for i in meta.paged_seqs if qsl[i + 1] - qsl[i] == 1]
        chunks = [i for i in meta.paged_seqs if qsl[i + 1] - qsl[i] > 1]
        if chunks:
            paged_attention_ref(out, q, kv_cache, meta, params, chunks)
        if decode:
            self.decode(out, q, kv_cache, meta, params, torch.tensor(decode, device=q.device))

    def decode(self, out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
               params: AttentionParams, seq_ids: torch.Tensor) -> None:
        k_cache, v_cache = kv_cache
        bs, kvh, d = k_cache.shape[1:]
        g = q.shape[1] // kvh
        tables = meta.block_tables.contiguous()
        cap = params.logits_soft_cap
        self.kernel[(len(seq_ids), kvh)](
            out, q, k_cache, v_cache, tables, meta.seq_lens, meta.query_start_loc, seq_ids,
            params.scale * params.k_scale, params.sliding_window or 2**30, cap or 1.0, params.v_scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
            BLOCK=bs, D=d, DP=_pow2(d), G=g, GP=_pow2(g), SOFT_CAP=cap is not None)
