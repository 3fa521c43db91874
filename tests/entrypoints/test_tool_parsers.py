"""The tool-call formats whose calls follow the content (qwen3_coder, llama3_json, mistral, pythonic): the calls and
the content of a whole reply, the same from a stream cut into random pieces (content as it settles, each call whole
once complete), replies that are not calls left as content; and one format end to end through the server."""

from __future__ import annotations

import json
import random
import re

import httpx
import pytest

from pagellm.entrypoints.openai.protocol import ChatCompletionRequest
from pagellm.entrypoints.openai.tool_calls import ToolStream, make_parser
from tests.entrypoints.server_utils import RemoteServer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "hours": {"type": "array"}, "ratio": {"type": "number"}, "note": {"type": ["string", "null"]}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]

QWEN = ("Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco, CA\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n<parameter=hours>\n[9, 12]\n"
        "</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n<parameter=note>\nnull\n</parameter>\n"
        "<parameter=unknown>\n42\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n"
        "</function>\n</tool_call>")
QWEN_CALLS = [("get_weather", {"city": "San Francisco, CA", "days": 3, "metric": True, "hours": [9, 12],
                               "ratio": 0.5, "note": None, "unknown": "42"}), ("get_time", {})]
LLAMA = ' <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; ' \
        '{"name": "get_time", "parameters": {}}'
MISTRAL_OLD = 'On it.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, ' \
              '{"name": "get_time", "arguments": {}}]'
MISTRAL_V11 = 'On it.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}[TOOL_CALLS]get_time[CALL_ID]' \
              'a1b2c3d4e[ARGS]{}'
PYTHONIC = '[get_weather(city="Paris", days=2), get_time()]'
PYTHONIC_LLAMA4 = '<|python_start|>[get_weather(city="Paris", days=2), get_time()]<|python_end|>'
PARIS = [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]


def parser(name: str):
    p = make_parser(name)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS)
    return p.for_request(req)


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def streamed(name: str, text: str, max_piece: int, seed: int = 0):
    """(content, [(name, arguments)]) as the deltas of a stream cut into random pieces add up."""
    ts = ToolStream("auto", parser=parser(name))
    rng = random.Random(seed)
    content, calls, i = "", {}, 0
    pieces = []
    while i < len(text):
        n = rng.randint(1, max_piece)
        pieces.append(ts.feed(text[i:i + n]))
        i += n
    pieces.append(ts.finish())
    for c, deltas in pieces:
        content += c or ""
        for d in deltas:
            e = calls.setdefault(d.index, ["", ""])
            e[0] += d.function.name or ""
            e[1] += d.function.arguments or ""
    return content, [(n, json.loads(a)) for n, a in calls.values()], ts


@pytest.mark.parametrize("name,text,content,expected", [
    ("qwen3_coder", QWEN, "Let me check.", QWEN_CALLS),
    ("llama3_json", LLAMA, None, PARIS),
    ("mistral", MISTRAL_OLD, "On it.", PARIS),
    ("mistral", MISTRAL_V11, "On it.", PARIS),
    ("pythonic", PYTHONIC, None, PARIS),
    ("pythonic", PYTHONIC_LLAMA4, None, PARIS),
], ids=["qwen3_coder", "llama3_json", "mistral", "mistral-v11", "pythonic", "pythonic-llama4"])
@pytest.mark.parametrize("max_piece", [1, 3, 7, 1000])
def test_calls_and_content_whole_and_streamed(name, text, content, expected, max_piece):
    got_content, calls = parser(name).parse(text)
    assert got_content == content
    assert calls_of(calls) == expected
    s_content, s_calls, ts = streamed(name, text, max_piece, seed=max_piece)
    assert s_content == (content or "")
    assert s_calls == expected
    assert [c.function.name for c in ts.calls] == [n for n, _ in expected]


@pytest.mark.parametrize("name,text", [
    ("qwen3_coder", "Just text, <function no call here."),
    ("qwen3_coder", "Cut short <tool_call>\n<function=get_weather>\n<parameter=city>\nPar"),
    ("llama3_json", "The weather is {fine} today."),
    ("llama3_json", '{"answer": 42}'),
    ("llama3_json", '{"name": "get_time", "parameters": {}'),
    ("mistral", "No calls [TOOL_CALL] here."),
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]{\"city\": "),
    ("pythonic", "[1, 2, 3]"),
    ("pythonic", "[get_weather(city=open('x'))]"),
    ("pythonic", "Sure: [get_time()]"),
])
def test_replies_that_are_not_calls_stay_content(name, text):
    assert parser(name).parse(text) == (text, [])
    s_content, s_calls, _ = streamed(name, text, 3)
    assert (s_content, s_calls) == (text, [])


def test_qwen3_coder_values_follow_the_schema_or_stay_text():
    p = parser("qwen3_coder")
    block = "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=ratio>\n1e3\n" \
            "</parameter>\n<parameter=city>\n  Verona  \n</parameter>\n</function>\n</tool_call>"
    assert calls_of(p.parse(block)[1]) == [("get_weather", {"days": "three", "ratio": 1000.0, "city": "  Verona  "})]
    unbound = make_parser("qwen3_coder")  # no request: every value is text
    assert calls_of(unbound.parse(block)[1]) == [("get_weather", {"days": "three", "ratio": "1e3",
                                                                  "city": "  Verona  "})]


def test_mistral_keeps_its_special_token_in_the_text():
    assert make_parser("mistral").keep_special_tokens and not make_parser("qwen3_coder").keep_special_tokens


def test_qwen3_coder_calls_through_the_server():
    """`--tool-call-parser qwen3_coder` end to end: the demo model's reply is forced (a regex) to a call with an
    integer parameter; the reply and its stream carry it with the schema's types."""
    call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nVerona\n</parameter>\n<parameter=days>\n2\n" \
           "</parameter>\n</function>\n</tool_call>"
    forced = "Wait\\. " + re.escape(call)
    server = RemoteServer(["--num-gpu-blocks-override", "256", "--enable-auto-tool-choice",
                           "--tool-call-parser", "qwen3_coder"])
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS[:1], "max_tokens": 120,
            "guided_regex": forced}
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
        msg = r["choices"][0]["message"]
        assert r["choices"][0]["finish_reason"] == "tool_calls" and msg["content"] == "Wait."
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == \
            [("get_weather", {"city": "Verona", "days": 2})]
        content, args, names = "", "", []
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    for ch in json.loads(line[6:])["choices"]:
                        content += ch["delta"].get("content") or ""
                        for d in ch["delta"].get("tool_calls") or []:
                            names += [d["function"]["name"]] if d["function"].get("name") else []
                            args += d["function"].get("arguments") or ""
        assert content == "Wait." and names == ["get_weather"] and json.loads(args) == {"city": "Verona", "days": 2}
    finally:
        server.stop()
