"""Every attention backend matches torch_ref (the oracle) on random paged caches."""

import random

import pytest
import torch

from pagellm.attention.backend import AttentionMetadata
from pagellm.attention.registry import get_attention_backend
from pagellm.attention.torch_ref import TorchRefBackend


def make_case(seed, num_heads, kv_heads, head_dim, block_size, specs, dtype, cache_dtype):
    """specs: (context_before, q_len) per sequence; blocks are scattered at random."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-(c + q) // block_size) for c, q in specs) + 8
    free = list(range(num_blocks))
    rng.shuffle(free)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(cache_dtype)
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
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype, cache_dtype, tol", [
    (torch.float32, torch.float32, 1e-5), (torch.float32, torch.bfloat16, 1e-5),
    (torch.bfloat16, torch.bfloat16, 2e-2), (torch.float32, torch.float16, 1e-5)])
def test_cpu_paged_matches_torch_ref(case, dtype, cache_dtype, tol):
    backend = get_attention_backend("cpu_paged", "cpu")
    h, kvh, d, bs, specs = case
    q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, dtype, cache_dtype)
    ref_cache = (cache[0].clone(), cache[1].clone())
    scale = d ** -0.5
    got = backend.forward(q, k, v, cache, meta, scale)
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, scale)
    assert torch.equal(cache[0], ref_cache[0]) and torch.equal(cache[1], ref_cache[1])  # same cache writes
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol)


def test_auto_picks_the_kernel_on_cpu():
    assert get_attention_backend("auto", "cpu").name == "cpu_paged"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        get_attention_backend("flash9", "cpu")


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="the Triton backend needs a CUDA GPU (run on a GPU machine)")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype, cache_dtype, tol", [(torch.float32, torch.float32, 1e-4),
                                                     (torch.bfloat16, torch.bfloat16, 2e-2),
                                                     (torch.float16, torch.float16, 5e-3)])
def test_triton_paged_matches_torch_ref_on_cuda(case, dtype, cache_dtype, tol):
    backend = get_attention_backend("triton_paged", "cuda")
    h, kvh, d, bs, specs = case
    q, k, v, cache, meta = make_case(0, h, kvh, d, bs, specs, dtype, cache_dtype)
    to = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    q, k, v = to(q), to(k), to(v)
    cache = (to(cache[0]), to(cache[1]))
    for field in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables", "paged_seq_ids"):
        setattr(meta, field, to(getattr(meta, field)))
    ref_cache = (cache[0].clone(), cache[1].clone())
    got = backend.forward(q, k, v, cache, meta, d ** -0.5)
    ref = TorchRefBackend().forward(q, k, v, ref_cache, meta, d ** -0.5)
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol)
