"""vLLM's OpenAI-server tests (tests/entrypoints/openai/ in vLLM), ported to pagellm and the demo model.

Each test names the vLLM test it comes from. The model-specific numbers of the originals (token
counts of a given prompt, expected texts) are replaced by checks that hold for any model; the
official `openai` client drives a real server subprocess, as in vLLM. Where pagellm deliberately
differs from vLLM, the test says so.
"""

import asyncio

import httpx
import openai
import pytest
from openai import BadRequestError

from tests.entrypoints.server_utils import RemoteServer

MODEL = "demo"
MESSAGES = [{"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": "what is 1+1?"}]


@pytest.fixture(scope="module")
def server():
    s = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "1024", "--max-n", "4",
                      "--no-enable-prefix-caching"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def tokenize(server, text: str) -> list[int]:
    return httpx.post(server.url + "/tokenize", json={"prompt": text}).json()["tokens"]


# ---- completion/test_completion.py -------------------------------------------------------

def test_single_completion(server, client):
    """vLLM: completion/test_completion.py::test_single_completion."""
    completion = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=5, temperature=0.0)
    assert completion.id is not None and len(completion.choices) == 1
    choice = completion.choices[0]
    assert len(choice.text) >= 5 and choice.finish_reason == "length"
    n_prompt = len(tokenize(server, "Hello, my name is"))
    assert (completion.usage.completion_tokens, completion.usage.prompt_tokens,
            completion.usage.total_tokens) == (5, n_prompt, n_prompt + 5)
    completion = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0)
    assert len(completion.choices[0].text) >= 1
    assert getattr(completion.choices[0], "prompt_logprobs", None) is None


def test_no_logprobs(client):
    """vLLM: completion/test_completion.py::test_no_logprobs."""
    completion = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                           logprobs=None)
    assert completion.choices[0].logprobs is None


def test_zero_logprobs(client):
    """vLLM: completion/test_completion.py::test_zero_logprobs."""
    completion = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                           logprobs=0)
    lp = completion.choices[0].logprobs
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.top_logprobs[0]) == 1


def test_some_logprobs(client):
    """vLLM: completion/test_completion.py::test_some_logprobs."""
    completion = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                           logprobs=5)
    assert 5 <= len(completion.choices[0].logprobs.top_logprobs[0]) <= 6


def test_too_many_completion_logprobs(client):
    """vLLM: completion/test_completion.py::test_too_many_completion_logprobs."""
    with pytest.raises(BadRequestError):
        client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0, logprobs=21)
    with pytest.raises(BadRequestError):  # pagellm refuses before the stream starts (vLLM: an error either way)
        for _ in client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                           logprobs=30, stream=True):
            pass
    completion = client.completions.create(model=MODEL, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0)
    assert len(completion.choices[0].text) >= 0  # the server still works


@pytest.mark.parametrize("prompt_logprobs", [-1, 0, 1, None])
def test_prompt_logprobs_completion(client, prompt_logprobs):
    """vLLM: completion/test_completion.py::test_prompt_logprobs_completion."""
    params: dict = {"prompt": ["A robot may not injure another robot", "My name is"], "model": MODEL}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(BadRequestError):
            client.completions.create(**params)
        return
    completion = client.completions.create(**params)
    if prompt_logprobs is not None:
        assert len(completion.choices[0].prompt_logprobs) > 0
        assert len(completion.choices[1].prompt_logprobs) > 0
    else:
        assert getattr(completion.choices[0], "prompt_logprobs", None) is None


def test_completion_streaming(client):
    """vLLM: completion/test_completion.py::test_completion_streaming."""
    prompt = "What is an LLM?"
    single = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0).choices[0].text
    chunks, finish_reason_count = [], 0
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0, stream=True):
        chunks.append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == "length" and chunk.choices[0].text
    assert "".join(chunks) == single


