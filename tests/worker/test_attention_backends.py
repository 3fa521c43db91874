"""Every attention backend matches torch_ref (the oracle) on random paged caches."""

import os
import random

import pytest
import torch

from pagellm.attention.backend import AttentionMetadata, AttentionParams, dense_attention, from_cache, to_cache
from pagellm.attention.registry import get_attention_backend
from pagellm.attention.torch_ref import TorchRefBackend


def make_case(seed, num_heads, kv_heads, head_dim, block_size, specs, dtype, cache_dtype):
    """specs: (context_before, q_len) per sequence; blocks are scattered at random."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-(c + q) // block_size) for c, q in specs) + 8
    free = list(range(num_blocks))
    rng.shuffle(free)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    if cache_dtype == torch.float8_e4m3fn:  # as the engine writes it (no e4m3 subnormals)
        k_cache, v_cache = to_cache(k_cache, cache_dtype, 1.0), to_cache(v_cache, cache_dtype, 1.0)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    tables, slots, lens, qsl = [], [], [], [0]
    for c, q in specs:
        n = c + q
        t = [free.pop() for _ in range(-(-n // block_size))]
        tables.append(t)
        slots += [t[p // block_size] * block_size + p % block_size for p in range(c, n)]
        lens.append(n)
        qsl.append(qsl[-1] + q)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    total = qsl[-1]
    q = torch.randn(total, num_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype)
    fresh = [i for i, (c, _) in enumerate(specs) if c == 0]
    paged = [i for i, (c, _) in enumerate(specs) if c > 0]
    meta = AttentionMetadata(total, torch.tensor(slots), torch.tensor(qsl, dtype=torch.int32),
                             torch.tensor(lens, dtype=torch.int32), bt, qsl, lens, fresh, paged,
                             torch.tensor(paged, dtype=torch.long), max(lens), block_size)
    return q, k, v, (k_cache, v_cache), meta


CASES = [
    (12, 12, 64, 16, [(37, 1), (5, 1), (300, 1), (16, 1)]),  # GPT-2 decode
    (8, 2, 32, 16, [(0, 9), (20, 1), (31, 7), (64, 3)]),  # GQA, fresh prompt + chunks
    (4, 1, 16, 4, [(1, 1), (0, 1), (7, 13), (100, 2)]),  # MQA, tiny blocks
    (6, 3, 128, 8, [(250, 1), (3, 4)]),  # head_dim 128
    (4, 2, 80, 16, [(40, 1), (0, 5), (17, 3)]),  # head_dim 80 (Phi-2, StableLM)
    (6, 1, 96, 8, [(70, 1), (9, 2)]),  # head_dim 96 (Phi-3)
    (8, 4, 256, 16, [(33, 1), (0, 6), (50, 4)]),  # head_dim 256 (Gemma 2)
    (7, 7, 20, 4, [(13, 1), (6, 3)]),  # head_dim 20: the kernel's scalar path
    (4, 2, 32, 16, [(0, 40), (45, 1), (12, 1), (30, 20)]),  # 2 query heads per K/V head, head_dim 32 (tiny Gemma 2)
]
# Plain attention, a sliding window (shorter than most contexts, and one not a multiple of the block
# size), soft-capping, and both together.
PARAMS = [(None, None), (24, None), (7, None), (None, 5.0), (11, 2.0)]


def poison_outside_window(cache, meta, window, block_size, chunk=None):
    """Fill every block wholly before a sequence's first visible key with NaN: a backend that reads
    a block the sliding window has handed back (or one before the query's chunk) produces NaN."""
    if window is None and chunk is None:
        return
    params = AttentionParams(1.0, window, attention_chunk_size=chunk)
    for i in meta.paged_seqs:
        q_len = meta.query_start_loc_cpu[i + 1] - meta.query_start_loc_cpu[i]
        first_key = params.first_key(meta.seq_lens_cpu[i] - q_len)
        for b in meta.block_tables[i][:first_key // block_size].tolist():
            cache[0][b] = float("nan")
            cache[1][b] = float("nan")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window, cap", PARAMS)
@pytest.mark.parametrize("dtype, cache_dtype, tol", [
    (torch.float32, torch.float32, 1e-5), (torch.float32, torch.bfloat16, 1e-5),
    (torch.bfloat16, torch.bfloat16, 2e-2), (torch.float32, torch.float16, 1e-5)])
def test_cpu_paged_matches_torch_ref(case, window, cap, dtype, cache_dtype, tol):
    backend = get_attention_backend("cpu_paged", "cpu")
    h, kvh, d, bs, specs = case
    q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, dtype, cache_dtype)
    poison_outside_window(cache, meta, window, bs)
    ref_cache = (cache[0].clone(), cache[1].clone())
    params = AttentionParams(d ** -0.5, window, cap)
    got = backend.forward(q, k, v, cache, meta, params)
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, params)
    assert torch.equal(cache[0].nan_to_num(), ref_cache[0].nan_to_num())  # same cache writes
    assert torch.equal(cache[1].nan_to_num(), ref_cache[1].nan_to_num())
    assert not ref.isnan().any() and not got.isnan().any()
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("window, cap", PARAMS)
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("chunk", [None, 4])
def test_dense_attention_follows_the_definition(window, cap, with_sinks, chunk):
    """torch_ref's building block against a loop that applies the window, chunk, cap and sink per query (a sink: one
    more logit in the softmax's sum, without a value; a chunk: keys in the query's own chunk of positions only)."""
    g = torch.Generator().manual_seed(1)
    n, q_len, h, kvh, d, start = 19, 5, 4, 2, 8, 3
    q, k, v = (torch.randn(x, heads, d, generator=g, dtype=torch.float64)
               for x, heads in ((q_len, h), (n, kvh), (n, kvh)))
    sinks = torch.randn(h, generator=g, dtype=torch.float64) * 2 if with_sinks else None
    params = AttentionParams(0.3, window, cap, sinks=sinks, attention_chunk_size=chunk)
    got = dense_attention(q, k, v, start, params)
    for i in range(q_len):
        pos = start + n - q_len + i
        for head in range(h):
            keys = [j for j in range(n) if start + j <= pos and (window is None or start + j > pos - window)
                    and (chunk is None or (start + j) // chunk == pos // chunk)]
            s = (k[keys, head // 2] @ q[i, head]) * 0.3
            if cap is not None:
                s = torch.tanh(s / cap) * cap
            e = torch.exp(s)
            total = e.sum() + (torch.exp(sinks[head]) if with_sinks else 0.0)
            want = (e / total) @ v[keys, head // 2]
            assert torch.allclose(got[i, head], want, atol=1e-10)


def test_auto_picks_the_kernel_on_cpu():
    assert get_attention_backend("auto", "cpu").name == "cpu_paged"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        get_attention_backend("flash9", "cpu")


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="the Triton backend needs a CUDA GPU (run on a GPU machine)")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window, cap", PARAMS)
@pytest.mark.parametrize("dtype, cache_dtype, tol", [(torch.float32, torch.float32, 1e-4),
                                                     (torch.bfloat16, torch.bfloat16, 2e-2),
                                                     (torch.bfloat16, torch.float8_e4m3fn, 2e-2),
                                                     (torch.float16, torch.float16, 5e-3)])
def test_triton_paged_matches_torch_ref_on_cuda(case, window, cap, dtype, cache_dtype, tol):
    backend = get_attention_backend("triton_paged", "cuda")
    h, kvh, d, bs, specs = case
    q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, dtype, cache_dtype)
    poison_outside_window(cache, meta, window, bs)
    to = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    q, k, v = to(q), to(k), to(v)
    cache = (to(cache[0]), to(cache[1]))
    for field in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables", "paged_seq_ids"):
        setattr(meta, field, to(getattr(meta, field)))
    ref_cache = (cache[0].clone(), cache[1].clone())
    params = AttentionParams(d ** -0.5, window, cap)
    got = backend.forward(q, k, v, cache, meta, params)
    ref = TorchRefBackend().forward(q, *reference_kv(k, v, cache_dtype, params), ref_cache, meta, params)
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol)
    split = torch.zeros_like(q)
    backend.attention(split, q, cache, meta, params, num_splits=4)  # flash-decoding: split contexts, merged
    assert torch.allclose(split[:meta.num_tokens].float(), ref.float(), atol=tol, rtol=tol)


def reference_kv(k, v, cache_dtype, params):
    """The K/V a reader of the cache sees: the Triton backend reads fresh prompts back from the cache too,
    so with a cache narrower than the compute dtype its reference attends over the rounded values."""
    if cache_dtype == k.dtype:
        return k, v
    return (from_cache(to_cache(k, cache_dtype, params.k_scale), k.dtype, params.k_scale),
            from_cache(to_cache(v, cache_dtype, params.v_scale), v.dtype, params.v_scale))


def many_sequences(seed, n):
    """(context_before, q_len) for n sequences: decode tokens, chunks and fresh prompts mixed."""
    rng = random.Random(seed)
    return [(rng.choice([0, rng.randrange(1, 90)]), rng.choice([1, 1, rng.randrange(1, 40)])) for _ in range(n)]


TRITON_CHECK = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.worker.test_attention_backends import (CASES, PARAMS, make_case, many_sequences, poison_outside_window,
                                                  reference_kv)
from pagellm.attention.backend import AttentionParams, write_kv
from pagellm.attention.torch_ref import TorchRefBackend
from pagellm.attention.triton_paged import TritonPagedBackend
backend = TritonPagedBackend()

def check(case, window, cap, dtype, cache_dtype, tol, splits=None, k_scale=1.0, v_scale=1.0):
    h, kvh, d, bs, specs = case
    q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, dtype, cache_dtype)
    poison_outside_window(cache, meta, window, bs)
    ref_cache = (cache[0].clone(), cache[1].clone())
    params = AttentionParams(d ** -0.5, window, cap, k_scale=k_scale, v_scale=v_scale)
    write_kv(k, v, cache, meta, params)
    got = torch.zeros_like(q)
    backend.attention(got, q, cache, meta, params, num_splits=splits)
    rk, rv = reference_kv(k, v, cache_dtype, params)
    ref = TorchRefBackend().forward(q, rk, rv, ref_cache, meta, params)
    err = (got.float() - ref.float()).abs().max().item()
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol), (case, window, cap, dtype, cache_dtype, splits,
                                                                          err)

