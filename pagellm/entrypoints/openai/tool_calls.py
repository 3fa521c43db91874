"""Tool calling on chat completions: constraints for forced calls, parsers for free ones.

    tool_choice "none"                 the model writes text (the template still sees the tools)
    tool_choice "auto"                 free text; a parser (--tool-call-parser, with --enable-auto-tool-choice)
                                       finds calls in it, e.g. Hermes' <tool_call>{"name", "arguments"}</tool_call>
    tool_choice "required"             the output is constrained to a JSON array of calls,
                                       [{"name": <one of the tools>, "parameters": {<its schema>}}, ...]
                                       (one call unless parallel_tool_calls): a valid call by construction
    tool_choice {"function": {"name"}} the output is constrained to that function's parameters schema

A response with calls carries them in message.tool_calls (arguments as JSON text, ids
"chatcmpl-tool-...") and finish_reason "tool_calls". Streaming sends them as OpenAI's tool-call
deltas: a named call's arguments stream as they are generated; "required" and "auto" calls are sent
whole when their text is complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pagellm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)
from pagellm.entrypoints.openai.reasoning import safe_end
from pagellm.sampling_params import ParamError, StructuredOutputsParams

TOOL_PARSERS = ("hermes",)


def tool_constraint(req: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The output constraint that tool_choice implies (None for none/auto or without tools)."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools or choice in (None, "none", "auto"):
        return None
    if isinstance(choice, NamedToolChoice):
        fn = next((t.function for t in tools if t.function.name == choice.function.name), None)
        if fn is None:
            raise ParamError(f"tool_choice names {choice.function.name!r}, which is not among the tools.",
                             param="tool_choice")
        return StructuredOutputsParams(json=fn.parameters or {"type": "object"})
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "parameters": t.function.parameters or {"type": "object"}},
              "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not req.parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def check_tool_request(req: ChatCompletionRequest, auto_enabled: bool) -> None:
    if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
        raise ParamError("tool_choice needs tools.", param="tool_choice")
    if req.tools and req.tool_choice == "auto" and not auto_enabled:
        raise ParamError('tool_choice "auto" needs the server to run with --enable-auto-tool-choice and '
                         "--tool-call-parser.", param="tool_choice")
    if req.tools and tool_constraint(req) is not None and req.structured_spec() is not None:
        raise ParamError("tool_choice required or a named function already constrains the output; drop "
                         "response_format / structured_outputs.", param="tool_choice")


def calls_from_required(text: str) -> list[ToolCall]:
    """The constrained JSON array of a "required" choice -> tool calls."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []  # cut short by max_tokens: no complete call
    return [ToolCall(function=FunctionCall(name=i["name"], arguments=json.dumps(i["parameters"], ensure_ascii=False)))
            for i in items]


class HermesToolParser:
    """Calls written as <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Hermes, Qwen2.5, ...)."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content outside the calls, or None; the calls). Blocks that are not valid JSON stay in the content."""
        calls, kept, last = [], [], 0
        for m in self._BLOCK.finditer(text):
            try:
                obj = json.loads(m.group(1))
                args = obj.get("arguments", obj.get("parameters", {}))
                text_args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                call = ToolCall(function=FunctionCall(name=obj["name"], arguments=text_args))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                continue
            kept.append(text[last:m.start()])
            last = m.end()
            calls.append(call)
        kept.append(text[last:])
        content = "".join(kept).strip() if calls else text
        return (content or None), calls


def make_parser(name: str) -> HermesToolParser:
    if name != "hermes":
        raise ValueError(f"--tool-call-parser must be one of {TOOL_PARSERS}, got {name!r}")
    return HermesToolParser()


@dataclass
class ToolStream:
    """Turns one choice's streamed text into content deltas and tool-call deltas."""

    mode: str  # "named" | "required" | "auto"
    name: str | None = None  # the named function
    parser: HermesToolParser | None = None
    text: str = ""  # everything generated so far
    sent_content: int = 0  # chars of text already sent as content (auto)
    started: bool = False  # named: the first delta (id, name) has been sent
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, piece: str) -> tuple[str | None, list[DeltaToolCall]]:
        """(content delta, tool-call deltas) for the new text."""
        self.text += piece
        if self.mode == "named":
            deltas = []
            if not self.started:
                self.started = True
                call = ToolCall(function=FunctionCall(name=self.name, arguments=""))
                self.calls.append(call)
                deltas.append(DeltaToolCall(index=0, id=call.id, type="function",
                                            function=DeltaFunctionCall(name=self.name, arguments="")))
            if piece:
                deltas.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=piece)))
            return None, deltas
        if self.mode == "auto":
            start = self.text.find(HermesToolParser.START, self.sent_content)
            # send content up to a call, holding back what could be the beginning of "<tool_call>"
            end = start if start != -1 else safe_end(self.text, HermesToolParser.START)
            if end > self.sent_content and (start == -1 or start >= self.sent_content):
                content, self.sent_content = self.text[self.sent_content:end], end
                return content, []
        return None, []

    def finish(self) -> tuple[str | None, list[DeltaToolCall]]:
        """At the end of the choice: (content not sent yet, the calls not streamed yet, whole)."""
        content = None
        if self.mode == "named":
            if self.calls:
                self.calls[0].function.arguments = self.text
            return None, []
        if self.mode == "required":
            self.calls = calls_from_required(self.text)
        else:
            _, self.calls = self.parser.parse(self.text)
            rest = self.text[self.sent_content:]
            if self.calls:  # what follows the last call
                rest = rest[rest.rfind(HermesToolParser.END) + len(HermesToolParser.END):].strip()
            content = rest or None
        return content, [DeltaToolCall(index=i, id=c.id, type="function",
                                       function=DeltaFunctionCall(name=c.function.name,
                                                                  arguments=c.function.arguments))
                         for i, c in enumerate(self.calls)]


def template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages for the chat template: text content, and the tool fields templates read (assistant tool_calls
    with arguments as objects, tool results with their tool_call_id)."""
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        extra = m.model_extra or {}
        thinking = extra.get("reasoning_content", extra.get("reasoning"))
        if isinstance(thinking, str):  # an earlier reply's thinking, sent back: templates read reasoning_content
            msg["reasoning_content"] = thinking
        if m.name is not None:
            msg["name"] = m.name
        if "tool_call_id" in extra:
            msg["tool_call_id"] = extra["tool_call_id"]
        if extra.get("tool_calls"):
            calls = []
            for c in extra["tool_calls"]:
                fn = dict(c.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**c, "function": fn})
            msg["tool_calls"] = calls
        out.append(msg)
    return out
