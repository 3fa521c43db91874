"""POST /v1/responses: OpenAI's Responses API, stateless, over the chat completions handler.

    ResponsesRequest -> ChatCompletionRequest (input items -> messages, instructions -> a system message,
    function tools, text.format -> response_format) -> create_chat_completion
        -> a Response object (reasoning, message and function_call output items), or
        -> semantic SSE events (response.created ... response.output_text.delta ... response.completed)

The server stores nothing: `previous_response_id` is a 400 (send the conversation in `input`), `store` is
ignored and reported as false. Only text and function tools: other content parts (images, files) and built-in
tools (web search, file search, ...) are a 400 naming them.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from pagellm.entrypoints.openai.protocol import ChatCompletionRequest, ChatCompletionResponse, ResponsesRequest
from pagellm.entrypoints.openai.serving_chat import create_chat_completion
from pagellm.entrypoints.openai.serving_common import APIError, ServingState, api_error_from, sse

_TEXT_PARTS = ("input_text", "output_text", "text")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content for the chat template: its text, or chat content parts when it holds images
    (input_image parts, with an image_url: a data: or http(s) URL)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts.", param="input")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise APIError(400, f"unsupported content part type {kind!r} in {where}: this server takes text "
                                "(input_text / output_text) and input_image (with an image_url) parts.",
                           param="input", code="unsupported_parameter")
    if any(p["type"] == "image_url" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages: instructions first, function calls as an assistant's tool_calls, their
    outputs as tool messages."""
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise APIError(400, f"input[{i}] must be an object.", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"input[{i}].role must be user, system, developer or assistant, got {role!r}.",
                               param="input")
            msgs.append({"role": "system" if role == "developer" else role,
                         "content": _text(item.get("content"), f"input[{i}]")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # an earlier reply's thinking: not sent to the template again
        else:
            raise APIError(400, f"input[{i}] has type {kind!r}: this server takes messages, function_call and "
                                "function_call_output items.", param="input", code="unsupported_parameter")
    return msgs


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    if req.previous_response_id is not None:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                            "whole conversation in input.", param="previous_response_id",
                       code="unsupported_parameter")
    body: dict[str, Any] = {"model": req.model, "messages": _messages(req), "stream": req.stream,
                            "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
                            "top_p": req.top_p}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if req.tools:
        tools = []
        for t in req.tools:
            if t.get("type") != "function":
                raise APIError(400, f"tool type {t.get('type')!r} is not supported (function tools only).",
                               param="tools", code="unsupported_parameter")
            tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                              "strict") if k in t}})
        body["tools"] = tools
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(400, "tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}.",
                           param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        body["tool_choice"] = choice
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    fmt = (req.text or {}).get("format") or {"type": "text"}
    if fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.get("type") != "text":
        raise APIError(400, f"text.format.type must be text, json_schema or json_object, got {fmt.get('type')!r}.",
                       param="text")
    extras = {k: v for k, v in (req.model_extra or {}).items() if k in ChatCompletionRequest.model_fields}
    try:
        return ChatCompletionRequest.model_validate({**extras, **{k: v for k, v in body.items() if v is not None}})
    except ValidationError as e:
        err = e.errors()[0]
        raise APIError(400, f"{'.'.join(map(str, err['loc']))}: {err['msg']}", param="input") from e


def _skeleton(req: ResponsesRequest, state: ServingState, rid: str, created: int) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created, "model": req.model or state.model_name,
            "status": "in_progress", "output": [], "error": None, "incomplete_details": None,
            "instructions": req.instructions, "metadata": req.metadata, "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "tools": req.tools or [],
            "tool_choice": req.tool_choice or "auto", "parallel_tool_calls": req.parallel_tool_calls is not False,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}}, "store": False,
            "truncation": "disabled", "previous_response_id": None, "reasoning": None, "usage": None}


