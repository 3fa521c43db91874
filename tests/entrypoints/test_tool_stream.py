"""Streamed tool calls (ToolStream): a call's index, id and name come as soon as its name is complete, then its
arguments piece by piece, whatever the text's chunking; the pieces add up to the arguments' JSON text."""

import json
import random

import pytest

from pagellm.entrypoints.openai.tool_calls import CallScanner, HermesToolParser, ToolStream

AUTO = ('Sure! <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"}\\" x", "n": [1, {"a": 2}]}}\n'
        '</tool_call>\n<tool_call>{"arguments": {"q": 1}, "name": "late"}</tool_call> done')
REQUIRED = '[{"name": "duel", "parameters": {"with": "Tybalt"}}, {"name": "flee", "parameters": {}}]'


def stream(mode, text, max_piece, seed=0):
    """Feed text in random pieces; returns (content, calls by index, the deltas' count before the text ended, ts)."""
    ts = ToolStream(mode, parser=HermesToolParser())
    rng = random.Random(seed)
    content, calls, events = [], {}, []
    i = 0
    while i < len(text):
        n = rng.randint(1, max_piece)
        c, deltas = ts.feed(text[i:i + n])
        i += n
        content.append(c or "")
        events += [(i, d) for d in deltas]
    rest, final = ts.finish()
    content.append(rest or "")
    events += [(len(text), d) for d in final]
    for _, d in events:
        e = calls.setdefault(d.index, {"id": None, "name": "", "arguments": "", "pieces": 0})
        e["id"] = e["id"] or d.id
        e["name"] += d.function.name or ""
        if d.function.arguments:
            e["arguments"] += d.function.arguments
            e["pieces"] += 1
    return "".join(content), calls, events, ts


@pytest.mark.parametrize("max_piece", [1, 2, 5, 13, 1000])
def test_auto_calls_stream_name_first_then_arguments(max_piece):
    content, calls, events, ts = stream("auto", AUTO, max_piece)
    assert content == "Sure! \n done" == HermesToolParser().parse(AUTO)[0]  # text between and after the calls
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": 'Paris "}" x', "n": [1, {"a": 2}]}), ("late", {"q": 1})]
    assert [c["id"] for c in calls.values()] == [c.id for c in ts.calls]  # the reply's calls keep the streamed ids
    assert [json.loads(c.function.arguments) for c in ts.calls] == [json.loads(c["arguments"]) for c in calls.values()]
    if max_piece < 10:  # the first call's name is out before its arguments end, its arguments in several pieces
        first_args_end = AUTO.index("}}") + 2
        assert events[0][0] < first_args_end and calls[0]["pieces"] > 1
    assert calls[1]["pieces"] == 1  # arguments before the name: sent whole once the call is complete


@pytest.mark.parametrize("max_piece", [1, 4, 1000])
def test_required_calls_stream_item_by_item(max_piece):
    content, calls, events, ts = stream("required", REQUIRED, max_piece)
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("duel", {"with": "Tybalt"}),
                                                                                  ("flee", {})]
    assert [c["id"] for c in calls.values()] == [c.id for c in ts.calls]
    if max_piece == 1:
        assert events[0][0] < REQUIRED.index("Tybalt") and calls[0]["pieces"] > 1


def test_text_without_calls_and_cut_short_calls():
    content, calls, _, ts = stream("auto", "Just words, <tool not a call.", 3)
    assert content == "Just words, <tool not a call." and not calls and not ts.calls
    cut = 'Hi <tool_call>{"name": "f", "arguments": {"a": "unfini'
    content, calls, _, ts = stream("auto", cut, 4)
    assert content == "Hi" and calls[0]["name"] == "f" and calls[0]["arguments"] == '{"a": "unfini'
    assert ts.calls == []  # no complete call: the reply's message has none (finish_reason stays "length")


@pytest.mark.parametrize("value, body_tail", [('"text"', "}"), ("12.5", " }"), ("true", "}"), ('{"k": [1, "]"]}', "}")])
def test_scanner_stops_where_the_value_ends(value, body_tail):
    sc = CallScanner()
    body = '{"name": "f", "arguments": ' + value + body_tail
    got = "".join(sc.feed(body[:i])[1] for i in range(1, len(body) + 1))
    assert sc.name == "f" and sc.done and got == value


@pytest.mark.parametrize("text", [
    'Sure! <tool_call>{"name": "a", "arguments": {}}</tool_call>\n\n<tool_call>{"name": "b", "arguments": {}}'
    '</tool_call> done',
    'Sure!  <tool_call>{"name": "a", "arguments": {}}</tool_call>\n',
    '<tool_call>{"arguments": {}, "name": "x"}</tool_call> then <tool_call>bad</tool_call> end  ',
    '<tool_call>{"name": "a", "arguments": {}}</tool_call>  \n ',
    'no calls  \n'])
