"""--otlp-traces-endpoint: one `llm_request` span per finished request, with vLLM's attributes, sent over OTLP/HTTP
to a collector (a loopback HTTP server here that decodes the protobuf payloads), continuing the caller's trace
when the HTTP request carries a traceparent header."""

from __future__ import annotations

import http.server
import os
import threading
import time

import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing needs pip install 'pagellm[otel]' (in the test extras)")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

from pagellm import LLM, SamplingParams  # noqa: E402
from tests.entrypoints.server_utils import RemoteServer  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, as (span, its attributes as a dict)."""

    def __init__(self) -> None:
        self.spans: list = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        outer.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/traces"

    def wait(self, n: int, timeout: float = 20.0) -> list:
        deadline = time.time() + timeout
        while len(self.spans) < n and time.time() < deadline:
            time.sleep(0.05)
        return self.spans


def _attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


@pytest.fixture()
def collector():
    c = Collector()
    yield c
    c.httpd.shutdown()


def test_server_spans_continue_the_callers_trace(llama_path, collector):
    from openai import OpenAI

    s = RemoteServer([llama_path, "--served-model-name", "m", "--max-model-len", "128",
                      "--otlp-traces-endpoint", collector.url], env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="x")
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        done = client.completions.create(model="m", prompt="The quick brown", max_tokens=7, temperature=0.5,
                                         top_p=0.9, extra_headers=headers, extra_body={"ignore_eos": True})
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, stream=True, extra_body={"ignore_eos": True})
        assert len([c for c in stream if c.choices and c.choices[0].delta.content]) >= 1
        spans = collector.wait(2)
    finally:
        s.stop()
    assert len(spans) == 2 and all(sp.name == "llm_request" for sp in spans)
    first = next(sp for sp in spans if _attrs(sp)["gen_ai.request.max_tokens"] == 7)
    a = _attrs(first)
    assert first.trace_id.hex() == TRACE_ID and first.parent_span_id.hex() == PARENT_ID
    assert first.kind == 2  # SERVER
    assert a["gen_ai.response.model"] == "m" and a["gen_ai.request.n"] == 1
    assert a["gen_ai.request.temperature"] == pytest.approx(0.5) and a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.usage.prompt_tokens"] == done.usage.prompt_tokens
    assert a["gen_ai.usage.completion_tokens"] == done.usage.completion_tokens == 7
    assert 0 <= a["gen_ai.latency.time_in_queue"] <= a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
    assert first.end_time_unix_nano - first.start_time_unix_nano == pytest.approx(a["gen_ai.latency.e2e"] * 1e9,
                                                                                 rel=0.01, abs=2e6)
    assert abs(first.start_time_unix_nano / 1e9 - time.time()) < 120  # wall-clock times
    other = next(sp for sp in spans if sp is not first)
    assert other.trace_id.hex() != TRACE_ID and not other.parent_span_id  # no traceparent: a new trace
    assert _attrs(other)["gen_ai.usage.completion_tokens"] == 5


def test_offline_spans(llama_path, collector, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    llm = LLM(llama_path, max_model_len=128, otlp_traces_endpoint=collector.url)
    outs = llm.generate(["The quick", "To be"], SamplingParams(max_tokens=4, n=2, seed=0), use_tqdm=False)
    llm.shutdown()
    spans = collector.wait(2)
    assert sorted(_attrs(sp)["gen_ai.request.id"] for sp in spans) == sorted(o.request_id for o in outs)
    assert all(_attrs(sp)["gen_ai.usage.completion_tokens"] == 8 and _attrs(sp)["gen_ai.request.n"] == 2
               for sp in spans)


def test_missing_packages_are_named(llama_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_otel(name, *args, **kwargs):
        if name.startswith("opentelemetry"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_otel)
    with pytest.raises(ValueError, match=r"pagellm\[otel\]"):
        LLM(llama_path, otlp_traces_endpoint="http://127.0.0.1:1/v1/traces")
    monkeypatch.setattr(builtins, "__import__", real)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift")
    with pytest.raises(ValueError, match="http/protobuf or grpc"):
        LLM(llama_path, otlp_traces_endpoint="http://127.0.0.1:1/v1/traces")
    assert os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "thrift"
