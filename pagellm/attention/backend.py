"""The attention backend protocol and the per-step metadata every backend reads.

    ModelRunner builds AttentionMetadata once per step
        -> model.forward(..., meta) -> each layer's Attention -> backend.forward(q, k, v, kv_cache, meta)

Worked example, three sequences scheduled with 2, 5 and 3 new tokens whose
contexts (cached + new) are 9, 5 and 40 tokens:

    query_start_loc [0, 2, 7, 10]      seq_lens [9, 5, 40]
    sequence 0 queries positions 7, 8; sequence 1 is a fresh prompt (positions 0..4)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

KVCache = tuple[torch.Tensor, torch.Tensor]  # per layer: K and V, each (num_blocks, block_size, kv_heads, head_dim)


@dataclass(frozen=True)
class AttentionParams:
    """What one layer's attention computes, beyond q, k and v.

    A query at position p sees the keys at positions j with

        p - sliding_window < j <= p        (sliding_window None: 0 <= j <= p)

and, with attention_chunk_size C (Llama 4's local layers), only those in p's own chunk of C positions:
j >= (p // C) * C. C = 4, p = 9: keys 8, 9.

    and its scores s = scale * q.k become cap * tanh(s / cap) before the softmax when
    logits_soft_cap is set (Gemma 2). With `sinks` (GPT-OSS: one learned logit per query head), the softmax
    runs over the scores and the head's sink together, and the sink's weight is dropped: the output is
    sum_j exp(s_j) v_j / (exp(sink) + sum_j exp(s_j)), attention that may go "nowhere".

    An 8-bit (fp8 e4m3) cache stores K / k_scale and V / v_scale, saturated to +-448; readers
    multiply back (the kernels fold k_scale into the query and v_scale into the output).
    """

    scale: float
    sliding_window: int | None = None  # keys the query sees, itself included; None = the whole context
    logits_soft_cap: float | None = None
    k_scale: float = 1.0  # per-tensor scales of an fp8 cache (1.0: vLLM's default without calibration)
    v_scale: float = 1.0
    sinks: torch.Tensor | None = field(default=None, compare=False)  # (num_heads,) float32 logits, or None
    attention_chunk_size: int | None = None  # keys only in the query's own chunk of this many positions

    def first_key(self, query_pos: int) -> int:
        """The first key position a query at query_pos sees."""
        first = 0 if self.sliding_window is None else max(0, query_pos - self.sliding_window + 1)
        chunk = self.attention_chunk_size
        return first if chunk is None else max(first, query_pos // chunk * chunk)

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos (L, 1), k_pos (1, n) -> (L, n): the keys each query sees (causal, window, chunk)."""
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= k_pos > q_pos - self.sliding_window
        chunk = self.attention_chunk_size
        if chunk is not None:
            mask &= k_pos >= torch.div(q_pos, chunk, rounding_mode="floor") * chunk
        return mask


@dataclass
class AttentionMetadata:
    num_tokens: int  # real tokens in the batch; rows past this are padding and are not attended or cached
    slot_mapping: torch.Tensor  # (num_tokens,) int64 cache slot of each new token
    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32 offsets of each sequence's tokens in the batch
    seq_lens: torch.Tensor  # (num_seqs,) int32 context length after this step
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32 block ids, padded with 0
    query_start_loc_cpu: list[int]  # host copies for loops over sequences
    seq_lens_cpu: list[int]
    fresh_seqs: list[int]  # sequences with no cached context: attend over this step's own K/V
    paged_seqs: list[int]  # sequences that read (part of) their context from the cache
    paged_seq_ids: torch.Tensor  # (len(paged_seqs),) int64, the same on the device (for kernels)
    max_seq_len: int
    block_size: int
    max_query_len: int = 0  # most new tokens of one sequence (1: a decode-only batch); 0 = derive it
    # images whose positions attend to each other both ways (Gemma 3), computed whole in this step: (first batch
    # row, rows, first position, image start, image end, the sequence's block table row on the device)
    image_blocks: list | None = None
    # models with a recurrent state per sequence (Mamba layers): each sequence's row in the state tensors
    state_rows: torch.Tensor | None = None  # (num_seqs,) int64 on the device
    state_rows_cpu: list[int] | None = None
    state_saves: dict[int, list[tuple[int, int]]] | None = None  # batch index -> [(chunk offset, checkpoint row)]
    recurrent_plan: Any = None  # how the recurrent layers split the step (models/mamba.py), made by the first one
    # DeepSeek Sparse Attention: the keys each query of a long sequence attends to, {batch index: (L, n) bool}, set by
    # a layer with an indexer for the layers after it that share its selection (GLM-5)
    sparse_selection: dict[int, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.max_query_len:
            qsl = self.query_start_loc_cpu
            self.max_query_len = max((b - a for a, b in zip(qsl, qsl[1:])), default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        """q (T, H, D), k/v (T, KVH, D) -> out (T, H, D); writes k/v of the first meta.num_tokens rows to the cache."""
        ...


class PagedBackendBase:
    """The forward every backend shares: store this step's K/V, SDPA for fresh prompts, then the
    backend's own `paged()` for the sequences that read context from the cache."""

    name = "base"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta, params)
        q = q.contiguous()
        # Rows no kernel writes (batch padding, before SDPA fills fresh prompts) must not hold garbage.
        alloc = torch.zeros if meta.num_tokens < q.shape[0] or meta.fresh_seqs else torch.empty
        out = alloc(q.shape, dtype=q.dtype, device=q.device)
        fresh_attention(out, q, k, v, meta, params)
        if meta.paged_seqs:
            self.paged(out, q, kv_cache, meta, params)
        return out

    def paged(self, out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
              params: AttentionParams) -> None:
        """Attention of the sequences in meta.paged_seqs, reading their context from the cache.

        Keys before params.first_key(query position) may sit in blocks already handed back
        (sliding window): a backend must not read them.
        """
        raise NotImplementedError


FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_MAX = 448.0  # largest finite e4m3fn value


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor viewed as uint8 (CPU torch has no index_copy_ / index_select for fp8), else itself."""
    return t.view(torch.uint8) if is_fp8(t) else t


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """K or V in the cache's dtype. fp8 stores x / scale saturated to the e4m3 range, with e4m3 subnormals
    (magnitudes under 2^-6 after scaling) stored as 0: readers widen fp8 with a shift and a multiply that must
    never meet an f32 subnormal (slow on x86), and every backend then reads the same values."""
    if cache_dtype in FP8_DTYPES:
        x = x.float()
        if scale != 1.0:
            x = x / scale
        q = x.clamp_(-FP8_MAX, FP8_MAX).to(cache_dtype)
        b = q.view(torch.uint8)
        b.masked_fill_((b & 0x78) == 0, 0)  # exponent field 0: a subnormal (or +-0)
        return q
    return x.to(cache_dtype)


def from_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cache contents back in the compute dtype (times the fp8 scale)."""
    if is_fp8(x):
        x = x.to(torch.float32)
        return (x * scale if scale != 1.0 else x).to(dtype)
    return x.to(dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
             params: AttentionParams | None = None) -> None:
    """Store this step's K/V at their slots (block * block_size + offset)."""
    k_cache, v_cache = kv_cache
    n = meta.num_tokens
    kvh, d = k_cache.shape[-2], k_cache.shape[-1]
    ks, vs = (params.k_scale, params.v_scale) if params is not None else (1.0, 1.0)
    as_bytes(k_cache).view(-1, kvh, d).index_copy_(0, meta.slot_mapping, as_bytes(to_cache(k[:n], k_cache.dtype, ks)))
    if v_cache is not k_cache:  # (one tensor where V is K: MLA's latent cache)
        as_bytes(v_cache).view(-1, kvh, d).index_copy_(0, meta.slot_mapping,
                                                       as_bytes(to_cache(v[:n], v_cache.dtype, vs)))


def fresh_attention(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    meta: AttentionMetadata, params: AttentionParams) -> None:
    """Causal attention of sequences whose whole context is in this step (a fresh prompt)."""
    qsl = meta.query_start_loc_cpu
    for i in meta.fresh_seqs:
        s, e = qsl[i], qsl[i + 1]
        out[s:e] = dense_attention(q[s:e], k[s:e], v[s:e], 0, params)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_start: int,
                    params: AttentionParams) -> torch.Tensor:
    """q (L, H, D) for the last L positions of a context whose keys k, v (n, KVH, D) start at
    position k_start -> out (L, H, D). Causal, with the layer's window and soft-cap.

    n = 6, L = 2, k_start = 0: queries sit at positions 4, 5; query 4 sees keys 0..4.
    """
    n, q_len = k.shape[0], q.shape[0]
    groups = q.shape[1] // k.shape[1]
    # (1, H, L, D): with a batch dimension torch runs its fused (flash) CPU kernel, in the inputs' dtype; 3-D
    # inputs take the unfused path, which also upcasts bf16 to float32.
    qi = q.transpose(0, 1)[None]
    ki = expand_kv(k.to(q.dtype), groups).transpose(0, 1)[None]  # (1, H, n, D)
    vi = expand_kv(v.to(q.dtype), groups).transpose(0, 1)[None]
    plain = (params.sliding_window is None and params.logits_soft_cap is None and params.sinks is None
             and params.attention_chunk_size is None)
    if plain and (n == q_len or q_len == 1):  # causal from the start, or one query that sees every key
        out = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=n == q_len > 1,
                                                               scale=params.scale)
        return out[0].transpose(0, 1)
    q_pos = torch.arange(k_start + n - q_len, k_start + n, device=q.device)[:, None]  # (L, 1)
    k_pos = torch.arange(k_start, k_start + n, device=q.device)[None, :]  # (1, n)
    return masked_attention(qi, ki, vi, params.visible(q_pos, k_pos), params)


def masked_attention(qi: torch.Tensor, ki: torch.Tensor, vi: torch.Tensor, mask: torch.Tensor,
                     params: AttentionParams) -> torch.Tensor:
    """qi (1, H, L, D), ki / vi (1, H, n, D), mask (L, n) of the keys each query sees -> (L, H, D)."""
    if params.logits_soft_cap is None and params.sinks is None:
        out = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=params.scale)
        return out[0].transpose(0, 1)
    # Soft-capping and sinks have no SDPA kernel: the eager formula (as Hugging Face's Gemma 2 and GPT-OSS), the
    # softmax in float32.
    scores = torch.matmul(qi[0], ki[0].transpose(1, 2)) * params.scale  # (H, L, n)
    cap = params.logits_soft_cap
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    if params.sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qi.dtype)
    else:  # one more column, each head's sink, in the softmax; its weight dropped after
        sink = params.sinks.to(scores.dtype)[:, None, None].expand(-1, scores.shape[1], 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1, dtype=torch.float32)[..., :-1].to(qi.dtype)
    return torch.matmul(probs, vi[0]).transpose(0, 1)


