"""Memory sharing, measured: KV blocks with sharing vs without, and what prefix caching saves.

    pagellm bench sharing [--model DIR] [--num-prompts 32] [--prefix-only] [--output-json F]

Part 1 (parallel sampling n = 2, 4, 8 and beam search width 4, prefix caching off, on a seeded
set of prompts whose lengths follow the throughput workload's, median 160 tokens):
after every engine step, `logical` = blocks the sequences' tables hold (what
they would need without sharing: every sequence its own copy) and `physical`
= distinct blocks actually held. Saving = 1 - physical / logical, averaged
over steps (the paper's measure) and at the peak step.

Part 2 (prefix caching, a shared system prompt): requests that share a long
system prompt arrive one after another; prefill tokens computed and the time
to first token (median) with caching on vs off, in the same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pagellm.benchmarks.common import add_model_args, llm_kwargs, write_report


def _blocks(engine) -> tuple[int, int]:
    tables = engine.scheduler.kv.tables.values()
    return sum(len(t) for t in tables), len({b.block_id for t in tables for b in t})


def measure_sharing(model: str, prompts: list, kind: str, width: int, max_tokens: int, seed: int,
                    load_format: str = "auto") -> dict:
    from pagellm import LLM, SamplingParams
    from pagellm.core.beam_search import BeamSearchPolicy
    from pagellm.sampling_params import BeamSearchParams

    llm = LLM(model, **llm_kwargs(model, enable_prefix_caching=False, seed=seed, load_format=load_format))
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        if kind == "beam":
            bp = BeamSearchParams(beam_width=width, max_tokens=max_tokens)
            num_eos = len(engine.config.model.eos_token_ids)
            engine.add_request(str(i), p, bp.sampling_params(max(2, 1 + num_eos) * width),
                               policy=BeamSearchPolicy(beam_width=width, num_eos=num_eos))
        else:
            engine.add_request(str(i), p, SamplingParams(n=width, temperature=0.8, top_p=0.95, seed=seed + i,
                                                         max_tokens=max_tokens))
    savings, peak = [], (0, 0)
    while engine.has_unfinished_requests():
        engine.step()
        logical, physical = _blocks(engine)
        if logical:
            savings.append(1 - physical / logical)
            if logical > peak[0]:
                peak = (logical, physical)
    return {"kind": kind, "width": width, "mean_saving": statistics.mean(savings),
            "peak_logical_blocks": peak[0], "peak_physical_blocks": peak[1],
            "peak_saving": 1 - peak[1] / peak[0] if peak[0] else 0.0, "steps": len(savings)}


def measure_prefix_caching(model: str, num_requests: int, system_tokens: int, seed: int,
                           load_format: str = "auto") -> dict:
    from transformers import AutoTokenizer

    from pagellm import LLM, SamplingParams

    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model)
    vocab = [t for t in range(len(tok)) if t not in set(tok.all_special_ids)]
    system = [rng.choice(vocab) for _ in range(system_tokens)]
    questions = [[rng.choice(vocab) for _ in range(rng.randint(8, 24))] for _ in range(num_requests)]
    out = {}
    for caching in (False, True):
        llm = LLM(model, enable_prefix_caching=caching, load_format=load_format, seed=seed)
        engine = llm.llm_engine
        llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up
        before = engine.stats.tokens_computed
        ttfts = []
        for q in questions:
            t0 = time.perf_counter()
            llm.generate({"prompt_token_ids": system + q}, SamplingParams(max_tokens=1), use_tqdm=False)
            ttfts.append(time.perf_counter() - t0)
        out["on" if caching else "off"] = {"prefill_tokens": engine.stats.tokens_computed - before,
                                           "median_ttft_s": statistics.median(ttfts),
                                           "hit_rate": (engine.get_stats().prefix_cache_hits /
                                                        max(1, engine.get_stats().prefix_cache_queries))}
    prompt_tokens = sum(system_tokens + len(q) for q in questions)
    return {"requests": num_requests, "system_tokens": system_tokens, "prompt_tokens": prompt_tokens,
            "off": out["off"], "on": out["on"],
            "prefill_tokens_saved": 1 - out["on"]["prefill_tokens"] / out["off"]["prefill_tokens"],
            "ttft_speedup": out["off"]["median_ttft_s"] / out["on"]["median_ttft_s"]}


def main(ns: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from pagellm.benchmarks.workload import WorkloadSpec, synthetic_workload

    # A fixed, seeded prompt set: prompt lengths lognormal around 160 tokens (the throughput workload's).
    tok = AutoTokenizer.from_pretrained(ns.model)
    cfg = AutoConfig.from_pretrained(ns.model)
    max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
    spec = WorkloadSpec(num_requests=ns.num_prompts, prompt_max=min(300, max_len - ns.max_tokens), seed=ns.seed)
    prompts = [{"prompt_token_ids": r.prompt_token_ids}
               for r in synthetic_workload(spec, cfg.vocab_size, set(tok.all_special_ids))]
    rows = []
    for kind, width in [] if ns.prefix_only else [("parallel", 2), ("parallel", 4), ("parallel", 8), ("beam", 4)]:
        r = measure_sharing(ns.model, prompts, kind, width, ns.max_tokens, ns.seed, ns.load_format)
        rows.append(r)
        print(f"{kind:>9} {width}: KV blocks saved {100 * r['mean_saving']:5.1f}% on average over "
              f"{r['steps']} steps, {100 * r['peak_saving']:5.1f}% at the peak ({r['peak_physical_blocks']} "
              f"physical vs {r['peak_logical_blocks']} without sharing)", flush=True)
    pc = measure_prefix_caching(ns.model, ns.prefix_requests, ns.system_tokens, ns.seed, ns.load_format)
    print(f"prefix caching, {pc['requests']} requests sharing a {pc['system_tokens']}-token system prompt: "
          f"prefill tokens {pc['off']['prefill_tokens']} -> {pc['on']['prefill_tokens']} "
          f"({100 * pc['prefill_tokens_saved']:.1f}% saved), median TTFT "
          f"{1000 * pc['off']['median_ttft_s']:.1f} ms -> {1000 * pc['on']['median_ttft_s']:.1f} ms "
          f"({pc['ttft_speedup']:.2f}x), hit rate {100 * pc['on']['hit_rate']:.1f}%", flush=True)
    report = {"model": ns.model, "sharing": rows, "prefix_caching": pc}
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, dtypes=False)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prefix-requests", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix-only", action="store_true", help="Measure part 2 (prefix caching) only.")
    p.add_argument("--output-json", default=None)