def test_parallel_streaming(client):
    """vLLM: completion/test_completion.py::test_parallel_streaming (n samples in one stream, by index)."""
    n, max_tokens = 3, 50
    chunks: list[list[str]] = [[] for _ in range(n)]
    finish_reason_count = 0
    for chunk in client.completions.create(model=MODEL, prompt="What is an LLM?", max_tokens=max_tokens, n=n,
                                           temperature=1.0, stream=True, seed=42):
        chunks[chunk.choices[0].index].append(chunk.choices[0].text)
        finish_reason_count += chunk.choices[0].finish_reason is not None
    assert finish_reason_count == n
    texts = ["".join(c) for c in chunks]
    assert all(len(c) <= max_tokens for c in chunks)
    assert len(set(texts)) == n


def test_completion_stream_options(client):
    """vLLM: completion/test_completion.py::test_completion_stream_options."""
    kw = dict(model=MODEL, prompt="What is the capital of France?", max_tokens=5, temperature=0.0)
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": False}):
        assert chunk.usage is None
    stream = client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason is not None:
            assert chunk.usage is None
            final = next(stream)
            assert final.usage.prompt_tokens > 0 and final.usage.completion_tokens > 0
            assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens
            assert final.choices == []
    for bad in ({"include_usage": None}, {"include_usage": True}):
        with pytest.raises(BadRequestError):
            client.completions.create(**kw, stream=False, stream_options=bad)


def test_batch_completions(client):
    """vLLM: completion/test_completion.py::test_batch_completions (without its beam-search part: pagellm
    serves beam search offline, through LLM.beam_search)."""
    for prompts in (["Hello, my name is"] * 2, [[0, 0, 0, 0, 0]] * 2):
        batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0.0)
        assert len(batch.choices) == 2 and batch.choices[0].text == batch.choices[1].text
        texts = ["", ""]
        for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0.0,
                                               stream=True):
            assert len(chunk.choices) == 1
            texts[chunk.choices[0].index] += chunk.choices[0].text
        assert texts[0] == texts[1]


@pytest.mark.parametrize("logprobs_arg", [1, 0])
def test_echo_logprob_completion(server, client, logprobs_arg):
    """vLLM: completion/test_completion.py::test_echo_logprob_completion."""
    for prompt in ("Hello, my name is", [0, 0, 0, 0, 0]):
        completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0, echo=True,
                                               logprobs=logprobs_arg)
        prompt_text = prompt if isinstance(prompt, str) else httpx.post(
            server.url + "/detokenize", json={"tokens": prompt}).json()["prompt"]
        assert completion.choices[0].text.startswith(prompt_text)
        lp = completion.choices[0].logprobs
        assert len(lp.text_offset) > 5
        assert len(lp.token_logprobs) > 5 and lp.token_logprobs[0] is None
        assert len(lp.top_logprobs) > 5 and lp.top_logprobs[0] is None
        for top in lp.top_logprobs[1:]:
            assert max(logprobs_arg, 1) <= len(top) <= logprobs_arg + 1
        assert len(lp.tokens) > 5


def test_completion_text_offset_streaming_equals_non_streaming(client):
    """vLLM: completion/test_completion_text_offset.py: text_offset counts from the start of the whole choice,
    in every streamed chunk as in the non-streaming response."""
    kw = dict(model=MODEL, prompt="ROMEO. But soft", max_tokens=12, temperature=0.0, logprobs=1)
    full = client.completions.create(**kw).choices[0].logprobs
    offsets, tokens = [], []
    for chunk in client.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            offsets += chunk.choices[0].logprobs.text_offset
            tokens += chunk.choices[0].logprobs.tokens
    assert offsets == full.text_offset and tokens == full.tokens
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


# ---- chat_completion/test_chat.py ---------------------------------------------------------

def test_no_logprobs_chat(client):
    """vLLM: chat_completion/test_chat.py::test_no_logprobs_chat."""
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0.0,
                                       logprobs=False)
    assert c.choices[0].logprobs is None


def test_zero_logprobs_chat(client):
    """vLLM: chat_completion/test_chat.py::test_zero_logprobs_chat."""
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0.0,
                                       logprobs=True, top_logprobs=0)
    assert c.choices[0].logprobs.content is not None
    assert len(c.choices[0].logprobs.content[0].top_logprobs) == 0


