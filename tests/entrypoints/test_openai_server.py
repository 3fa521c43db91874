"""The OpenAI-compatible server, driven by the official `openai` client against a real subprocess."""

import asyncio
import json
import os
import signal
import threading

import httpx
import openai
import pytest

from tests.entrypoints.server_utils import RemoteServer

MODEL = "demo"


@pytest.fixture(scope="module")
def server():
    s = RemoteServer(["--served-model-name", MODEL, "--max-n", "4", "--num-gpu-blocks-override", "512",
                      "--enable-prompt-tokens-details"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert "version" in httpx.get(server.url + "/version").json()
    # the routes that change the running engine exist only with --server-dev-mode
    assert httpx.post(server.url + "/sleep").status_code == 404
    assert httpx.post(server.url + "/collective_rpc", json={"method": "sleep"}).status_code == 404


def test_completion_and_its_stream_agree(client):
    kw = dict(model=MODEL, prompt="ROMEO.", max_tokens=24, temperature=0)
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    pieces = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(pieces) == full.choices[0].text
    assert full.usage.prompt_tokens == len(httpx.post(str(client.base_url).replace("/v1/", "/tokenize"),
                                                      json={"prompt": "ROMEO."}).json()["tokens"])


def test_chat_and_its_stream_agree(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What say you?"}], max_tokens=30, temperature=0)
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_chat_text_parts_and_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Good"}, {"type": "text", "text": " morrow"}]}], max_completion_tokens=5,
        temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_n_and_best_of(client):
    r = client.completions.create(model=MODEL, prompt="KING.", n=3, max_tokens=8, seed=1, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    r = client.completions.create(model=MODEL, prompt="KING.", n=2, best_of=4, max_tokens=8, seed=1)
    assert len(r.choices) == 2
    r = client.completions.create(model=MODEL, prompt=["KING.", "QUEEN."], n=2, max_tokens=4)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_token_prompts(client):
    ids = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"), json={"prompt": "ROMEO."}).json()["tokens"]
    a = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    b = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    c = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [ch.text for ch in c.choices] == [b.choices[0].text] * 2


def test_logprobs_both_formats(client):
    r = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.token_logprobs) == 5 and all(len(t) == 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    e = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=2, temperature=0, logprobs=1, echo=True)
    assert e.choices[0].text.startswith("ROMEO.") and e.choices[0].logprobs.token_logprobs[0] is None
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hail"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_tokens_as_token_ids(client):
    """return_tokens_as_token_ids (vLLM's request field; --return-tokens-as-token-ids for the server's default): each
    logprobs token, chosen and candidates, written "token_id:N" with the ids the completion returns."""
    extra = {"return_tokens_as_token_ids": True, "return_token_ids": True}
    r = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body=extra)
    ch = r.choices[0]
    assert ch.logprobs.tokens == [f"token_id:{t}" for t in ch.token_ids]
    assert all(ch.logprobs.tokens[i] in top and all(k.startswith("token_id:") for k in top)
               for i, top in enumerate(ch.logprobs.top_logprobs))
    assert ch.logprobs.text_offset[-1] < len(ch.text)  # offsets still count the text
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hail"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2, extra_body=extra)
    content = c.choices[0].logprobs.content
    assert [t.token for t in content] == [f"token_id:{i}" for i in c.choices[0].token_ids]
    assert all(tp.token.startswith("token_id:") for t in content for tp in t.top_logprobs)
    assert bytes(content[0].bytes).decode() == content[0].token
    plain = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=5, temperature=0, logprobs=0)
    assert not plain.choices[0].logprobs.tokens[0].startswith("token_id:")


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=30, temperature=0).choices[0].text
    stop = base[8:12]
    r = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == base[:base.index(stop)] and r.choices[0].finish_reason == "stop"


def test_tokenize_detokenize_round_trip(server):
    toks = httpx.post(server.url + "/tokenize", json={"prompt": "To be, or not to be"}).json()
    assert toks["count"] == len(toks["tokens"])
    text = httpx.post(server.url + "/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"]
    assert text == "To be, or not to be"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2


