"""/openapi.json describes the server truthfully, and schemathesis finds no 5xx and no response that
breaks it (bounded examples per route, so it runs in CI)."""

import httpx
import pytest

from tests.entrypoints.server_utils import RemoteServer

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test dependency (pip install -e .[test])")

MODEL = "demo"


@pytest.fixture(scope="module")
def server():
    # A short context bounds the work of any generated request.
    s = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "256", "--max-model-len", "48",
                      "--max-n", "2", "--max-request-body-size", "100000"])
    yield s
    s.stop()


def test_openapi_declares_what_the_server_sends(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429"} <= set(responses) and "422" not in responses
        assert "text/event-stream" in responses["200"]["content"]
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "/v1/models/{model}" in spec["paths"]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server):
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    def fuzz(op, seen: set):
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        @given(op.as_strategy())
        def run(case):
            seen.add(case.call_and_validate(base_url=server.url, checks=checks, timeout=60).status_code)

        run()

    failures, statuses = [], {}
    for result in schema.get_all_operations():
        op = result.ok()
        try:
            fuzz(op, statuses.setdefault(op.label, set()))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: B036 - schemathesis reports failures as exception groups
            failures.append(f"{op.label}: {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)
    for label in ("POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"):
        assert 400 in statuses[label], (label, statuses[label])  # rejected requests were exercised
    # ... and accepted ones, JSON and event stream, whose responses must match the schema too
    ops = {r.ok().label: r.ok() for r in schema.get_all_operations()}
    chat = [{"role": "user", "content": "Hail"}]
    for label, body in (("POST /v1/completions", {"prompt": "ROMEO.", "max_tokens": 3, "logprobs": 1}),
                        ("POST /v1/completions", {"prompt": "ROMEO.", "max_tokens": 3, "stream": True}),
                        ("POST /v1/chat/completions", {"messages": chat, "max_tokens": 3}),
                        ("POST /v1/chat/completions", {"messages": chat, "max_tokens": 3, "stream": True}),
                        ("POST /tokenize", {"prompt": "ROMEO."}), ("POST /detokenize", {"tokens": [5, 6]})):
        response = ops[label].Case(body=body, media_type="application/json").call_and_validate(
            base_url=server.url, checks=checks, timeout=60)
        assert response.status_code == 200, (label, response.text)
    assert httpx.get(server.url + "/health").status_code == 200