def test_some_logprobs_chat(client):
    """vLLM: chat_completion/test_chat.py::test_some_logprobs_chat."""
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0.0,
                                       logprobs=True, top_logprobs=5)
    assert len(c.choices[0].logprobs.content[0].top_logprobs) == 5


def test_too_many_chat_logprobs(client):
    """vLLM: chat_completion/test_chat.py::test_too_many_chat_logprobs."""
    with pytest.raises(BadRequestError):
        for _ in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10,
                                                logprobs=True, top_logprobs=21, stream=True):
            pass
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10, logprobs=True,
                                       top_logprobs=30)
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10)
    assert c.choices[0].message.content is not None


@pytest.mark.parametrize("prompt_logprobs", [1, 0, -1, None])
def test_prompt_logprobs_chat(client, prompt_logprobs):
    """vLLM: chat_completion/test_chat.py::test_prompt_logprobs_chat."""
    params: dict = {"messages": MESSAGES + [{"role": "assistant", "content": "Two."},
                                            {"role": "user", "content": "Why?"}], "model": MODEL}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(BadRequestError):
            client.chat.completions.create(**params)
        return
    c = client.chat.completions.create(**params)
    if prompt_logprobs is not None:
        assert len(c.prompt_logprobs) > 0
    else:
        assert getattr(c, "prompt_logprobs", None) is None


def test_more_than_one_prompt_logprobs_chat(client):
    """vLLM: chat_completion/test_chat.py::test_more_than_one_prompt_logprobs_chat. vLLM's test expects exactly
    k entries at one position; both servers return the top k plus the prompt token when it is not among them,
    so this checks k <= entries <= k + 1 at every position."""
    params = {"messages": MESSAGES, "model": MODEL}
    for k in (1, 2):
        c = client.chat.completions.create(**params, extra_body={"prompt_logprobs": k})
        assert all(k <= len(entry) <= k + 1 for entry in c.prompt_logprobs[1:])


def test_single_chat_session(server, client):
    """vLLM: chat_completion/test_chat.py::test_single_chat_session."""
    messages = list(MESSAGES)
    c = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, logprobs=True,
                                       top_logprobs=5)
    assert c.id is not None and len(c.choices) == 1
    assert c.choices[0].finish_reason == "length"
    n_prompt = len(httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"])
    assert c.usage == openai.types.CompletionUsage(completion_tokens=5, prompt_tokens=n_prompt,
                                                   total_tokens=n_prompt + 5)
    assert c.choices[0].message.role == "assistant" and len(c.choices[0].message.content) >= 5
    messages += [{"role": "assistant", "content": c.choices[0].message.content},
                 {"role": "user", "content": "express your result in json"}]
    c = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5)
    assert c.choices[0].message.content is not None


def test_chat_streaming(client):
    """vLLM: chat_completion/test_chat.py::test_chat_streaming. Differs on purpose in one point: like the OpenAI
    API, pagellm ends a chat stream with a chunk whose delta is empty and which carries finish_reason (vLLM puts
    the last text and the finish_reason in one chunk)."""
    kw = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0.0)
    c = client.chat.completions.create(**kw)
    chunks, finish_reason_count = [], 0
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
        if delta.content:
            chunks.append(delta.content)
        finish_reason_count += chunk.choices[0].finish_reason is not None
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == c.choices[0].finish_reason
    assert "".join(chunks) == c.choices[0].message.content


def test_chat_completion_stream_options(client):
    """vLLM: chat_completion/test_chat.py::test_chat_completion_stream_options (without continuous_usage_stats,
    which pagellm does not implement: it is accepted and ignored)."""
    kw = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0.0)
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": False}):
        assert chunk.usage is None
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason is not None:
            final = next(stream)
            assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens > 0
            assert final.choices == []
    for bad in ({"include_usage": None}, {"include_usage": True}):
        with pytest.raises(BadRequestError):
            client.chat.completions.create(**kw, stream=False, stream_options=bad)