def test_metrics_change_after_a_request(server, client):
    before = server.metric("pagellm:generation_tokens_total")
    client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=7, temperature=0,
                              extra_body={"ignore_eos": True})
    assert server.metric("pagellm:generation_tokens_total") == before + 7
    text = httpx.get(server.url + "/metrics").text
    for name in ("pagellm:num_requests_running", "pagellm:num_requests_waiting", "pagellm:kv_cache_usage_perc",
                 "pagellm:prefix_cache_hits_total", "pagellm:prompt_tokens_total",
                 "pagellm:time_to_first_token_seconds_bucket", "pagellm:time_per_output_token_seconds_bucket",
                 "pagellm:e2e_request_latency_seconds_bucket"):
        assert name in text


def test_prefix_cache_hits_show_in_metrics(server, client):
    prompt = "HAMLET. " * 12
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    hits = server.metric("pagellm:prefix_cache_hits_total")
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert server.metric("pagellm:prefix_cache_hits_total") > hits


# ---- errors -------------------------------------------------------------------------------------


def post(server, path, body=None, content=None, headers=None):
    return httpx.post(server.url + path, json=body, content=content,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def test_invalid_json(server):
    assert_error(post(server, "/v1/completions", content=b"{not json"), 400, "invalid_json")


def test_json_that_is_not_an_object(server):
    assert_error(post(server, "/v1/completions", content=b"[1, 2]"), 400)
    assert_error(post(server, "/v1/chat/completions", content=b'"hello"'), 400)


def test_wrong_types(server):
    assert_error(post(server, "/v1/completions", {"prompt": "x", "max_tokens": "many"}), 400, param="max_tokens")
    assert_error(post(server, "/v1/chat/completions", {"messages": "hi"}), 400, param="messages")
    assert_error(post(server, "/v1/completions", {"max_tokens": 3}), 400, param="prompt")


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 0), ("top_p", 2), ("top_k", -5),
                                          ("max_tokens", 0), ("presence_penalty", 3), ("min_p", 1.5)])
def test_out_of_range_sampling_values(server, field, value):
    assert_error(post(server, "/v1/completions", {"prompt": "x", field: value}), 400, "invalid_value", field)


def test_context_length_exceeded_says_both_numbers(server):
    err = assert_error(post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5000}), 400,
                       "context_length_exceeded")
    assert "512" in err["message"] and "5000" in err["message"]
    err = assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 600}]}),
                       400, "context_length_exceeded", "messages")


def test_n_over_the_cap(server):
    assert_error(post(server, "/v1/completions", {"prompt": "x", "n": 5}), 400, "invalid_value", "n")


def test_unknown_fields_are_accepted(server):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "frobnicate": True})
    assert r.status_code == 200


def test_unknown_model_is_404(server):
    assert_error(post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model_not_found", "model")


def test_suffix_is_rejected(server):
    assert_error(post(server, "/v1/completions", {"prompt": "x", "suffix": "y"}), 400, "unsupported_parameter",
                 "suffix")


def test_official_client_raises_its_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=-2)
    assert e.value.body["param"] == "temperature"


# ---- concurrency, disconnects ---------------------------------------------------------------------


def test_disconnect_mid_stream_aborts_and_frees_the_pool(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "prompt": "ROMEO.", "max_tokens": 400, "stream": True, "ignore_eos": True}, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break  # closing the connection mid-stream
    assert server.wait_pool_free()


def test_many_concurrent_streams_complete(aclient, server):
    async def one(i):
        stream = await aclient.completions.create(model=MODEL, prompt=f"KING {i}.", max_tokens=10 + i % 7,
                                                  stream=True, extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return finish

    async def main():
        return await asyncio.gather(*(one(i) for i in range(36)))

    finishes = asyncio.run(main())
    assert finishes == ["length"] * 36
    assert server.wait_pool_free()


def test_concurrent_streams_have_the_right_lengths(server):
    lengths = {}

    def one(i):
        n = 5 + i % 9
        with httpx.stream("POST", server.url + "/v1/completions", json={
                "prompt": "QUEEN.", "max_tokens": n, "stream": True, "ignore_eos": True, "logprobs": 0},
                timeout=120) as r:
            toks = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    toks += sum(len(c["logprobs"]["tokens"]) for c in json.loads(line[6:])["choices"])
        lengths[i] = (toks, n)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got == want for got, want in lengths.values())


