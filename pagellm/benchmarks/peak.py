"""What this machine can do, and the throughput bound of a workload on it.

    pagellm bench peak [--model DIR] [--dtype float32] [--workload nanovllm] [--device cuda]
    (also: python benchmarks/peak.py)

Measures the GEMM rate (torch matmul, the model's dtype, every thread) and the
memory read bandwidth (a sum over 1 GiB), then bounds the default throughput
workload on the given model:

    time >= FLOPs / GEMM rate + bytes / bandwidth
    FLOPs = 2 x non-embedding params x (prompt + output tokens)
          + 2 x LM-head params x output tokens
          + attention: 4 x layers x hidden x context, per computed token
    bytes = decode steps x weight bytes (every step reads every weight)
          + KV cache bytes of every context token, read once per generated token

with decode steps = the longest output (all requests decode together). The
bound in output tokens/s is output tokens / that time.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from pagellm.benchmarks.common import sync_device, write_report

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def gemm_gflops(dtype: torch.dtype = torch.float32, repeats: int = 5, device: str = "cpu") -> float:
    best = 0.0
    shapes = [(2048, 768, 3072), (2048, 2048, 2048)] if device == "cpu" else [(8192, 8192, 8192)] * 2
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
        a @ b
        sync_device(device)
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync_device(device)
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t) / 1e9)
    return best


def int8_gemm_gops(repeats: int = 5) -> float:
    """int8 x int8 -> int32 matmul rate (torch._int_mm: oneDNN VNNI/AMX on CPU), in GOP/s."""
    best = 0.0
    for m, k, n in [(2048, 768, 3072), (2048, 2048, 2048)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()
        torch._int_mm(a, b)
        t = time.perf_counter()
        for _ in range(repeats):
            torch._int_mm(a, b)
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t) / 1e9)
    return best


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes per second a sum over `gib` GiB reads (GPU: 4 GiB, beyond any cache)."""
    if device != "cpu":
        gib = max(gib, 4.0)
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    x.sum()
    sync_device(device)
    t = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    sync_device(device)
    return x.numel() * 4 * repeats / (time.perf_counter() - t) / 1e9


@dataclass
class ModelShape:
    layers: int
    hidden: int
    kv_dim: int  # kv_heads x head_dim
    non_embedding_params: int
    lm_head_params: int

    @property
    def weights_read_per_step(self) -> int:  # every weight but the input embedding (a gather)
        return self.non_embedding_params + self.lm_head_params

    @classmethod
    def from_config(cls, model: str) -> ModelShape:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(model)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        total = sum(p.numel() for p in m.parameters())  # tied weights counted once
        emb = m.get_input_embeddings().weight.numel()
        lm_head = m.get_output_embeddings().weight.numel()
        tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
        pos = sum(p.numel() for n, p in m.named_parameters() if n.endswith("wpe.weight"))
        from pagellm.models.registry import get_model_class, resolve_architecture

        geo = get_model_class(resolve_architecture(getattr(cfg, "architectures", None), cfg)).geometry(cfg)
        non_emb = total - emb - pos - (0 if tied else lm_head)
        return cls(geo.num_layers, cfg.hidden_size, geo.num_kv_heads * geo.head_dim, non_emb, lm_head)


def workload_bound(shape: ModelShape, prompt_lens: list[int], output_lens: list[int], gflops: float, gbs: float,
                   elem_bytes: int = 4, kv_elem_bytes: int = 4, linear_gflops: float | None = None,
                   linear_elem_bytes: int | None = None) -> dict:
    """linear_gflops / linear_elem_bytes: the rate and weight size of the non-embedding projections when they
    differ from the rest (int8 weights: int8 GEMMs, 1 byte per weight); LM head and attention keep gflops."""
    linear_flops = 2 * shape.non_embedding_params * (sum(prompt_lens) + sum(output_lens))
    flops = 2 * shape.lm_head_params * sum(output_lens)
    attn_tokens = 0  # sum of context lengths over every computed token
    kv_read = 0  # context tokens read over every generated token
    for p, o in zip(prompt_lens, output_lens):
        attn_tokens += p * (p + 1) // 2 + sum(p + t for t in range(o))
        kv_read += sum(p + t for t in range(o))
    flops += 4 * shape.layers * shape.hidden * attn_tokens
    steps = max(output_lens)
    lin_elem = elem_bytes if linear_elem_bytes is None else linear_elem_bytes
    bytes_ = steps * (shape.non_embedding_params * lin_elem + shape.lm_head_params * elem_bytes)
    bytes_ += kv_read * 2 * shape.layers * shape.kv_dim * kv_elem_bytes
    seconds = (flops / (gflops * 1e9) + linear_flops / ((linear_gflops or gflops) * 1e9)
               + bytes_ / (gbs * 1e9))
    return {"flops": flops + linear_flops, "bytes": bytes_, "seconds": seconds,
            "output_tokens_per_s": sum(output_lens) / seconds}


def main(ns: argparse.Namespace) -> dict:
    from dataclasses import replace

    from pagellm.benchmarks.workload import PRESETS, synthetic_workload

    dtype = _DTYPES[ns.dtype]
    g = gemm_gflops(dtype, device=ns.device)
    bw = read_bandwidth_gbs(device=ns.device)
    shape = ModelShape.from_config(ns.model)
    base = PRESETS[ns.workload]
    spec = replace(base, num_requests=ns.num_prompts or base.num_requests, seed=ns.seed)
    reqs = synthetic_workload(spec, 1000, set())
    elem = torch.empty((), dtype=dtype).element_size()
    kv_elem = torch.empty((), dtype=_DTYPES.get(ns.kv_cache_dtype, dtype)).element_size()
    bound = workload_bound(shape, [len(r.prompt_token_ids) for r in reqs], [r.output_len for r in reqs], g, bw,
                           elem, kv_elem)
    report = {"gemm_gflops": g, "read_bandwidth_gbs": bw, "threads": torch.get_num_threads(), "dtype": ns.dtype,
              "model": ns.model, "workload": ns.workload, "device": ns.device, "bound": bound}
    where = f"{torch.get_num_threads()} threads" if ns.device == "cpu" else torch.cuda.get_device_name()
    print(f"{ns.dtype} GEMM {g:.0f} GFLOP/s, memory read {bw:.1f} GB/s ({where}); "
          f"workload bound on {ns.model}: {bound['output_tokens_per_s']:.0f} output tok/s "
          f"({bound['flops'] / 1e12:.2f} TFLOP, {bound['bytes'] / 1e9:.0f} GB, {bound['seconds']:.1f} s)")
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    import os

    p.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "configs", "gpt2-124m"))
    p.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--workload", default="default", choices=["default", "nanovllm"],
                   help="The workload shape to bound (see bench throughput --workload).")
    p.add_argument("--num-prompts", type=int, default=None, help="Requests (default: the workload's).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the GEMM rate and bandwidth are measured.")
    p.add_argument("--output-json", default=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    main(parser.parse_args())
