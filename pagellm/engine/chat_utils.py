"""Chat conversations -> prompt token ids, through the tokenizer's (or a given) Jinja chat template.

Images in messages (OpenAI content parts {"type": "image_url", "image_url": {"url": ...}}, or vLLM's offline
{"type": "image_pil", "image_pil": PIL image}) are taken out by `split_media`: the template sees an {"type": "image"}
part in their place when it iterates over content parts (as llava-hf's templates do), else the content as a string
with the model's placeholder ("<image>") before the message's text (vLLM's "string" content format).
"""

from __future__ import annotations

import re
from typing import Any

from pagellm.sampling_params import ParamError

# Names the template already receives from the call itself; chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "conversation", "tools", "documents", "chat_template", "tokenize",
                                      "add_generation_prompt", "continue_final_message", "return_dict",
                                      "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs",
                                      "return_assistant_tokens_mask"})


def apply_chat_template(tokenizer: Any, conversation: list[dict[str, Any]], chat_template: str | None = None,
                        add_generation_prompt: bool = True, continue_final_message: bool = False,
                        tools: list[dict[str, Any]] | None = None,
                        template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of the rendered conversation (the template also receives `tools`, and `template_kwargs` as
    variables, e.g. enable_thinking). ParamError when no template exists (param 'messages') or a template
    variable would replace one of the call's own (param 'chat_template_kwargs')."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ParamError("the model's tokenizer has no chat template; pass one (chat_template=..., or the "
                         "server's --chat-template).", param="messages")
    clash = sorted(RESERVED_TEMPLATE_KWARGS & set(template_kwargs or {}))
    if clash:
        raise ParamError(f"chat_template_kwargs may not set {clash}: the request sets those itself.",
                         param="chat_template_kwargs")
    ids = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=True, tools=tools,
                                        add_generation_prompt=add_generation_prompt and not continue_final_message,
                                        continue_final_message=continue_final_message, **(template_kwargs or {}))
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


IMAGE_PARTS = ("image_url", "image_pil")
# A template that loops over a message's content parts ("for part in message['content']") renders them itself.
_ITERATES_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+(\[\s*['\"]content['\"]\s*\]|\.content)")


def content_format(template: str | None) -> str:
    """vLLM's chat-template content format: "openai" (the template reads content parts) or "string"."""
    return "openai" if template and _ITERATES_CONTENT.search(template) else "string"


def chat_prompt(tokenizer: Any, mm: Any, conversation: list[dict[str, Any]], chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                mm_processor_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine prompt of a conversation: token ids by the chat template, and the images its messages hold
    (`mm`: the engine's MultiModalProcessor, None for a text-only model) with `mm_processor_kwargs` for them."""
    conv, images = split_media(conversation, mm, chat_template or getattr(tokenizer, "chat_template", None))
    prompt: dict[str, Any] = {"prompt_token_ids": apply_chat_template(
        tokenizer, conv, chat_template, add_generation_prompt, continue_final_message, tools, template_kwargs)}
    if images:
        prompt["multi_modal_data"] = {"image": images}
        if mm_processor_kwargs is not None:
            prompt["mm_processor_kwargs"] = mm_processor_kwargs
    return prompt


def split_media(conversation: list[dict[str, Any]], mm: Any,
                template: str | None) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages for the template, the images in order, each loaded by `mm.load`). `mm` None: the model takes text
    only, and an image part is a ParamError (param 'messages')."""
    fmt = content_format(template)
    images: list[Any] = []
    out = []
    for m in conversation:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS
                                                    for p in content):
            out.append(m)
            continue
        if mm is None:
            raise ParamError("this model takes text only: a message's content may not hold images.",
                             param="messages")
        parts, texts = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
                texts.append(part.get("text", ""))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ParamError("an image_url content part needs image_url.url, a string.", param="messages")
                images.append(mm.load(url))
                parts.append({"type": "image"})
            elif kind == "image_pil":
                images.append(mm.load(part.get("image_pil")))
                parts.append({"type": "image"})
            else:
                raise ParamError(f"unsupported content part type {kind!r}: text, image_url and image_pil are "
                                 "taken.", param="messages")
        n = sum(p["type"] == "image" for p in parts)
        text = parts if fmt == "openai" else "".join(f"{mm.placeholder}\n" for _ in range(n)) + "".join(texts)
        out.append({**m, "content": text})
    return out, images
