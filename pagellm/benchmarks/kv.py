"""The paged KV cache's memory argument, measured: utilization and concurrency under a fixed budget.

    pagellm bench kv [--model DIR] [--kv-tokens 8192] [--block-size 16]
                     [--kv-cache-dtype bfloat16 --kv-cache-dtype fp8]

The throughput workload runs through pagellm with a KV cache of exactly
--kv-tokens token slots. After every step: sequences running, tokens stored in
the cache, slots allocated (blocks in use x block size). Next to it, the same
requests (same order, same lengths) through a contiguous allocator that
reserves, per request, either max_model_len slots or prompt + max output
slots (what pre-paging servers do), simulated with the same budget and one
token per step. Utilization = tokens stored / slots allocated or reserved.

With several --kv-cache-dtype, the budget is the bytes of --kv-tokens slots in the first dtype, and each
dtype gets the slots those bytes hold (an 8-bit cache: twice a bf16 one's): the paged rows then show how
many more sequences run at once in the same memory.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field

from pagellm.benchmarks.common import add_model_args, llm_kwargs, write_report


@dataclass
class KVRun:
    name: str
    steps: int
    mean_running: float
    max_running: int
    mean_utilization: float  # tokens stored / slots held, averaged over steps
    running_series: list[int] = field(default_factory=list)  # sequences running, per step (for --plot)
    utilization_series: list[float] = field(default_factory=list)  # tokens stored / slots held, per step

    def row(self) -> str:
        return (f"{self.name:<46}{self.mean_running:>10.1f}{self.max_running:>8d}"
                f"{100 * self.mean_utilization:>11.1f}%{self.steps:>8d}")


def simulate_contiguous(prompt_lens: list[int], output_lens: list[int], budget: int, reserve: list[int],
                        name: str) -> KVRun:
    """FCFS, no preemption: a request is admitted when its reservation fits; it then stores its prompt
    and one more token per step until its output is complete."""
    waiting = list(range(len(prompt_lens)))
    running: dict[int, int] = {}  # request -> tokens stored
    used = steps = 0
    counts, utils = [], []
    while waiting or running:
        while waiting and used + reserve[waiting[0]] <= budget:
            r = waiting.pop(0)
            if reserve[r] > budget:
                raise ValueError(f"request {r} needs {reserve[r]} slots, budget {budget}")
            running[r] = prompt_lens[r]
            used += reserve[r]
        if not running:
            raise ValueError("budget too small for the first request")
        steps += 1
        for r in list(running):
            running[r] += 1
        counts.append(len(running))
        utils.append(sum(running.values()) / used)
        for r in [r for r, n in running.items() if n >= prompt_lens[r] + output_lens[r]]:
            del running[r]
            used -= reserve[r]
    return KVRun(name, steps, statistics.fmean(counts), max(counts), statistics.fmean(utils), counts, utils)


def run_paged(model: str, reqs, kv_tokens: int, block_size: int, load_format: str,
              kv_cache_dtype: str | None = None) -> KVRun:
    from pagellm import LLM, SamplingParams

    num_blocks = kv_tokens // block_size
    extra = {"kv_cache_dtype": kv_cache_dtype, "dtype": "bfloat16"} if kv_cache_dtype else {}
    llm = LLM(model, **llm_kwargs(model, num_gpu_blocks_override=num_blocks, block_size=block_size,
                                   enable_prefix_caching=False, load_format=load_format, **extra))
    engine = llm.llm_engine
    for i, r in enumerate(reqs):
        engine.add_request(str(i), {"prompt_token_ids": r.prompt_token_ids},
                           SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=1.0, seed=i))
    counts, utils = [], []
    while engine.has_unfinished_requests():
        engine.step()
        sched = engine.scheduler
        seqs = [s for req in sched.running for s in req.live_seqs()]
        held = (num_blocks - sched.kv.num_free_blocks) * block_size
        if seqs and held:
            counts.append(len(seqs))
            utils.append(sum(s.num_computed_tokens for s in seqs) / held)
    label = f"pagellm (block {block_size}{', ' + kv_cache_dtype if kv_cache_dtype else ''}, {kv_tokens} slots)"
    return KVRun(label, len(counts), statistics.fmean(counts), max(counts),
                 statistics.fmean(utils), counts, utils)


def main(ns: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    from pagellm.benchmarks.workload import WorkloadSpec, synthetic_workload

    cfg = AutoConfig.from_pretrained(ns.model)
    max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
    spec = WorkloadSpec(num_requests=ns.num_prompts, seed=ns.seed)
    reqs = synthetic_workload(spec, cfg.vocab_size, set(range(8)), max_len)
    p = [len(r.prompt_token_ids) for r in reqs]
    o = [r.output_len for r in reqs]
    import torch

    from pagellm.worker.kv_cache import torch_dtype

    dtypes = ns.kv_cache_dtype or [None]
    size = {d: torch.empty((), dtype=torch_dtype(d)).element_size() if d else 1 for d in dtypes}
    runs = [run_paged(ns.model, reqs, ns.kv_tokens * size[dtypes[0]] // size[d], ns.block_size, ns.load_format, d)
            for d in dtypes]
    runs += [simulate_contiguous(p, o, ns.kv_tokens, [pi + spec.output_max for pi in p],
                                f"contiguous, prompt + max output ({spec.output_max})"),
            simulate_contiguous(p, o, ns.kv_tokens, [max_len] * len(p), f"contiguous, max_model_len ({max_len})")]
    print(f"KV budget {ns.kv_tokens} token slots; {len(reqs)} requests, {sum(p)} prompt + {sum(o)} output tokens")
    if ns.kv_cache_dtype:
        print(f"same memory for every cache dtype: {ns.kv_tokens} slots of {dtypes[0]}")
    print(f"{'allocator':<46}{'running':>10}{'peak':>8}{'KV util':>12}{'steps':>8}")
    for r in runs:
        print(r.row())
    report = {"kv_tokens": ns.kv_tokens, "block_size": ns.block_size, "runs": [vars(r) for r in runs]}
    if ns.plot:
        from pagellm.benchmarks.plots import plot_kv

        plot_kv(report, ns.plot)
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, dtypes=False)
    p.add_argument("--kv-tokens", type=int, default=8192, help="KV cache size in token slots.")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-dtype", action="append", default=None,
                   choices=["float32", "bfloat16", "float16", "fp8", "fp8_e4m3"],
                   help="Run pagellm with this cache dtype (repeatable; bf16 compute) in the memory of --kv-tokens "
                        "slots of the first one given.")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="Draw KV utilization and running sequences per step (needs matplotlib).")