for case in CASES:
    for window, cap in PARAMS:
        for splits in (1, 3):  # one pass over the context, and split over it then merged
            check(case, window, cap, torch.float32, torch.float32, 1e-5, splits)
for case in CASES[:5]:
    for window, cap in PARAMS[:3]:
        check(case, window, cap, torch.bfloat16, torch.bfloat16, 2e-2)
        check(case, window, cap, torch.float16, torch.float16, 5e-3, 2)
        check(case, window, cap, torch.float32, torch.bfloat16, 1e-5)
        check(case, window, cap, torch.bfloat16, torch.float8_e4m3fn, 2e-2, None, 0.5, 2.0)
        check(case, window, cap, torch.float32, torch.float8_e4m3fn, 1e-5, 2, 0.5, 2.0)
for seed, (h, kvh) in enumerate([(8, 1), (16, 2), (6, 6)]):  # many sequences: the program -> sequence search
    check((h, kvh, 32, 16, many_sequences(seed, 37)), None, None, torch.float32, torch.float32, 1e-5)
    check((h, kvh, 32, 8, many_sequences(seed, 21)), 20, None, torch.float32, torch.float32, 1e-5, 4)
print("ok")
"""


def test_triton_kernel_matches_torch_ref_in_the_interpreter():
    """The Triton kernels' logic (varlen query blocks, fresh prompts and chunks, windows, soft-cap, head
    sizes that are not a power of two, split contexts, fp8/bf16/fp16 caches) checked on CPU with Triton's
    interpreter (TRITON_INTERPRET=1); the GPU test above checks the compiled kernels. The interpreter
    multiplies bf16 in float32, so only the GPU test sees bf16 tensor-core rounding."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from tests.triton_script import run_script

    run_script(TRITON_CHECK)


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window, cap", [(None, None), (7, None), (11, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_scale, v_scale", [(1.0, 1.0), (0.05, 3.0)])
def test_cpu_paged_reads_an_fp8_cache_like_torch_ref(case, window, cap, dtype, k_scale, v_scale):
    """An fp8 (e4m3) cache: the C++ kernel's vectorized fp8 -> f32 widening and its folded scales give
    what torch_ref computes from the same bytes (torch's own fp8 conversion)."""
    backend = get_attention_backend("cpu_paged", "cpu")
    h, kvh, d, bs, specs = case
    q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, dtype, FP8)
    ref_cache = (cache[0].clone(), cache[1].clone())
    params = AttentionParams(d ** -0.5, window, cap, k_scale=k_scale, v_scale=v_scale)
    got = backend.forward(q, k, v, cache, meta, params)
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, params)
    for c, r in zip(cache, ref_cache):  # the same fp8 bytes written
        assert torch.equal(c.view(torch.uint8), r.view(torch.uint8))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), ref.float(), atol=tol * max(1.0, v_scale), rtol=tol)


