"""What a hostile or careless client can send, and what the server must answer (each a defect found by a
probe once: a 5xx, a hang, a wrong status, a wrong shape, or a request that kept running)."""

import json
import threading
import time

import httpx
import pytest

from tests.entrypoints.server_utils import RemoteServer

MODEL = "demo"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server():
    s = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "512", "--max-n", "4",
                      "--max-request-body-size", "200000"])
    yield s
    s.stop()


def post_raw(server, path: str, body: str | bytes, headers=JSON) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers=headers, timeout=60)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "__any__") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "__any__":
        assert err["param"] == param, err
    return err


# ---- 1. lone UTF-16 surrogates -------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "a\\udfffb"], "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"prompt": "a", "max_tokens": 1, "bad_words": ["\\ud800"]}', "bad_words"),
    ("/v1/completions", '{"prompt": "a", "max_tokens": 1, "stop": ["x\\ud801"]}', "stop"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/tokenize", '{"prompt": "a\\ud800b"}', "prompt"),
])
def test_lone_surrogates_are_a_400_naming_the_field(server, path, body, param):
    err = assert_openai_error(post_raw(server, path, body), 400, param)
    assert "not valid Unicode" in err["message"]


# ---- 2. a non-streaming client that leaves is aborted ---------------------------------------

def test_non_streaming_disconnect_aborts_and_frees_the_pool(server):
    aborted_before = _abort_count(server)
    body = {"prompt": "ROMEO.", "max_tokens": 400, "n": 4, "temperature": 1.0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    assert server.wait_pool_free(timeout=10)
    # The request was aborted (4 choices), not run to its 400 tokens.
    deadline = time.time() + 5
    while _abort_count(server) < aborted_before + 4 and time.time() < deadline:
        time.sleep(0.1)
    assert _abort_count(server) == aborted_before + 4


def _abort_count(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith('pagellm:request_success_total{finished_reason="abort"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- 3, 4. the waiting-queue limit --------------------------------------------------------

def test_queue_limit_answers_429_before_a_stream_starts_and_400_when_it_never_fits():
    s = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "256", "--max-num-seqs", "1",
                      "--max-waiting-requests", "1"])
    try:
        body = {"model": MODEL, "prompt": "ROMEO.", "max_tokens": 300, "ignore_eos": True}
        threads = [threading.Thread(target=httpx.post, args=(s.url + "/v1/completions",),
                                    kwargs={"json": body, "timeout": 120}) for _ in range(2)]
        for t in threads:  # one runs, one waits: the queue is full
            t.start()
            time.sleep(0.3)
        r = httpx.post(s.url + "/v1/completions", json={**body, "stream": True}, timeout=30)
        err = assert_openai_error(r, 429)
        assert err["code"] == "rate_limit_exceeded" and r.headers["retry-after"] == "1"
        assert r.headers["content-type"].startswith("application/json")  # not a 200 event stream
        for t in threads:
            t.join()
        # Two prompts can never be queued under --max-waiting-requests 1: a 400, even on an idle server.
        r = httpx.post(s.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1}, timeout=30)
        err = assert_openai_error(r, 400, "prompt")
        assert "--max-waiting-requests" in err["message"]
    finally:
        s.stop()


# ---- 5. CPU work off the event loop; body size; request chat templates -------------------

def test_a_huge_prompt_does_not_stall_health(server):
    big = "ROMEO. " * 25_000  # 175 kB: under the body limit, slow to tokenize, far over max_model_len
    result = {}

    def send():
        result["r"] = httpx.post(server.url + "/v1/completions", json={"prompt": big, "max_tokens": 1}, timeout=120)

    t = threading.Thread(target=send)
    t.start()
    worst = 0.0
    while t.is_alive():
        start = time.time()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        worst = max(worst, time.time() - start)
        time.sleep(0.02)
    t.join()
    assert_openai_error(result["r"], 400, "prompt")
    assert worst < 2.0


