"""The paged KV cache tensors: sizing from a memory budget, allocation, block copies.

Layout per layer, for K and for V:

    (num_blocks, block_size, num_kv_heads, head_dim)
        block b, slot o  <->  token at position p of a sequence with table[p // block_size] == b,
                              o == p % block_size

A model whose V is its K (ModelConfig.kv_shared: DeepSeek's latent cache) has one tensor per layer, passed as
both. A model whose layers differ in heads or head_dim (ModelConfig.kv_layer_shapes: Gemma 4) shapes each layer's
tensors by its own. Viewed as (num_blocks * block_size, kv_heads, head_dim), a token's K/V is one
row at index `slot = b * block_size + o`, which makes the per-step write a
single index_copy_ and a sequence's context a gather of whole blocks.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time

import psutil
import torch

from pagellm.attention.backend import KVCache, as_bytes
from pagellm.config import EngineConfig
from pagellm.worker.step_buffers import to_device

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def kv_cache_dtype(config: EngineConfig) -> torch.dtype:
    name = config.cache.kv_cache_dtype
    return torch_dtype(config.model.dtype if name == "auto" else name)


def layer_tensors(kv: KVCache) -> tuple[torch.Tensor, ...]:
    """A layer's cache tensors: K and V, or the one tensor that is both (MLA)."""
    k, v = kv
    return (k,) if v is k else (k, v)


def held_layers(shapes: list, layers: range | None) -> list:
    """The cache layers' shapes with None for the layers another pipeline stage holds (`layers`: this stage's)."""
    return shapes if layers is None else [s if i in layers else None for i, s in enumerate(shapes)]


def bytes_per_block(config: EngineConfig, layers: range | None = None) -> int:
    """K and V of one block in every layer (one tensor where V is K: MLA), or in a pipeline stage's `layers`; with
    a draft model (speculative decoding), its layers too: both caches have the same number of blocks."""
    shapes = [(config.model, s) for s in held_layers(config.model.layer_kv_shapes(), layers) if s is not None]
    spec = config.scheduler.speculative
    if spec is not None and spec.draft is not None:
        shapes += [(spec.draft, s) for s in spec.draft.layer_kv_shapes()]
    elem = torch.empty((), dtype=kv_cache_dtype(config)).element_size()
    return sum((1 if m.kv_shared else 2) * config.cache.block_size * heads * dim * elem for m, (heads, dim) in shapes)


