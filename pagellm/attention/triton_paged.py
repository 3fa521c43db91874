"""Paged attention on CUDA GPUs: one Triton kernel for every sequence in the batch.

Fresh prompts, prefill chunks over cached context and decode tokens all take the same path: this
step's K/V are written to the cache first, then one launch reads every sequence's context straight
from its block table. No Python loop over sequences, no host-to-device copy per layer.

Work split. A program owns one (query block, K/V head): BLOCK_Q consecutive query tokens of one
sequence times the G query heads that share the K/V head, laid out as the rows of a
(BLOCK_M = BLOCK_Q * G, padded) tile, so a K/V tile read from memory serves all of them and both
products are `tl.dot`s:

    rows m = (token m // G, head m % G)        S = Q K^T (BLOCK_M x TILE_N)    O += P V

with an online softmax (running max and sum) in float32. Programs are numbered per sequence from
query_start_loc alone, with no host-side list: sequence s owns program ids
[qsl[s] // BLOCK_Q + s, qsl[s + 1] // BLOCK_Q + s + 1), an upper bound on its ceil(q_len / BLOCK_Q)
blocks; a program finds its sequence by binary search and exits if it is past the last block. The
grid is fixed by the token and sequence counts, which is what a CUDA graph needs.

Split over the context (flash-decoding). When there are too few programs to fill the GPU (small
decode batches, long contexts), axis 2 splits each program's key range into NUM_SPLITS parts that
write a partial (max, sum, unnormalized output) each; a second kernel merges them by
log-sum-exp.

Keys are gathered a tile at a time by position (block table lookup per key), so the tile size is
independent of the cache's block size; positions before the first key a query block can see
(sliding window, chunked attention) are never loaded, because their blocks may already belong to another sequence.
Soft-capping, attention sinks (a per-head logit added to the softmax's sum once, at the end or in the merge), head
sizes that are not a power of two (padded and masked) and an fp8 cache (widened in registers; k_scale folded into
the scores, v_scale into the output) are handled in the kernel.
Triton is imported only when this backend is chosen; `TRITON_INTERPRET=1` runs the same kernels on
CPU (the tests check them against torch_ref that way).
"""

from __future__ import annotations

import functools
import os

import torch

from pagellm.attention.backend import (
    AttentionMetadata,
    AttentionParams,
    KVCache,
    PagedBackendBase,
    write_kv,
)


@functools.lru_cache(maxsize=1)
def _kernels():
    from pagellm.attention import triton_kernels

    return triton_kernels.paged_attention, triton_kernels.merge_splits


