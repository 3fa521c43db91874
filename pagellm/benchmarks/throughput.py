"""Offline throughput, side by side in one run: pagellm vs Hugging Face transformers.

    pagellm bench throughput [--model DIR] [--load-format dummy] [--compare hf] [--output-json F]

Each engine runs in its own fresh process (same threads, same workload, same
token ids, every request generating exactly its output length), so peak
memory is per engine and one engine's caches never help another. Timing
covers generation only, after a short warm-up; model loading is excluded.

Engines:
    pagellm      continuous batching over the paged KV cache
    hf-static    transformers generate, batches of 16 with left padding, each batch runs to its
                 longest output (static batching, as users run it)
    hf-single    transformers generate, one request at a time
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from dataclasses import asdict, dataclass

from pagellm.benchmarks.common import add_model_args, has_tokenizer, llm_kwargs, sync_device, write_report
from pagellm.benchmarks.workload import (
    PRESETS,
    BenchRequest,
    WorkloadSpec,
    dataset_workload,
    synthetic_workload,
    workload_totals,
)


@dataclass
class EngineResult:
    engine: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    peak_rss_mb: float
    note: str = ""

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(requests_per_s=self.requests_per_s, output_tokens_per_s=self.output_tokens_per_s,
                 total_tokens_per_s=self.total_tokens_per_s)
        return d


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


# --structured-fraction: the schema constrained requests follow: a list of records, which ends only when the
# model closes it (ignore_eos keeps every request at its length; the grammar masks every step until then).
BENCH_SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "qty": {"type": "integer", "minimum": 0, "maximum": 999},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
    "required": ["name", "qty", "tags"]}}


def run_pagellm(model: str, engine_kwargs: dict, reqs: list[BenchRequest], threads: int | None,
                structured_fraction: float = 0.0, label: str = "") -> EngineResult:
    from pagellm import LLM, SamplingParams
    from pagellm.sampling_params import StructuredOutputsParams

    _set_threads(threads)
    llm = LLM(model, **engine_kwargs)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    every = round(1 / structured_fraction) if structured_fraction else 0  # 0.5 -> every 2nd request
    spec = StructuredOutputsParams(json=BENCH_SCHEMA)
    params = [SamplingParams(temperature=1.0, top_p=1.0, seed=i, max_tokens=r.output_len, ignore_eos=True,
                             structured_outputs=spec if every and i % every == 0 else None)
              for i, r in enumerate(reqs)]
    llm.generate(prompts[:2], [p.clone(max_tokens=4) for p in params[:2]], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    p_tok, o_tok = workload_totals(reqs)
    assert produced == o_tok, f"pagellm produced {produced} tokens, workload asks {o_tok}"
    stats = llm.llm_engine.get_stats()
    note = f"{stats.num_total_blocks} KV blocks, {stats.num_preemptions} preemptions"
    counters = llm.llm_engine.stats
    if llm.llm_engine.config.scheduler.async_scheduling:
        note += f"; {counters.overlapped_steps} of {counters.num_steps} steps overlapped (async scheduling)"
    elif llm.llm_engine.config.parallel.pipeline_parallel_size > 1:
        note += f"; {counters.overlapped_steps} of {counters.num_steps} steps launched behind another (pipeline)"
    if counters.device_steps > counters.num_steps:
        note += f"; {counters.device_steps} device steps in {counters.num_steps} scheduling rounds (multi-step decode)"
    tp = engine_kwargs.get("tensor_parallel_size", 1)
    if every:
        note += f"; {sum(p.structured_outputs is not None for p in params)} of {len(params)} requests JSON-constrained"
    if tp > 1:
        comm = llm.llm_engine.executor.driver.tp.comm  # counted from the warm-up on: subtract nothing, it is small
        note += f"; rank 0 spent {100 * comm.seconds / elapsed:.0f}% of the time in {comm.calls} collectives"
    llm.shutdown()
    name = "pagellm" if tp == 1 else f"pagellm-tp{tp}"
    name += f"[{label}]" if label else ""
    return EngineResult(name + (f"-json{int(100 * structured_fraction)}%" if every else ""), elapsed, len(reqs),
                        p_tok, o_tok, _peak_rss_mb(), note)


def parse_variant(text: str) -> dict:
    """'quantization=int8,dtype=bfloat16' -> engine keyword overrides ('none' -> None, 'true' / 'false' -> bool,
    digits -> int)."""
    from pagellm.engine.arg_utils import EngineArgs

    names = {f.name for f in __import__("dataclasses").fields(EngineArgs)}
    out: dict = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ValueError(f"--variant takes KEY=VALUE pairs of engine arguments, got {item!r}")
        value = value.strip()
        words = {"none": None, "true": True, "false": False}
        out[key] = words[value.lower()] if value.lower() in words else int(value) if value.isdigit() else value
    return out


def _hf_model(model: str, load_format: str, dtype: str, device: str = "cpu"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    if load_format == "dummy":
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=torch_dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    m.to(device).eval()
    m.generation_config.eos_token_id = None  # run every request to its length
    return m


def _hf_generate(m, batch: list[BenchRequest]) -> int:
    import torch

    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, r in enumerate(batch):  # left padding
        ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        mask[i, width - len(r.prompt_token_ids):] = 1
    new = max(r.output_len for r in batch)
    ids, mask = ids.to(m.device), mask.to(m.device)
    with torch.inference_mode():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0,
                         top_k=0, pad_token_id=0)
    return (out.shape[1] - width) * len(batch)


def run_hf(model: str, load_format: str, dtype: str, reqs: list[BenchRequest], batch_size: int,
           threads: int | None, device: str = "cpu") -> EngineResult:
    _set_threads(threads)
    m = _hf_model(model, load_format, dtype, device)
    _hf_generate(m, [BenchRequest(reqs[0].prompt_token_ids[:8], 4)])  # warm-up
    t0 = time.perf_counter()
    computed = 0
    for i in range(0, len(reqs), batch_size):
        computed += _hf_generate(m, reqs[i:i + batch_size])
    sync_device(device)
    elapsed = time.perf_counter() - t0
    p_tok, o_tok = workload_totals(reqs)
    name = "hf-single" if batch_size == 1 else f"hf-static({batch_size})"
    return EngineResult(name, elapsed, len(reqs), p_tok, o_tok, _peak_rss_mb(),
                        f"{computed - o_tok} padded tokens generated beyond the workload")


def _child(queue, fn, args) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # report, don't hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_isolated(fn, *args) -> EngineResult:
    """Run one engine in a fresh process (spawn) and return its result."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, args))
    p.start()
    status, value = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__} failed: {value}")
    return value


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.machine()})"


