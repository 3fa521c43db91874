"""Images through `pagellm serve` with the official openai client: image_url parts (data: and http:// URLs) in chat
completions, streamed and not, give the offline engine's tokens; bad image parts are a 400 naming the problem, and
the server keeps serving."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading

import httpx
import pytest
from multimodal_models import images

from pagellm import LLM, SamplingParams
from tests.entrypoints.server_utils import RemoteServer

IMGS = images(2)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(img)).decode()


@pytest.fixture(scope="module")
def server(vlm_models):
    s = RemoteServer([vlm_models["llava"], "--served-model-name", "llava", "--max-model-len", "256",
                      "--limit-mm-per-prompt", '{"image": 2}'])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def image_host(tmp_path_factory):
    """A loopback HTTP server holding IMGS[1] as /cat.png."""
    root = tmp_path_factory.mktemp("www")
    (root / "cat.png").write_bytes(_png(IMGS[1]))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _assert_served_like(client, model: str, msgs: list, ref) -> None:
    """The reply to msgs, streamed and not, is the offline engine's `ref` (12 greedy tokens, EOS ignored)."""
    kw = dict(model=model, messages=msgs, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
    resp = client.chat.completions.create(**kw)
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    stream = client.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.outputs[0].text


def _parts(url: str) -> list[dict]:
    return [{"type": "text", "text": "What is"}, {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": " in the picture?"}]


def test_chat_with_images_through_the_openai_client(server, vlm_models, image_host):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="x")
    llm = LLM(vlm_models["llava"], max_model_len=256)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for img, url in ((IMGS[0], _data_url(IMGS[0])), (IMGS[1], image_host + "/cat.png")):
        ref = llm.chat([{"role": "user", "content": _parts(_data_url(img))}], sp, use_tqdm=False)[0]
        _assert_served_like(client, "llava", [{"role": "user", "content": _parts(url)}], ref)
    # two images in one message, and one in each of two messages
    two = [{"role": "user", "content": _parts(_data_url(IMGS[0])) + _parts(_data_url(IMGS[1]))}]
    assert client.chat.completions.create(model="llava", messages=two, max_tokens=4).usage.prompt_tokens > 32


def test_responses_api_input_image(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="x")
    url = _data_url(IMGS[1])
    chat = client.chat.completions.create(model="llava", messages=[{"role": "user", "content": _parts(url)}],
                                          max_tokens=8, temperature=0.0)
    resp = client.responses.create(model="llava", max_output_tokens=8, temperature=0.0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is"},
                                     {"type": "input_image", "image_url": url},
                                     {"type": "input_text", "text": " in the picture?"}]}])
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens


def test_bad_image_parts_are_a_400(server, image_host):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="x")
    cases = [
        (_parts("data:image/png;base64," + base64.b64encode(b"not a png").decode()), "not an image"),
        (_parts(image_host + "/missing.png"), "cannot fetch the image"),
        (_parts("file:///etc/hostname"), "allowed-local-media-path"),
        (_parts("ftp://example/x.png"), "unsupported image URL"),
        (_parts(_data_url(IMGS[0])) * 3, "at most 2 image"),
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "unsupported content part"),
        ([{"type": "image_url", "image_url": "data:,"}], "image_url"),
    ]
    for content, match in cases:
        with pytest.raises(BadRequestError, match=match):
            client.chat.completions.create(model="llava", messages=[{"role": "user", "content": content}],
                                           max_tokens=2)
    ok = client.chat.completions.create(model="llava", max_tokens=2,
                                        messages=[{"role": "user", "content": _parts(_data_url(IMGS[0]))}])
    assert ok.choices[0].finish_reason == "length"
    metrics = httpx.get(server.url + "/metrics").text
    assert "pagellm:num_requests_running 0.0" in metrics


def test_images_on_a_text_model_are_a_400(tiny_models):
    from openai import BadRequestError, OpenAI

    s = RemoteServer([tiny_models["llama"], "--max-model-len", "128"])
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="x")
        with pytest.raises(BadRequestError, match="takes text only"):
            client.chat.completions.create(model=tiny_models["llama"], max_tokens=2,
                                           messages=[{"role": "user", "content": _parts(_data_url(IMGS[0]))}])
        text_parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]
        assert client.chat.completions.create(model=tiny_models["llama"], max_tokens=2,
                                              messages=[{"role": "user", "content": text_parts}]).choices
    finally:
        s.stop()


def test_qwen2_vl_chat_through_the_openai_client(vlm_models):
    """Qwen2-VL behind the server: its template writes the vision tokens, the image fills its own grid's positions,
    and the reply (streamed too) equals the offline engine's; mm_processor_kwargs reach the image processor."""
    import numpy as np
    from openai import BadRequestError, OpenAI
    from PIL import Image

    path = vlm_models["qwen2-vl"]
    s = RemoteServer([path, "--served-model-name", "qwen", "--max-model-len", "256"])
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="x")
        sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        for img in IMGS:
            msgs = [{"role": "user", "content": _parts(_data_url(img))}]
            _assert_served_like(client, "qwen", msgs, LLM(path, max_model_len=256).chat(msgs, sp, use_tqdm=False)[0])
        # the image processor's settings per request (vLLM's mm_processor_kwargs): more pixels, more positions
        photo = Image.fromarray(np.random.default_rng(5).integers(0, 256, (120, 160, 3), dtype=np.uint8))
        msgs = [{"role": "user", "content": _parts(_data_url(photo))}]
        sizes = [client.chat.completions.create(model="qwen", messages=msgs, max_tokens=1, extra_body=extra)
                 .usage.prompt_tokens for extra in ({}, {"mm_processor_kwargs": {"max_pixels": 112 * 112}})]
        assert sizes[0] < sizes[1]
        with pytest.raises(BadRequestError, match="mm_processor_kwargs"):
            client.chat.completions.create(model="qwen", messages=msgs, max_tokens=1,
                                           extra_body={"mm_processor_kwargs": {"no_such_setting": 1}})
    finally:
        s.stop()


@pytest.mark.parametrize("name", ["gemma3", "llava-next", "mistral3"])
def test_gemma3_llava_next_and_mistral3_chat_through_the_openai_client(vlm_models, name):
    """Gemma 3 (its template writes <start_of_image>, expanded around the soft tokens; images attend to themselves
    both ways), LLaVA-NeXT (anyres tiles) and Mistral 3 (grids of [IMG] rows) behind the server: replies, streamed
    too, equal the offline engine's."""
    from openai import OpenAI

    path = vlm_models[name]
    s = RemoteServer([path, "--served-model-name", name, "--max-model-len", "512"])
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="x")
        sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        llm = LLM(path, max_model_len=512)
        for img in IMGS[:2]:
            msgs = [{"role": "user", "content": _parts(_data_url(img))}]
            _assert_served_like(client, name, msgs, llm.chat(msgs, sp, use_tqdm=False)[0])
    finally:
        s.stop()
