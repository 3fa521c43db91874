"""Paged attention with a compiled C++/OpenMP kernel that walks block tables (csrc/paged_attention.cpp).

The same extension carries the int8 activation helpers of quantization/int8.py (csrc/int8_ops.cpp).

Fresh prompts (no cached context) use SDPA on their own K/V, as in torch_ref;
every sequence that reads context from the cache (decode steps, prefill chunks
after the first, prompts with prefix-cache hits) goes through the kernel,
which never copies K/V into a contiguous buffer.

The extension is compiled once per machine on first use (torch.utils.cpp_extension,
-O3 -march=native, about 20-40 s) and cached under torch's extension directory;
its name carries a hash of the CPU's flags, so a cache from another CPU is never
loaded. `get_attention_backend("auto")` falls back to torch_ref if the build fails.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform

import torch

from pagellm.attention.backend import AttentionMetadata, AttentionParams, KVCache, PagedBackendBase

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCES = [os.path.join(_CSRC, "paged_attention.cpp"), os.path.join(_CSRC, "int8_ops.cpp")]


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        flags = platform.processor()
    src = b""
    for path in _SOURCES:
        with open(path, "rb") as f:
            src += f.read()
    return hashlib.sha256(flags.encode() + src + torch.__version__.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled extension: imported straight from torch's build directory when this CPU's build is there,
    else compiled (torch.utils.cpp_extension.load). Importing directly skips torch's build lock, which a process
    killed while loading leaves behind and every later load would wait on forever."""
    import importlib.machinery
    import importlib.util

    from torch.utils.cpp_extension import _get_build_directory, load

    name = f"pagellm_paged_attention_{_cpu_tag()}"
    built = os.path.join(_get_build_directory(name, verbose=False), name + importlib.machinery.EXTENSION_SUFFIXES[-1])
    if os.path.isfile(built):
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    logger.info("compiling the paged-attention kernel %s (first use on this machine)", name)
    return load(name=name, sources=_SOURCES, extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)


_NO_SINKS = torch.empty(0)


class CpuPagedBackend(PagedBackendBase):
    name = "cpu_paged"

    def __init__(self) -> None:
        self.ops = load_extension()

    def paged(self, out: torch.Tensor, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
              params: AttentionParams) -> None:
        with torch.profiler.record_function("pagellm::paged_attention"):
            self.ops.paged_attention(out, q, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, meta.paged_seq_ids, params.scale,
                                     params.sliding_window or 0, params.attention_chunk_size or 0,
                                     params.logits_soft_cap or 0.0, params.k_scale,
                                     params.v_scale,
                                     _NO_SINKS if params.sinks is None else params.sinks.float().contiguous())
