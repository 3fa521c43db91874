"""Online serving benchmark: a streaming client against any OpenAI-compatible server.

    pagellm bench serve --base-url http://127.0.0.1:8000 [--model NAME] [--request-rate 4] [--num-prompts 64]
                        [--goodput ttft:500 tpot:100 e2el:10000]

Requests go to /v1/completions with `stream: true`, arriving as a Poisson
process at --request-rate per second (inf = all at once). Reported, with vLLM's
benchmark_serving definitions so numbers compare:
    TTFT  time to first token                     (mean, median, p99)
    TPOT  (latency - TTFT) / (output tokens - 1)   per request, excluding the first token
    ITL   time between consecutive streamed chunks
    E2EL  end-to-end latency
    request throughput, output token throughput, and goodput: requests/s meeting every SLO given.
Prompts are sent as token ids (synthetic workload) or text (--dataset).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from pagellm.benchmarks.common import write_report
from pagellm.benchmarks.latency import percentile


@dataclass
class RequestRecord:
    start: float  # when the request was sent (s, monotonic)
    chunk_times: list[float] = field(default_factory=list)  # arrival time of every chunk with new tokens
    end: float = 0.0  # when the stream closed
    output_tokens: int = 0  # tokens generated (from usage when the server reports it)
    prompt_tokens: int = 0
    ok: bool = False
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def _summary(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {"mean": statistics.fmean(xs), "median": statistics.median(xs), "p99": percentile(xs, 99)}


def compute_metrics(records: list[RequestRecord], duration: float, slo: dict[str, float] | None = None) -> dict:
    """Aggregate per-request timings. Times in seconds; `slo` values in milliseconds (ttft, tpot, e2el)."""
    ok = [r for r in records if r.ok and r.chunk_times]
    out_tokens = sum(r.output_tokens for r in ok)
    good = 0
    for r in ok:
        checks = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
        if all(checks[k] * 1000 <= v for k, v in (slo or {}).items()):
            good += 1
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "goodput": good / duration if slo else None,
        "ttft_s": _summary([r.ttft for r in ok]),
        "tpot_s": _summary([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": _summary([x for r in ok for x in r.itls]),
        "e2el_s": _summary([r.latency for r in ok]),
        # per request, for --plot and later analysis
        "samples": {"ttft_s": [r.ttft for r in ok], "tpot_s": [r.tpot for r in ok if r.tpot is not None]},
    }


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from start): exponential gaps at `rate` per second; all zero when rate is inf."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def _one(client, url: str, body: dict, headers: dict, rec: RequestRecord) -> None:
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=None) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            chunks = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    rec.error = str(data["error"])
                    return
                if data.get("usage"):
                    rec.output_tokens = data["usage"]["completion_tokens"]
                    rec.prompt_tokens = data["usage"]["prompt_tokens"]
                if any(c.get("text") for c in data.get("choices", [])):
                    rec.chunk_times.append(time.monotonic())
                    chunks += 1
            rec.end = time.monotonic()
            rec.output_tokens = rec.output_tokens or chunks
            rec.ok = True
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        rec.error = f"{type(e).__name__}: {e}"


async def run(ns: argparse.Namespace, prompts: list, output_lens: list[int]) -> dict:
    import httpx

    url = ns.base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    arrivals = poisson_arrivals(len(prompts), ns.request_rate, ns.seed)
    records = []
    limits = httpx.Limits(max_connections=ns.max_concurrency or 10_000)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.monotonic()
        tasks = []
        for prompt, out_len, at in zip(prompts, output_lens, arrivals):
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"prompt": prompt, "max_tokens": out_len, "stream": True, "temperature": 1.0,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            if ns.served_model:
                body["model"] = ns.served_model
            rec = RequestRecord(time.monotonic())
            records.append(rec)
            tasks.append(asyncio.create_task(_one(client, url, body, headers, rec)))
        await asyncio.gather(*tasks)
        duration = time.monotonic() - t0
    slo = dict(item.split(":") for item in ns.goodput) if ns.goodput else None
    metrics = compute_metrics(records, duration, {k: float(v) for k, v in slo.items()} if slo else None)
    errors = [r.error for r in records if not r.ok]
    if errors:
        metrics["first_error"] = errors[0]
    return metrics


def main(ns: argparse.Namespace) -> dict:
    from pagellm.benchmarks.workload import WorkloadSpec, dataset_workload, synthetic_workload

    if ns.dataset:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ns.tokenizer)
        reqs = dataset_workload(ns.dataset, tok, ns.num_prompts, ns.output_len or 100, ns.seed)
        prompts = [r.prompt for r in reqs]
    else:
        spec = WorkloadSpec(num_requests=ns.num_prompts, seed=ns.seed, prompt_max=ns.max_input_len)
        reqs = synthetic_workload(spec, ns.vocab_size, set(range(ns.num_special_tokens)))
        prompts = [r.prompt_token_ids for r in reqs]
    lens = [ns.output_len or r.output_len for r in reqs]
    m = asyncio.run(run(ns, prompts, lens))
    ms = lambda d: f"mean {1000 * d['mean']:.1f} / median {1000 * d['median']:.1f} / p99 {1000 * d['p99']:.1f} ms"  # noqa: E731
    print(f"{m['completed']} completed, {m['failed']} failed in {m['duration_s']:.1f} s "
          f"(request rate {ns.request_rate}/s)")
    print(f"request throughput {m['request_throughput']:.2f}/s, output tokens {m['output_token_throughput']:.1f}/s, "
          f"total tokens {m['total_token_throughput']:.1f}/s" +
          (f", goodput {m['goodput']:.2f} req/s" if m["goodput"] is not None else ""))
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2el_s", "E2EL")):
        print(f"{name:>5}: {ms(m[key])}")
    if "first_error" in m:
        print(f"first error: {m['first_error']}")
    if ns.plot:
        from pagellm.benchmarks.plots import plot_serve

        plot_serve(m, ns.plot)
    return write_report(m, ns.output_json)


def add_args(p: argparse.ArgumentParser) -> None:
    from pagellm.entrypoints.cli import DEMO_MODEL

    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--served-model", default=None, help="The `model` field to send (default: none).")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate (req/s); inf = all at once.")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None, help="Fixed output length (default: the workload's).")
    p.add_argument("--max-input-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=4096, help="Token ids of synthetic prompts are below this.")
    p.add_argument("--num-special-tokens", type=int, default=8, help="Token ids below this are not used.")
    p.add_argument("--dataset", default=None, help="JSONL of {'prompt': ...} (text prompts, any server).")
    p.add_argument("--tokenizer", default=DEMO_MODEL, help="Tokenizer for --dataset.")
    p.add_argument("--goodput", nargs="*", default=None, help="SLOs in ms, e.g. ttft:500 tpot:100 e2el:10000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="Draw the TTFT and TPOT distributions (needs matplotlib: pip install pagellm[plot]).")