def test_body_over_the_limit_is_413_in_openai_shape(server):
    err = assert_openai_error(post_raw(server, "/v1/completions", json.dumps({"prompt": "x" * 300_000})), 413)
    assert err["code"] == "request_too_large" and "--max-request-body-size" in err["message"]
    # chunked upload with no Content-Length: counted as it arrives
    r = httpx.post(server.url + "/v1/completions", content=iter([b'{"prompt": "', b"x" * 250_000, b'"}']),
                   headers=JSON, timeout=30)
    assert_openai_error(r, 413)


def test_request_chat_template_is_refused_unless_trusted(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 'x' }}", "max_tokens": 1}
    err = assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json=body), 400, "chat_template")
    assert "--trust-request-chat-template" in err["message"]


# ---- 6. logprob caps; logprobs=0 reports the sampled token ----------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "logprobs": 4096}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
])
def test_logprobs_over_max_logprobs_are_400(server, path, body, param):
    err = assert_openai_error(httpx.post(server.url + path, json=body), 400, param)
    assert "--max-logprobs" in err["message"]


def test_zero_logprobs_still_report_the_sampled_token(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "ROMEO.", "max_tokens": 5, "logprobs": 0,
                                                          "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert [list(t) for t in lp["top_logprobs"]] == [[tok] for tok in lp["tokens"]]
    assert [t[tok] for t, tok in zip(lp["top_logprobs"], lp["tokens"])] == lp["token_logprobs"]


# ---- 7, 8, 9. numbers and types -------------------------------------------------------------

@pytest.mark.parametrize("fragment, param", [
    ('"temperature": Infinity', "temperature"),
    ('"temperature": NaN', "temperature"),
    ('"top_p": -Infinity', "top_p"),
    ('"repetition_penalty": Infinity', "repetition_penalty"),
    ('"logit_bias": {"5": NaN}', "logit_bias"),
    ('"logit_bias": {"5": Infinity}', "logit_bias"),
    ('"logit_bias": {"5": 1e39}', "logit_bias"),
    ('"logit_bias": {"5": -101}', "logit_bias"),
    ('"seed": 18446744073709551616', "seed"),
    ('"seed": -9223372036854775809', "seed"),
    ('"temperature": "0.5"', "temperature"),
    ('"n": "2"', "n"),
    ('"n": 2.0', "n"),
    ('"stream": "yes"', "stream"),
    ('"logprobs": true', "logprobs"),
    ('"max_tokens": true', "max_tokens"),
    ('"stop": 7', "stop"),
])
def test_non_finite_out_of_range_and_mistyped_values_are_400(server, fragment, param):
    r = post_raw(server, "/v1/completions", '{"prompt": "a", "max_tokens": 1, ' + fragment + "}")
    assert_openai_error(r, 400, param)


def test_booleans_are_not_token_ids(server):
    assert_openai_error(post_raw(server, "/v1/completions", '{"prompt": [true, false], "max_tokens": 1}'), 400,
                        "prompt")


def test_seed_at_the_int64_edges_is_accepted(server):
    for seed in (2 ** 63 - 1, -(2 ** 63)):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1, "seed": seed})
        assert r.status_code == 200, r.text


# ---- 10. stream-only fields; prompt_logprobs in the response -------------------------------

def test_stream_options_without_stream_and_prompt_logprobs_with_stream_are_400(server):
    assert_openai_error(httpx.post(server.url + "/v1/completions", json={
        "prompt": "a", "max_tokens": 1, "stream_options": {"include_usage": True}}), 400, "stream_options")
    assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a"}], "stream_options": {"include_usage": True}}), 400,
        "stream_options")
    assert_openai_error(httpx.post(server.url + "/v1/completions", json={
        "prompt": "a", "max_tokens": 1, "stream": True, "prompt_logprobs": 1}), 400, "prompt_logprobs")


def test_prompt_logprobs_come_back_in_completions_and_chat(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "ROMEO. But soft", "max_tokens": 1,
                                                          "prompt_logprobs": 2}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "ROMEO. But soft"}).json()["tokens"]
    assert plp[0] is None and len(plp) == len(ids)
    for pos, entry in enumerate(plp[1:], start=1):
        assert str(ids[pos]) in entry and 2 <= len(entry) <= 3  # top 2 and the prompt token itself
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
    chat = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hail"}], "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) > 3