def build_workload(ns: argparse.Namespace) -> tuple[list[BenchRequest], dict]:
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(ns.model)
    max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    if ns.dataset:
        tok = AutoTokenizer.from_pretrained(ns.model)
        reqs = dataset_workload(ns.dataset, tok, ns.num_prompts, ns.output_len or 100, ns.seed)
    else:
        base = PRESETS[ns.workload]
        spec = WorkloadSpec(**{**asdict(base), "num_requests": ns.num_prompts or base.num_requests, "seed": ns.seed})
        if ns.output_len:
            spec = WorkloadSpec(**{**asdict(spec), "output_median": ns.output_len, "output_min": ns.output_len,
                                   "output_max": ns.output_len})
        if ns.input_len:
            spec = WorkloadSpec(**{**asdict(spec), "prompt_median": ns.input_len, "prompt_min": ns.input_len,
                                   "prompt_max": ns.input_len})
        specials = set(AutoTokenizer.from_pretrained(ns.model).all_special_ids) if has_tokenizer(ns.model) else set()
        reqs = synthetic_workload(spec, cfg.vocab_size, specials, max_len)
    p, o = workload_totals(reqs)
    return reqs, {"num_requests": len(reqs), "prompt_tokens": p, "output_tokens": o}


def engine_kwargs(ns: argparse.Namespace) -> dict:
    kw = dict(load_format=ns.load_format, dtype=ns.dtype, kv_cache_dtype=ns.kv_cache_dtype,
              quantization=ns.quantization, max_num_seqs=ns.max_num_seqs, block_size=ns.block_size, seed=ns.seed,
              attention_backend=ns.attention_backend, device=ns.device)
    kw = llm_kwargs(ns.model, **kw)
    if ns.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = ns.max_num_batched_tokens
    if ns.kv_cache_memory:
        kw["kv_cache_memory"] = ns.kv_cache_memory
    return kw