def _pow2(x: int) -> int:
    return max(1, 1 << (x - 1).bit_length())


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_DOT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(num_tokens: int, num_seqs: int, num_kv_heads: int, groups: int, max_query_len: int, max_seq_len: int,
         device: torch.device, num_splits: int | None = None) -> dict:
    """Tile shape and grid for one launch: the same for every layer of a step.

    Decode-only batches use a 16-row tile (BLOCK_Q = 16 // G tokens of G heads); batches with
    prompts use 64 rows. Without enough programs to give every multiprocessor two, a decode batch
    splits its contexts so each split still walks at least 256 keys.
    """
    block_m = 16 if max_query_len == 1 else 64
    block_m = max(block_m, _pow2(groups))
    block_q = max(1, block_m // groups)
    grid0 = num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = 1
        if max_query_len == 1 and device.type == "cuda":
            programs = num_seqs * num_kv_heads
            sms = _num_sms(device.index or 0)
            if programs < 2 * sms:
                num_splits = max(1, min(16, (2 * sms) // max(programs, 1), max_seq_len // 256))
    return dict(BLOCK_M=block_m, BLOCK_Q=block_q, grid0=grid0, NUM_SPLITS=num_splits)


LAUNCH_ENV = "PAGELLM_ATTENTION_LAUNCH"
_LAUNCH_KEYS = ("tile_n", "num_warps", "num_stages")


def launch_settings(text: str) -> dict[str, int]:
    """Parse 'tile_n=64,num_warps=4,num_stages=3' (any of the three) into a dict; ValueError naming what is wrong."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in _LAUNCH_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{LAUNCH_ENV}: {item!r} is not one of {', '.join(k + '=N' for k in _LAUNCH_KEYS)} "
                             "(N a positive integer)")
        if key == "tile_n" and int(value) & (int(value) - 1):
            raise ValueError(f"{LAUNCH_ENV}: tile_n must be a power of two, got {value}")
        out[key] = int(value)
    return out


class TritonPagedBackend(PagedBackendBase):
    name = "triton_paged"
    tile_n = 32  # keys per tile
    num_warps: int | None = None  # launch options (None: Triton's defaults); `pagellm bench attention` sweeps them
    num_stages: int | None = None

    def __init__(self) -> None:
        self.attn_kernel, self.merge_kernel = _kernels()
        # A sweep's pick for this GPU (`pagellm bench attention --tile-n ... --num-warps ... --num-stages ...`).
        for key, value in launch_settings(os.environ.get(LAUNCH_ENV, "")).items():
            setattr(self, key, value)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta, params)
        q = q.contiguous()
        # Rows past num_tokens (batch padding) are not written by the kernel.
        alloc = torch.zeros if meta.num_tokens < q.shape[0] else torch.empty
        out = alloc(q.shape, dtype=q.dtype, device=q.device)
        self.attention(out, q, kv_cache, meta, params)
        return out

    def _launch_options(self) -> dict:
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return {k: v for k, v in opts.items() if v is not None}

    def attention(self, out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                  params: AttentionParams, num_splits: int | None = None) -> None:
        """out[:num_tokens] = attention of every query token of the batch over its sequence's cached context."""
        k_cache, v_cache = kv_cache
        bs, kvh, d = k_cache.shape[1:]
        h = q.shape[1]
        g = h // kvh
        t = meta.num_tokens
        p = plan(t, meta.num_seqs, kvh, g, meta.max_query_len, meta.max_seq_len, q.device, num_splits)
        tables = meta.block_tables
        if tables.stride(-1) != 1:
            tables = tables.contiguous()
        splits, dp = p["NUM_SPLITS"], max(16, _pow2(d))
        if splits > 1:
            part_out = torch.empty(t * h * splits * dp, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(t * h * splits * 2, dtype=torch.float32, device=q.device)
        else:
            part_out = part_ml = out  # unused
        cap = params.logits_soft_cap
        sinks = None if params.sinks is None else params.sinks.float().contiguous()
        dot_dtype = _DOT_DTYPES.get(q.dtype, "fp32")
        if dot_dtype == "bf16" and _INTERPRETED:  # the interpreter multiplies bf16 as raw integers
            dot_dtype = "fp32"
        self.attn_kernel[(p["grid0"], kvh, splits)](
            out, part_out, part_ml, q, k_cache, v_cache, tables, meta.seq_lens, meta.query_start_loc,
            out if sinks is None else sinks, meta.num_seqs, params.scale * params.k_scale,
            params.sliding_window or 2**30, params.attention_chunk_size or 2**30, cap or 1.0,
            params.v_scale, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            tables.stride(0),
            BLOCK_SIZE=bs, D=d, DP=dp, G=g, BLOCK_Q=p["BLOCK_Q"], BLOCK_M=p["BLOCK_M"], TILE_N=self.tile_n,
            NUM_SPLITS=splits, SOFT_CAP=cap is not None, SLIDING=params.sliding_window is not None,
            CHUNKED=params.attention_chunk_size is not None, SINKS=sinks is not None,
            DOT_DTYPE=_tl_dtype(dot_dtype), IEEE=dot_dtype == "fp32", **self._launch_options())
        if splits > 1:
            self.merge_kernel[(t, h)](out, part_out, part_ml, out if sinks is None else sinks, t, params.v_scale,
                                      q.stride(0), q.stride(1), H=h, D=d, DP=dp, NUM_SPLITS=splits,
                                      SP=max(2, _pow2(splits)), SINKS=sinks is not None)


def _tl_dtype(name: str):
    import triton.language as tl

    return {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[name]
