"""Request and response bodies of the OpenAI API (and vLLM's extra sampling fields), as pydantic models.

Request fields are strictly typed, as the OpenAI API is: "0.5" is not a number, true is not 1,
and NaN or Infinity is no float. Text must be valid Unicode (a lone UTF-16 surrogate is a 400
naming the field). Unknown request fields are accepted and logged as ignored, as vLLM does:
clients written for other servers keep working.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pagellm.sampling_params import ParamError, SamplingParams, StructuredOutputsParams

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_STOP_STRINGS = 64  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 1024  # characters per stop string or bad word
MAX_BAD_WORDS = 256
MAX_TOKEN_ID_LIST = 4096  # stop_token_ids, allowed_token_ids, logit_bias entries
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range: [-100, 100]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _bad_unicode(value: Any, path: str) -> str | None:
    """The path of the first string in value that is not valid Unicode (a lone surrogate), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _bad_unicode(v, f"{path}.{i}")
            if bad:
                return bad
    if isinstance(value, dict):
        for k, v in value.items():
            bad = _bad_unicode(k, f"{path}.{k!r}") or _bad_unicode(v, f"{path}.{k}")
            if bad:
                return bad
    return None


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        bad = _bad_unicode(value, info.field_name)  # nested models check their own fields
        if bad:
            raise ValueError(f"{bad} is not valid Unicode text (it holds a lone UTF-16 surrogate)")
        return value

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries its choice's usage so far

    def continuous(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


class JsonSchemaFormat(OpenAIBaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # "schema" shadows a pydantic name
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    # structural_tag (vLLM's): xgrammar's format, or the older structures + triggers
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


class StructuredOutputsField(OpenAIBaseModel):
    """vLLM's `structured_outputs` request field: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None


class SamplingFields(OpenAIBaseModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    return_tokens_as_token_ids: bool | None = None  # logprobs tokens as "token_id:N" (default: the server's flag)
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_TOKEN_ID_LIST)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_ID_LIST)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_ID_LIST)
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    cache_salt: str | None = None
    # vLLM's: the prompt's and each choice's token ids in the reply (streams: the prompt's in a choice's first
    # chunk, each chunk's own new ids)
    return_token_ids: bool | None = None
    priority: int = 0  # vLLM's: with --scheduling-policy priority, lower values are served first
    use_beam_search: bool = False  # vLLM's: n beams (deterministic), scored by sum logprob / len ** length_penalty
    length_penalty: float = 1.0
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    vllm_xargs: dict[str, Any] | None = None  # vLLM's: SamplingParams.extra_args, for custom logits processors

    @field_validator("stop")
    @classmethod
    def _stop_lengths(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(v)}")
        for s in [v] if isinstance(v, str) else v or []:
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters, got {len(s)}")
        return v

    @field_validator("bad_words")
    @classmethod
    def _bad_word_lengths(cls, v):
        for s in v or []:
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each bad word must be at most {MAX_STOP_CHARS} characters, got {len(s)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_range(cls, v):
        for k, b in (v or {}).items():
            if not -LOGIT_BIAS_LIMIT <= b <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"bias for token {k} must be in [-100, 100], got {b}")
        return v

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """`defaults`: the model's generation-config defaults (SamplingParams names), for the fields the request
        leaves unset; their max_tokens caps the request's (a request without one is capped per prompt later)."""
        defaults = defaults or {}
        kw: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            v = getattr(self, name)
            if v is None:
                v = defaults.get(name)
            if v is not None:
                kw[name] = v
        cap = defaults.get("max_tokens")
        if cap is not None and max_tokens is not None:
            max_tokens = min(max_tokens, cap)
        return SamplingParams(
            n=self.n, best_of=self.best_of, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, max_tokens=max_tokens, min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=self.prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            truncate_prompt_tokens=self.truncate_prompt_tokens, structured_outputs=self.structured_spec(),
            extra_args=self.vllm_xargs, **kw)

    def structured_spec(self) -> StructuredOutputsParams | None:
        """The one output constraint this request asks for, from whichever field it used (400 if several)."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ParamError("response_format of type json_schema needs json_schema.schema.",
                                 param="response_format")
            found.append(("response_format", StructuredOutputsParams(json=rf.json_schema.schema_)))
        elif rf is not None and rf.type == "structural_tag":
            tag = {"type": "structural_tag", "format": rf.format} if rf.format is not None else \
                {"structures": rf.structures or [], "triggers": rf.triggers or []}
            found.append(("response_format", StructuredOutputsParams(structural_tag=json.dumps(tag))))
        so = self.structured_outputs
        if so is not None:
            found.append(("structured_outputs", StructuredOutputsParams(
                json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar, json_object=so.json_object,
                structural_tag=so.structural_tag)))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            v = getattr(self, name)
            if v is not None:
                found.append((name, StructuredOutputsParams(**{kind: v})))
        if len(found) > 1:
            raise ParamError(f"give one output constraint, not {len(found)}: {[n for n, _ in found]}.",
                             param=found[1][0])
        return found[0][1] if found else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    prompt_embeds: str | list[str] | None = None  # vLLM's: base64 of torch.save(tensor (tokens, hidden)), or a list
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None  # a string, or content parts (text; image_url: images)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _known_parts(cls, v):
        for part in v if isinstance(v, list) else ():
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string field 'text'")
            elif kind == "image_url":
                url = part.get("image_url")
                if not isinstance(url, dict) or not isinstance(url.get("url"), str):
                    raise ValueError("an image_url content part needs 'image_url': {'url': string}")
            else:
                raise ValueError(f"unsupported content part type {kind!r}: this server takes text and image_url "
                                 "parts")
        return v

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(p.get("type") == "image_url" for p in self.content)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p["text"] for p in self.content if p.get("type") == "text")


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ToolDefinition(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    include_reasoning: bool = True  # with --reasoning-parser: False drops the reasoning from the reply
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, e.g. {"enable_thinking": false}
    mm_processor_kwargs: dict[str, Any] | None = None  # multimodal models: the image processor's settings (vLLM's)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # OpenAI's; with --enable-prompt-tokens-details

    @classmethod
    def so_far(cls, prompt_tokens: int, completion_tokens: int) -> dict:
        """A chunk's usage (continuous_usage_stats): its choice's tokens so far."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens).model_dump(exclude_none=True)

    def add_prompt(self, num_tokens: int, num_cached: int, details: bool) -> None:
        self.prompt_tokens += num_tokens
        if details:
            self.prompt_tokens_details = self.prompt_tokens_details or PromptTokensDetails()
            self.prompt_tokens_details.cached_tokens += num_cached


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's shape for one candidate at one prompt position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobsList = list[dict[str, PromptLogprob] | None]  # per prompt position (token id -> entry); first None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobsList | None = None  # vLLM's extra field, when asked for
    prompt_token_ids: list[int] | None = None  # return_token_ids
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    # --reasoning-parser: the thinking, under vLLM's current name and its older one (DeepSeek's API's too)
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobsList | None = None  # vLLM's extra field, when asked for
    prompt_token_ids: list[int] | None = None  # return_token_ids


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids: this chunk's new ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: in each choice's first chunk


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagellm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str
    lora_int_id: int | None = None


class TokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- the Responses API (stateless) ------------------------------------------------------


class ResponsesRequest(OpenAIBaseModel):
    """OpenAI's POST /v1/responses body: what a stateless text server honours; vLLM's extra sampling fields
    (top_k, seed, repetition_penalty, ...) pass through to the chat handler."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_schema" | "json_object", ...}}
    metadata: dict[str, str] | None = None  # echoed back
    store: bool | None = None  # ignored: nothing is stored (the reply says store: false)
    previous_response_id: str | None = None  # refused: nothing is stored
    reasoning: dict[str, Any] | None = None  # accepted; the model thinks as its chat template makes it
    user: str | None = None
    truncation: str | None = None
    priority: int = 0


# ---- pooling models (runner pooling) ----------------------------------------------------

PoolingInput = str | list[str] | list[int] | list[list[int]]


class PoolingFields(OpenAIBaseModel):
    """What every pooling route takes besides its input (vLLM's extras)."""

    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens (-1: up to max_model_len)
    priority: int = 0


class EmbeddingRequest(PoolingFields):
    input: PoolingInput | None = None
    # vLLM's chat embeddings: a conversation through the chat template instead of `input`
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # Matryoshka models only
    normalize: bool | None = None  # vLLM's extra: L2-normalize (default: the model's pooler config, on)


class EmbeddingData(BaseModel):
    index: int
    object: str = "embedding"
    embedding: list[float] | str  # base64: little-endian float32 bytes


class PoolingUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class PoolingResponse(BaseModel):
    """What the embeddings, classify and score replies share (vLLM's shape); each adds its `data` list."""

    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: PoolingUsage


class EmbeddingResponse(PoolingResponse):
    data: list[EmbeddingData]


class PoolingRequest(PoolingFields):
    """vLLM's generic /pooling: the model's raw output per input, for any task it serves."""

    input: PoolingInput
    task: Literal["embed", "token_embed", "classify", "token_classify"] | None = None  # default: the model's task
    normalize: bool | None = None
    use_activation: bool | None = None


class PoolingData(BaseModel):
    index: int
    object: str = "pooling"
    data: list[Any]  # (hidden,) / (labels,), or one row per prompt token (token_embed, token_classify)


class PoolingResponseList(PoolingResponse):
    data: list[PoolingData]


class ClassificationRequest(PoolingFields):
    input: PoolingInput
    use_activation: bool | None = None  # softmax (sigmoid for one label); false: the raw logits


class ClassificationData(BaseModel):
    index: int
    label: str | None  # the most probable class's name (config.json's id2label)
    probs: list[float]
    num_classes: int


class ClassificationResponse(PoolingResponse):
    data: list[ClassificationData]


class ScoreRequest(PoolingFields):
    text_1: str | list[str]
    text_2: str | list[str]
    use_activation: bool | None = None


class ScoreData(BaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(PoolingResponse):
    data: list[ScoreData]


class RerankRequest(PoolingFields):
    query: str
    documents: list[str]
    top_n: int = 0  # the best top_n documents (0: all)
    use_activation: bool | None = None


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: PoolingUsage
    results: list[RerankResult]
