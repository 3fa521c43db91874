"""Paged attention in plain torch: the portable path and the oracle other backends must match.

For each sequence reading from the cache: gather its blocks into a contiguous
(context, kv_heads, head_dim) tensor, then scaled-dot-product attention with a
causal mask aligned to the end of the context (query i of a q_len-token chunk
sits at position seq_len - q_len + i and sees keys 0 .. that position).
"""

from __future__ import annotations

import torch

from pagellm.attention.backend import AttentionMetadata, KVCache, PagedBackendBase, expand_kv


class TorchRefBackend(PagedBackendBase):
    name = "torch_ref"

    def paged(self, out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
              scale: float) -> None:
        paged_attention_ref(out, q, kv_cache, meta, scale, meta.paged_seqs)


def gather_context(kv_cache: KVCache, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first seq_len tokens: each (seq_len, kv_heads, head_dim)."""
    k_cache, v_cache = kv_cache
    bs, kvh, d = k_cache.shape[1:]
    blocks = block_table[: -(-seq_len // bs)].long()
    k = k_cache[blocks].reshape(-1, kvh, d)[:seq_len]
    v = v_cache[blocks].reshape(-1, kvh, d)[:seq_len]
    return k, v


def paged_attention_ref(out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                        scale: float, seqs: list[int]) -> None:
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    groups = q.shape[1] // kv_cache[0].shape[2]
    for i in seqs:
        s, e, n = qsl[i], qsl[i + 1], lens[i]
        k, v = gather_context(kv_cache, meta.block_tables[i], n)
        k = expand_kv(k.to(q.dtype), groups).transpose(0, 1)  # (H, n, D)
        v = expand_kv(v.to(q.dtype), groups).transpose(0, 1)
        qi = q[s:e].transpose(0, 1)  # (H, q_len, D)
        q_len = e - s
        mask = None
        if q_len > 1:
            q_pos = torch.arange(n - q_len, n, device=q.device)[:, None]
            mask = torch.arange(n, device=q.device)[None, :] <= q_pos  # (q_len, n)
        oi = torch.nn.functional.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[s:e] = oi.transpose(0, 1)