# ---- 11, 12. every error in OpenAI's shape ------------------------------------------------

def test_router_and_parser_errors_have_the_openai_shape(server):
    assert_openai_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(server.url + "/v1/completions"), 405)
    assert_openai_error(post_raw(server, "/v1/completions", b'{"prompt": "\xff\xfe"}'), 400)
    assert_openai_error(post_raw(server, "/v1/completions", "[" * 10_000 + "]" * 10_000), 400)


def test_tokenize_errors_keep_the_connection_alive(server):
    with httpx.Client(base_url=server.url) as c:
        assert_openai_error(c.post("/tokenize", json={"prompt": "a", "model": "other"}), 404, "model")
        assert_openai_error(c.post("/tokenize", json={}), 400, "prompt")
        assert_openai_error(c.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
        assert_openai_error(c.post("/detokenize", json={"tokens": "abc"}), 400, "tokens")
        assert c.post("/tokenize", json={"prompt": "ROMEO."}).status_code == 200  # same connection


# ---- 13. stop lists are capped -------------------------------------------------------------

def test_stop_lists_are_capped(server):
    assert_openai_error(httpx.post(server.url + "/v1/completions", json={
        "prompt": "a", "max_tokens": 1, "stop": ["x"] * 65}), 400, "stop")
    assert_openai_error(httpx.post(server.url + "/v1/completions", json={
        "prompt": "a", "max_tokens": 1, "stop": "x" * 1025}), 400, "stop")
    assert_openai_error(httpx.post(server.url + "/v1/completions", json={
        "prompt": "a", "max_tokens": 1, "bad_words": ["x"] * 257}), 400, "bad_words")


# ---- 15. smaller ones ------------------------------------------------------------------------

def test_too_large_max_tokens_names_max_tokens(server):
    err = assert_openai_error(httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 10_000}),
                              400, "max_tokens")
    assert err["code"] == "context_length_exceeded"
    err = assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 10_000}), 400,
        "max_completion_tokens")


def test_unsupported_content_parts_say_so(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]})
    err = assert_openai_error(r, 400, "messages")
    assert "unsupported content part type 'input_audio'" in err["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})  # a text-only model
    err = assert_openai_error(r, 400, "messages")
    assert "takes text only" in err["message"]


def test_auth_comes_before_body_validation():
    s = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "64", "--api-key", "k"])
    try:
        for body in ('{"prompt": 5', '{"prompt": "a", "temperature": "hot"}'):
            err = assert_openai_error(post_raw(s, "/v1/completions", body), 401)
            assert err["code"] == "invalid_api_key"
        ok = post_raw(s, "/v1/completions", '{"prompt": "a", "max_tokens": 1}',
                      headers={**JSON, "authorization": "Bearer k"})
        assert ok.status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200  # probes stay open
    finally:
        s.stop()


def test_cors_preflight_needs_no_key_and_origins_are_checked():
    """CORS, as vLLM's server: preflights are answered before the API key is asked for; only the allowed
    origins get the Access-Control-Allow-Origin header; error replies carry it too, so a browser can read them."""
    s = RemoteServer(["--num-gpu-blocks-override", "64", "--api-key", "k", "--allowed-origins",
                      '["https://app.example"]'])
    try:
        url = s.url + "/v1/completions"
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        ok = httpx.options(url, headers={"Origin": "https://app.example", **pre})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        bad = httpx.options(url, headers={"Origin": "https://evil.example", **pre})
        assert "access-control-allow-origin" not in bad.headers
        body = {"prompt": "ROMEO.", "max_tokens": 2}
        r = httpx.post(url, json=body, headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.post(url, json=body, headers={"Origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        s.stop()
    s = RemoteServer(["--num-gpu-blocks-override", "64", "--allowed-origins", "[]"])
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                       headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    finally:
        s.stop()