def _reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": _id("rs"), "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": _id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": _id("fc"), "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def _finish(resp: dict[str, Any], finish_reason: str | None) -> None:
    if finish_reason == "length":
        resp["status"], resp["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
    else:
        resp["status"] = "completed"
    resp["completed_at"] = int(time.time())


async def create_response(state: ServingState, req: ResponsesRequest) -> dict | AsyncIterator[str]:
    chat = to_chat_request(req)
    result = await create_chat_completion(state, chat)  # every check (model, lengths, tools) happens here
    rid, created = _id("resp"), int(time.time())
    if req.stream:
        return _events(req, state, result, rid, created)
    assert isinstance(result, ChatCompletionResponse)
    resp = _skeleton(req, state, rid, created)
    choice = result.choices[0]
    msg = choice.message
    if getattr(msg, "reasoning_content", None):
        resp["output"].append(_reasoning_item(msg.reasoning_content))
    if msg.content:
        resp["output"].append(_message_item(msg.content))
    for call in msg.tool_calls or []:
        resp["output"].append(_call_item(call.id, call.function.name, call.function.arguments))
    u = result.usage
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details is not None else 0
    resp["usage"] = _usage(u.prompt_tokens, u.completion_tokens, cached)
    _finish(resp, choice.finish_reason)
    return resp


async def _events(req: ResponsesRequest, state: ServingState, chunks: AsyncIterator[str], rid: str,
                  created: int) -> AsyncIterator[str]:
    """The chat stream's chunks as the Responses API's semantic events (no [DONE] at the end)."""
    resp = _skeleton(req, state, rid, created)
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        return sse({"type": kind, "sequence_number": seq - 1, **fields})

    yield event("response.created", response=dict(resp))
    yield event("response.in_progress", response=dict(resp))
    open_item: dict[str, Any] | None = None  # the reasoning or message item receiving deltas
    calls: dict[int, dict[str, str]] = {}
    finish_reason, usage = None, None

    def close() -> list[str]:
        nonlocal open_item
        if open_item is None:
            return []
        item, idx, open_item = open_item, len(resp["output"]), None
        item["status"] = "completed"
        resp["output"].append(item)
        text = item["content"][0]["text"]
        if item["type"] == "reasoning":
            out = [event("response.reasoning_text.done", item_id=item["id"], output_index=idx, content_index=0,
                         text=text)]
        else:
            part = item["content"][0]
            out = [event("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                         text=text, logprobs=[]),
                   event("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                         part=part)]
        return out + [event("response.output_item.done", output_index=idx, item=item)]

    def delta(kind: str, text: str) -> list[str]:
        nonlocal open_item
        out: list[str] = []
        if open_item is not None and open_item["type"] != kind:
            out += close()
        idx = len(resp["output"])
        if open_item is None:
            open_item = _reasoning_item("", "in_progress") if kind == "reasoning" else _message_item("", "in_progress")
            shown = {**open_item, "content": []}
            out.append(event("response.output_item.added", output_index=idx, item=shown))
            if kind == "message":
                out.append(event("response.content_part.added", item_id=open_item["id"], output_index=idx,
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        open_item["content"][0]["text"] += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return out + [event(name, item_id=open_item["id"], output_index=idx, content_index=0, delta=text, **extra)]

    try:
        async for line in chunks:
            data = line.removeprefix("data: ").strip()
            if data == "[DONE]":
                break
            body = json.loads(data)
            if "error" in body:
                err = body["error"]
                yield event("error", code=err.get("code"), message=err.get("message"), param=err.get("param"))
                resp["status"], resp["error"] = "failed", {"code": err.get("code") or "server_error",
                                                           "message": err.get("message")}
                yield event("response.failed", response=resp)
                return
            if body.get("usage"):
                usage = body["usage"]
            for ch in body.get("choices", []):
                d = ch.get("delta") or {}
                if d.get("reasoning_content"):
                    for e in delta("reasoning", d["reasoning_content"]):
                        yield e
                if d.get("content"):
                    for e in delta("message", d["content"]):
                        yield e
                for tc in d.get("tool_calls") or []:
                    c = calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "arguments": ""})
                    c["id"] = tc.get("id") or c["id"]
                    fn = tc.get("function") or {}
                    c["name"] = fn.get("name") or c["name"]
                    c["arguments"] += fn.get("arguments") or ""
                if ch.get("finish_reason"):
                    finish_reason = ch["finish_reason"]
    except Exception as e:  # noqa: BLE001 - reported in the stream, as OpenAI does
        err = api_error_from(e)
        yield event("error", code=err.code, message=err.message, param=err.param)
        return
    finally:  # a client that left: the chat stream's engine request is aborted now, not when collected
        with contextlib.suppress(BaseException):
            await chunks.aclose()
    for e in close():
        yield e
    for _, c in sorted(calls.items()):
        idx = len(resp["output"])
        item = _call_item(c["id"], c["name"], "", "in_progress")
        yield event("response.output_item.added", output_index=idx, item=item)
        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=idx,
                    delta=c["arguments"])
        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                    arguments=c["arguments"], name=c["name"])
        item.update(arguments=c["arguments"], status="completed")
        resp["output"].append(item)
        yield event("response.output_item.done", output_index=idx, item=item)
    if usage is not None:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        resp["usage"] = _usage(usage["prompt_tokens"], usage["completion_tokens"], cached)
    _finish(resp, finish_reason)
    yield event("response.incomplete" if resp["status"] == "incomplete" else "response.completed", response=resp)
