"""Latency of one batch: prefill and decode timed separately, median and p90 over iterations.

    pagellm bench latency [--model DIR] [--batch-size 8] [--input-len 128] [--output-len 64] [--num-iters 5]

Each iteration submits `batch_size` requests of `input_len` random tokens, then
times the prefill (the steps until every request has its first token; one
step when the token budget allows) and every decode step after it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pagellm.benchmarks.common import add_model_args, llm_kwargs, write_report


def percentile(xs: list[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default), p in [0, 100]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_batch(engine, batch: int, input_len: int, output_len: int, vocab: int, rng: random.Random,
              tag: str) -> tuple[float, list[float]]:
    from pagellm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True, seed=0)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": [rng.randrange(vocab) for _ in range(input_len)]},
                           params)
    t0 = time.perf_counter()
    while not all(s.num_output_tokens >= 1 for r in engine.scheduler.requests.values() for s in r.seqs) \
            and engine.has_unfinished_requests():
        engine.step()
    prefill = time.perf_counter() - t0
    decode = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        decode.append(time.perf_counter() - t)
    return prefill, decode


def main(ns: argparse.Namespace) -> dict:
    from pagellm import LLM

    llm = LLM(ns.model, **llm_kwargs(ns.model, load_format=ns.load_format, dtype=ns.dtype, quantization=ns.quantization,
                                      kv_cache_dtype=ns.kv_cache_dtype, enable_prefix_caching=False,
                                      max_num_batched_tokens=max(ns.batch_size * ns.input_len, 2048)))
    engine = llm.llm_engine
    vocab = engine.config.model.vocab_size
    rng = random.Random(ns.seed)
    run_batch(engine, ns.batch_size, ns.input_len, min(4, ns.output_len), vocab, rng, "warmup")
    prefills, decodes, totals = [], [], []
    for it in range(ns.num_iters):
        t = time.perf_counter()
        p, d = run_batch(engine, ns.batch_size, ns.input_len, ns.output_len, vocab, rng, f"it{it}")
        totals.append(time.perf_counter() - t)
        prefills.append(p)
        decodes += d
    report = {
        "batch_size": ns.batch_size, "input_len": ns.input_len, "output_len": ns.output_len, "model": ns.model,
        "prefill_s": {"median": statistics.median(prefills), "p90": percentile(prefills, 90)},
        "decode_step_s": {"median": statistics.median(decodes) if decodes else float("nan"),
                          "p90": percentile(decodes, 90)},
        "total_s": {"median": statistics.median(totals), "p90": percentile(totals, 90)},
    }
    pre, dec = report["prefill_s"], report["decode_step_s"]
    print(f"batch {ns.batch_size} x ({ns.input_len} in, {ns.output_len} out), {ns.num_iters} iterations: "
          f"prefill median {1000 * pre['median']:.1f} ms (p90 {1000 * pre['p90']:.1f}), "
          f"decode step median {1000 * dec['median']:.1f} ms (p90 {1000 * dec['p90']:.1f}), "
          f"whole batch median {report['total_s']['median']:.2f} s")
    return write_report(report, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
