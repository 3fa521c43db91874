"""Tool calling on chat completions: constraints for forced calls, parsers for free ones.

    tool_choice "none"                 the model writes text (the template still sees the tools)
    tool_choice "auto"                 free text; a parser (--tool-call-parser, with --enable-auto-tool-choice)
                                       finds calls in it: Hermes' <tool_call>{"name", "arguments"}</tool_call>,
                                       harmony messages to functions.NAME (GPT-OSS, "openai"), Qwen3-Coder's and
                                       Qwen3.5's <function=NAME><parameter=P>...</parameter></function>
                                       ("qwen3_coder"), Llama 3's JSON objects ("llama3_json"), Mistral's
                                       [TOOL_CALLS] ("mistral") or Python call lists ("pythonic": Llama 3.2 / 4)
    tool_choice "required"             the output is constrained to a JSON array of calls,
                                       [{"name": <one of the tools>, "parameters": {<its schema>}}, ...]
                                       (one call unless parallel_tool_calls): a valid call by construction
    tool_choice {"function": {"name"}} the output is constrained to that function's parameters schema

A response with calls carries them in message.tool_calls (arguments as JSON text, ids
"chatcmpl-tool-...") and finish_reason "tool_calls". Streaming sends them as OpenAI's tool-call
deltas as they are generated: a call's index, id and name first, then its arguments piece by piece
(CallScanner finds where a call's arguments begin and end in the text).
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


class ToolParser:
    """What every parser has: whether its tags are special tokens the reply must keep, and its form for one request
    (a parser that reads the request's tools returns a bound copy)."""

    keep_special_tokens = False

    def for_request(self, req: ChatCompletionRequest) -> ToolParser:
        return self


class HermesToolParser(ToolParser):
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


class HarmonyToolParser(ToolParser):
    """OpenAI's harmony format (GPT-OSS; vLLM's `openai` parser). The reply is a run of messages,

        [<|start|>assistant[ to=RECIPIENT]]<|channel|>CHANNEL[ to=RECIPIENT][ json][<|constrain|>json]<|message|>BODY
        then <|end|>, <|call|> (a tool call's end: a stop token, so absent from the text) or <|return|>

    A message to `functions.NAME` is a call of NAME with BODY as its arguments; the bodies of `final` messages and of
    `commentary` ones without a recipient (preambles) are the content; `analysis` messages are the thinking (taken by
    --reasoning-parser openai_gptoss, else dropped). Text before any header (the answer after the reasoning parser
    dropped its header, or a reply without tags) is content. The tags are special tokens, kept in the text for this
    parser (keep_special_tokens)."""

    keep_special_tokens = True
    _HEADER = re.compile(r"(?:<\|start\|>(?P<role>[^<]*))?<\|channel\|>(?P<head>[^<]*)(?:<\|constrain\|>[^<]*)?"
                         r"<\|message\|>")
    _END = re.compile(r"<\|end\|>|<\|call\|>|<\|return\|>|(?=<\|start\|>)|(?=<\|channel\|>)")
    _TO = re.compile(r"\bto=(\S+)")

    def messages(self, text: str, final: bool = True) -> list[tuple[str | None, str | None, str, bool]]:
        """(channel, recipient, body, closed) per message; text before the first header is (None, None, text,
        True). Not final: a body stops before a tag still arriving, and an unfinished header is not a body."""
        out, pos = [], 0
        while True:
            m = self._HEADER.search(text, pos)
            lead = text[pos:m.start() if m else len(text)]
            if pos == 0 and lead:  # up to a header that has not arrived whole (never a body)
                cut = min((i for i in (lead.find("<|start|>"), lead.find("<|channel|>")) if i != -1), default=-1)
                lead = lead if cut == -1 else lead[:cut]
                out.append((None, None, lead if final else self._settled(lead), True))
            if m is None:
                return out
            head = m.group("head")
            to = self._TO.search(f"{m.group('role') or ''} {head}")
            end = self._END.search(text, m.end())
            body = text[m.end():end.start() if end else len(text)]
            if end is None and not final:
                body = self._settled(body)
            out.append((head.split()[0] if head.split() else "", to.group(1) if to else None, body, end is not None))
            if end is None:
                return out
            pos = end.end()

    @staticmethod
    def _settled(text: str) -> str:
        """text up to a tag that may still be arriving (a "<|" not yet closed by "|>", or a last "<")."""
        at = text.rfind("<|")
        text = text if at == -1 or "|>" in text[at:] else text[:at]
        return text[:safe_end(text, "<|")]

    def split(self, text: str, final: bool = True) -> tuple[str, list[ToolCall]]:
        """(content so far, calls): not final, only calls whose message has ended."""
        content, calls = [], []
        for channel, to, body, closed in self.messages(text, final):
            if to is not None and to.startswith("functions."):
                if closed or final:
                    calls.append(ToolCall(function=FunctionCall(name=to[len("functions."):], arguments=body.strip())))
            elif channel is None or channel == "final" or (channel == "commentary" and to is None):
                content.append(body)
        return "".join(content), calls

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls = self.split(text)
        content = content.strip() if calls else content
        return content or None, calls


class TailCallsParser(ToolParser):
    """Formats whose calls follow the content: the content is the text before the first call's marker (its trailing
    whitespace dropped when calls follow), the calls are read from the marker on (`_calls`), and text after them is
    dropped (vLLM's parsers of these formats do the same). Streaming (ToolStream, through `split`) sends the content
    as it settles and each call whole once complete. Calls that do not parse leave the whole text as content."""

    markers: tuple[str, ...] = ()

    def _start(self, text: str) -> int:
        found = [i for i in (text.find(m) for m in self.markers) if i != -1]
        return min(found, default=-1)

    def _calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        """The complete calls in `tail` (the text from the first marker); at the end, None when it is not calls."""
        raise NotImplementedError

    def split(self, text: str, final: bool = True) -> tuple[str, list[ToolCall]]:
        at = self._start(text)
        if at == -1:
            if final:
                return text, []
            return text[:min((safe_end(text, m) for m in self.markers), default=len(text))].rstrip(), []
        calls = self._calls(text[at:], final)
        if calls is None or (final and not calls):
            return (text, []) if final else (text[:at].rstrip(), [])
        return text[:at].rstrip(), calls

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls = self.split(text)
        return content or None, calls


def _call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(function=FunctionCall(name=name, arguments=text))


def _json_objects(text: str, final: bool, sep: str = ";") -> list[Any] | None:
    """The JSON values written one after another in `text` (whitespace or `sep` between them): those complete so
    far; at the end, None when anything else is there."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == sep):
            i += 1
        if i == len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None if final else out
        out.append(value)


class Qwen3CoderToolParser(TailCallsParser):
    """Qwen3-Coder and Qwen3.5 (vLLM's `qwen3_coder`): each call an XML-like block,

        <tool_call>
        <function=get_weather>
        <parameter=city>
        Paris
        </parameter>
        </function>
        </tool_call>

    Parameter values are text; each becomes the JSON type the tool's schema gives its parameter (integer, number,
    boolean, object, array; null as null), strings otherwise and for parameters the schema does not name."""

    markers = ("<tool_call>", "<function=")
    _FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
    _PARAM = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)

    def __init__(self, schemas: dict[str, dict] | None = None) -> None:
        self.schemas = schemas or {}  # function name -> its parameters' properties

    def for_request(self, req: ChatCompletionRequest) -> Qwen3CoderToolParser:
        return Qwen3CoderToolParser({t.function.name: (t.function.parameters or {}).get("properties") or {}
                                     for t in req.tools or []})

    def _calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        calls = []
        for m in self._FUNCTION.finditer(tail):
            name = m.group(1).strip()
            props = self.schemas.get(name, {})
            args = {}
            for p in self._PARAM.finditer(m.group(2)):
                key = p.group(1).strip()
                args[key] = self._value(p.group(2).removeprefix("\n").removesuffix("\n"), props.get(key))
            calls.append(_call(name, args))
        return calls

    @staticmethod
    def _value(text: str, schema: dict | None) -> Any:
        kind = (schema or {}).get("type", "string")
        kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
        if text.strip().lower() == "null":
            return None
        try:
            if kind == "integer":
                return int(text.strip())
            if kind == "number":
                v = float(text.strip())
                return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v
            if kind == "boolean":
                return {"true": True, "false": False}[text.strip().lower()]
            if kind in ("object", "array"):
                return json.loads(text)
        except (ValueError, KeyError):
            pass
        return text


class LeadingCallsParser(TailCallsParser):
    """Formats where a reply is either all calls (it starts with a marker) or all content."""

    def _start(self, text: str) -> int:
        stripped = text.lstrip()
        at = len(text) - len(stripped)
        return at if stripped.startswith(self.markers) else -1

    def split(self, text: str, final: bool = True) -> tuple[str, list[ToolCall]]:
        if not final and (not text.strip() or any(m.startswith(text.lstrip()) for m in self.markers)):
            return "", []  # whitespace so far, or a marker arriving: a call may still follow
        return super().split(text, final)


class Llama3JsonToolParser(LeadingCallsParser):
    """Llama 3.1 / 3.2 / 3.3's JSON calls (vLLM's `llama3_json`): a reply that starts with <|python_tag|> or "{" is
    a run of {"name": ..., "parameters": {...}} objects (";" between them); any other reply is content."""

    markers = ("<|python_tag|>", "{")

    def _calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        objs = _json_objects(tail.removeprefix("<|python_tag|>"), final)
        if objs is None:
            return None
        calls = []
        for o in objs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                return None if final else calls
            calls.append(_call(o["name"], o.get("parameters", o.get("arguments", {}))))
        return calls


class MistralToolParser(TailCallsParser):
    """Mistral's calls after the [TOOL_CALLS] token (vLLM's `mistral`): a JSON array of {"name", "arguments"}
    (tokenizers before v11), or NAME[ARGS]{...} after each [TOOL_CALLS] (v11 on; a [CALL_ID] part is skipped).
    [TOOL_CALLS] is a special token: kept in the text for this parser."""

    markers = ("[TOOL_CALLS]",)
    keep_special_tokens = True

    def _calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        calls = []
        for part in tail.split("[TOOL_CALLS]")[1:]:
            if part.lstrip().startswith("["):  # [{"name": ..., "arguments": {...}}, ...]
                arrays = _json_objects(part, final)
                if arrays is None or (final and len(arrays) != 1):
                    return None
                for o in [x for a in arrays if isinstance(a, list) for x in a]:
                    if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                        return None
                    calls.append(_call(o["name"], o.get("arguments", o.get("parameters", {}))))
                continue
            name, sep, args = part.partition("[ARGS]")
            if not sep:
                if final:
                    return None
                break
            objs = _json_objects(args, final)
            if objs is None or (final and len(objs) != 1):
                return None
            if objs:
                calls.append(_call(name.split("[CALL_ID]")[0].strip(), objs[0]))
        return calls


class PythonicToolParser(LeadingCallsParser):
    """Calls written as a Python list (vLLM's `pythonic`: Llama 3.2, Llama 4, ...):
    [get_weather(city="Paris"), get_time()] (between <|python_start|> and <|python_end|> for Llama 4). Keyword
    arguments whose values are Python literals; anything else is content."""

    markers = ("<|python_start|>", "[")

    def _calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        import ast

        body = tail.removeprefix("<|python_start|>").strip().removesuffix("<|python_end|>").strip()
        try:
            tree = ast.parse(body, mode="eval").body
        except SyntaxError:
            return None if final else []
        if not isinstance(tree, ast.List):
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            try:
                args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except ValueError:
                return None
            if None in args:  # **kwargs
                return None
            calls.append(_call(node.func.id, args))
        return calls


TOOL_PARSER_CLASSES = {"hermes": HermesToolParser, "openai": HarmonyToolParser,
                       "qwen3_coder": Qwen3CoderToolParser, "llama3_json": Llama3JsonToolParser,
                       "mistral": MistralToolParser, "pythonic": PythonicToolParser}
TOOL_PARSERS = tuple(TOOL_PARSER_CLASSES)  # --tool-call-parser's choices


def make_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSER_CLASSES:
        raise ValueError(f"--tool-call-parser must be one of {TOOL_PARSERS}, got {name!r}")
    return TOOL_PARSER_CLASSES[name]()


class CallScanner:
    """One call object {"name": "...", "arguments" | "parameters": VALUE, ...} read as it is generated: the name once
    its string is closed (and the arguments key follows it), then the value's text as it arrives, up to where the
    value ends (found by tracking strings and brackets, so no closing brace is ever sent as an argument).

        '{"name": "get_weather", "arguments": {"city": "Par'   -> name get_weather; arguments so far '{"city": "Par'
    """

    HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')

    def __init__(self) -> None:
        self.name: str | None = None
        self.value_start = -1  # where the value begins in the object's text
        self.scanned = 0  # value characters scanned (and so known to belong to it)
        self.sent = 0  # value characters sent
        self.depth = 0
        self.in_string = self.escaped = False
        self.done = False  # the value ended at value_start + scanned
        self.failed = False  # not this shape (e.g. arguments before name): read it whole at the end

    def feed(self, body: str) -> tuple[bool, str]:
        """`body`: the object's text so far. Returns (the name just became known, new argument text)."""
        new_name = False
        if self.name is None:
            m = self.HEAD.match(body)
            if m is None:
                probe = re.sub(r"\s+", "", body)  # can more text still make it name-first?
                self.failed = not ('{"name":"'.startswith(probe) or probe.startswith('{"name":"'))
                return False, ""
            self.name, self.value_start, new_name = json.loads(f'"{m.group(1)}"'), m.end(), True
        if self.scanned == 0:  # the value starts at its first non-space character
            while self.value_start < len(body) and body[self.value_start].isspace():
                self.value_start += 1
        value = body[self.value_start:]
        i = self.scanned
        while i < len(value) and not self.done:
            ch = value[i]
            if value[0] not in "{[\"":  # a bare number or literal: it ends before , } ] or a space
                if ch in ",}] \n\t\r":
                    self.done = True
                    break
            elif self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    self.done = self.depth == 0  # a string value ends with its quote
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
            i += 1
        self.scanned = i
        piece, self.sent = value[self.sent:self.scanned], self.scanned
        return new_name, piece


@dataclass
class ToolStream:
    """Turns one choice's streamed text into content deltas and tool-call deltas, OpenAI's way: a call's first
    delta carries its index, id, type and name, the next ones pieces of its arguments (in order, they add up to
    the arguments' JSON text). Named calls stream from the first token; "required" and "auto" calls from the
    moment their name is complete. A call whose text does not read name-first is sent whole once complete."""

    mode: str  # "named" | "required" | "auto"
    name: str | None = None  # the named function
    parser: ToolParser | None = None  # (make_parser), bound to the request
    text: str = ""  # everything generated so far
    sent_content: int = 0  # chars of text already sent as content (auto)
    started: bool = False  # named: the first delta (id, name) has been sent
    calls: list[ToolCall] = field(default_factory=list)  # calls begun, in order (arguments as streamed)
    block: int = -1  # auto: where the current <tool_call> body starts; required: the current item's "{"
    scanner: CallScanner | None = None
    done_to: int = 0  # required: text consumed by finished items
    held: str = ""  # auto: trailing whitespace of the content so far, sent once text follows it (else dropped)
    content_sent: bool = False  # auto: some content has been sent

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
                self.calls[0].function.arguments += piece
                deltas.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=piece)))
            return None, deltas
        if self.mode == "required":
            return None, self._scan_required()
        if hasattr(self.parser, "split"):  # harmony and the formats whose calls are sent whole
            return self._scan_harmony()
        return self._scan_auto()

    def _step(self, body: str) -> list[DeltaToolCall]:
        """Deltas for the current call's object text."""
        sc = self.scanner
        new_name, args = sc.feed(body)
        out = []
        if new_name:
            call = ToolCall(function=FunctionCall(name=sc.name, arguments=""))
            self.calls.append(call)
            out.append(DeltaToolCall(index=len(self.calls) - 1, id=call.id, type="function",
                                     function=DeltaFunctionCall(name=sc.name, arguments="")))
        if args:
            self.calls[-1].function.arguments += args
            out.append(DeltaToolCall(index=len(self.calls) - 1, function=DeltaFunctionCall(arguments=args)))
        return out

    def _whole(self, name: str, arguments: str) -> list[DeltaToolCall]:
        call = ToolCall(function=FunctionCall(name=name, arguments=arguments))
        self.calls.append(call)
        return [DeltaToolCall(index=len(self.calls) - 1, id=call.id, type="function",
                              function=DeltaFunctionCall(name=name, arguments=arguments))]

    def _scan_auto(self) -> tuple[str | None, list[DeltaToolCall]]:
        start, end = HermesToolParser.START, HermesToolParser.END
        content, deltas = [], []
        while True:
            if self.block < 0:
                at = self.text.find(start, self.sent_content)
                stop = at if at != -1 else safe_end(self.text, start)  # content up to the next call's tag
                if stop > self.sent_content:
                    content.append(self._content(self.text[self.sent_content:stop]))
                    self.sent_content = stop
                if at == -1:
                    break
                self.block, self.scanner = at + len(start), CallScanner()
            close = self.text.find(end, self.block)
            body = self.text[self.block:close if close != -1 else len(self.text)]
            if not self.scanner.failed:
                deltas += self._step(body)
            if close == -1:
                break
            if self.scanner.name is None:  # not name-first: whole, if it parses (else it is content)
                _, calls = self.parser.parse(start + body + end)
                if calls:
                    deltas += self._whole(calls[0].function.name, calls[0].function.arguments)
                else:  # not a call: content, as the non-streaming reply keeps it
                    content.append(self._content(self.text[self.sent_content:close + len(end)]))
            self.sent_content, self.block, self.scanner = close + len(end), -1, None
        return ("".join(content) or None), deltas

    def _scan_harmony(self, final: bool = False) -> tuple[str | None, list[DeltaToolCall]]:
        """A parser with `split` (harmony, TailCallsParser): content as it settles, each call whole once complete."""
        content, calls = self.parser.split(self.text, final)
        piece = content[self.sent_content:]
        self.sent_content = len(content)
        deltas = []
        for call in calls[len(self.calls):]:
            deltas += self._whole(call.function.name, call.function.arguments)
        return piece or None, deltas

    def _content(self, piece: str) -> str:
        """Content text to send now: whitespace at its end waits for what follows (the non-streaming reply strips
        the content's end when it has calls)."""
        text = self.held + piece
        if not self.content_sent and self.calls:  # the content's start, after a call: stripped too
            text = text.lstrip()
        sent = text.rstrip()
        self.held = text[len(sent):]
        self.content_sent = self.content_sent or bool(sent)
        return sent

    def _scan_required(self) -> list[DeltaToolCall]:
        """The constrained array [{"name": ..., "parameters": {...}}, ...]: item by item."""
        deltas = []
        while True:
            if self.block < 0:
                at = self.text.find("{", self.done_to)
                if at == -1:
                    return deltas
                self.block, self.scanner = at, CallScanner()
            sc = self.scanner
            deltas += self._step(self.text[self.block:])
            if not sc.done:
                return deltas
            close = self.text.find("}", self.block + sc.value_start + sc.scanned)  # the item's own brace
            if close == -1:
                return deltas
            self.done_to, self.block, self.scanner = close + 1, -1, None

    def finish(self) -> tuple[str | None, list[DeltaToolCall]]:
        """At the end of the choice: (content not sent yet, the tool-call deltas not sent yet). `calls` then holds
        every call, arguments as the non-streaming reply gives them."""
        if self.mode == "named":
            return None, []
        if self.mode == "auto" and hasattr(self.parser, "split"):
            return self._scan_harmony(final=True)  # the last call ends with the output (harmony: <|call|> stops it)
        if self.mode == "required":
            parsed = calls_from_required(self.text)
            content = None
        else:
            _, parsed = self.parser.parse(self.text)
            rest = self.text[self.sent_content:]  # after the last complete call (or all of it, without one)
            if self.block >= 0 and self.scanner.name is not None:  # a call cut short, streamed in part: not content
                rest = self.text[self.sent_content:self.block - len(HermesToolParser.START)]
            rest = self.held + rest
            if parsed or self.calls:
                rest = rest.strip() if not self.content_sent else rest.rstrip()
            content = rest or None
        if len(parsed) == len(self.calls):  # the same calls: keep the streamed ids
            for mine, theirs in zip(self.calls, parsed):
                theirs.id = mine.id
        self.calls = parsed
        return content, []


def template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages for the chat template: text content (content parts kept where they hold images), and the tool
    fields templates read (assistant tool_calls
    with arguments as objects, tool results with their tool_call_id)."""
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content if m.has_images() else m.text()}
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