def test_api_key_and_queue_limit_and_graceful_shutdown():
    s = RemoteServer(["--api-key", "sekret", "--max-num-seqs", "1", "--max-waiting-requests", "1",
                      "--num-gpu-blocks-override", "256"])
    try:
        r = post(s, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert_error(r, 401, "invalid_api_key")
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret")
        assert ok.completions.create(model=ok.models.list().data[0].id, prompt="x", max_tokens=1).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong").models.list()
        assert httpx.get(s.url + "/health").status_code == 200  # probes stay open
        assert httpx.get(s.url + "/metrics").status_code == 200

        # One running, one waiting; the rest get 429 with Retry-After.
        auth = {"authorization": "Bearer sekret"}
        results = []

        def fire():
            results.append(httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 60,
                                      "ignore_eos": True}, headers=auth, timeout=120))

        threads = [threading.Thread(target=fire) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 429 in codes
        limited = next(r for r in results if r.status_code == 429)
        assert_error(limited, 429, "rate_limit_exceeded")
        assert limited.headers["retry-after"] == "1"

        # SIGTERM mid-stream: the stream ends with a final chunk and [DONE]; the server exits 0.
        lines = []
        with httpx.stream("POST", s.url + "/v1/completions", headers=auth, json={
                "prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    s.proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][6:])
        assert last["choices"][0]["finish_reason"] == "abort"
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_openapi_docs_are_served(server):
    assert httpx.get(server.url + "/docs").status_code == 200
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/completions" in schema["paths"]


def test_return_token_ids(server, client):
    tokenize = server.url + "/tokenize"
    kw = dict(model=MODEL, prompt="ROMEO.", max_tokens=8, temperature=0)
    full = client.completions.create(**kw, extra_body={"return_token_ids": True}).choices[0]
    extra = full.model_extra
    assert extra["prompt_token_ids"] == httpx.post(tokenize, json={"prompt": "ROMEO."}).json()["tokens"]
    assert len(extra["token_ids"]) == 8
    assert httpx.post(server.url + "/detokenize", json={"tokens": extra["token_ids"]}).json()["prompt"] == full.text
    chunks = [c.choices[0].model_extra for c in client.completions.create(
        **kw, stream=True, extra_body={"return_token_ids": True}) if c.choices]
    assert sum((c["token_ids"] for c in chunks), []) == extra["token_ids"]
    assert [c.get("prompt_token_ids") is not None for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert client.completions.create(**kw).choices[0].model_extra.get("token_ids") is None

    msgs = [{"role": "user", "content": "What say you?"}]
    ckw = dict(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    chat = client.chat.completions.create(**ckw, extra_body={"return_token_ids": True})
    assert chat.model_extra["prompt_token_ids"] == httpx.post(tokenize, json={"messages": msgs}).json()["tokens"]
    ids = chat.choices[0].model_extra["token_ids"]
    assert len(ids) == chat.usage.completion_tokens
    streamed = list(client.chat.completions.create(**ckw, stream=True, extra_body={"return_token_ids": True}))
    assert streamed[0].model_extra["prompt_token_ids"] == chat.model_extra["prompt_token_ids"]
    assert all(c.model_extra.get("prompt_token_ids") is None for c in streamed[1:])
    assert sum((c.choices[0].model_extra.get("token_ids") or [] for c in streamed if c.choices), []) == ids


def test_usage_reports_prompt_tokens_from_the_prefix_cache(client):
    """With --enable-prompt-tokens-details (this module's server); without it usage has no details, as in vLLM
    (test_vllm_openai_suite checks the plain shape)."""
    prompt = "FIRST CITIZEN. Before we proceed any further, hear me speak; you are all resolved rather to die " * 2
    kw = dict(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    first = client.completions.create(**kw).usage
    again = client.completions.create(**kw).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = again.prompt_tokens_details.cached_tokens
    assert 16 <= cached < again.prompt_tokens and cached % 16 == 0  # whole blocks, never the last token
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    msgs = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, stream=True,
                                          stream_options={"include_usage": True})
    assert list(chat)[-1].usage.prompt_tokens_details.cached_tokens >= 16


def test_cache_salt_separates_prefix_caches(client):
    """vLLM's cache_salt: a request reuses cached prompt blocks only of requests that gave the same salt."""
    prompt = "MENENIUS. I tell you, friends, most charitable care have the patricians of you. " * 2
    kw = dict(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)

    def cached(**extra):
        return client.completions.create(**kw, **extra).usage.prompt_tokens_details.cached_tokens

    assert cached(extra_body={"cache_salt": "tenant-a"}) == 0
    assert cached(extra_body={"cache_salt": "tenant-b"}) == 0  # another tenant: nothing shared
    assert cached() == 0  # no salt: not shared with salted requests either
    assert cached(extra_body={"cache_salt": "tenant-a"}) >= 16
    msgs = [{"role": "user", "content": prompt}]
    chat = dict(model=MODEL, messages=msgs, max_tokens=2)
    client.chat.completions.create(**chat, extra_body={"cache_salt": "tenant-a"})
    other = client.chat.completions.create(**chat, extra_body={"cache_salt": "tenant-c"})
    same = client.chat.completions.create(**chat, extra_body={"cache_salt": "tenant-a"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0 and same.usage.prompt_tokens_details.cached_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw, extra_body={"cache_salt": ""})
    assert e.value.body["param"] == "cache_salt"


def test_chat_echo_prepends_the_continued_assistant_message(client):
    """vLLM's chat `echo`: with the conversation ending in an assistant message, the reply starts with it."""
    msgs = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "Good my lord,"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
              extra_body={"continue_final_message": True, "add_generation_prompt": False})
    plain = client.chat.completions.create(**kw).choices[0].message.content
    kw["extra_body"]["echo"] = True
    echo = client.chat.completions.create(**kw).choices[0].message.content
    assert echo == "Good my lord," + plain
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == echo
    user_last = client.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=4, temperature=0,
                                               extra_body={"echo": True}).choices[0].message.content
    assert not user_last.startswith("Speak.")  # the last message is the user's: nothing to echo


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's usage so far."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=6, temperature=0, n=2,
                                            stream=True, stream_options=opts))
    body = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in body)
    for index in (0, 1):
        counts = [c.usage.completion_tokens for c in body if c.choices[0].index == index]
        assert counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1].usage.completion_tokens == 12  # the final usage chunk: every choice
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak."}],
                                               max_tokens=5, temperature=0, stream=True, stream_options=opts))
    counts = [c.usage.completion_tokens for c in chat if c.choices]
    assert counts[0] == 0 and counts[-1] == 5 and counts == sorted(counts)
    assert all(c.usage.prompt_tokens == chat[-1].usage.prompt_tokens for c in chat)
    plain = list(client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain if c.choices)


