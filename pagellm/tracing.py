"""OpenTelemetry traces of requests (`--otlp-traces-endpoint`, vLLM's flag and span).

    tracer = init_tracer("http://collector:4318/v1/traces")     once, at start-up (ValueError without the packages)
    tracer.request_span(out, params, model, headers)            when a generation request ends
    tracer.flush()                                              send what is queued (the provider also does at exit)

Each finished request becomes one `llm_request` span (kind SERVER) from its arrival to its end, a child of the
caller's span when the HTTP request carried W3C trace context (`traceparent`, `tracestate`). Its attributes are
vLLM's (the GenAI semantic conventions): the request's sampling parameters, its token counts and its latencies
(queue, first token, end to end, prefill, decode), measured on the engine's clock. Prompts and outputs are never
recorded. Spans go out in batches (OpenTelemetry's BatchSpanProcessor; OTEL_BSP_* settings apply) over OTLP:
HTTP/protobuf by default, gRPC with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc (and opentelemetry-exporter-otlp-proto-grpc
installed).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

TRACE_HEADERS = ("traceparent", "tracestate")


class SpanAttributes:
    """vLLM's attribute names."""

    RESPONSE_MODEL = "gen_ai.response.model"
    REQUEST_ID = "gen_ai.request.id"
    REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    REQUEST_TOP_P = "gen_ai.request.top_p"
    REQUEST_TOP_K = "gen_ai.request.top_k"
    REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    REQUEST_N = "gen_ai.request.n"
    USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
    USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
    USAGE_NUM_SEQUENCES = "gen_ai.usage.num_sequences"
    LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
    LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
    LATENCY_E2E = "gen_ai.latency.e2e"
    LATENCY_TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
    LATENCY_TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"
    LATENCY_TIME_IN_MODEL_INFERENCE = "gen_ai.latency.time_in_model_inference"


def init_tracer(endpoint: str, service_name: str = "pagellm") -> RequestTracer:
    """A tracer exporting to `endpoint` over OTLP; ValueError naming the missing packages."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ValueError("otlp_traces_endpoint needs OpenTelemetry: pip install 'pagellm[otel]' "
                         "(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http).") from None
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                                  "http/protobuf"))
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            raise ValueError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be http/protobuf or grpc, got {protocol!r}.")
    except ImportError:
        package = "grpc" if protocol == "grpc" else "http"
        raise ValueError(f"OTLP over {protocol} needs opentelemetry-exporter-otlp-proto-{package}.") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    logger.info("tracing: llm_request spans to %s over OTLP (%s)", endpoint, protocol)
    return RequestTracer(provider)


def trace_headers(headers: Any) -> dict[str, str] | None:
    """The W3C trace context of an HTTP request's headers, or None."""
    found = {k: headers[k] for k in TRACE_HEADERS if k in headers}
    return found or None


class RequestTracer:
    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("pagellm")

    def flush(self) -> None:
        self.provider.force_flush()

    def request_span(self, out: Any, params: Any, model: str, headers: dict[str, str] | None = None,
                     completion_tokens: int | None = None) -> None:
        """One finished generation request (its final RequestOutput and SamplingParams) as an `llm_request` span.
        `completion_tokens`: the request's output tokens when `out` holds only the last delta (streaming)."""
        _request_span(self.tracer, out, params, model, headers, completion_tokens)


def _request_span(tracer: Any, out: Any, params: Any, model: str, headers: dict[str, str] | None,
                  completion: int | None) -> None:
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    m = out.metrics or {}
    arrival, first_token = m.get("arrival_time"), m.get("first_token_time")
    scheduled, finished = m.get("first_scheduled_time"), m.get("finished_time")
    mono_now, wall_now = time.monotonic(), time.time_ns()

    def wall(t: float | None) -> int | None:  # the engine's monotonic clock -> epoch nanoseconds
        return None if t is None else wall_now - int((mono_now - t) * 1e9)

    ctx = TraceContextTextMapPropagator().extract(headers) if headers else None
    span = tracer.start_span("llm_request", kind=SpanKind.SERVER, context=ctx, start_time=wall(arrival))
    a = SpanAttributes
    if completion is None:
        completion = sum(len(c.token_ids) for c in out.outputs)
    attrs: dict[str, Any] = {
        a.RESPONSE_MODEL: model, a.REQUEST_ID: out.request_id, a.REQUEST_N: params.n,
        a.REQUEST_TEMPERATURE: float(params.temperature), a.REQUEST_TOP_P: float(params.top_p),
        a.REQUEST_TOP_K: int(params.top_k), a.REQUEST_MAX_TOKENS: int(params.max_tokens or 0),
        a.USAGE_PROMPT_TOKENS: len(out.prompt_token_ids), a.USAGE_COMPLETION_TOKENS: completion,
        a.USAGE_NUM_SEQUENCES: int(getattr(params, "best_of", None) or params.n),
    }
    for name, start, end in ((a.LATENCY_TIME_IN_QUEUE, arrival, scheduled),
                             (a.LATENCY_TIME_TO_FIRST_TOKEN, arrival, first_token), (a.LATENCY_E2E, arrival, finished),
                             (a.LATENCY_TIME_IN_MODEL_PREFILL, scheduled, first_token),
                             (a.LATENCY_TIME_IN_MODEL_DECODE, first_token, finished),
                             (a.LATENCY_TIME_IN_MODEL_INFERENCE, scheduled, finished)):
        if start is not None and end is not None:
            attrs[name] = max(0.0, end - start)
    span.set_attributes(attrs)
    span.end(end_time=wall(finished) or wall_now)
