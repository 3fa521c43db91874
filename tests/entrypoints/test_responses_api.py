"""POST /v1/responses through the official openai client: the same text as /v1/chat/completions for the same
conversation, streamed as semantic events that add up to it, structured output, function tools, clear 400s."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import DEMO_MODEL
from tests.entrypoints.server_utils import RemoteServer


@pytest.fixture(scope="module")
def server():
    s = RemoteServer([DEMO_MODEL, "--served-model-name", "demo"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="x")


def chat_text(client, messages, max_tokens):
    r = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=max_tokens,
                                       temperature=0)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage


def test_text_equals_chat_completions(client):
    resp = client.responses.create(model="demo", input="Good morrow, sweet prince!", max_output_tokens=24,
                                   temperature=0, metadata={"k": "v"})
    text, reason, usage = chat_text(client, [{"role": "user", "content": "Good morrow, sweet prince!"}], 24)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.output_text == text
    assert resp.output[0].type == "message" and resp.output[0].content[0].type == "output_text"
    assert resp.usage.input_tokens == usage.prompt_tokens and resp.usage.output_tokens == usage.completion_tokens
    assert resp.status == ("incomplete" if reason == "length" else "completed") and resp.metadata == {"k": "v"}
    if reason == "length":
        assert resp.incomplete_details.reason == "max_output_tokens"
    conv = client.responses.create(
        model="demo", instructions="Speak as a king.", temperature=0, max_output_tokens=16,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Who goes there?"}]},
               {"role": "assistant", "content": [{"type": "output_text", "text": "A friend."}]},
               {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Thy name?"}])
    expected, _, _ = chat_text(client, [{"role": "system", "content": "Speak as a king."},
                                        {"role": "user", "content": "Who goes there?"},
                                        {"role": "assistant", "content": "A friend."},
                                        {"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Thy name?"}], 16)
    assert conv.output_text == expected


def test_streamed_events_add_up(client, server):
    kwargs = dict(model="demo", input="To be, or not to be", max_output_tokens=30, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete" if whole.status == "incomplete" else "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    with client.responses.stream(**kwargs) as stream:  # the client's own accumulator agrees
        assert stream.get_final_response().output_text == whole.output_text
    with httpx.stream("POST", server.url + "/v1/responses", json={**kwargs, "stream": True,
                                                                  "max_output_tokens": 400}) as r:
        next(r.iter_lines())  # leave after the first event: the request is aborted, its blocks freed
    assert server.wait_pool_free()


def test_structured_output_and_function_tools(client):
    schema = {"type": "object", "properties": {"name": {"enum": ["Hamlet", "Ophelia"]}, "alive": {"type": "boolean"}},
              "required": ["name", "alive"], "additionalProperties": False}
    resp = client.responses.create(model="demo", input="Describe Hamlet.", max_output_tokens=100,
                                   text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                    "strict": True}})
    obj = json.loads(resp.output_text)
    assert resp.status == "completed" and obj["name"] in ("Hamlet", "Ophelia") and isinstance(obj["alive"], bool)
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"enum": ["Verona", "Mantua"]}},
                           "required": ["city"], "additionalProperties": False}}
    call = client.responses.create(model="demo", input="Weather in Verona?", tools=[tool], max_output_tokens=100,
                                   tool_choice={"type": "function", "name": "get_weather"})
    item = next(o for o in call.output if o.type == "function_call")
    assert item.name == "get_weather" and "city" in json.loads(item.arguments) and item.call_id
    follow = client.responses.create(model="demo", tools=[tool], max_output_tokens=10, input=[
        {"role": "user", "content": "Weather in Verona?"},
        {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
        {"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}])
    assert follow.status in ("completed", "incomplete") and follow.output
    streamed = list(client.responses.create(model="demo", input="Weather in Verona?", tools=[tool], stream=True,
                                            max_output_tokens=100, tool_choice="required"))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert done and done[0].name == "get_weather" and "city" in json.loads(done[0].arguments)


def test_bad_requests(client, server):
    from openai import BadRequestError

    for kwargs, match in (
            ({"previous_response_id": "resp_1"}, "previous_response_id is not supported"),
            ({"tools": [{"type": "web_search"}]}, "tool type 'web_search' is not supported"),
            ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
             "takes text only"),
            ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
             "unsupported content part type 'input_file'"),
            ({"max_output_tokens": 100000}, "maximum context length")):
        with pytest.raises(BadRequestError, match=match):
            client.responses.create(**{"model": "demo", "input": "hi", **kwargs})
    r = httpx.post(server.url + "/v1/responses", json={"model": "nope", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