def format_table(results: list[EngineResult]) -> str:
    width = max(16, *(len(r.engine) + 2 for r in results))
    lines = [f"{'engine':<{width}}{'req/s':>9}{'out tok/s':>11}{'total tok/s':>13}{'peak RSS MB':>13}"
             f"{'time s':>9}  note"]
    for r in results:
        lines.append(f"{r.engine:<{width}}{r.requests_per_s:>9.3f}{r.output_tokens_per_s:>11.1f}"
                     f"{r.total_tokens_per_s:>13.1f}{r.peak_rss_mb:>13.0f}{r.elapsed_s:>9.1f}  {r.note}")
    base = results[0]
    for r in results[1:]:
        lines.append(f"ratio {base.engine} / {r.engine}: {base.output_tokens_per_s / r.output_tokens_per_s:.2f}x "
                     "output tokens/s")
    return "\n".join(lines)


def main(ns: argparse.Namespace) -> dict:
    reqs, workload = build_workload(ns)
    print(f"workload: {workload['num_requests']} requests, {workload['prompt_tokens']} prompt + "
          f"{workload['output_tokens']} output tokens; model {ns.model} ({ns.load_format}, {ns.dtype}, "
          f"quantization {ns.quantization}, kv {ns.kv_cache_dtype}); threads {ns.threads or os.cpu_count()}",
          flush=True)
    before = _peak(ns) if ns.bound else None
    results = [run_isolated(run_pagellm, ns.model, engine_kwargs(ns), reqs, ns.threads)]
    print(format_table(results), flush=True)
    if ns.structured_fraction:  # beside the unconstrained run: the cost of grammar masks
        results.append(run_isolated(run_pagellm, ns.model, engine_kwargs(ns), reqs, ns.threads, ns.structured_fraction))
        print(format_table(results), flush=True)
    for variant in ns.variant:  # beside the main run: the same workload with some engine arguments changed
        kw = {**engine_kwargs(ns), **parse_variant(variant)}  # (model=DIR: another checkpoint of the model)
        results.append(run_isolated(run_pagellm, kw.pop("model", ns.model), kw, reqs, ns.threads, 0.0, variant))
        print(format_table(results), flush=True)
    if ns.tensor_parallel_size > 1:  # beside TP=1, same workload, same total threads
        per_rank = max(1, (ns.threads or os.cpu_count() or 1) // ns.tensor_parallel_size)
        kw = {**engine_kwargs(ns), "tensor_parallel_size": ns.tensor_parallel_size, "num_threads": per_rank}
        results.append(run_isolated(run_pagellm, ns.model, kw, reqs, None))
        print(format_table(results), flush=True)
    for name in ns.compare or []:
        if name != "hf":
            raise ValueError(f"--compare takes 'hf', got {name!r}")
        hf_reqs = reqs[:ns.hf_num_prompts] if ns.hf_num_prompts else reqs
        results.append(run_isolated(run_hf, ns.model, ns.load_format, ns.dtype, hf_reqs, ns.hf_batch_size,
                                    ns.threads, ns.device))
        if len(hf_reqs) < len(reqs):
            results[-1].note += f"; first {len(hf_reqs)} requests only"
        print(format_table(results), flush=True)
        if not ns.skip_hf_single:
            sub = reqs[:ns.hf_single_requests] if ns.hf_single_requests else reqs
            results.append(run_isolated(run_hf, ns.model, ns.load_format, ns.dtype, sub, 1, ns.threads, ns.device))
            if len(sub) < len(reqs):
                results[-1].note += f"; first {len(sub)} requests only"
            print(format_table(results), flush=True)
    report = {"workload": workload, "model": ns.model, "load_format": ns.load_format, "dtype": ns.dtype,
              "quantization": ns.quantization, "kv_cache_dtype": ns.kv_cache_dtype,
              "threads": ns.threads or os.cpu_count(), "device": device_name(ns.device),
              "results": [r.as_dict() for r in results]}
    if ns.bound:
        report["bound"] = measure_bound(ns, reqs, before)
        b = report["bound"]
        int8_rate = f", int8 GEMM {b['int8_gemm_gops']:.0f} GOP/s" if b.get("int8_gemm_gops") else ""
        print(f"workload bound ({ns.dtype}{', int8 weights' if ns.quantization == 'int8' else ''}, "
              f"GEMM {b['gemm_gflops']:.0f} GFLOP/s{int8_rate}, memory {b['read_bandwidth_gbs']:.1f} "
              f"GB/s, measured around the runs): {b['output_tokens_per_s']:.0f} output tok/s; "
              + ", ".join(f"{r.engine} {100 * r.output_tokens_per_s / b['output_tokens_per_s']:.0f}%"
                          for r in results), flush=True)
    if ns.plot:
        from pagellm.benchmarks.plots import plot_throughput

        plot_throughput(report, ns.plot)
    return write_report(report, ns.output_json)


def _peak(ns: argparse.Namespace) -> tuple[float, float, float | None]:
    """(GEMM GFLOP/s in the run's dtype, memory read GB/s, int8 GEMM GOP/s with --quantization int8 on a CPU
    with int8 dot products, else None) measured now, with the run's threads."""
    import torch

    from pagellm.benchmarks.peak import _DTYPES, gemm_gflops, int8_gemm_gops, read_bandwidth_gbs
    from pagellm.quantization.int8 import cpu_has_int8_dot

    _set_threads(ns.threads)
    dtype = _DTYPES.get(ns.dtype, torch.float32)
    cpu = ns.device == "cpu"
    int8 = int8_gemm_gops() if cpu and ns.quantization == "int8" and cpu_has_int8_dot() else None
    return gemm_gflops(dtype, device=ns.device), read_bandwidth_gbs(device=ns.device), int8


def measure_bound(ns: argparse.Namespace, reqs: list[BenchRequest], before: tuple[float, float]) -> dict:
    """The workload's throughput bound on this machine (pagellm bench peak's model), from the best GEMM rate and
    bandwidth measured before and after the engines ran: the machine is shared, so the most favourable
    reading makes the percentage a conservative one."""
    import torch

    from pagellm.benchmarks.peak import _DTYPES, ModelShape, workload_bound

    after = _peak(ns)
    g, bw = max(before[0], after[0]), max(before[1], after[1])
    g8 = max(before[2], after[2]) if before[2] is not None else None
    elem = torch.empty((), dtype=_DTYPES.get(ns.dtype, torch.float32)).element_size()
    kv = ns.dtype if ns.kv_cache_dtype == "auto" else ns.kv_cache_dtype
    kv_elem = torch.empty((), dtype=_DTYPES.get(kv, torch.float32)).element_size()
    int8 = ns.quantization == "int8"  # projections: 1-byte weights, at the int8 GEMM rate where the CPU has one
    bound = workload_bound(ModelShape.from_config(ns.model), [len(r.prompt_token_ids) for r in reqs],
                           [r.output_len for r in reqs], g, bw, elem, kv_elem, linear_gflops=g8,
                           linear_elem_bytes=1 if int8 else None)
    return {**bound, "gemm_gflops": g, "read_bandwidth_gbs": bw, "int8_gemm_gops": g8}


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--workload", default="default", choices=sorted(PRESETS),
                   help="Synthetic workload shape: default (64 requests, lognormal lengths) or nanovllm (256 "
                        "requests, prompt and output lengths uniform in [100, 1024]).")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="Requests (default: the workload's, or the whole dataset).")
    p.add_argument("--input-len", type=int, default=None, help="Fixed prompt length instead of the distribution.")
    p.add_argument("--output-len", type=int, default=None, help="Fixed output length instead of the distribution.")
    p.add_argument("--dataset", default=None, help="JSONL of {'prompt': ..., 'output_len': ...}.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads for every engine.")
    p.add_argument("--compare", action="append", choices=["hf"], help="Also run Hugging Face transformers.")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--hf-num-prompts", type=int, default=None,
                   help="Run the static-batching baseline on the first N requests only (its tokens/s is the ratio's "
                        "denominator; for long workloads on a GPU).")
    p.add_argument("--skip-hf-single", action="store_true", help="Skip the one-at-a-time baseline.")
    p.add_argument("--hf-single-requests", type=int, default=None,
                   help="Run the one-at-a-time baseline on the first N requests only (it is slow).")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=int, default=None)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--device", default="cpu", help="cpu or cuda (for every engine).")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="Also run pagellm sharded over N ranks, beside the unsharded run (each rank gets an even "
                        "share of --threads or of the cores).")
    p.add_argument("--bound", action="store_true",
                   help="Also measure this machine's GEMM rate and memory bandwidth around the runs and print each "
                        "engine's share of the workload's throughput bound (see `pagellm bench peak`).")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="Draw output tokens/s per engine (needs matplotlib: pip install pagellm[plot]).")
    p.add_argument("--structured-fraction", type=float, default=0.0,
                   help="Also run pagellm with this fraction of the requests constrained by a JSON schema (e.g. 0.5).")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="Also run pagellm with these engine arguments changed, beside the main run (repeatable), "
                        "e.g. --variant quantization=int8 --variant kv_cache_dtype=fp8 (model=DIR: another "
                        "checkpoint of the model, e.g. a quantized one).")
    p.add_argument("--output-json", default=None)
