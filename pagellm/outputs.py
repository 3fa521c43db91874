"""What generate() returns: RequestOutput with one CompletionOutput per returned sequence (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float  # log-probability of the token
    rank: int | None = None  # 1-based rank in the distribution
    decoded_token: str | None = None  # the token's text


SampleLogprobs = list[dict[int, Logprob]]  # one dict per generated position: token id -> Logprob
PromptLogprobs = list[dict[int, Logprob] | None]  # per prompt position; the first is None


@dataclass
class CompletionOutput:
    index: int  # which of the request's n outputs
    text: str  # generated text (a delta when output_kind is DELTA)
    token_ids: list[int]  # generated token ids (a delta when output_kind is DELTA)
    cumulative_logprob: float | None  # sum of the generated tokens' logprobs
    logprobs: SampleLogprobs | None = None  # per position, when SamplingParams.logprobs is set
    finish_reason: str | None = None  # "stop" | "length" | "abort", None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it; None for EOS

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the prompt text (None when given as token ids and not detokenized)
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first token, finish times (monotonic s)
    error: str | None = None  # set when the request failed inside the engine


@dataclass
class BeamSearchSequence:
    """One finished beam (vLLM's shape): tokens and text include the prompt."""

    tokens: list[int]  # prompt + generated token ids
    logprobs: SampleLogprobs | None  # per generated position, when asked for
    cum_logprob: float  # sum of the generated tokens' logprobs
    text: str | None  # decoded prompt + output (None without a tokenizer)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """`LLM.beam_search` result for one prompt: the beam_width best beams, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class PoolingOutput:
    data: Any  # torch.Tensor (float32): an embedding (hidden,), class probabilities (labels,), or per token (n, hidden)


@dataclass
class PoolingRequestOutput:
    """A pooling model's answer to one prompt (vLLM's shape); `LLM.embed` / `classify` / `score` return the
    typed views below."""

    request_id: str
    outputs: Any  # PoolingOutput, or EmbeddingOutput / ClassificationOutput / ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: str | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed inside the engine


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]  # one per class (softmax; a sigmoid score with one label)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float  # cosine similarity (embedding models) or the cross-encoder's score


EmbeddingRequestOutput = PoolingRequestOutput
ClassificationRequestOutput = PoolingRequestOutput
ScoringRequestOutput = PoolingRequestOutput