def image_block_attention(out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                          params: AttentionParams) -> None:
    """Gemma 3: the rows of an image computed in this step attend to every position of that image, later ones
    included, besides what causal attention gives them (transformers' mask: causal OR the same image, then the
    layer's window). The backend has written the step's K/V and computed the rows causally; they are computed
    again here from the cache, over the keys up to the image's end.

        image at 10 .. 13, window 12: query 11 sees keys 0 .. 13 (a global layer), 0 .. 13 (sliding: 11 - 0 < 12)
    """
    for row, n, pos, lo, hi, table in meta.image_blocks:
        start = params.first_key(pos)
        k, v = gather_context(kv_cache, table, start, hi)
        k, v = from_cache(k, q.dtype, params.k_scale), from_cache(v, q.dtype, params.v_scale)
        groups = q.shape[1] // k.shape[1]
        qi = q[row:row + n].transpose(0, 1)[None]
        ki = expand_kv(k, groups).transpose(0, 1)[None]
        vi = expand_kv(v, groups).transpose(0, 1)[None]
        q_pos = torch.arange(pos, pos + n, device=q.device)[:, None]
        k_pos = torch.arange(start, hi, device=q.device)[None, :]
        mask = (k_pos <= q_pos) | (k_pos >= lo)  # every key up to hi: causal, or inside the image
        if params.sliding_window is not None:
            mask &= q_pos - k_pos < params.sliding_window
        out[row:row + n] = masked_attention(qi, ki, vi, mask, params)


def gather_context(kv_cache: KVCache, block_table: torch.Tensor, start: int,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions start .. seq_len - 1 of one sequence: each (seq_len - start, kv_heads, head_dim).

    block_size 4, start 6, seq_len 10: blocks table[1], table[2] are read, rows 2.. of the first.
    """
    k_cache, v_cache = kv_cache
    bs, kvh, d = k_cache.shape[1:]
    first = start // bs
    blocks = block_table[first: -(-seq_len // bs)].long()
    skip = start - first * bs
    k = k_cache[blocks].reshape(-1, kvh, d)[skip:seq_len - first * bs]
    v = v_cache[blocks].reshape(-1, kvh, d)[skip:seq_len - first * bs]
    return k, v


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(L, KVH, D) -> (L, KVH * groups, D): each K/V head serves `groups` query heads."""
    if groups == 1:
        return x
    n, kvh, d = x.shape
    return x[:, :, None, :].expand(n, kvh, groups, d).reshape(n, kvh * groups, d)