def test_logits_bias(server, client):
    """vLLM: chat_completion/test_chat.py::test_logits_bias (completions variant): a +100 bias forces a token;
    a -100 bias on the greedy first token changes it."""
    kw = dict(model=MODEL, prompt="ROMEO.", max_tokens=5, temperature=0.0, logprobs=0)
    target = tokenize(server, " Juliet")[-1]
    forced = client.completions.create(**kw, logit_bias={str(target): 100}).choices[0]
    text = httpx.post(server.url + "/detokenize", json={"tokens": [target]}).json()["prompt"]
    assert forced.logprobs.tokens == [text] * 5
    first = client.completions.create(**kw).choices[0].logprobs.tokens[0]
    banned = {str(t): -100 for t in tokenize(server, first)}
    assert client.completions.create(**kw, logit_bias=banned).choices[0].logprobs.tokens[0] != first


def test_seed_reproducible_and_distinct(client):
    """vLLM: test_seed (completions/chat): the same seed gives the same text, other seeds other texts."""
    kw = dict(model=MODEL, prompt="ROMEO.", max_tokens=20, temperature=1.0)
    a = client.completions.create(**kw, seed=7).choices[0].text
    assert client.completions.create(**kw, seed=7).choices[0].text == a
    assert len({client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2, 3)}) > 1


# ---- errors, models, tokenization ----------------------------------------------------------

def test_chat_error_messages(client):
    """vLLM: chat_completion/test_chat_error.py: bad requests come back as BadRequestError with a message;
    pagellm's error codes are OpenAI's strings (vLLM sends the status number as `code`)."""
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_completion_tokens=5)
    assert e.value.body["param"] == "messages" and isinstance(e.value.body["code"], str)


def test_check_models(client):
    """vLLM: test_models.py::test_check_models, and models.retrieve."""
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].root
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_tokenize_completions_and_chat(server):
    """vLLM: test_tokenization.py::test_tokenize_completions / test_tokenize_chat / test_detokenize."""
    ids = tokenize(server, "This is a test prompt.")
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "This is a test prompt."}).json()
    assert r == {"tokens": ids, "count": len(ids), "max_model_len": 512}
    assert httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": ids}).json() == {
        "prompt": "This is a test prompt."}
    chat = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
    no_gen = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                                         "add_generation_prompt": False}).json()
    assert chat["count"] > no_gen["count"] > len(ids) * 0


# ---- test_metrics.py ------------------------------------------------------------------------

def _metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_counts(server, client):
    """vLLM: test_metrics.py::test_metrics_counts: after known requests, the request histograms count exactly
    those requests, their tokens and their parameters."""
    before = _metrics(server)
    prompt = [5] * 10
    num_requests, max_tokens, n = 3, 7, 2
    for _ in range(num_requests):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, n=n, temperature=1.0,
                                  extra_body={"ignore_eos": True})
    after = _metrics(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "request_params_max_tokens", "request_params_n"):
        assert delta(f"pagellm:{hist}_count") == num_requests, hist
    assert delta("pagellm:request_prompt_tokens_sum") == num_requests * len(prompt)
    assert delta("pagellm:request_generation_tokens_sum") == num_requests * n * max_tokens
    assert delta("pagellm:request_params_max_tokens_sum") == num_requests * max_tokens
    assert delta("pagellm:request_params_n_sum") == num_requests * n
    assert delta('pagellm:request_success_total{finished_reason="length"}') == num_requests * n
    assert delta("pagellm:time_per_output_token_seconds_count") == num_requests
    assert delta("pagellm:request_decode_time_seconds_sum") > 0


def test_abort_metrics_reset(server):
    """vLLM: test_metrics.py::test_abort_metrics_reset: after aborted streams, nothing runs or waits and every
    KV block is free; the aborts are counted."""
    before = _metrics(server).get('pagellm:request_success_total{finished_reason="abort"}', 0.0)

    async def abandon():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
        streams = [await c.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=400, stream=True,
                                              extra_body={"ignore_eos": True}) for _ in range(4)]
        for s in streams:
            await s.__anext__()
        for s in streams:
            await s.close()

    asyncio.run(abandon())
    assert server.wait_pool_free(timeout=10)
    m = _metrics(server)
    assert m["pagellm:num_requests_running"] == 0 and m["pagellm:num_requests_waiting"] == 0
    assert m['pagellm:request_success_total{finished_reason="abort"}'] - before == 4
