"""Benchmark workloads: seeded synthetic requests, or a JSONL dataset of prompts.

Synthetic (the default): prompt and output lengths drawn from lognormal
distributions (median 160 and 100 tokens, sigma 0.6, clipped to [16, 512] and
[8, 256]), prompts made of random non-special token ids. Every engine gets the
same token ids and generates exactly `output_len` tokens (ignore_eos).

Presets (`--workload NAME`):
    default    the lognormal shape above, 64 requests
    nanovllm   nano-vllm's README benchmark: 256 requests, prompt and output lengths
               uniform in [100, 1024] (needs max_model_len >= 2048)
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    prompt: str | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    prompt_median: int = 160
    prompt_min: int = 16
    prompt_max: int = 512
    output_median: int = 100
    output_min: int = 8
    output_max: int = 256
    sigma: float = 0.6
    seed: int = 0
    distribution: str = "lognormal"  # or "uniform": lengths uniform in [min, max]


PRESETS = {
    "default": WorkloadSpec(),
    "nanovllm": WorkloadSpec(num_requests=256, prompt_min=100, prompt_max=1024, output_min=100, output_max=1024,
                             distribution="uniform"),
}


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def synthetic_workload(spec: WorkloadSpec, vocab_size: int, special_ids: set[int] | None = None,
                       max_model_len: int | None = None) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    special = special_ids or set()
    out = []
    if spec.distribution not in ("lognormal", "uniform"):
        raise ValueError(f"distribution must be 'lognormal' or 'uniform', got {spec.distribution!r}")
    for _ in range(spec.num_requests):
        if spec.distribution == "uniform":
            p = rng.randint(spec.prompt_min, spec.prompt_max)
            o = rng.randint(spec.output_min, spec.output_max)
        else:
            p = _lognormal(rng, spec.prompt_median, spec.sigma, spec.prompt_min, spec.prompt_max)
            o = _lognormal(rng, spec.output_median, spec.sigma, spec.output_min, spec.output_max)
        if max_model_len is not None and p + o > max_model_len:  # fit the model: shorten output, then prompt
            o = min(o, max_model_len // 2)
            p = min(p, max_model_len - o)
        ids = []
        while len(ids) < p:
            t = rng.randrange(vocab_size)
            if t not in special:
                ids.append(t)
        out.append(BenchRequest(ids, o))
    return out


def dataset_workload(path: str, tokenizer, num_requests: int | None, default_output_len: int,
                     seed: int = 0) -> list[BenchRequest]:
    """JSONL lines {"prompt": str, "output_len": int (optional)}; sampled with the seed if num_requests is set."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{i + 1}: each line must be an object with a 'prompt' string")
            rows.append(row)
    if num_requests is not None and num_requests < len(rows):
        rows = random.Random(seed).sample(rows, num_requests)
    return [BenchRequest(tokenizer.encode(r["prompt"]), int(r.get("output_len", default_output_len)), r["prompt"])
            for r in rows]


def workload_totals(reqs: list[BenchRequest]) -> tuple[int, int]:
    return sum(len(r.prompt_token_ids) for r in reqs), sum(r.output_len for r in reqs)
