"""Sequence-group policies: how a request's sequences fork and consume sampled tokens.

The scheduler is the same for every kind of request; what differs is decided
here, through three hooks the scheduler calls for each request:

    compute_target(req, seq)        how far seq may be computed before the policy acts
    before_schedule(req, ctx)       e.g. fork a parallel-sampling request once its prompt is cached
    process(req, results, ctx, more)  sampled tokens -> appended tokens, forks, finished sequences
                                    (`more`: multi-step decode's later tokens per sequence id)

`SamplingPolicy` covers n / best_of (fork before the last prompt token, so each
of the best_of sequences computes that token itself and samples its own first
token with its own seed). `BeamSearchPolicy` lives in core/beam_search.py.

Pure Python: no torch import.
"""

from __future__ import annotations

from typing import Protocol

from pagellm.core.request import Request, RequestStatus, Sequence
from pagellm.core.sched_output import SampleResult, SeqDelta


class PolicyContext(Protocol):
    """What a policy may do to the scheduler's state (implemented by Scheduler)."""

    max_model_len: int

    def fork_seq(self, parent: Sequence, index: int) -> Sequence: ...

    def finish_seq(self, seq: Sequence, status: RequestStatus, stop_reason: int | str | None = None) -> None: ...


def check_stop(seq: Sequence, ctx: PolicyContext) -> tuple[RequestStatus, int | str | None] | None:
    """Stop conditions decided on token ids (stop strings are matched on text by the output processor)."""
    params = seq.request.sampling_params
    token_ids = seq.token_ids
    num_tokens = len(token_ids)
    num_out = num_tokens - seq.num_prompt_tokens
    if num_out >= params.min_tokens:
        token = token_ids[-1]
        if not params.ignore_eos and token in seq.request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, None
        if params.stop_token_ids and token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token
    if params.max_tokens is not None and num_out >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH_CAPPED, None
    if num_tokens >= ctx.max_model_len:
        return RequestStatus.FINISHED_LENGTH_CAPPED, None
    return None


def append_and_check(seq: Sequence, result: SampleResult, ctx: PolicyContext,
                     more: list[SampleResult] | None = None) -> SeqDelta:
    """Append a sampled token (then, with multi-step decode, the tokens in `more`, in order), record logprobs,
    finish the sequence at the first token where a stop condition holds (the tokens after it are dropped)."""
    results = [result, *more] if more else [result]
    params = seq.request.sampling_params
    # Only the last token can end a sequence that ignores EOS and has no stop tokens (the scheduler gives a
    # multi-step round no more tokens than max_tokens and max_model_len leave).
    last = len(results) - 1 if params.ignore_eos and not params.stop_token_ids else 0
    delta = SeqDelta(seq.index, [], [])
    for i, res in enumerate(results):
        seq.append_token(res.token_id, res.logprob)
        delta.new_token_ids.append(res.token_id)
        delta.new_logprobs.append(res)
        stop = check_stop(seq, ctx) if i >= last else None
        if stop is not None:
            status, reason = stop
            ctx.finish_seq(seq, status, reason)
            delta.finish_reason = str(seq.finish_reason)
            delta.stop_reason = reason
            break
    return delta


class SamplingPolicy:
    """n / best_of sampling. With best_of > 1 the prompt is computed once and forked (a model with recurrent layers:
    each fork starts from a copy of the prompt's state)."""

    def __init__(self, best_of: int) -> None:
        self.best_of = best_of
        self.forked = best_of == 1

    @property
    def max_seqs(self) -> int:
        return self.best_of

    def compute_target(self, req: Request, seq: Sequence) -> int:
        if self.forked:
            return seq.num_tokens
        # Compute all but the last prompt token once; each fork computes that token itself.
        return req.num_prompt_tokens - 1

    def before_schedule(self, req: Request, ctx: PolicyContext) -> None:
        if self.forked:
            return
        parent = req.seqs[0]
        if parent.num_computed_tokens >= req.num_prompt_tokens - 1:
            for index in range(1, self.best_of):
                ctx.fork_seq(parent, index)
            self.forked = True

    def process(self, req: Request, results: dict[Sequence, SampleResult], ctx: PolicyContext,
                more: dict[int, list[SampleResult]] | None = None) -> list[SeqDelta]:
        return [append_and_check(seq, res, ctx, more and more.get(seq.seq_id)) for seq, res in results.items()]


def make_policy(req: Request) -> SamplingPolicy:
    return SamplingPolicy(req.sampling_params.best_of or 1)
