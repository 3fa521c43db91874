"""Request and sequence state owned by the scheduler.

A `Request` is what a user submitted: one prompt and one `SamplingParams`. It
owns one or more `Sequence`s: one for plain sampling, `best_of` after a
parallel-sampling request forks, `beam_width` for beam search. Every sequence
carries its own output tokens, its own `num_computed_tokens` and (in the KV
cache manager) its own block table; sequences of one request share KV blocks
until they write into them.

Pure Python: no torch import (tests/core check this).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagellm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: every status after RUNNING is a finished one."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()

    def is_finished(self) -> bool:
        return self > _PREEMPTED


_PREEMPTED = RequestStatus.PREEMPTED  # statuses above it are finished ones (a plain int comparison)


class FinishReason(str, enum.Enum):
    """The OpenAI `finish_reason` strings."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"

    def __str__(self) -> str:
        return self.value


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_IGNORED: FinishReason.LENGTH,
}


def finish_reason_of(status: RequestStatus) -> FinishReason | None:
    return _FINISH_REASONS.get(status)


_seq_counter = itertools.count()


class Sequence:
    """One generated continuation of a request's prompt.

    `token_ids` is the prompt followed by the output; `num_computed_tokens`
    counts the leading tokens whose K/V are in the cache, or will be once the
    steps already scheduled have run (it advances when a step is scheduled).
    The scheduler moves `num_computed_tokens` towards `num_tokens` each step:
    there is no separate prefill or decode state.
    """

    __slots__ = (
        "seq_id", "request", "index", "token_ids", "num_prompt_tokens", "num_computed_tokens",
        "status", "stop_reason", "cumulative_logprob", "num_cached_tokens", "seed",
        "in_worker", "num_synced_tokens", "num_output_placeholders",
    )

    def __init__(self, request: Request, index: int, token_ids: list[int], num_prompt_tokens: int,
                 seed: int) -> None:
        self.seq_id: int = next(_seq_counter)  # engine-unique, used by the worker and the KV manager
        self.request = request  # owning request
        self.index = index  # position among the request's outputs (CompletionOutput.index)
        self.token_ids = token_ids  # prompt + output tokens
        self.num_prompt_tokens = num_prompt_tokens
        self.num_computed_tokens = 0  # leading tokens whose K/V are in the cache
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None  # matched stop token id or stop string
        self.cumulative_logprob = 0.0  # sum of the chosen tokens' logprobs
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.seed = seed  # sampling seed of this sequence (request seed + index)
        self.in_worker = False  # the worker holds this sequence's state (sent as a diff, not in full)
        self.num_synced_tokens = 0  # tokens the worker has seen (the rest are sent with the next step)
        # Tokens being sampled by steps in flight (async scheduling): counted in what the next step computes,
        # not yet in token_ids.
        self.num_output_placeholders = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def is_finished(self) -> bool:
        return self.status > _PREEMPTED

    @property
    def finish_reason(self) -> FinishReason | None:
        return finish_reason_of(self.status)

    def append_token(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.name})")


@dataclass(eq=False)
class Request:
    """A user request: one prompt, one SamplingParams, one or more sequences."""

    request_id: str  # user-visible id, unique among live requests
    prompt_token_ids: list[int]  # the tokenized prompt
    sampling_params: SamplingParams  # validated parameters
    arrival_time: float  # time.monotonic() at add_request; FCFS order key
    prompt: str | None = None  # the prompt text, when the user gave text
    eos_token_ids: frozenset[int] = frozenset()  # tokens that end a sequence unless ignore_eos
    base_seed: int = 0  # sampling seed: params.seed, or drawn from the engine RNG at arrival
    cache_salt: str | None = None  # mixed into prefix-cache hashes (isolates tenants)
    priority: int = 0  # scheduling_policy "priority": lower values are served first
    lora_id: int = 0  # the LoRA adapter's lora_int_id (0: the base model)
    seqs: list[Sequence] = field(default_factory=list)  # live and finished sequences, by index
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0  # times this request was preempted (recomputed)
    first_scheduled_time: float | None = None  # time.monotonic() when first admitted to the running batch
    policy: Any = None  # the SequenceGroupPolicy deciding forks and what to do with sampled tokens
    pooling_params: Any = None  # PoolingParams: a pooling model's request (its prompt is pooled, nothing sampled)
    mm_features: list | None = None  # MultiModalFeature per image (multimodal models): positions and pixel values
    mm_rope: Any = None  # multimodal RoPE positions of the prompt (Qwen2-VL), for the worker

    @property
    def mm_end(self) -> int:
        """The prompt position after the last image's placeholders (0 without images)."""
        return self.mm_features[-1].end if self.mm_features else 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if s.status <= _PREEMPTED]

    def is_finished(self) -> bool:
        return self.status > _PREEMPTED

    def new_sequence(self, index: int, token_ids: list[int]) -> Sequence:
        # Sequence i samples with seed base_seed + i: output i of an n>1 request equals the output of a
        # separate request with seed + i.
        return Sequence(self, index, token_ids, self.num_prompt_tokens, self.base_seed + index)
