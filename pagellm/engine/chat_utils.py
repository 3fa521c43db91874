"""Chat conversations -> prompt token ids, through the tokenizer's (or a given) Jinja chat template."""

from __future__ import annotations

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
