"""The contract between the scheduler and the worker, one step at a time.

    Scheduler.schedule() -> SchedulerOutput -> ModelRunner.execute_model()
        -> ModelRunnerOutput -> Scheduler.update_from_output()

Sequences the worker has not seen (new, forked, resumed after preemption) are
sent in full (`NewSeqData`); sequences it holds are sent as diffs
(`CachedSeqData`). The worker samples a sequence when this step's tokens reach
the end of what is known (num_computed + num_scheduled == num_tokens).

Multi-step decode (`num_steps > 1`): every sequence of the step is decoding, and its n scheduled tokens are
computed one per device step, each step's input being the token sampled by the step before; the sequence
samples n tokens (`ModelRunnerOutput.samples` holds the first, `extra_samples` the others, in order).

Speculative decoding (`spec_token_ids`): a decoding sequence computes its last token and k draft tokens after
it, and samples at each of those k + 1 positions; it keeps the samples up to and including the first that
differs from the draft at its place (`samples` the first, `extra_samples` the accepted others), so a step
yields 1 to k + 1 tokens.

Pure Python: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagellm.sampling_params import SamplingParams


@dataclass
class NewSeqData:
    """A sequence the worker does not hold yet."""

    seq_id: int  # engine-unique sequence id
    req_id: str  # owning request (for logs)
    token_ids: list[int]  # every known token: prompt + output so far
    num_prompt_tokens: int  # the first num_prompt_tokens of token_ids are the prompt
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int  # tokens whose K/V are already cached (prefix hits)
    sampling_params: SamplingParams  # the request's parameters
    seed: int  # sampling seed of this sequence
    lora_id: int = 0  # the LoRA adapter it runs with (0: none)
    pooling_params: Any = None  # PoolingParams of a pooling model's request: pooled once its prompt is computed
    mm_features: list | None = None  # the request's images (MultiModalFeature), while some of their positions remain
    mm_rope: Any = None  # (a, b, (3, b - a) positions, delta): multimodal RoPE (Qwen2-VL) of a prompt with images
    state_checkpoint: int = -1  # recurrent layers: the checkpoint slot its state starts from (-1: zero state)
    state_parent: int = -1  # recurrent layers: a beam forked from this live sequence starts from a copy of its state


@dataclass
class CachedSeqData:
    """Diffs for sequences the worker holds (parallel lists, one entry per sequence)."""

    seq_ids: list[int] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)  # tokens appended since the last step
    table_starts: list[int] = field(default_factory=list)  # block_ids below replace the table from here on
    new_block_ids: list[list[int]] = field(default_factory=list)  # appended blocks and copy-on-write targets
    num_computed_tokens: list[int] = field(default_factory=list)  # before this step's tokens


@dataclass
class SchedulerOutput:
    """Everything the worker needs for one forward pass."""

    new_seqs: list[NewSeqData]  # sequences sent in full
    cached_seqs: CachedSeqData  # diffs for the others
    num_scheduled_tokens: dict[int, int]  # seq_id -> tokens to compute this step, in batch order
    total_num_scheduled_tokens: int  # sum of the above, <= max_num_batched_tokens (per device step of a round)
    blocks_to_copy: list[tuple[int, int]]  # (src, dst) copy-on-write, applied before the forward pass
    finished_seq_ids: set[int]  # sequences the worker must forget (finished, aborted, preempted, dropped)
    sampling_seq_ids: list[int] = field(default_factory=list)  # sequences whose chunk ends at their last token
    grammar_seq_ids: list[int] = field(default_factory=list)  # constrained sequences sampled this step
    grammar_bitmask: Any = None  # (len(grammar_seq_ids), ceil(vocab / 32)) int32 allowed-token bits, same order
    grammar_deferred: bool = False  # the bitmask comes later (finish_sampling): a constrained token is in flight
    num_steps: int = 1  # > 1: multi-step decode, each sequence's tokens computed one per device step
    # Speculative decoding: seq_id -> draft tokens scheduled after its last token (they are the last of its
    # num_scheduled_tokens); the step samples at the last token and at each draft.
    spec_token_ids: dict[int, list[int]] = field(default_factory=dict)
    # Recurrent layers under prefix caching: seq_id -> [(tokens of its chunk computed before the checkpoint,
    # slot)]; each layer copies the sequence's state into the slot at that point of the chunk.
    state_saves: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # Recurrent layers under speculative decoding, the last speculative step's verdicts (applied first, before the
    # step's finished sequences are dropped): seq_id -> j, the drafts it kept, fewer than it checked; its state goes
    # back to the one saved after its token j (0: the last known token, j: draft j).
    state_rewinds: dict[int, int] = field(default_factory=dict)
    # and with prefix caching, seq_id -> [(j, slot)]: checkpoints at boundaries within the drafts it kept, copied
    # from the state saved after its token j (-1: its own row, when it kept every draft).
    state_promotions: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0

    @property
    def has_work(self) -> bool:
        """Something for the worker to do, even with no token to compute."""
        return not self.is_empty or bool(self.finished_seq_ids or self.state_rewinds or self.state_promotions)


@dataclass(slots=True)
class SampleResult:
    """What the worker sampled for one sequence."""

    token_id: int  # the sampled token
    logprob: float  # its logprob (raw or processed per logprobs_mode)
    top_ids: list[int] | None = None  # top-k token ids (k = SamplingParams.logprobs), best first
    top_logprobs: list[float] | None = None  # their logprobs
    rank: int | None = None  # 1-based rank of the sampled token in the distribution


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens computed in one step's chunk, for positions start .. start+len-1."""

    start: int  # prompt position of the first entry (>= 1: position 0 has no logprob)
    token_logprobs: list[float]  # logprob of the actual prompt token
    ranks: list[int]  # its rank
    top_ids: list[list[int]]  # top-k ids per position
    top_logprobs: list[list[float]]  # top-k logprobs per position


@dataclass
class ModelRunnerOutput:
    """The worker's answer to one SchedulerOutput."""

    samples: dict[int, SampleResult] = field(default_factory=dict)  # seq_id -> sampled token
    extra_samples: dict[int, list[SampleResult]] = field(default_factory=dict)  # multi-step: the later tokens
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)  # seq_id -> this chunk's
    pooled: dict[int, Any] = field(default_factory=dict)  # pooling models: seq_id -> output (numpy float32)


@dataclass(slots=True)
class SeqDelta:
    """What changed for one sequence in one step (scheduler -> output processor)."""

    index: int  # CompletionOutput.index
    new_token_ids: list[int]  # tokens appended this step
    new_logprobs: list[SampleResult]  # their sample results (for logprobs output)
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None  # matched stop token id / string


@dataclass(slots=True)
class RequestUpdate:
    """One request's changes in one step."""

    request_id: str
    deltas: list[SeqDelta]  # per changed sequence
    finished: bool  # every sequence of the request is finished
    prompt_logprobs: PromptLogprobs | None = None  # new prompt logprobs (first sequence only)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    first_scheduled_time: float | None = None  # time.monotonic() when the request first joined the batch
    pooled: Any = None  # a pooling request's output (numpy float32), with finished=True
