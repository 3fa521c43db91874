"""`pagellm serve --async-scheduling`: the engine core keeps a step in flight while it applies the previous one's
results; completions, streams with stop strings and disconnects behave as with one step at a time. The same again
with `--num-scheduler-steps 4` (multi-step rounds, which constrained requests turn off while they run)."""

import json

import httpx
import pytest

from tests.entrypoints.server_utils import RemoteServer
from tests.worker.test_cuda_graphs import DEMO

MODEL = "demo"


@pytest.fixture(scope="module", params=[[], ["--num-scheduler-steps", "4"]], ids=["one-step", "multi-step"])
def server(request):
    s = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "512", "--async-scheduling",
                      *request.param])
    s.mode = "multi-step" if request.param else "one-step"
    yield s
    s.stop()


def test_greedy_completions_equal_hf(server):
    from transformers import AutoTokenizer

    from tests.hf_reference import hf_greedy

    tok = AutoTokenizer.from_pretrained(DEMO)
    prompts = ["To be, or not to be", "My lord,", "Now is the winter"]
    r = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": prompts, "max_tokens": 12, "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    for p, text in zip(prompts, texts):
        tokens, _ = hf_greedy(DEMO, tok(p)["input_ids"], 12)
        assert text == tok.decode(tokens)


def test_stream_stops_at_the_stop_string_and_the_pool_is_freed(server):
    body = {"model": MODEL, "prompt": "ROMEO.", "max_tokens": 60, "temperature": 0, "stop": ["e"], "stream": True}
    chunks = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    assert chunks[-1]["finish_reason"] == "stop"
    assert "e" not in "".join(c["text"] for c in chunks)
    assert server.wait_pool_free(timeout=10)


def test_multi_step_rounds_show_in_the_metrics(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "ROMEO.", "max_tokens": 40,
                                                         "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    extra = server.metric("pagellm:engine_device_steps_total") - server.metric("pagellm:engine_steps_total")
    assert (extra > 10) if "multi" in server.mode else (extra == 0)


def test_disconnect_aborts_and_frees_the_pool(server):
    body = {"model": MODEL, "prompt": "ROMEO.", "max_tokens": 400, "n": 3, "temperature": 1.0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    assert server.wait_pool_free(timeout=10)


def test_constrained_completions_stay_in_their_language(server):
    """Grammar masks arrive after their step is launched (the token before is still in flight)."""
    import re

    bodies = [{"prompt": "ROMEO.", "structured_outputs": {"regex": "(thou|thee) art (a|an) [a-z]{3,9}\\."}},
              {"prompt": "Speak, ", "structured_outputs": {"choice": ["ROMEO", "JULIET", "TYBALT"]}}]
    for body in bodies:
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "max_tokens": 60, "temperature": 1.0,
                                                             "n": 3, "seed": 1, **body}, timeout=60)
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            spec = body["structured_outputs"]
            if "regex" in spec:
                assert re.fullmatch(spec["regex"], c["text"]), c["text"]
            else:
                assert c["text"] in spec["choice"]
    assert server.wait_pool_free(timeout=10)
