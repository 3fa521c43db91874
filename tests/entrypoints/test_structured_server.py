"""Structured output and tool calling through the server, driven by the official `openai` client unchanged."""

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.entrypoints.server_utils import RemoteServer

MODEL = "demo"
# A template that shows the tools and renders tool calls and tool results, as instruct models' templates do.
TOOL_TEMPLATE = (
    "{% if tools %}<|system|>\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</call>{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Verona", "Mantua", "Padua"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"]}}}
DUEL = {"type": "function", "function": {"name": "duel", "parameters": {"type": "object", "properties": {
    "with": {"enum": ["Tybalt", "Paris"]}}, "required": ["with"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("tpl") / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    s = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "1024", "--max-n", "4",
                      "--chat-template", str(template), "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x")


class Verdict(pydantic.BaseModel):
    speaker: str = pydantic.Field(max_length=10)
    guilty: bool
    years: int = pydantic.Field(ge=0, le=20)


def test_response_format_json_schema_parses_with_the_openai_client(client):
    msgs = [{"role": "user", "content": "Judge him."}]
    for temperature in (0.0, 1.0):
        c = client.chat.completions.parse(model=MODEL, messages=msgs, response_format=Verdict, max_tokens=200,
                                          temperature=temperature, n=3, seed=1)
        for choice in c.choices:
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Verdict)


def test_json_object_and_vllm_fields_on_completions(client):
    schema = {"type": "object", "properties": {"line": {"type": "string", "maxLength": 20}}, "required": ["line"]}
    cases = [({"structured_outputs": {"json": schema}}, lambda t: jsonschema.validate(json.loads(t), schema)),
             ({"guided_json": schema}, lambda t: jsonschema.validate(json.loads(t), schema)),
             ({"guided_regex": "[A-Z]{4,6}\\."}, lambda t: re.fullmatch("[A-Z]{4,6}\\.", t) or pytest.fail(t)),
             ({"guided_choice": ["aye", "nay"]}, lambda t: t in ("aye", "nay") or pytest.fail(t)),
             ({"guided_grammar": 'root ::= "O " [A-Z] [a-z]+ "!"'},
              lambda t: re.fullmatch("O [A-Z][a-z]+!", t) or pytest.fail(t))]
    for extra, check in cases:
        c = client.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=120, temperature=0.9, n=2, seed=4,
                                      extra_body=extra)
        for choice in c.choices:
            assert choice.finish_reason == "stop"
            check(choice.text)


def test_streamed_structured_output_is_valid_too(client):
    chunks = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a house."}], max_tokens=40, stream=True,
        extra_body={"guided_choice": ["Montague", "Capulet"]})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text in ("Montague", "Capulet")


def test_a_schema_that_does_not_compile_is_a_400_with_the_compilers_message(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body={"guided_regex": "[a-"})
    body = e.value.body
    assert body["param"] == "structured_outputs" and body["code"] == "invalid_grammar"
    assert "Regex parsing error" in body["message"]
    with pytest.raises(openai.BadRequestError, match="give one output constraint"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"guided_regex": "a", "guided_choice": ["a"]})
    assert server.wait_pool_free()


def test_named_tool_choice_is_a_valid_call_by_construction(client):
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}],
                                       tools=[WEATHER, DUEL], max_tokens=100, n=2, temperature=1.0, seed=2,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in c.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_and_parallel_calls(server, client):
    # A +4 bias on "]" lets the small model close the array of calls soon (the grammar decides where it may).
    close = {str(httpx.post(server.url + "/tokenize", json={"prompt": "]"}).json()["tokens"][-1]): 4}
    for parallel in (True, False):
        c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Act."}],
                                           tools=[WEATHER, DUEL], tool_choice="required", max_tokens=400,
                                           parallel_tool_calls=parallel, temperature=0.8, seed=7, logit_bias=close)
        calls = c.choices[0].message.tool_calls
        assert c.choices[0].finish_reason == "tool_calls" and calls
        assert parallel or len(calls) == 1
        for call in calls:
            tool = {"get_weather": WEATHER, "duel": DUEL}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_call_deltas_stream_in_openais_shape(client):
    for choice in ({"type": "function", "function": {"name": "duel"}}, "required"):
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Fight!"}],
                                                tools=[DUEL], tool_choice=choice, max_tokens=400, stream=True)
        calls: dict[int, dict] = {}
        finish = None
        for chunk in stream:
            if not chunk.choices:
                continue
            for d in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or d.id
                entry["name"] += d.function.name or "" if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and calls
        for entry in calls.values():
            assert entry["id"] and entry["name"] == "duel"
            assert json.loads(entry["arguments"])["with"] in ("Tybalt", "Paris")


def test_auto_tool_choice_parses_hermes_calls_from_the_text(client):
    """The text is forced (a regex) to contain a Hermes call between words: the parser must find it."""
    call = '<tool_call>{"name": "duel", "arguments": {"with": "Tybalt"}}</tool_call>'
    forced = "Draw\\! " + re.escape(call) + " Now"
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Fight!"}],
                                       tools=[DUEL], tool_choice="auto", max_tokens=100,
                                       extra_body={"guided_regex": forced})
    msg = c.choices[0].message
    assert c.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls[0].function.name == "duel"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"with": "Tybalt"}
    assert msg.content == "Draw! \nNow" or msg.content.replace("\n", " ").split() == ["Draw!", "Now"]
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Fight!"}],
                                              tools=[DUEL], tool_choice="auto", max_tokens=100, stream=True,
                                              extra_body={"guided_regex": forced})
    content, names, args, pieces = "", [], "", 0
    for chunk in streamed:
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            for d in chunk.choices[0].delta.tool_calls or []:  # the name first, then the arguments in pieces
                names += [d.function.name] if d.function.name else []
                args += d.function.arguments or ""
                pieces += bool(d.function.arguments)
    assert names == ["duel"] and "<tool_call>" not in content and content.split() == ["Draw!", "Now"]
    assert json.loads(args) == {"with": "Tybalt"} and pieces > 1
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak."}],
                                           tools=[DUEL], tool_choice="auto", max_tokens=10, temperature=0)
    assert plain.choices[0].message.tool_calls == [] and plain.choices[0].message.content


def test_the_template_receives_tools_and_tool_messages(server):
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Verona", "days": 2}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}]
    ids = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"]
    ids_tools = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": messages, "tools": [WEATHER], "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '<call>get_weather{"city": "Verona", "days": 2}</call>' in text and "<|tool|>\nSunny" in text
    assert ids_tools > len(ids)  # the tool list is rendered too


def test_tool_choice_auto_needs_the_server_flag():
    s = RemoteServer(["--served-model-name", MODEL, "--num-gpu-blocks-override", "64"])
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "tools": [DUEL], "tool_choice": "auto"})
        assert r.status_code == 400 and "--enable-auto-tool-choice" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "tools": [DUEL], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] == []  # default: no parsing
    finally:
        s.stop()