def test_fp8_cache_writes_scaled_saturated_values_and_reads_them_back():
    """write_kv stores K / k_scale saturated to +-448, subnormals as 0; torch_ref multiplies back; the result
    is close to attention over the unquantized K/V (e4m3 keeps 3 mantissa bits)."""
    from pagellm.attention.backend import from_cache

    x = torch.tensor([0.0, 1.0, -3.0, 1000.0, -1e6, 0.1, 0.02, -0.025, 0.04])
    stored = to_cache(x, FP8, 2.0)
    assert stored.dtype == FP8
    back = from_cache(stored, torch.float32, 2.0).tolist()
    # saturated at 448 * scale; 0.02 / 2 and 0.025 / 2 are e4m3 subnormals (< 2^-6): stored as 0
    assert back[:5] == [0.0, 1.0, -3.0, 896.0, -896.0] and back[6:8] == [0.0, 0.0]
    assert back[5] == pytest.approx(0.1, rel=0.07) and back[8] == pytest.approx(0.04, rel=0.07)
    h, kvh, d, bs, specs = CASES[1]
    q, k, v, cache, meta = make_case(3, h, kvh, d, bs, specs, torch.float32, FP8)
    full = make_case(3, h, kvh, d, bs, specs, torch.float32, torch.float32)[3]
    params = AttentionParams(d ** -0.5)
    got = TorchRefBackend().forward(q, k, v, cache, meta, params)
    exact = TorchRefBackend().forward(q, k, v, full, meta, params)
    err = (got - exact).norm() / exact.norm()
    assert 0 < err < 0.1, err


