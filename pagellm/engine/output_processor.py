"""RequestUpdate (token ids) -> RequestOutput (text), per step.

    scheduler.update_from_output() -> [RequestUpdate]
        -> OutputProcessor.process(updates, on_stop)
             incremental detokenization per sequence (final-only requests without stop strings:
             one decode when the output is made, nothing per token)
             stop strings matched on the text (they may span tokens); on a match the
             sequence is cut there and `on_stop` tells the scheduler to free it
             logprobs and prompt logprobs turned into dicts of Logprob
        -> [RequestOutput] (cumulative, delta or final-only, per SamplingParams.output_kind)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pagellm.core.sched_output import PromptLogprobs as PromptLogprobChunk
from pagellm.core.sched_output import RequestUpdate, SampleResult
from pagellm.engine.detokenizer import IncrementalDetokenizer
from pagellm.outputs import CompletionOutput, Logprob, PoolingOutput, PoolingRequestOutput, RequestOutput
from pagellm.sampling_params import RequestOutputKind, SamplingParams

StopCallback = Callable[[str, int, str], bool]  # (request_id, index, stop string) -> request finished


@dataclass
class _SeqState:
    index: int
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_text: int = 0  # chars already delivered (DELTA)
    sent_tokens: int = 0  # token ids already delivered (DELTA)
    changed: bool = False
    lazy_text: bool = False  # the text is decoded once, when the output is made (final-only, no stop strings)


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: dict[int, _SeqState] = field(default_factory=dict)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: int = 0
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished: bool = False
    final_only: bool = False  # one output when the request finishes (FINAL_ONLY, or best_of > n)
    embeds: bool = False  # the prompt came as embeddings: its token ids are placeholders (no detokenizer context)

    def __post_init__(self) -> None:
        p = self.params
        self.final_only = p.output_kind == RequestOutputKind.FINAL_ONLY or p.best_of > p.n


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self._token_text: dict[int, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float, embeds: bool = False) -> None:
        st = _RequestState(request_id, prompt, prompt_token_ids, params, arrival_time, embeds=embeds)
        if params.prompt_logprobs is not None:
            st.prompt_logprobs = [None]
        self.states[request_id] = st

    def has_request(self, request_id: str) -> bool:
        return request_id in self.states

    def all_finished(self, request_id: str) -> bool:
        """Every sequence of the request has finished as far as this processor has seen (stop strings
        included); for a core in another process, which learns of stop strings a little later."""
        st = self.states.get(request_id)
        if st is None:
            return True
        return len(st.seqs) >= st.params.best_of and all(s.finish_reason is not None for s in st.seqs.values())

    # ---- per step -------------------------------------------------------------------

    def process(self, updates: list[RequestUpdate], on_stop: StopCallback) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for u in updates:
            st = self.states.get(u.request_id)
            if st is None:
                continue
            st.num_cached_tokens = u.num_cached_tokens
            if st.first_scheduled_time is None:
                st.first_scheduled_time = u.first_scheduled_time
            if u.pooled is not None:  # a pooling request: one output, when its prompt has been computed
                del self.states[st.request_id]
                outputs.append(PoolingRequestOutput(st.request_id, PoolingOutput(torch.from_numpy(u.pooled)),
                                                    st.prompt_token_ids, True, st.prompt, st.num_cached_tokens))
                continue
            if u.prompt_logprobs is not None and st.prompt_logprobs is not None:
                self._add_prompt_logprobs(st, u.prompt_logprobs)
            for d in u.deltas:
                seq = st.seqs.get(d.index) or self._seq(st, d.index)
                if seq.finish_reason is not None:
                    continue  # stopped here by a stop string; the core has not heard yet (engine process)
                if seq.lazy_text and seq.logprobs is None:  # nothing to do per token but keep it
                    seq.token_ids += d.new_token_ids
                    for res in d.new_logprobs:
                        seq.cumulative_logprob += res.logprob
                    seq.changed = True
                    if d.finish_reason is not None:
                        self._finish_seq(st, seq, d.finish_reason, d.stop_reason)
                    continue
                for token_id, res in zip(d.new_token_ids, d.new_logprobs):
                    stop = self._append(st, seq, token_id, res)
                    if stop is not None:
                        if on_stop(st.request_id, seq.index, stop):
                            u.finished = True
                        break
                else:
                    if d.finish_reason is not None:
                        self._finish_seq(st, seq, d.finish_reason, d.stop_reason)
            if st.first_token_time is None and u.deltas:
                st.first_token_time = now
            st.finished = u.finished
            if st.final_only and not st.finished:
                continue
            out = self._make_output(st)
            if out is not None:
                outputs.append(out)
            if st.finished:
                del self.states[st.request_id]
        return outputs

    def abort(self, request_ids: list[str], error: str | None = None) -> list[RequestOutput]:
        """Final outputs for requests ended by the engine (abort or failure)."""
        outs = []
        for rid in request_ids:
            st = self.states.pop(rid, None)
            if st is None:
                continue
            st.finished = True
            for seq in st.seqs.values():
                if seq.finish_reason is None:
                    seq.finish_reason = "abort"
                    seq.changed = True
            if not st.seqs:
                st.seqs[0] = _SeqState(0, None, finish_reason="abort", changed=True)
            out = self._make_output(st, force=True)
            out.error = error
            outs.append(out)
        return outs

    # ---- helpers --------------------------------------------------------------------

    def _seq(self, st: _RequestState, index: int) -> _SeqState:
        seq = st.seqs.get(index)
        if seq is None:
            p = st.params
            detok = (IncrementalDetokenizer(self.tokenizer, [] if st.embeds else st.prompt_token_ids,
                                            p.skip_special_tokens,
                                            p.spaces_between_special_tokens)
                     if p.detokenize and self.tokenizer is not None else None)
            seq = _SeqState(index, detok, logprobs=[] if p.logprobs is not None else None,
                            lazy_text=detok is not None and st.final_only and not p.stop)
            st.seqs[index] = seq
        return seq

    def _append(self, st: _RequestState, seq: _SeqState, token_id: int, res: SampleResult) -> str | None:
        """Add one token; returns the stop string if it completed one."""
        seq.token_ids.append(token_id)
        seq.cumulative_logprob += res.logprob
        seq.changed = True
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_dict(token_id, res.logprob, res.rank, res.top_ids, res.top_logprobs))
        if seq.detok is None or seq.lazy_text:
            return None
        piece = seq.detok.add(token_id)
        if not piece:
            return None
        old_len = len(seq.text)
        seq.text += piece
        return self._check_stop_strings(st, seq, old_len) if st.params.stop else None

    def _check_stop_strings(self, st: _RequestState, seq: _SeqState, old_len: int) -> str | None:
        stops = st.params.stop
        if not stops:
            return None
        best: tuple[int, str] | None = None
        for s in stops:
            i = seq.text.find(s, max(0, old_len - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        seq.text = seq.text[:i + len(s)] if st.params.include_stop_str_in_output else seq.text[:i]
        seq.finish_reason, seq.stop_reason = "stop", s
        return s

    def _finish_seq(self, st: _RequestState, seq: _SeqState, reason: str, stop_reason: int | str | None) -> None:
        if seq.detok is not None and not seq.lazy_text:
            seq.text += seq.detok.finish()
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.changed = True

    def _token_str(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def _logprob_dict(self, token_id: int, logprob: float, rank: int | None, top_ids: list[int] | None,
                      top_lps: list[float] | None) -> dict[int, Logprob]:
        d = {token_id: Logprob(logprob, rank, self._token_str(token_id))}
        for r, (tid, lp) in enumerate(zip(top_ids or [], top_lps or []), start=1):
            if tid not in d:
                d[tid] = Logprob(lp, r, self._token_str(tid))
        return d

    def _add_prompt_logprobs(self, st: _RequestState, chunk: PromptLogprobChunk) -> None:
        for j, (lp, rank) in enumerate(zip(chunk.token_logprobs, chunk.ranks)):
            pos = chunk.start + j
            if pos != len(st.prompt_logprobs):
                continue  # a chunk recomputed after preemption: already recorded
            st.prompt_logprobs.append(self._logprob_dict(st.prompt_token_ids[pos], lp, rank,
                                                         chunk.top_ids[j], chunk.top_logprobs[j]))

    def _make_output(self, st: _RequestState, force: bool = False) -> RequestOutput | None:
        p = st.params
        kind = RequestOutputKind.FINAL_ONLY if st.final_only else p.output_kind  # best_of > n: known at the end
        if st.final_only and not st.finished and not force:
            return None
        seqs = sorted(st.seqs.values(), key=lambda s: s.index)
        if st.finished and p.best_of > p.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:p.n]
        delta = kind == RequestOutputKind.DELTA
        completions = []
        for new_index, seq in enumerate(seqs):
            if delta and not seq.changed:
                continue
            completions.append(self._completion(st, seq, delta, new_index if p.best_of > p.n else seq.index))
            seq.changed = False
        if delta and not completions and not st.finished and st.prompt_logprobs is None:
            return None
        prompt_lps = st.prompt_logprobs
        if delta and prompt_lps is not None:
            prompt_lps, st.prompt_logprobs_sent = prompt_lps[st.prompt_logprobs_sent:], len(prompt_lps)
        metrics = {"arrival_time": st.arrival_time}
        if st.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = st.first_scheduled_time
        if st.first_token_time is not None:
            metrics["first_token_time"] = st.first_token_time
        if st.finished:
            metrics["finished_time"] = time.monotonic()
        return RequestOutput(st.request_id, st.prompt, st.prompt_token_ids, prompt_lps, completions, st.finished,
                             st.num_cached_tokens, metrics)

    def _completion(self, st: _RequestState, seq: _SeqState, delta: bool, index: int) -> CompletionOutput:
        if seq.lazy_text:
            seq.text = seq.detok.decode(seq.token_ids)
        hold = 0
        if st.params.stop and seq.finish_reason is None:
            hold = max(len(s) for s in st.params.stop) - 1  # could still become a stop string
        text_end = max(seq.sent_text, len(seq.text) - hold)
        if delta:
            text, tokens = seq.text[seq.sent_text:text_end], seq.token_ids[seq.sent_tokens:]
            lps = seq.logprobs[seq.sent_tokens:] if seq.logprobs is not None else None
            seq.sent_text, seq.sent_tokens = text_end, len(seq.token_ids)
        else:
            text, tokens, lps = seq.text[:text_end], list(seq.token_ids), seq.logprobs
            lps = list(lps) if lps is not None else None
        return CompletionOutput(index, text, tokens, seq.cumulative_logprob, lps, seq.finish_reason, seq.stop_reason)
