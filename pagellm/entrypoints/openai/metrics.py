"""Prometheus metrics (prometheus-client), named like vLLM's with the `pagellm:` prefix.

Request-level histograms and counters are recorded by the serving layer when a request ends
(finished, or aborted by a disconnect); the phases come from the engine's timestamps:

    arrival --queue--> first scheduled --prefill--> first token --decode--> finished
    |<------------------------------- e2e (server side) ------------------------>|

Engine gauges (running/waiting requests, KV cache usage, prefix cache counters,
preemptions, speculative decoding's drafts and accepted tokens) are read from the engine's latest
stats snapshot at scrape time.
Each server has its own registry: no global state.
"""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_N_BUCKETS = (1, 2, 5, 10, 20)


class _EngineCollector:
    def __init__(self) -> None:
        self.engine = None

    def collect(self):
        if self.engine is None:
            return
        s = self.engine.stats
        c = self.engine.counters
        yield GaugeMetricFamily("pagellm:num_requests_running", "Requests in the running batch.",
                                value=s.num_running_reqs)
        yield GaugeMetricFamily("pagellm:num_requests_waiting", "Requests waiting to be scheduled.",
                                value=s.num_waiting_reqs)
        yield GaugeMetricFamily("pagellm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                                value=s.kv_cache_usage)
        yield GaugeMetricFamily("pagellm:kv_cache_free_blocks", "Free KV cache blocks.", value=s.num_free_blocks)
        yield GaugeMetricFamily("pagellm:kv_cache_total_blocks", "KV cache blocks.", value=s.num_total_blocks)
        yield CounterMetricFamily("pagellm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=s.prefix_cache_queries)
        yield CounterMetricFamily("pagellm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=s.prefix_cache_hits)
        yield CounterMetricFamily("pagellm:num_preemptions", "Preemptions since start.", value=s.num_preemptions)
        yield CounterMetricFamily("pagellm:spec_decode_num_drafts", "Speculative decoding: sequence steps that "
                                  "checked draft tokens.", value=s.spec_num_drafts)
        yield CounterMetricFamily("pagellm:spec_decode_num_draft_tokens", "Speculative decoding: draft tokens "
                                  "checked.", value=s.spec_num_draft_tokens)
        yield CounterMetricFamily("pagellm:spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens "
                                  "the model agreed with (kept).", value=s.spec_num_accepted_tokens)
        yield CounterMetricFamily("pagellm:engine_steps", "Engine steps since start.", value=c.num_steps)
        yield CounterMetricFamily("pagellm:engine_device_steps", "Forward passes since start: engine steps plus the "
                                  "extra decode steps of multi-step rounds (--num-scheduler-steps).",
                                  value=c.device_steps)
        yield GaugeMetricFamily("pagellm:engine_sleep_state", "Sleep mode: 1 while the engine sleeps (requests get "
                                "503), 0 awake.", value=int(bool(getattr(self.engine, "sleeping", False))))
        yield from self._per_replica()

    def _per_replica(self):
        """With data parallelism: each replica's gauges under pagellm:replica_*{engine="i"} (the unlabelled
        families above are the sums)."""
        replicas = getattr(self.engine, "replicas", ())
        if len(replicas) < 2:
            return
        families = {
            "num_requests_running": ("Requests in the replica's running batch.", lambda st: st.num_running_reqs),
            "num_requests_waiting": ("Requests waiting in the replica.", lambda st: st.num_waiting_reqs),
            "kv_cache_usage_perc": ("Fraction of the replica's KV cache blocks in use.", lambda st: st.kv_cache_usage),
            "kv_cache_free_blocks": ("The replica's free KV cache blocks.", lambda st: st.num_free_blocks),
        }
        for name, (doc, value) in families.items():
            fam = GaugeMetricFamily(f"pagellm:replica_{name}", doc, labels=["engine"])
            for r in replicas:
                if r.stats is not None:
                    fam.add_metric([str(r.index)], value(r.stats))
            yield fam
        fam = GaugeMetricFamily("pagellm:replica_up", "1 while the replica serves, 0 once it is dead.",
                                labels=["engine"])
        for r in replicas:
            fam.add_metric([str(r.index)], 0 if r.dead else 1)
        yield fam


class RecentWindow:
    """Values observed in the last `seconds` (for the dashboard's percentiles; Prometheus has the histograms)."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds
        self._items: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, value: float, now: float | None = None) -> None:
        self._items.append((time.monotonic() if now is None else now, value))
        self._trim()

    def _trim(self) -> None:
        cutoff = time.monotonic() - self.seconds
        while self._items and self._items[0][0] < cutoff:
            self._items.popleft()

    def percentiles(self, qs=(50, 90, 99)) -> dict[str, float | int | None]:
        self._trim()
        values = sorted(v for _, v in self._items)
        out: dict[str, float | int | None] = {"count": len(values)}
        for q in qs:
            out[f"p{q}"] = values[min(len(values) - 1, int(q / 100 * len(values)))] if values else None
        return out


class ServerMetrics:
    def __init__(self) -> None:
        self.recent_ttft = RecentWindow()  # seconds to the first token, last minute
        self.recent_itl = RecentWindow()  # mean seconds between output tokens per request, last minute
        self.registry = CollectorRegistry()
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        r = self.registry
        self.prompt_tokens = Counter("pagellm:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("pagellm:generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.request_success = Counter("pagellm:request_success", "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram("pagellm:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pagellm:time_per_output_token_seconds", "Mean time per output token after the first.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pagellm:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("pagellm:request_queue_time_seconds", "Time from arrival to first scheduled.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("pagellm:request_prefill_time_seconds",
                                      "Time from first scheduled to first token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("pagellm:request_decode_time_seconds", "Time from first token to finish.",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("pagellm:request_prompt_tokens", "Prompt tokens per request.",
                                               buckets=_TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("pagellm:request_generation_tokens",
                                                   "Generated tokens per request.", buckets=_TOKEN_BUCKETS, registry=r)
        self.params_max_tokens = Histogram("pagellm:request_params_max_tokens", "The max_tokens of each request.",
                                           buckets=_TOKEN_BUCKETS, registry=r)
        self.params_n = Histogram("pagellm:request_params_n", "The n of each request.", buckets=_N_BUCKETS,
                                  registry=r)

    def attach_engine(self, engine) -> None:
        self._engine.engine = engine

    def request_finished(self, out, params, start: float, first: float | None, num_tokens: int, now: float) -> None:
        """A request ended with a final output (any finish reason, engine-side aborts included)."""
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(num_tokens)
        for c in out.outputs:
            self.request_success.labels(finished_reason=c.finish_reason or "unknown").inc()
        self.e2e.observe(now - start)
        # Token times from the engine's clock (the same monotonic clock on one machine): a non-streaming request
        # receives all its tokens at once, so the times the server saw them say nothing about the generation.
        m = out.metrics
        arrival, first_token, finished = m.get("arrival_time"), m.get("first_token_time"), m.get("finished_time")
        if arrival is not None and first_token is not None:
            self.ttft.observe(max(0.0, first_token - arrival))
            self.recent_ttft.add(max(0.0, first_token - arrival), now)
        per_seq = num_tokens / max(1, params.n)  # the n sequences of a request decode side by side
        if first_token is not None and finished is not None and per_seq > 1:
            per_token = max(0.0, finished - first_token) / (per_seq - 1)
            self.tpot.observe(per_token)
            self.recent_itl.add(per_token, now)
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        self.request_generation_tokens.observe(num_tokens)
        self._observe_params(params)
        scheduled = m.get("first_scheduled_time")
        if arrival is not None and scheduled is not None:
            self.queue_time.observe(max(0.0, scheduled - arrival))
            if first_token is not None:
                self.prefill_time.observe(max(0.0, first_token - scheduled))
        if first_token is not None and finished is not None:
            self.decode_time.observe(max(0.0, finished - first_token))

    def pooling_finished(self, out, start: float, now: float) -> None:
        """A pooling model's request ended (its prompt pooled): counted as a successful request with no output
        tokens."""
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.request_success.labels(finished_reason="stop").inc()
        self.e2e.observe(now - start)
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        self.request_generation_tokens.observe(0)

    def pooling_aborted(self) -> None:
        """A pooling request the client abandoned (disconnect)."""
        self.request_success.labels(finished_reason="abort").inc()

    def request_aborted(self, params) -> None:
        """A request the client abandoned (disconnect): no final output ever reached the server."""
        self.request_success.labels(finished_reason="abort").inc(params.n)
        self._observe_params(params)

    def _observe_params(self, params) -> None:
        self.params_max_tokens.observe(params.max_tokens or 0)
        self.params_n.observe(params.n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
