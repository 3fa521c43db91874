"""Chat conversations -> prompt token ids, through the tokenizer's (or a given) Jinja chat template."""

from __future__ import annotations

from typing import Any

from pagellm.sampling_params import ParamError


def apply_chat_template(tokenizer: Any, conversation: list[dict[str, Any]], chat_template: str | None = None,
                        add_generation_prompt: bool = True, continue_final_message: bool = False,
                        tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the rendered conversation (the template also receives `tools`). ParamError (param 'messages')
    when no template exists."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ParamError("the model's tokenizer has no chat template; pass one (chat_template=..., or the "
                         "server's --chat-template).", param="messages")
    ids = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=True, tools=tools,
                                        add_generation_prompt=add_generation_prompt and not continue_final_message,
                                        continue_final_message=continue_final_message)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
