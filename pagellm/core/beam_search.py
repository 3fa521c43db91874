"""Beam search as a sequence-group policy: beams fork and free KV blocks as candidates are kept or dropped.

Each step every live beam reports its top-K next tokens (K = max(2, 1 + #eos) x
beam_width, log-softmax of the processed logits). Then, as Hugging Face's
`generate(num_beams=..., do_sample=False)` does:

    1. candidates = (beam score + token logprob) over all beams; keep the best K
    2. a candidate that ends in EOS (or reaches max_tokens) among the best beam_width becomes a
       finished hypothesis scored  sum_logprobs / generated_len ** length_penalty
       (unless the finished set is full with early_stopping=True, or cannot improve any more)
    3. the best beam_width candidates that did not stop become the next beams:
       a beam chosen once appends its token in place; chosen m times, it forks m - 1 children
       (sharing every block; copy-on-write on their next write); a beam not chosen is freed
    4. stop when no running beam can beat the worst finished hypothesis (early_stopping False /
       "never" heuristics as HF), or the finished set is full (early_stopping True), or every
       candidate stopped

Beams move in lockstep: results of beams that sampled early (after a preemption or
a partial schedule) wait until every live beam has one.

Pure Python: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagellm.core.policies import PolicyContext
from pagellm.core.request import Request, RequestStatus, Sequence
from pagellm.core.sched_output import SampleResult, SeqDelta

_NEG = -1.0e9


@dataclass
class Hypothesis:
    score: float  # length-penalised score
    token_ids: list[int]  # generated tokens (prompt excluded)
    logprobs: list[float]  # per token
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class _Candidate:
    score: float  # beam score + token logprob
    seq: Sequence
    token: int
    logprob: float


@dataclass
class BeamSearchPolicy:
    beam_width: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_eos: int = 1
    num_return: int | None = None  # hypotheses returned (default: beam_width)
    finished: list[Hypothesis] = field(default_factory=list)
    pending: dict[int, SampleResult] = field(default_factory=dict)  # seq_id -> result waiting for the others
    token_logprobs: dict[int, list[float]] = field(default_factory=dict)  # seq_id -> logprobs of its tokens
    improvable: bool = True  # HF's is_early_stop_heuristic_unsatisfied (sticky)
    next_index: int = 1

    @property
    def max_seqs(self) -> int:
        return self.beam_width

    @property
    def num_candidates(self) -> int:
        return max(2, 1 + self.num_eos) * self.beam_width

    def compute_target(self, req: Request, seq: Sequence) -> int:
        return seq.num_tokens

    def before_schedule(self, req: Request, ctx: PolicyContext) -> None:
        return None

    def process(self, req: Request, results: dict[Sequence, SampleResult], ctx: PolicyContext,
                more: dict[int, list[SampleResult]] | None = None) -> list[SeqDelta]:
        assert not more, "beam search runs one step at a time"  # the scheduler never gives it multi-step decode
        for seq, res in results.items():
            self.pending[seq.seq_id] = res
        beams = req.live_seqs()
        if any(b.seq_id not in self.pending for b in beams):
            return []  # wait for every beam
        cands = self._candidates(beams)
        self.pending.clear()
        params = req.sampling_params
        gen_len = beams[0].num_output_tokens + 1
        all_stop = True
        keep: list[_Candidate] = []
        # As HF: whether hypotheses may still be added is decided once per step, before adding any.
        can_add = self.improvable and not (self.early_stopping is True and len(self.finished) >= self.beam_width)
        for rank, c in enumerate(cands):
            hits = gen_len >= params.max_tokens or (not params.ignore_eos and c.token in req.eos_token_ids
                                                    and gen_len > params.min_tokens)
            all_stop &= hits
            if hits:
                if rank < self.beam_width and can_add:
                    self._add_finished(c, gen_len)
            elif len(keep) < self.beam_width:
                keep.append(c)
        self._advance(beams, keep, ctx)
        self._update_heuristic(keep, gen_len + 1, params.max_tokens)
        done = all_stop or not keep or not self.improvable or (
            self.early_stopping is True and len(self.finished) >= self.beam_width)
        return self._finish(req, ctx) if done else []

    def _candidates(self, beams: list[Sequence]) -> list[_Candidate]:
        out = []
        for seq in beams:
            res = self.pending[seq.seq_id]
            for tok, lp in zip(res.top_ids or [res.token_id], res.top_logprobs or [res.logprob]):
                if lp == float("-inf"):
                    continue  # masked out (a grammar, bad words, allowed_token_ids): never a candidate
                out.append(_Candidate(seq.cumulative_logprob + lp, seq, tok, lp))
        out.sort(key=lambda c: c.score, reverse=True)
        return out[:self.num_candidates]

    def _add_finished(self, c: _Candidate, gen_len: int) -> None:
        score = c.score / (gen_len ** self.length_penalty)
        toks = c.seq.output_token_ids + [c.token]
        lps = self.token_logprobs.get(c.seq.seq_id, []) + [c.logprob]
        reason = "length" if c.token not in c.seq.request.eos_token_ids else "stop"
        self.finished.append(Hypothesis(score, toks, lps, reason))
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.beam_width:]

    def _advance(self, beams: list[Sequence], keep: list[_Candidate], ctx: PolicyContext) -> None:
        """Kept candidates become the beams: append in place, fork for extra picks, free the unpicked."""
        picks: dict[int, list[_Candidate]] = {}
        for c in keep:
            picks.setdefault(c.seq.seq_id, []).append(c)
        for seq in beams:
            chosen = picks.get(seq.seq_id, [])
            if not chosen:
                ctx.finish_seq(seq, RequestStatus.FINISHED_IGNORED)
                self.token_logprobs.pop(seq.seq_id, None)
                continue
            base_lps = self.token_logprobs.get(seq.seq_id, [])
            for c in chosen[1:]:  # fork before the parent's own token is appended
                child = ctx.fork_seq(seq, self.next_index)
                self.next_index += 1
                child.append_token(c.token, c.logprob)
                self.token_logprobs[child.seq_id] = base_lps + [c.logprob]
            seq.append_token(chosen[0].token, chosen[0].logprob)
            self.token_logprobs[seq.seq_id] = base_lps + [chosen[0].logprob]

    def _update_heuristic(self, keep: list[_Candidate], new_gen_len: int, max_tokens: int) -> None:
        if not keep or len(self.finished) < self.beam_width:
            return  # an empty finished slot can always be improved
        hyp_len = max_tokens if (self.early_stopping == "never" and self.length_penalty > 0) else new_gen_len - 1
        best_possible = max(c.score for c in keep) / (hyp_len ** self.length_penalty)
        self.improvable &= best_possible > min(h.score for h in self.finished)

    def _finish(self, req: Request, ctx: PolicyContext) -> list[SeqDelta]:
        for seq in req.live_seqs():
            ctx.finish_seq(seq, RequestStatus.FINISHED_IGNORED)
        self.token_logprobs.clear()
        n = self.num_return or self.beam_width
        deltas = []
        for i, h in enumerate(self.finished[:n]):
            results = [SampleResult(t, lp) for t, lp in zip(h.token_ids, h.logprobs)]
            deltas.append(SeqDelta(i, list(h.token_ids), results, finish_reason=h.finish_reason))
        return deltas