def test_streamed_content_equals_the_whole_replys(text):
    """Text between and after calls (and blocks that are not calls) is content, whitespace inside it kept and its
    ends stripped when there are calls, as the non-streaming reply has it, however the text is chunked."""
    ref, _ = HermesToolParser().parse(text)
    for seed in range(20):
        content, _, _, _ = stream("auto", text, 7, seed)
        assert (content or None) == ref


# GPT-OSS's harmony format (--tool-call-parser openai): a preamble, a call with <|constrain|>, a call whose recipient
# sits in the role, and the last call cut by its <|call|> stop token (absent from the text)
HARMONY = ('<|start|>assistant<|channel|>commentary<|message|>Let me look, a<b.<|end|>'
           '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
           '{"city": "Paris"}<|call|>'
           '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{"tz": "CET"}')


def test_harmony_messages_to_functions_are_calls_and_the_rest_is_content():
    from pagellm.entrypoints.openai.tool_calls import make_parser

    parser = make_parser("openai")
    content, calls = parser.parse(HARMONY)
    assert content == "Let me look, a<b."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert parser.parse("<|channel|>final<|message|>It is sunny.") == ("It is sunny.", [])
    assert parser.parse("It is sunny.") == ("It is sunny.", [])  # the final header already dropped
    analysis = "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>Done."
    assert parser.parse(analysis) == ("Done.", [])  # thinking is never content
    assert parser.parse("<|start|>assistant<|channel|>comm") == (None, [])  # cut inside a header


@pytest.mark.parametrize("seed", range(6))
def test_harmony_streams_content_as_it_comes_and_each_call_once_ended(seed):
    from pagellm.entrypoints.openai.tool_calls import HarmonyToolParser

    rng = random.Random(seed)
    ts = ToolStream("auto", parser=HarmonyToolParser())
    content, calls, i = "", [], 0
    while i < len(HARMONY):
        n = rng.randint(1, 9)
        c, deltas = ts.feed(HARMONY[i:i + n])
        i += n
        content += c or ""
        assert "Let me look, a<b.".startswith(content)  # no tag text ever leaks into the content
        calls += deltas
        if deltas and deltas[0].function.name == "get_weather":
            assert i > HARMONY.index("<|call|>")  # sent once its message ended
    rest, final = ts.finish()
    content += rest or ""
    calls += final
    assert content == "Let me look, a<b."
    assert [(d.index, d.function.name, d.function.arguments) for d in calls] == [
        (0, "get_weather", '{"city": "Paris"}'), (1, "get_time", '{"tz": "CET"}')]
    assert [c.id for c in ts.calls] == [d.id for d in calls]  # the reply's calls keep the streamed ids


def test_harmony_reply_through_the_reasoning_parser_splits_thinking_calls_and_content():
    """--reasoning-parser openai_gptoss then --tool-call-parser openai: the analysis is the reasoning, the call is
    a tool call, the preamble the content; streamed at every cut, the same."""
    from types import SimpleNamespace

    from pagellm.entrypoints.openai.protocol import ChatCompletionRequest
    from pagellm.entrypoints.openai.reasoning import PARSERS
    from pagellm.entrypoints.openai.serving_chat import choice_message
    from pagellm.entrypoints.openai.tool_calls import make_parser

    gptoss = PARSERS["openai_gptoss"]
    state = SimpleNamespace(tool_parser=make_parser("openai"), reasoning_parser=gptoss)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "weather?"}],
                                tools=[{"type": "function", "function": {"name": "get_weather"}}], tool_choice="auto")
    text = "<|channel|>analysis<|message|>Need the tool.<|end|>" + HARMONY
    msg, reason = choice_message(state, req, "auto", text, "stop", gptoss.stream(""))
    assert msg.reasoning == "Need the tool." and msg.content == "Let me look, a<b."
    assert [c.function.name for c in msg.tool_calls] == ["get_weather", "get_time"] and reason == "tool_calls"
    for cut in range(1, len(text)):
        thinking, ts = gptoss.stream(""), ToolStream("auto", parser=state.tool_parser)
        reasoning, content, names = "", "", []
        for piece, final in ((text[:cut], False), (text[cut:], True)):
            r, c = thinking.feed(piece, final=final)
            got, deltas = ts.feed(c)
            reasoning, content, names = reasoning + r, content + (got or ""), names + [d.function.name for d in deltas]
        rest, deltas = ts.finish()
        content, names = content + (rest or ""), names + [d.function.name for d in deltas]
        assert (reasoning, content, names) == ("Need the tool.", "Let me look, a<b.", ["get_weather", "get_time"])
