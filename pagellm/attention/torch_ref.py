"""Paged attention in plain torch: the portable path and the oracle other backends must match.

For each sequence reading from the cache: gather the blocks its queries can see
into a contiguous (keys, kv_heads, head_dim) tensor, then attention with a causal
mask aligned to the end of the context (query i of a q_len-token chunk sits at
position seq_len - q_len + i and sees keys 0 .. that position, or the last
sliding_window of them). Blocks wholly before the first visible key are never
read: under a sliding window they may already belong to another sequence.
"""

from __future__ import annotations

import torch

from pagellm.attention.backend import (
    AttentionMetadata,
    AttentionParams,
    KVCache,
    PagedBackendBase,
    dense_attention,
    from_cache,
    gather_context,
    is_fp8,
)


class TorchRefBackend(PagedBackendBase):
    name = "torch_ref"

    def paged(self, out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
              params: AttentionParams) -> None:
        paged_attention_ref(out, q, kv_cache, meta, params, meta.paged_seqs)


def paged_attention_ref(out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                        params: AttentionParams, seqs: list[int]) -> None:
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for i in seqs:
        s, e, n = qsl[i], qsl[i + 1], lens[i]
        start = params.first_key(n - (e - s))  # what the chunk's first query sees
        k, v = gather_context(kv_cache, meta.block_tables[i], start, n)
        if is_fp8(k):
            k, v = from_cache(k, q.dtype, params.k_scale), from_cache(v, q.dtype, params.v_scale)
        out[s:e] = dense_attention(q[s:e], k, v, start, params)