def test_launch_settings_of_the_triton_kernel_from_the_environment():
    """PAGELLM_ATTENTION_LAUNCH carries a sweep's pick to the engine; anything else is a clear error."""
    from pagellm.attention.triton_paged import launch_settings

    assert launch_settings("") == {}
    assert launch_settings("tile_n=64, num_warps=4,num_stages=3") == {"tile_n": 64, "num_warps": 4, "num_stages": 3}
    for bad in ("tile_n=48", "tile_n=0", "warps=4", "num_stages", "num_warps=x"):
        with pytest.raises(ValueError, match="PAGELLM_ATTENTION_LAUNCH"):
            launch_settings(bad)


def test_cpu_kernel_loads_past_a_stale_build_lock():
    """A process killed while loading the extension leaves torch's build lock behind; the next load imports the
    built kernel directly instead of waiting on that lock forever."""
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    from pagellm.attention.cpu_paged import _cpu_tag, load_extension

    load_extension()  # built (or found) here
    name = f"pagellm_paged_attention_{_cpu_tag()}"
    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    open(lock, "w").close()
    try:
        r = subprocess.run([sys.executable, "-c", "from pagellm.attention.cpu_paged import load_extension; "
                            "print(hasattr(load_extension(), 'paged_attention'))"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "True", r.stderr[-2000:]
    finally:
        os.remove(lock)


# Multi-head latent attention (DeepSeek): one K/V head whose V is its K, one cache tensor per layer passed as both,
# with every query head on it; 576 = kv_lora_rank 512 + rope 64 (V2 / V3), 40 the tiny fixtures'.
MLA_CASES = [(16, 576, [(0, 9), (40, 1), (23, 6)]), (4, 40, [(0, 5), (70, 1), (3, 1), (12, 9)])]


@pytest.mark.parametrize("name", ["torch_ref", "cpu_paged"])
@pytest.mark.parametrize("h, d, specs", MLA_CASES)
def test_backends_attend_over_a_cache_whose_v_is_its_k(name, h, d, specs):
    backend = get_attention_backend(name, "cpu")
    q, k, _, cache, meta = make_case(3, h, 1, d, 16, specs, torch.float32, torch.float32)
    shared = (cache[0], cache[0])
    ref_cache = (cache[0].clone(), cache[0].clone())  # two tensors holding the same values
    params = AttentionParams(0.1)
    got = backend.forward(q, k, k, shared, meta, params)
    ref = TorchRefBackend().forward(q, k, k, ref_cache, meta, params)
    assert torch.equal(shared[0], ref_cache[0]) and torch.equal(ref_cache[0], ref_cache[1])  # the same writes
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


TRITON_MLA_CHECK = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.worker.test_attention_backends import MLA_CASES, make_case
from pagellm.attention.backend import AttentionParams, write_kv
from pagellm.attention.torch_ref import TorchRefBackend
from pagellm.attention.triton_paged import TritonPagedBackend
for h, d, specs in MLA_CASES:
    for splits in (1, 2):
        q, k, _, cache, meta = make_case(3, h, 1, d, 16, specs, torch.float32, torch.float32)
        shared = (cache[0], cache[0])
        ref_cache = (cache[0].clone(), cache[0].clone())
        params = AttentionParams(0.1)
        write_kv(k, k, shared, meta, params)
        got = torch.zeros_like(q)
        TritonPagedBackend().attention(got, q, shared, meta, params, num_splits=splits)
        ref = TorchRefBackend().forward(q, k, k, ref_cache, meta, params)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (h, d, splits, (got - ref).abs().max().item())
print("ok")
"""


def test_triton_kernel_attends_over_a_cache_whose_v_is_its_k_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from tests.triton_script import run_script

    run_script(TRITON_MLA_CHECK)


# GQA with fresh prompts and chunks, head_dim 128 (a compiled fixed shape), head_dim 20 (the scalar path), 2 query
# heads per K/V head: attention sinks (GPT-OSS) in each of the kernel's paths
SINK_CASES = [CASES[1], CASES[3], CASES[7], CASES[8]]


@pytest.mark.parametrize("case", SINK_CASES)
@pytest.mark.parametrize("window", [None, 7])
def test_cpu_paged_applies_attention_sinks_like_torch_ref(case, window):
    h, kvh, d, bs, specs = case
    q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, torch.float32, torch.float32)
    ref_cache = (cache[0].clone(), cache[1].clone())
    plain_cache = (cache[0].clone(), cache[1].clone())
    sinks = torch.randn(h, generator=torch.Generator().manual_seed(5)) * 2
    params = AttentionParams(d ** -0.5, window, None, sinks=sinks)
    got = get_attention_backend("cpu_paged", "cpu").forward(q, k, v, cache, meta, params)
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, params)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    plain = TorchRefBackend().forward(q, k, v, plain_cache, meta, AttentionParams(d ** -0.5, window))
    assert (plain - ref).abs().max() > 1e-2  # the sinks matter


# Chunked attention (Llama 4's local layers): chunks shorter than most contexts, one not a multiple of the block size,
# one longer than every context (the same as none); with a window too
CHUNKS = [(None, 5), (None, 16), (None, 1000), (7, 12)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window, chunk", CHUNKS)
@pytest.mark.parametrize("dtype, cache_dtype, tol", [(torch.float32, torch.float32, 1e-5),
                                                     (torch.bfloat16, torch.bfloat16, 2e-2)])
def test_cpu_paged_applies_chunked_attention_like_torch_ref(case, window, chunk, dtype, cache_dtype, tol):
    h, kvh, d, bs, specs = case
    q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, dtype, cache_dtype)
    plain_cache = (cache[0].clone(), cache[1].clone())
    poison_outside_window(cache, meta, window, bs, chunk)
    ref_cache = (cache[0].clone(), cache[1].clone())
    params = AttentionParams(d ** -0.5, window, attention_chunk_size=chunk)
    got = get_attention_backend("cpu_paged", "cpu").forward(q, k, v, cache, meta, params)
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, params)
    assert not ref.isnan().any() and not got.isnan().any()
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol)
    if window is None and chunk < 50 and max(meta.seq_lens_cpu) > 2 * chunk:  # the chunks matter
        plain = TorchRefBackend().forward(q, k, v, plain_cache, meta, AttentionParams(d ** -0.5, window))
        assert (plain.float() - ref.float()).abs().max() > 1e-2


TRITON_CHUNK_CHECK = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.worker.test_attention_backends import CASES, CHUNKS, make_case, poison_outside_window
from pagellm.attention.backend import AttentionParams, write_kv
from pagellm.attention.torch_ref import TorchRefBackend
from pagellm.attention.triton_paged import TritonPagedBackend
for h, kvh, d, bs, specs in CASES[1:4] + CASES[8:]:
    for window, chunk in CHUNKS:
        for splits in (1, 3):
            q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, torch.float32, torch.float32)
            poison_outside_window(cache, meta, window, bs, chunk)
            ref_cache = (cache[0].clone(), cache[1].clone())
            params = AttentionParams(d ** -0.5, window, attention_chunk_size=chunk)
            write_kv(k, v, cache, meta, params)
            got = torch.zeros_like(q)
            TritonPagedBackend().attention(got, q, cache, meta, params, num_splits=splits)
            ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, params)
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (h, d, window, chunk, splits,
                                                                    (got - ref).abs().max())
print("ok")
"""


def test_triton_kernel_applies_chunked_attention_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from tests.triton_script import run_script

    run_script(TRITON_CHUNK_CHECK)


TRITON_SINKS_CHECK = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.worker.test_attention_backends import SINK_CASES, make_case
from pagellm.attention.backend import AttentionParams, write_kv
from pagellm.attention.torch_ref import TorchRefBackend
from pagellm.attention.triton_paged import TritonPagedBackend
for h, kvh, d, bs, specs in SINK_CASES:
    for window in (None, 7):
        for splits in (1, 3):
            q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, torch.float32, torch.float32)
            ref_cache = (cache[0].clone(), cache[1].clone())
            sinks = torch.randn(h, generator=torch.Generator().manual_seed(5)) * 2
            params = AttentionParams(d ** -0.5, window, None, sinks=sinks)
            write_kv(k, v, cache, meta, params)
            got = torch.zeros_like(q)
            TritonPagedBackend().attention(got, q, cache, meta, params, num_splits=splits)
            ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, params)
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (h, d, window, splits, (got - ref).abs().max())
print("ok")
"""


def test_triton_kernel_applies_attention_sinks_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from tests.triton_script import run_script

    run_script(TRITON_SINKS_CHECK)