def determine_num_blocks(config: EngineConfig, layers: range | None = None) -> int:
    """Blocks that fit the memory budget (explicit bytes, or a fraction of what is free now), for every cache layer
    or a pipeline stage's `layers`."""
    if config.cache.num_blocks is not None:
        return config.cache.num_blocks
    per_block = bytes_per_block(config, layers)
    if per_block == 0:  # no attention layer (a pure state-space model): the blocks are bookkeeping only
        return config.scheduler.max_num_seqs * -(-config.scheduler.max_model_len // config.cache.block_size)
    budget = config.cache.kv_cache_memory
    if budget is None:
        if config.device.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
        else:
            free = psutil.virtual_memory().available
        budget = int(free * config.cache.kv_cache_memory_fraction)
        # No use holding more than every sequence at full length, plus as much again for the prefix cache.
        blocks_per_seq = -(-config.scheduler.max_model_len // config.cache.block_size)
        budget = min(budget, 2 * config.scheduler.max_num_seqs * blocks_per_seq * per_block)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory={budget} bytes holds no KV block; one block needs {per_block} bytes "
                         f"(block_size={config.cache.block_size}).")
    return int(num_blocks)


def advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages under a CPU cache tensor (no-op elsewhere).

    Advised before the first touch, the zero-fill at allocation takes 512x fewer page faults, and
    the attention kernel's scattered block reads miss the TLB far less often.
    """
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        huge = 2 << 20
        start = (t.data_ptr() + huge - 1) // huge * huge
        end = (t.data_ptr() + t.numel() * t.element_size()) // huge * huge
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass


def allocate_kv_cache(config: EngineConfig, num_blocks: int, layers: range | None = None) -> list[KVCache | None]:
    """The cache of config.model (a draft model's: an EngineConfig whose model is the draft, the same blocks); with
    `layers` (a pipeline stage's), None in place of every other layer's."""
    m = config.model
    dtype, device = kv_cache_dtype(config), torch.device(config.device.device)
    t0 = time.perf_counter()
    caches = []
    for layer in held_layers(m.layer_kv_shapes(), layers):
        if layer is None:
            caches.append(None)
            continue
        shape = (num_blocks, config.cache.block_size, *layer)
        k = torch.empty(shape, dtype=dtype, device=device)
        caches.append((k, k if m.kv_shared else torch.empty(shape, dtype=dtype, device=device)))
    caches_held = [kv for kv in caches if kv is not None]
    for kv in caches_held:
        for t in layer_tensors(kv):
            advise_huge_pages(t)
            if device.type == "cpu":
                # Touch every page now, as a GPU cache is committed up front: the block pool hands out blocks in
                # LRU order, so a lazily faulted cache takes its page faults (2 MiB zero-fills) inside decode
                # steps until every block has been used once (measured: up to a third of a step's time).
                as_bytes(t).zero_()
    gib = sum(t.numel() * t.element_size() for kv in caches_held for t in layer_tensors(kv)) / 2**30
    logger.info("KV cache of %s: %d blocks of %d tokens (%d tokens, %.2f GiB, %s), allocated in %.1fs",
                m.architecture, num_blocks, config.cache.block_size,
                num_blocks * config.cache.block_size, gib, dtype, time.perf_counter() - t0)
    return caches


def num_spec_state_rows(config: EngineConfig) -> int:
    """Speculative decoding on a model with recurrent layers: k state rows per batch row, the states after each of
    a speculative step's first k tokens (the last known one and the drafts but the last)."""
    spec = config.scheduler.speculative
    return config.scheduler.max_num_seqs * spec.num_speculative_tokens if spec is not None else 0


def allocate_states(config: EngineConfig) -> list[tuple[torch.Tensor, ...]]:
    """The recurrent state of every stateful layer (Mamba), in the compute dtype unless the model names another
    (ModelConfig.state_dtypes): one row per batch row (InputBatch's rows, max_num_seqs of them), zeroed when a
    sequence takes the row, then (prefix caching) one row per state checkpoint slot (core/state_checkpoints.py),
    then (speculative decoding) num_speculative_tokens rows per batch row (num_spec_state_rows)."""
    m = config.model
    seqs, device = config.scheduler.max_num_seqs, torch.device(config.device.device)
    spec_rows = num_spec_state_rows(config)
    rows = seqs + config.cache.num_state_checkpoints + spec_rows
    names = list(m.state_dtypes) + [None] * (len(m.state_shapes) - len(m.state_dtypes))
    dtypes = [torch_dtype(name or m.dtype) for name in names]
    states = [tuple(torch.zeros((rows, *shape), dtype=dtype, device=device) for shape, dtype in zip(m.state_shapes,
                                                                                                   dtypes))
              for _ in range(m.num_state_layers)]
    gib = sum(t.numel() * t.element_size() for layer in states for t in layer) / 2**30
    logger.info("recurrent state of %s: %d layers x (%d sequences + %d checkpoints + %d for speculative steps) "
                "(%.2f GiB, %s)", m.architecture, m.num_state_layers, seqs, config.cache.num_state_checkpoints,
                spec_rows, gib, ", ".join(str(d) for d in dtypes))
    return states


def copy_blocks(kv_caches: list[KVCache | None], copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: copy each (src, dst) block in every layer this process holds, before the forward pass."""
    if not copies:
        return
    kv_caches = [kv for kv in kv_caches if kv is not None]
    if not kv_caches:
        return
    device = kv_caches[0][0].device
    src = to_device([s for s, _ in copies], device, torch.long)
    dst = to_device([d for _, d in copies], device, torch.long)
    for kv in kv_caches:
        for t in map(as_bytes, layer_tensors(kv)):
            t.index_copy_(0, dst, t.index_select(0, src))
