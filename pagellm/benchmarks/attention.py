"""Paged-attention kernel micro-benchmark: time per call and the KV bandwidth it achieves.

    pagellm bench attention --device cuda --batch-size 256 --context-len 1024 --num-heads 32 --num-kv-heads 4
    pagellm bench attention --backend cpu_paged --backend torch_ref --batch-size 16 --context-len 512

Builds a cache of --batch-size sequences of --context-len tokens in blocks scattered at random, and times
the backend's attention over it (--query-len new tokens per sequence, 1 = decode; the K/V write is not
timed). Bytes = every context token's K and V once (+ queries and outputs); GB/s = bytes / median time,
beside the memory read bandwidth measured on the same device in the same run (a sum over a large
tensor), so `% of bandwidth` is what the kernel streams of what the memory gives.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pagellm.benchmarks.common import sync_device, write_report


def build_case(batch: int, context: int, q_len: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
               dtype, cache_dtype, device: str, seed: int = 0):
    import torch

    from pagellm.attention.backend import AttentionMetadata, to_cache

    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 1
    ids = list(range(1, num_blocks))
    random.Random(seed).shuffle(ids)
    tables = torch.tensor(ids, dtype=torch.int32).view(batch, blocks_per_seq)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = to_cache(torch.randn(shape, generator=g).to(device), cache_dtype, 1.0)
    v_cache = to_cache(torch.randn(shape, generator=g).to(device), cache_dtype, 1.0)
    total = batch * q_len
    q = torch.randn(total, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    qsl = [i * q_len for i in range(batch + 1)]
    lens = [context] * batch
    pos = torch.arange(context - q_len, context)
    slots = (tables[:, pos // block_size].long() * block_size + pos % block_size).reshape(-1)
    meta = AttentionMetadata(
        num_tokens=total, slot_mapping=slots.to(device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32).to(device), block_tables=tables.to(device),
        query_start_loc_cpu=qsl, seq_lens_cpu=lens, fresh_seqs=[], paged_seqs=list(range(batch)),
        paged_seq_ids=torch.arange(batch).to(device), max_seq_len=context, block_size=block_size)
    return q, (k_cache, v_cache), meta


def time_backend(backend, q, cache, meta, params, device: str, iters: int, repeats: int = 5,
                 num_splits: int | None = None) -> float:
    """Median seconds per attention call (the backend's read of the cache; no K/V write). `num_splits` (Triton):
    split each context in that many parts instead of the backend's choice."""
    import functools

    import torch

    out = torch.zeros_like(q)
    call = backend.attention if hasattr(backend, "attention") else backend.paged
    if num_splits is not None:
        call = functools.partial(call, num_splits=num_splits)

    call(out, q, cache, meta, params)  # compile / warm up
    sync_device(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            call(out, q, cache, meta, params)
        sync_device(device)
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


def _ints(text: str | None) -> list[int | None]:
    return [int(x) for x in text.split(",")] if text else [None]


def _sweep(backend, ns: argparse.Namespace) -> list[dict]:
    """Launch settings to time: every combination of --tile-n / --num-warps / --num-stages / --num-splits (Triton
    backend)."""
    if not hasattr(backend, "tile_n"):
        return [{}]
    combos = []
    for tile in _ints(ns.tile_n):
        for warps in _ints(ns.num_warps):
            for stages in _ints(ns.num_stages):
                for splits in _ints(ns.num_splits):
                    knobs = {"tile_n": tile, "num_warps": warps, "num_stages": stages, "num_splits": splits}
                    combos.append({k: v for k, v in knobs.items() if v is not None})
    return combos


def main(ns: argparse.Namespace) -> dict:
    import torch

    from pagellm.attention.backend import AttentionParams
    from pagellm.attention.registry import get_attention_backend
    from pagellm.benchmarks.peak import _DTYPES, read_bandwidth_gbs

    if ns.threads:
        torch.set_num_threads(ns.threads)
    dtype = _DTYPES[ns.dtype]
    cache_dtype = dtype if ns.kv_cache_dtype == "auto" else _DTYPES[ns.kv_cache_dtype]
    q, cache, meta = build_case(ns.batch_size, ns.context_len, ns.query_len, ns.num_heads, ns.num_kv_heads,
                                ns.head_dim, ns.block_size, dtype, cache_dtype, ns.device)
    params = AttentionParams(ns.head_dim ** -0.5)
    kv_bytes = 2 * ns.batch_size * ns.context_len * ns.num_kv_heads * ns.head_dim * cache[0].element_size()
    qo_bytes = 2 * q.numel() * q.element_size()
    bw = read_bandwidth_gbs(device=ns.device)
    where = f"{torch.get_num_threads()} threads" if ns.device == "cpu" else torch.cuda.get_device_name()
    print(f"attention: batch {ns.batch_size} x context {ns.context_len} (query {ns.query_len}), heads "
          f"{ns.num_heads}/{ns.num_kv_heads} x {ns.head_dim}, block {ns.block_size}, {ns.dtype} / cache "
          f"{cache[0].dtype}; K/V {kv_bytes / 1e6:.1f} MB; memory read {bw:.1f} GB/s ({where})")
    rows = []
    for name in ns.backend or ["auto"]:
        backend = get_attention_backend(name, ns.device)
        for knobs in _sweep(backend, ns):
            for key, value in knobs.items():
                if key != "num_splits":
                    setattr(backend, key, value)
            sec = time_backend(backend, q, cache, meta, params, ns.device, ns.iters,
                               num_splits=knobs.get("num_splits"))
            gbs = (kv_bytes + qo_bytes) / sec / 1e9
            label = backend.name + "".join(f" {k}={v}" for k, v in knobs.items())
            rows.append({"backend": backend.name, **knobs, "ms": sec * 1e3, "gbs": gbs,
                         "pct_of_bandwidth": 100 * gbs / bw})
            print(f"  {label:<40} {sec * 1e3:9.3f} ms  {gbs:9.1f} GB/s  {100 * gbs / bw:5.1f}% of measured "
                  "bandwidth", flush=True)
    return write_report({"batch_size": ns.batch_size, "context_len": ns.context_len, "query_len": ns.query_len,
                         "num_heads": ns.num_heads, "num_kv_heads": ns.num_kv_heads, "head_dim": ns.head_dim,
                         "block_size": ns.block_size, "dtype": ns.dtype, "kv_cache_dtype": str(cache[0].dtype),
                         "device": ns.device, "read_bandwidth_gbs": bw, "results": rows}, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", action="append", default=None,
                   help="Attention backend (repeatable): auto, torch_ref, cpu_paged, triton_paged.")
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--context-len", type=int, default=1024, help="Tokens of context per sequence (new ones included).")
    p.add_argument("--query-len", type=int, default=1, help="New tokens per sequence (1 = decode).")
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "fp8"])
    p.add_argument("--iters", type=int, default=20, help="Calls per timed repeat (5 repeats, median).")
    p.add_argument("--tile-n", default=None, metavar="N[,N...]", help="Triton: keys per tile to try (e.g. 16,32,64).")
    p.add_argument("--num-warps", default=None, metavar="N[,N...]", help="Triton: warps per program to try.")
    p.add_argument("--num-stages", default=None, metavar="N[,N...]", help="Triton: pipeline stages to try.")
    p.add_argument("--num-splits", default=None, metavar="N[,N...]",
                   help="Triton: parts each context is split into (flash-decoding), instead of the backend's choice.")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output-json", default=None)