def test_beam_search_over_the_api_equals_hf(server, client):
    """vLLM's use_beam_search: n beams, best first, as Hugging Face's num_beams (the demo model, its EOS tokens)."""
    from tests.conftest import DEMO_MODEL
    from tests.engine.test_memory_sharing import hf_beams

    ids = httpx.post(server.url + "/tokenize", json={"prompt": "ROMEO."}).json()["tokens"]
    with open(os.path.join(DEMO_MODEL, "generation_config.json")) as f:
        eos = set(json.load(f)["eos_token_id"])  # the demo model's end-of-sequence tokens
    ref = hf_beams(DEMO_MODEL, ids, 3, 12, 0.5, False, eos)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, n=3,
                                  extra_body={"use_beam_search": True, "length_penalty": 0.5, "return_token_ids": True})
    assert [c.model_extra["token_ids"] for c in sorted(r.choices, key=lambda c: c.index)] == ref
    stream = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, n=3, stream=True,
                                       extra_body={"use_beam_search": True, "length_penalty": 0.5})
    texts = {}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert [texts[i] for i in range(3)] == [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak."}],
                                          max_tokens=6, n=2, extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and chat.choices[0].message.content != chat.choices[1].message.content
    for bad in ({"temperature": 0.7}, {"logprobs": 2}, {"stop": ["\n"]}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=4, n=2,
                                      extra_body={"use_beam_search": True}, **bad)
        assert e.value.body["param"] == next(iter(bad))
    assert server.wait_pool_free()
