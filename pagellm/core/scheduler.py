"""Continuous batching: which sequences compute how many tokens in the next step.

    add_request(Request)                       -> waiting queue
    schedule()                  -> SchedulerOutput (to the worker)
    update_from_output(SchedulerOutput, ModelRunnerOutput) -> [RequestUpdate] (to the output processor)
    finish_by_stop_string / abort_requests     (from the engine)

Requests are served first come, first served (policy "fcfs"), or by priority, then arrival (policy
"priority": a lower value first, vLLM's convention). Every step, running requests are scheduled first (in
that order), then waiting ones are admitted in that order while the token budget, the sequence limit and
the free blocks allow. When the pool runs dry for a running request, the last one in that order is
preempted: its blocks are freed, it goes back to the queue (the front under fcfs), and it is recomputed
later from its tokens (prompt + output so far), which gives the same results. Under "priority" a waiting
request that does not fit also preempts running requests of a strictly lower priority (a larger value),
last first. What differs between kinds of requests (n / best_of forks, beam
search) lives in core/policies.py, not here.

A sequence's num_computed_tokens advances when a step is scheduled, so the next
step can be scheduled before this one's results are back (async scheduling): a
sequence whose step samples gets an output placeholder, which the next step
computes (the worker takes that token from the previous step's sampled tokens
on the device) and which the sampled token replaces in update_from_output.
A constrained sequence's grammar mask depends on the token in flight: such a step
is marked grammar_deferred, and the engine hands the worker the mask once the
previous step's results have advanced the grammar (the forward pass runs in the
meantime; only sampling waits). Requests whose next step depends on the sampled
token on the host otherwise (beam search, multi-token bad words) switch the
engine to one step at a time while they live (`can_schedule_ahead`).

Multi-step decode (`num_scheduler_steps` K > 1): when every sequence of a step is decoding, each gets up to
K tokens (fewer near its max_tokens or max_model_len), computed one per device step, and the step samples
them all; their slots are allocated now, and the tokens past a stop are dropped when the results come
back. Scheduling, stop checks and outputs then run once per K tokens. The requests above keep the engine at
one step while they live; penalties and min_tokens run in rounds (the worker counts and bans per step).

Speculative decoding (`speculative` config): a decoding sequence of a request that may speculate
(`_may_speculate`) gets its last token plus up to k draft tokens from NgramProposer (method ngram), or k
placeholders that the worker's draft model fills in (method draft_model), with slots for all of them. The
worker samples at each of those positions and keeps the samples while they equal the drafts (plus the first
that differs); the results roll num_computed_tokens back by the drafts it rejected (`_apply_verdicts`), whose
slots are written again by later steps. Blocks are entered in the prefix cache only up to the known tokens,
so a draft's K/V is never shared. Drafts come from the tokens on the host (n-grams, and the draft model's
first input), so such requests, like the ones above, keep the engine at one step at a time while they live.

Pipeline stages (`micro_batches` P > 1): the engine keeps up to P steps in flight, one per stage, so their
sequences must differ: a request with a token in flight is skipped (the first stage needs that token, which is
on the host only once the step is back), and a step takes at most 1/P of the live sequences, so the P
micro-batches stay about even instead of the first taking everything. Nothing is ever scheduled on a placeholder
then, so the requests that need their tokens on the host (beam search, bad words) and grammar masks need no
special case.

LoRA (`max_loras` > 0): the running requests use at most max_loras distinct adapters (the worker has that many
slots); a waiting request of another adapter is passed over, keeping its place in the queue, until one of
them frees up.

Pooling models: a request with pooling_params (max_tokens 1) is scheduled like any prompt; the worker pools the
hidden states of its last chunk instead of sampling, and update_from_output finishes it with that output.

Pure Python: no torch import.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from pagellm.config import SchedulerConfig
from pagellm.core.grammar import GrammarHook
from pagellm.core.kv_cache_manager import KVCacheManager, PrefixMatch, SlotAllocation, max_blocks_per_seq
from pagellm.core.policies import SamplingPolicy, make_policy
from pagellm.core.request import Request, RequestStatus, Sequence
from pagellm.core.sched_output import (
    CachedSeqData,
    ModelRunnerOutput,
    NewSeqData,
    RequestUpdate,
    SampleResult,
    SchedulerOutput,
    SeqDelta,
)
from pagellm.core.speculative import make_proposer
from pagellm.core.state_checkpoints import StateCheckpoints
from pagellm.sampling_params import ParamError


def _reads_sampled_tokens(req: Request) -> bool:
    """Whether building a step for this request needs the tokens it sampled so far on the host: beam search
    (beams fork from candidates) and bad words of several tokens (the last tokens decide what is banned).
    Penalties do not (the worker counts sampled tokens on the device), nor grammars (their mask waits, not
    the step: grammar_deferred)."""
    p = req.sampling_params
    return not isinstance(req.policy, SamplingPolicy) or any(len(w) > 1 for w in p._bad_words_token_ids or ())


def _may_speculate(req: Request) -> bool:
    """Whether the request's sequences may decode with draft tokens: none of the host-side state above, no
    structured outputs. Logprobs, min_tokens, logit bias, allowed tokens and penalties work per position (a
    position's penalties count the drafts before it)."""
    return not _reads_sampled_tokens(req) and req.sampling_params.structured_outputs is None


def _cut_before_whole_image(req: Request, start: int, num_new: int) -> int:
    """A chunk [start, start + num_new) shortened so that it does not end inside an image whose positions attend to
    each other both ways (Gemma 3): such an image is computed in one step, from its first position not yet computed
    (0: the sequence waits for a step with room for it)."""
    end = start + num_new
    for f in req.mm_features:
        if f.whole and f.offset < end < f.end:
            return max(f.offset - start, 0)
    return num_new


def check_request_fits(config: SchedulerConfig, block_size: int, num_blocks: int, sliding_window: int | None,
                       num_prompt_tokens: int, max_tokens: int, max_seqs: int) -> None:
    """ValueError if a request of this shape could never run, however empty the engine (usable away from the
    scheduler: the API process of `pagellm serve` checks requests before sending them to the engine)."""
    if max_seqs > config.max_num_seqs:
        raise ValueError(f"the request needs {max_seqs} sequences (n/best_of/beam width), more than "
                         f"max_num_seqs={config.max_num_seqs}.")
    num_tokens = min(num_prompt_tokens + max_tokens, config.max_model_len)
    need = max_blocks_per_seq(num_tokens, config.max_num_batched_tokens, block_size, sliding_window) * max_seqs
    if need > num_blocks:
        raise ValueError(
            f"the request needs up to {need} KV cache blocks ({max_seqs} sequence(s) of up to "
            f"{num_prompt_tokens + max_tokens} tokens, block_size={block_size}) but the cache "
            f"has {num_blocks}; lower max_tokens or raise kv_cache_memory.")


_IN_PLACE = SlotAllocation(0, [], [])  # a step that leaves the block table as it is (read-only: shared)


@dataclass
class _StepPlan:
    """Sequences chosen for this step, in batch order."""

    entries: dict[Sequence, tuple[int, SlotAllocation]] = field(default_factory=dict)
    budget: int = 0  # tokens left
    steps: int = 1  # > 1: multi-step decode (every entry a decoding sequence, its tokens one per device step)
    drafts: dict[Sequence, list[int]] = field(default_factory=dict)  # speculative decoding: tokens after the last
    max_seqs: int = 1 << 62  # sequences this step may take (pipeline micro-batches: a share of the live ones)

    @property
    def full(self) -> bool:
        return self.budget <= 0 or len(self.entries) >= self.max_seqs

    def add(self, seq: Sequence, num_tokens: int, alloc: SlotAllocation) -> None:
        self.entries[seq] = (num_tokens, alloc)
        self.budget -= num_tokens

    def drop_request(self, req: Request) -> None:
        for seq in [s for s in self.entries if s.request is req]:
            self.budget += self.entries.pop(seq)[0]
            self.drafts.pop(seq, None)


def check_priority(policy: str, priority: int) -> None:
    """ParamError unless a non-zero priority meets the "priority" policy (offline a ValueError, online a 400)."""
    if priority and policy != "priority":
        raise ParamError(f"priority {priority} needs scheduling_policy='priority' (--scheduling-policy priority); "
                         "this engine serves first come, first served.", param="priority")


@dataclass
class SchedulerStats:
    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float  # fraction of blocks held by live sequences
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int  # since start
    spec_num_drafts: int = 0  # speculative decoding: sequence steps that checked draft tokens
    spec_num_draft_tokens: int = 0  # draft tokens checked
    spec_num_accepted_tokens: int = 0  # of those, tokens the model agreed with


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_size: int, num_blocks: int,
                 enable_prefix_caching: bool, sliding_window: int | None = None,
                 grammar: GrammarHook | None = None, max_loras: int = 0, stateful: bool = False,
                 state_checkpoints: tuple[int, int] = (0, 0), micro_batches: int = 1) -> None:
        self.config = config
        self.micro_batches = micro_batches  # steps in flight at once (pipeline stages), each of other sequences
        # The model keeps a recurrent state per sequence (Mamba layers): a sequence forked from a computed one (n /
        # best_of samples, beams) starts from a copy of its parent's state (scheduled before its parent, which moves
        # on only once the copy is made), and a cached prefix is reused only up to a checkpoint of that state
        # (state_checkpoints: (interval, slots); core/state_checkpoints.py).
        self.stateful = stateful
        self._state_parents: dict[int, int] = {}  # forked seq_id -> the seq whose state it copies when first sent
        interval, slots = state_checkpoints
        self.checkpoints = StateCheckpoints(slots, interval, block_size) if enable_prefix_caching and slots else None
        self._restores: dict[int, int] = {}  # seq_id -> checkpoint slot its state starts from (a prefix hit)
        # the last speculative step's verdicts for the worker's recurrent states (state_rewinds, state_promotions)
        self._rewinds: dict[int, int] = {}
        self._promotions: dict[int, list[tuple[int, int]]] = {}
        self.grammar = grammar  # structured output: follows constrained sequences (core/grammar.py)
        self.max_model_len = config.max_model_len
        self.block_size = block_size
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching, sliding_window)
        self.by_priority = config.policy == "priority"
        # the order of service: arrival time, or (priority, arrival time)
        self._rank = (lambda r: (r.priority, r.arrival_time)) if self.by_priority else (lambda r: r.arrival_time)
        self.waiting: deque[Request] = deque()  # in the order of service under "priority"
        self.running: list[Request] = []  # in the order of service
        self.requests: dict[str, Request] = {}
        self._seqs: dict[int, Sequence] = {}  # live sequences by id
        self._forget: set[int] = set()  # sequence ids the worker must drop at the next step
        self._host_token_reqs: set[str] = set()  # live requests that need their sampled tokens before a step
        self._constrained_reqs: set[str] = set()  # live requests with structured outputs
        self.num_steps = config.num_scheduler_steps
        self.num_preemptions = 0
        self.max_loras = max_loras  # distinct LoRA adapters among running requests (0: LoRA off)
        spec = config.speculative
        self.proposer = make_proposer(spec) if spec is not None else None
        self._spec_reqs: set[str] = set()  # live requests whose sequences decode with draft tokens
        self.spec_drafts = self.spec_draft_tokens = self.spec_accepted_tokens = 0  # sequence steps, tokens, kept

    # ---- requests in and out ------------------------------------------------------

    def check_fits(self, num_prompt_tokens: int, max_tokens: int, max_seqs: int) -> None:
        """ValueError if a request of this shape could never run, however empty the engine."""
        check_request_fits(self.config, self.block_size, self.kv.num_total_blocks, self.kv.sliding_window,
                           num_prompt_tokens, max_tokens, max_seqs)

    def add_request(self, req: Request) -> None:
        """Queue a request. Raises ValueError if it could never fit, before queueing it."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use.")
        if req.policy is None:
            req.policy = make_policy(req)
        self.check_fits(req.num_prompt_tokens, req.sampling_params.max_tokens or 0, req.policy.max_seqs)
        check_priority(self.config.policy, req.priority)
        spec = req.sampling_params.structured_outputs
        if spec is not None and self.grammar is None:
            raise ValueError("structured_outputs need a tokenizer (the engine runs with skip_tokenizer_init).")
        if not req.seqs:
            req.seqs = [req.new_sequence(0, list(req.prompt_token_ids))]
        for seq in req.seqs:
            self._seqs[seq.seq_id] = seq
            if spec is not None:
                self.grammar.add(seq.seq_id, spec)
        self.requests[req.request_id] = req
        if _reads_sampled_tokens(req):
            self._host_token_reqs.add(req.request_id)
        if self.proposer is not None and _may_speculate(req):  # drafts come from the tokens on the host
            self._spec_reqs.add(req.request_id)
            self._host_token_reqs.add(req.request_id)
        if spec is not None:
            self._constrained_reqs.add(req.request_id)
        self._queue(req)

    def _queue(self, req: Request, front: bool = False) -> None:
        """Into the waiting queue: in the order of service under "priority"; else at the back (or the front:
        a preempted request)."""
        if self.by_priority:
            bisect.insort(self.waiting, req, key=self._rank)
        elif front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        """Finish requests now, freeing every block. Unknown ids are ignored."""
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            for seq in req.live_seqs():
                self.finish_seq(seq, RequestStatus.FINISHED_ABORTED)
            self._finish_request(req, RequestStatus.FINISHED_ABORTED)
            aborted.append(req)
        return aborted

    def finish_by_stop_string(self, request_id: str, index: int, stop: str) -> bool:
        """The output processor matched a stop string. Returns True if the request is now finished."""
        req = self.requests.get(request_id)
        if req is None:
            return True
        for seq in req.live_seqs():
            if seq.index == index:
                self.finish_seq(seq, RequestStatus.FINISHED_STOPPED, stop)
        if not req.live_seqs():
            self._finish_request(req, RequestStatus.FINISHED_STOPPED)
            return True
        return False

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (and recurrent-state checkpoint): their contents are stale once the weights
        change or the cache is freed. False, and nothing forgotten, while a sequence holds blocks."""
        if not self.kv.reset_prefix_cache():
            return False
        if self.checkpoints is not None:
            self.checkpoints.reset()
        return True

    def can_schedule_ahead(self) -> bool:
        """True when the next step may be scheduled before the results of the one in flight are back: no live
        request needs its sampled tokens on the host to build its next step."""
        return self.micro_batches > 1 or not self._host_token_reqs

    @property
    def num_running_seqs(self) -> int:
        return sum(r.policy.max_seqs for r in self.running)

    # ---- PolicyContext ------------------------------------------------------------

    def fork_seq(self, parent: Sequence, index: int) -> Sequence:
        req = parent.request
        child = req.new_sequence(index, list(parent.token_ids))
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.cumulative_logprob = parent.cumulative_logprob
        child.status = parent.status
        self.kv.fork(parent, child)
        if parent.seq_id in self._restores:  # the parent has not been sent yet: both start from its checkpoint
            self._note_restore(child.seq_id, self._restores[parent.seq_id])
        elif self.stateful and parent.num_computed_tokens:
            self._state_parents[child.seq_id] = parent.seq_id
        if req.sampling_params.structured_outputs is not None:
            self.grammar.fork(parent.seq_id, child.seq_id)
        req.seqs.append(child)
        self._seqs[child.seq_id] = child
        return child

    def finish_seq(self, seq: Sequence, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        seq.status = status
        seq.stop_reason = stop_reason
        self.kv.free(seq)
        self.kv.forget_hashes(seq)
        self._drop_restore(seq.seq_id)
        self._state_parents.pop(seq.seq_id, None)
        if seq.request.sampling_params.structured_outputs is not None:
            self.grammar.free(seq.seq_id)
        self._seqs.pop(seq.seq_id, None)
        if self.proposer is not None:
            self.proposer.forget(seq.seq_id)
        if seq.in_worker:
            self._forget.add(seq.seq_id)
            seq.in_worker = False

    def _finish_request(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.requests.pop(req.request_id, None)
        self._host_token_reqs.discard(req.request_id)
        self._constrained_reqs.discard(req.request_id)
        self._spec_reqs.discard(req.request_id)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    # ---- scheduling ---------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        # There is no prefill phase and no decode phase. Every sequence has
        # num_computed_tokens catching up with num_tokens (prompt + output); a step
        # gives each scheduled sequence some tokens within the token budget. A
        # prompt, a chunk of a long prompt, one decode token and the recompute of
        # a preempted sequence are all the same thing.
        plan = _StepPlan(budget=self.config.max_num_batched_tokens)
        if self.micro_batches > 1:
            live = self.num_running_seqs + sum(r.policy.max_seqs for r in self.waiting)
            plan.max_seqs = max(1, -(-min(live, self.config.max_num_seqs) // self.micro_batches))
        preempted = self._schedule_running(plan)
        if not preempted:
            self._admit_waiting(plan)
            if self.num_steps > 1 and not (self._host_token_reqs or self._constrained_reqs):
                self._plan_more_steps(plan)
        return self._build_output(plan)

    def _plan_more_steps(self, plan: _StepPlan) -> None:
        """Multi-step decode: if every entry is one decoding token of a sequence the worker holds, give each
        up to num_steps tokens (what its limits leave, what the pool can hold)."""
        entries = plan.entries
        for seq, (n, alloc) in entries.items():
            if (n != 1 or not seq.in_worker or alloc.copies
                    or seq.num_computed_tokens + 1 != len(seq.token_ids) + seq.num_output_placeholders):
                return
        for seq, (_, alloc) in entries.items():
            k = min(self.num_steps, self._tokens_left(seq))
            if k < 2:
                continue
            more = self.kv.allocate_slots(seq, k)
            if more is None:
                continue  # the pool is short: this one decodes one token
            if alloc is not _IN_PLACE:  # the first token's blocks, then the others'
                more = SlotAllocation(alloc.start, alloc.block_ids + more.block_ids, [])
            entries[seq] = (k, more)
            plan.steps = max(plan.steps, k)

    def _tokens_left(self, seq: Sequence) -> int:
        """Tokens the sequence may still sample, counting those in flight."""
        n = len(seq.token_ids) + seq.num_output_placeholders
        left = self.max_model_len - n
        max_tokens = seq.request.sampling_params.max_tokens
        return left if max_tokens is None else min(left, max_tokens - (n - seq.num_prompt_tokens))

    def _schedule_running(self, plan: _StepPlan) -> bool:
        preempted = False
        i = 0
        while i < len(self.running) and not plan.full:
            req = self.running[i]
            if self._schedule_request(req, plan):
                i += 1
                continue
            # Out of blocks: the latest arrival makes room, then this request tries again.
            victim = self.running.pop()
            plan.drop_request(victim)
            self._preempt(victim)
            preempted = True
            if victim is req:
                break
        return preempted

    def _admit_waiting(self, plan: _StepPlan) -> None:
        if not self.waiting:
            return
        num_seqs = self.num_running_seqs
        loras = {r.lora_id for r in self.running if r.lora_id} if self.max_loras else set()
        skipped: list[Request] = []  # requests of another adapter while max_loras are running: they wait
        while self.waiting and not plan.full:
            req = self.waiting[0]
            if req.lora_id and req.lora_id not in loras and len(loras) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            if num_seqs + req.policy.max_seqs > self.config.max_num_seqs:
                if self._preempt_for(req, plan):
                    num_seqs = self.num_running_seqs
                    continue
                break
            before = len(plan.entries)
            fits = self._schedule_request(req, plan)
            if not fits and len(plan.entries) == before:
                if self._preempt_for(req, plan):
                    num_seqs = self.num_running_seqs
                    continue
                break  # not even its first sequence fits: wait for blocks to free up
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            for seq in req.live_seqs():
                seq.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=self._rank)
            num_seqs += req.policy.max_seqs
            if req.lora_id:
                loras.add(req.lora_id)
            if not fits:
                break
        for req in reversed(skipped):  # back in their places
            self._queue(req, front=True)

    def _preempt_for(self, req: Request, plan: _StepPlan) -> bool:
        """Under "priority": preempt the last running request if its priority is strictly lower than req's (a
        larger value), to make room for req. False when there is none."""
        if not self.by_priority or not self.running or self.running[-1].priority <= req.priority:
            return False
        victim = self.running.pop()
        plan.drop_request(victim)
        self._preempt(victim)
        return True

    def _schedule_request(self, req: Request, plan: _StepPlan) -> bool:
        """Schedule the request's live sequences. False when the pool ran dry."""
        if self.micro_batches > 1 and any(s.num_output_placeholders for s in req.live_seqs()):
            return True  # in flight in another micro-batch: its next step waits for that one's tokens
        req.policy.before_schedule(req, self)
        entries = plan.entries
        seqs = req.live_seqs()
        if self._state_parents:  # forks first: a parent must not move on before its forks have copied its state
            seqs = sorted(seqs, key=lambda s: s.seq_id not in self._state_parents)
        for seq in seqs:
            if plan.full:
                return True
            if seq in entries:
                continue
            if not self._schedule_seq(req, seq, plan):
                return False
        return True

    def _schedule_seq(self, req: Request, seq: Sequence, plan: _StepPlan) -> bool:
        placeholders = seq.num_output_placeholders
        if placeholders and self._tokens_left(seq) <= 0:
            return True  # the tokens in flight are its last (max_tokens or max_model_len): nothing more to compute
        target = req.policy.compute_target(req, seq) + placeholders
        computed = seq.num_computed_tokens
        if (target - computed == 1 and req.request_id in self._spec_reqs and computed + 1 == len(seq.token_ids)
                and self._speculate(seq, plan)):
            return True
        if target - computed == 1 and self.kv.fits_in_place(seq, 1):
            # The common decode step (every sequence, every step): one token into a block it holds; the table stays.
            plan.add(seq, 1, _IN_PLACE)
            return True
        prefix: PrefixMatch | None = None
        cached = 0
        if computed == 0 and not self.kv.has_table(seq.seq_id):
            prefix = self.kv.find_prefix(seq)
            if self.checkpoints is not None:
                prefix = self._checkpointed(seq, prefix)
            cached = prefix.num_tokens(self.block_size)
        num_new = min(target - computed - cached, plan.budget)
        if num_new < target - computed - cached and not self.config.chunked_prefill:
            return True  # an encoder-only model's prompt is computed whole: it waits for a step with room
        if num_new < target - computed - cached and req.mm_features:
            num_new = _cut_before_whole_image(req, computed + cached, num_new)
        if num_new <= 0 and not cached:
            return True
        alloc = self.kv.allocate_slots(seq, max(num_new, 0), prefix)
        if alloc is None:
            return False
        if cached:
            seq.num_computed_tokens += cached
            seq.num_cached_tokens = cached
        if num_new > 0:
            plan.add(seq, num_new, alloc)
        return True

    def _checkpointed(self, seq: Sequence, prefix: PrefixMatch) -> PrefixMatch:
        """A hit cut back to its last state checkpoint (the slot noted, and pinned, for the worker's restore)."""
        self._drop_restore(seq.seq_id)
        if not prefix.blocks:
            return prefix
        k, slot = self.checkpoints.lookup(self.kv.block_hashes(seq, len(prefix.blocks)), len(prefix.blocks))
        prefix = self.kv.cut_prefix(seq, prefix, k)
        if prefix.blocks:
            self._note_restore(seq.seq_id, slot)
        return prefix

    def _note_restore(self, seq_id: int, slot: int) -> None:
        self._restores[seq_id] = slot
        self.checkpoints.pin(slot)

    def _drop_restore(self, seq_id: int) -> int:
        """The slot a sequence was to start from (-1: none), no longer pinned for it."""
        slot = self._restores.pop(seq_id, -1)
        if slot >= 0:
            self.checkpoints.unpin(slot)
        return slot

    def _speculate(self, seq: Sequence, plan: _StepPlan) -> bool:
        """Speculative decoding: schedule the last token and up to num_speculative_tokens drafts after it (within
        the sequence's limits and the step's budget). False when there is no draft or the pool cannot hold them
        (the sequence then decodes one token as usual)."""
        off = self.config.speculative.disable_by_batch_size
        if off is not None and len(self.running) > off:
            return False  # a large batch: the drafts' extra rows would cost more than the steps they save
        k = min(self._tokens_left(seq), plan.budget) - 1
        drafts = self.proposer.propose(seq.seq_id, seq.token_ids, k) if k > 0 else None
        if not drafts:
            return False
        alloc = self.kv.allocate_slots(seq, 1 + len(drafts))
        if alloc is None:
            return False
        plan.add(seq, 1 + len(drafts), alloc)
        plan.drafts[seq] = drafts
        return True

    def _preempt(self, req: Request) -> None:
        for seq in req.live_seqs():
            self.kv.uncache_unwritten(seq)
            self.kv.free(seq)
            self._drop_restore(seq.seq_id)
            self._state_parents.pop(seq.seq_id, None)  # it recomputes from its first token
            seq.num_computed_tokens = 0
            seq.status = RequestStatus.PREEMPTED
            if seq.in_worker:
                self._forget.add(seq.seq_id)
                seq.in_worker = False
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._queue(req, front=True)

    def _build_output(self, plan: _StepPlan) -> SchedulerOutput:
        new_seqs: list[NewSeqData] = []
        cached = CachedSeqData()
        copies: list[tuple[int, int]] = []
        num_scheduled: dict[int, int] = {}
        sampling: list[Sequence] = []
        c_ids, c_tokens, c_starts, c_blocks, c_computed = (cached.seq_ids, cached.new_token_ids, cached.table_starts,
                                                           cached.new_block_ids, cached.num_computed_tokens)
        multi = plan.steps > 1
        drafts = plan.drafts
        saves: dict[int, list[tuple[int, int]]] = {}
        checkpoints = self.checkpoints if not multi else None  # a multi-step round checkpoints nothing
        for seq, (n, alloc) in plan.entries.items():
            seq_id = seq.seq_id
            num_scheduled[seq_id] = n
            if alloc.copies:
                copies.extend(alloc.copies)
            num_tokens = len(seq.token_ids)
            computed = seq.num_computed_tokens
            if multi or computed + n == num_tokens + seq.num_output_placeholders + (
                    len(drafts[seq]) if drafts and seq in drafts else 0):
                sampling.append(seq)  # the chunk reaches the last token: the step samples the next one
            if checkpoints is not None:
                end = min(computed + n, num_tokens)  # a boundary's hash needs its tokens on the host
                if end // checkpoints.interval > computed // checkpoints.interval:
                    planned = checkpoints.plan_saves(self.kv.block_hashes(seq, end // self.block_size), computed,
                                                     end)
                    if planned:
                        saves[seq_id] = planned
            if not seq.in_worker:
                req = seq.request
                new_seqs.append(NewSeqData(
                    seq_id, req.request_id, list(seq.token_ids), seq.num_prompt_tokens,
                    self.kv.block_ids(seq_id), computed, req.sampling_params, seq.seed, req.lora_id,
                    req.pooling_params, req.mm_features if computed < req.mm_end else None, req.mm_rope,
                    self._drop_restore(seq_id),
                    self._state_parents.pop(seq_id, -1)))
                seq.in_worker = True
            else:
                c_ids.append(seq_id)
                c_tokens.append(seq.token_ids[seq.num_synced_tokens:])
                c_starts.append(alloc.start)
                c_blocks.append(alloc.block_ids)
                c_computed.append(computed)
            seq.num_synced_tokens = num_tokens
            seq.num_computed_tokens = computed + n
        constrained = ([seq for seq in sampling if seq.request.sampling_params.structured_outputs is not None]
                       if self._constrained_reqs else [])
        # A constrained sequence with a token in flight: its mask is known only once that token is back.
        deferred = any(seq.num_output_placeholders for seq in constrained)
        for seq in sampling:
            seq.num_output_placeholders += num_scheduled[seq.seq_id] if multi else 1
        forget, self._forget = self._forget, set()
        out = SchedulerOutput(new_seqs, cached, num_scheduled, sum(num_scheduled.values()), copies, forget,
                              sampling_seq_ids=[seq.seq_id for seq in sampling], num_steps=plan.steps,
                              spec_token_ids={seq.seq_id: d for seq, d in drafts.items()}, state_saves=saves,
                              state_rewinds=self._rewinds, state_promotions=self._promotions)
        self._rewinds, self._promotions = {}, {}
        if checkpoints is not None:
            checkpoints.commit()
        if constrained:
            out.grammar_seq_ids = [seq.seq_id for seq in constrained]
            if deferred:
                out.grammar_deferred = True
            else:
                out.grammar_bitmask = self.grammar.bitmask(out.grammar_seq_ids)
        return out

    def grammar_bitmask(self, sched: SchedulerOutput):
        """The masks of a grammar_deferred step, once the step before it has been applied (sequences that ended
        meanwhile get every token allowed: their sample is dropped)."""
        return self.grammar.bitmask(sched.grammar_seq_ids)

    # ---- results ------------------------------------------------------------------

    def update_from_output(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> list[RequestUpdate]:
        seqs = self._seqs
        multi = sched.num_steps > 1
        for seq_id in sched.sampling_seq_ids:
            seq = seqs.get(seq_id)
            if seq is not None:
                seq.num_output_placeholders -= sched.num_scheduled_tokens[seq_id] if multi else 1
        results: dict[Request, dict[Sequence, SampleResult]] = {}
        prompt_lps = out.prompt_logprobs
        more = out.extra_samples or None
        if sched.spec_token_ids:
            self._apply_verdicts(sched.spec_token_ids, out)
        updates = []
        for seq_id, data in out.pooled.items():  # a pooling request ends when its prompt is computed
            seq = seqs.get(seq_id)
            if seq is not None and not seq.is_finished():
                req = seq.request
                self.finish_seq(seq, RequestStatus.FINISHED_STOPPED)
                self._finish_request(req, RequestStatus.FINISHED_STOPPED)
                updates.append(RequestUpdate(req.request_id, [], True, None, seq.num_cached_tokens,
                                             req.first_scheduled_time, pooled=data))
        for seq_id, res in out.samples.items():
            seq = seqs.get(seq_id)
            if seq is not None and not seq.is_finished():
                req = seq.request
                per_seq = results.get(req)
                if per_seq is None:
                    results[req] = {seq: res}
                else:
                    per_seq[seq] = res
        for seq_id in prompt_lps:
            seq = seqs.get(seq_id)
            if seq is not None:
                results.setdefault(seq.request, {})
        for req, seq_results in results.items():
            deltas: list[SeqDelta] = req.policy.process(req, seq_results, self, more) if seq_results else []
            if seq_results and req.sampling_params.structured_outputs is not None:
                for seq in req.live_seqs():  # beam search reports no deltas until it ends: sync every beam
                    self.grammar.sync(seq.seq_id, seq.output_token_ids)
            prompt_lp = None
            if prompt_lps:
                for seq in req.seqs:
                    prompt_lp = prompt_lp or prompt_lps.get(seq.seq_id)
            finished = not req.live_seqs()
            if finished:
                self._finish_request(req, RequestStatus.FINISHED_STOPPED)
            updates.append(RequestUpdate(req.request_id, deltas, finished, prompt_lp, req.seqs[0].num_cached_tokens,
                                         req.first_scheduled_time))
        return updates

    def _apply_verdicts(self, spec_token_ids: dict[int, list[int]], out: ModelRunnerOutput) -> None:
        """Speculative decoding: a sequence whose step checked k drafts and kept a of them (it samples a + 1
        tokens) has k - a tokens fewer computed than scheduled; their K/V slots are written again later. A
        recurrent state has taken in all k: the next step puts back the one saved after draft a (state_rewinds),
        and checkpoints the boundaries among the kept drafts (state_promotions; those tokens were not on the host
        when the step was scheduled). Such a checkpoint is visible at once: the worker copies it before anything
        of the next step, whose new sequences may start from it."""
        for seq_id, drafts in spec_token_ids.items():
            later = out.extra_samples.get(seq_id, ())
            a = len(later)
            self.spec_drafts += 1
            self.spec_draft_tokens += len(drafts)
            self.spec_accepted_tokens += a
            seq = self._seqs.get(seq_id)
            if seq is not None:
                seq.num_computed_tokens -= len(drafts) - a
                if a:  # the drafts kept are the samples before the last (a draft model's are placeholders here)
                    kept = [out.samples[seq_id].token_id] + [r.token_id for r in later[:-1]]
                    self.kv.cache_kept_drafts(seq, kept)
                    if self.checkpoints is not None:
                        self._checkpoint_kept_drafts(seq, kept, len(drafts))
                if self.stateful and a < len(drafts):
                    self._rewinds[seq_id] = a

    def _checkpoint_kept_drafts(self, seq: Sequence, kept: list[int], num_drafts: int) -> None:
        end = seq.num_computed_tokens  # the step computed from `start`: its last known token, then the drafts kept
        start = end - len(kept) - 1
        if end // self.checkpoints.interval <= (start + 1) // self.checkpoints.interval:
            return  # no boundary after the last known token (the step itself checkpointed one there)
        planned = self.checkpoints.plan_saves(self.kv.block_hashes(seq, end // self.block_size, kept), start, end)
        self.checkpoints.commit()
        if planned:
            self._promotions[seq.seq_id] = [(offset - 1 if offset - 1 < num_drafts else -1, slot)
                                            for offset, slot in planned]

    def fail_step(self, sched: SchedulerOutput, later: list[SchedulerOutput] = ()) -> list[Request]:
        """The forward pass raised: abort the requests in that batch (and forget the hashes of blocks it
        may not have written). `later`: the steps scheduled after it that have not completed either."""
        reqs = {self._seqs[s].request for s in sched.num_scheduled_tokens if s in self._seqs}
        for step in (sched, *later):  # back to what the completed steps wrote
            for seq_id, n in step.num_scheduled_tokens.items():
                seq = self._seqs.get(seq_id)
                if seq is not None and seq.request in reqs:
                    seq.num_computed_tokens = max(0, seq.num_computed_tokens - n)
        for req in reqs:
            for seq in req.live_seqs():
                self.kv.uncache_unwritten(seq)
        if self.checkpoints is not None and (sched.state_saves or sched.state_promotions):  # not written
            unwritten = {slot for saves in (sched.state_saves, sched.state_promotions) for planned in saves.values()
                         for _, slot in planned}
            self.checkpoints.invalidate(unwritten)
            for step in later:  # a sequence that starts from one of them
                reqs.update(self._seqs[d.seq_id].request for d in step.new_seqs
                            if d.state_checkpoint in unwritten and d.seq_id in self._seqs)
            reqs.update(self._seqs[i].request for i, slot in self._restores.items()
                        if slot in unwritten and i in self._seqs)
        return self.abort_requests([r.request_id for r in reqs])

    def request_table(self, limit: int = 64) -> list[dict]:
        """Running, then waiting requests (the first `limit`), for dashboards: tokens so far and blocks held."""
        rows = []
        for req in (self.running + list(self.waiting))[:limit]:
            live = req.live_seqs()
            rows.append({"request_id": req.request_id, "status": req.status.name.lower(),
                         "prompt_tokens": req.num_prompt_tokens,
                         "output_tokens": max((s.num_output_tokens for s in req.seqs), default=0),
                         "sequences": len(live), "blocks": sum(self.kv.num_live_blocks(s.seq_id) for s in live),
                         "preemptions": req.num_preemptions})
        return rows

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_total_blocks,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.num_preemptions,
            spec_num_drafts=self.spec_drafts,
            spec_num_draft_tokens=self.spec_draft_tokens,
            spec_num_accepted_tokens=self.spec_accepted_tokens,
        )
