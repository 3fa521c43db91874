"""Persistent per-sequence state in the worker: one row per live sequence.

    SchedulerOutput.new_seqs      -> add()      (fills a free row)
    SchedulerOutput.cached_seqs   -> update()   (appends tokens, patches the block table)
    SchedulerOutput.finished_seq_ids -> remove() (frees the row)
    rows of this step's sampled sequences -> sampling_metadata() -> SamplingMetadata
                                          -> sampled()  (one placeholder token each)

Penalties read per-row state kept on the device (allocated when the first row that uses them arrives):
which tokens the prompt holds, and how often each token was generated. A sampled token is counted on
the device as soon as it is sampled; when its value reaches the host (the scheduler's diff) the
provisional count is swapped for the final token, which differs only under beam search.

A row holds num_tokens tokens, of which the first num_known are on the host. A step that samples a
row counts the token it samples at once (a placeholder); its value arrives with a later step's diff.
With async scheduling the next step is built before that: the placeholder is the only unknown token
it computes, and the model runner takes it from the previous step's sampled tokens on the device
(`prev_sample_index`: the row's index among them, -1 if the row did not sample). A multi-step decode
samples several tokens per row (`prev_count`, from position `prev_first` on); the next step computes the
last of them, found at `(position - prev_first) * prev_stride + prev_sample_index` in those tokens.

Arrays are allocated once (numpy, filled lazily by the OS) and indexed by row,
so building a step's inputs is a handful of vectorised numpy operations,
whatever the batch size.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import torch

from pagellm.core.sched_output import CachedSeqData, NewSeqData
from pagellm.sample.metadata import SamplingMetadata
from pagellm.sampling_params import LogprobsMode, SamplingParams
from pagellm.worker.step_buffers import to_device

_MASK64 = (1 << 64) - 1
# What a row's parameters need beyond temperature / top-k / top-p / min-p (InputBatch.extras), so a step
# whose rows use none of it reads no SamplingParams object.
_PENALTIES, _LOGIT_BIAS, _ALLOWED, _BANNED, _PROCESSED = 1, 2, 4, 8, 16
_NO_PENALTIES = dict(presence_penalties=None, frequency_penalties=None, repetition_penalties=None, prompt_mask=None,
                     output_counts=None)


def counter_uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per row from (seed, counter) alone: SplitMix64 over the pair, in numpy's uint64
    arithmetic (which wraps modulo 2^64). Seeds are the requests' seeds modulo 2^64."""
    with np.errstate(over="ignore"):
        z = seeds * np.uint64(0x9E3779B97F4A7C15) + (counters.astype(np.uint64) + np.uint64(1)) * np.uint64(
            0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int, vocab_size: int,
                 eos_token_ids: frozenset[int], device: torch.device) -> None:
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        max_blocks = -(-max_model_len // block_size)
        self.token_ids = np.zeros((max_num_seqs, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_seqs, dtype=np.int64)  # known tokens + placeholders
        self.num_known = np.zeros(max_num_seqs, dtype=np.int64)  # tokens whose ids the host holds
        self.prev_sample_index = np.full(max_num_seqs, -1, dtype=np.int64)
        self._prev_rows = np.zeros(0, dtype=np.int64)
        self.prev_first = np.zeros(max_num_seqs, dtype=np.int64)  # position of the row's first token sampled then
        self.prev_count = np.zeros(max_num_seqs, dtype=np.int64)  # tokens the row sampled then
        self.prev_stride = 0  # rows that sampled then
        self.num_prompt = np.zeros(max_num_seqs, dtype=np.int64)
        self.num_computed = np.zeros(max_num_seqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_seqs, max_blocks), dtype=np.int32)
        self.temperature = np.ones(max_num_seqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_seqs, dtype=np.int64)
        self.top_p = np.ones(max_num_seqs, dtype=np.float32)
        self.min_p = np.zeros(max_num_seqs, dtype=np.float32)
        self.wants_prompt_logprobs = np.zeros(max_num_seqs, dtype=bool)
        self.extras = np.zeros(max_num_seqs, dtype=np.int64)  # _PENALTIES | _LOGIT_BIAS | ... flags
        self.num_logprobs = np.full(max_num_seqs, -1, dtype=np.int64)  # SamplingParams.logprobs, -1 for None
        self.params: list[SamplingParams | None] = [None] * max_num_seqs
        self.seeds = np.zeros(max_num_seqs, dtype=np.uint64)  # each request's seed modulo 2^64
        self.lora_ids = np.zeros(max_num_seqs, dtype=np.int64)  # each row's LoRA adapter (0: none)
        self.row_of: dict[int, int] = {}
        self._free_rows = list(range(max_num_seqs))  # a heap: the lowest free row first (the live rows stay packed)
        # Penalties: per-row parameters, and (on the device, allocated on first use) the prompt's tokens as a
        # mask, the generated tokens' counts, and the last sampled token while its value is provisional.
        self.penalties = np.zeros((max_num_seqs, 3), dtype=np.float32)  # presence, frequency, repetition
        self.counted_upto = np.zeros(max_num_seqs, dtype=np.int64)  # tokens below this position are counted
        self.prompt_mask: torch.Tensor | None = None  # (rows, V) bool
        self.output_counts: torch.Tensor | None = None  # (rows, V) float32
        self._last_sampled: torch.Tensor | None = None  # (rows,) int64: each row's last sampled token

    # ---- state updates --------------------------------------------------------------

    def add(self, d: NewSeqData) -> None:
        if not self._free_rows:
            raise RuntimeError("more live sequences than max_num_seqs rows")
        row = heapq.heappop(self._free_rows)
        self.row_of[d.seq_id] = row
        n = len(d.token_ids)
        self.token_ids[row, :n] = d.token_ids
        self.num_tokens[row] = self.num_known[row] = n
        self.prev_sample_index[row] = -1
        self.num_prompt[row] = d.num_prompt_tokens
        self.num_computed[row] = d.num_computed_tokens
        self.block_table[row, :len(d.block_ids)] = d.block_ids
        p = d.sampling_params
        self.params[row] = p
        self.seeds[row] = d.seed & _MASK64
        self.lora_ids[row] = d.lora_id
        self.temperature[row] = p.temperature
        self.top_k[row] = p.top_k
        self.top_p[row] = p.top_p
        self.min_p[row] = p.min_p
        self.wants_prompt_logprobs[row] = p.prompt_logprobs is not None
        self.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        penalized = bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)
        self.penalties[row] = (p.presence_penalty, p.frequency_penalty, p.repetition_penalty)  # (0, 0, 1): none
        if penalized:
            self._start_penalties(row, d.token_ids, d.num_prompt_tokens, p)
        self.extras[row] = (
            (_PENALTIES if penalized else 0)
            | (_LOGIT_BIAS if p.logit_bias else 0) | (_ALLOWED if p.allowed_token_ids is not None else 0)
            | (_BANNED if p.min_tokens > 0 or p._bad_words_token_ids else 0)
            | (_PROCESSED if p.logprobs_mode == LogprobsMode.PROCESSED_LOGPROBS else 0))

    def remove(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            self.params[row] = None
            self.wants_prompt_logprobs[row] = False
            self.prev_sample_index[row] = -1
            heapq.heappush(self._free_rows, row)

    def update(self, c: CachedSeqData) -> None:
        """Apply the diffs of the sequences held here (vectorized over the batch: this runs every step)."""
        n = len(c.seq_ids)
        if not n:
            return
        row_of = self.row_of
        rows = np.fromiter((row_of[s] for s in c.seq_ids), dtype=np.int64, count=n)
        lens = np.fromiter(map(len, c.new_token_ids), dtype=np.int64, count=n)
        if lens.any():  # the known tokens grow over the placeholders
            has = np.flatnonzero(lens)
            r, ln = rows[has], lens[has]
            known = self.num_known[r]
            ends = np.cumsum(ln)
            pos = np.arange(int(ends[-1])) + np.repeat(known - (ends - ln), ln)
            self.token_ids[np.repeat(r, ln), pos] = list(itertools.chain.from_iterable(c.new_token_ids))
            self.num_known[r] = known + ln
            self.num_tokens[r] = np.maximum(self.num_tokens[r], known + ln)
            penalized = np.flatnonzero(self.extras[r] & _PENALTIES)
            if len(penalized):  # penalized rows: (row, first position, tokens) now known
                self._count_known_tokens([(int(r[i]), int(known[i]), c.new_token_ids[has[i]]) for i in penalized])
        for i, blocks in enumerate(c.new_block_ids):
            if blocks:
                start = c.table_starts[i]
                self.block_table[rows[i], start:start + len(blocks)] = blocks
        self.num_computed[rows] = c.num_computed_tokens

    # ---- penalty state (on the device) ------------------------------------------------

    def _start_penalties(self, row: int, token_ids: list[int], num_prompt: int, p: SamplingParams) -> None:
        if self.output_counts is None:
            n, v, dev = len(self.temperature), self.vocab_size, self.device
            self.prompt_mask = torch.zeros(n, v, dtype=torch.bool, device=dev)
            self.output_counts = torch.zeros(n, v, dtype=torch.float32, device=dev)
            self._last_sampled = torch.zeros(n, dtype=torch.int64, device=dev)
        self.counted_upto[row] = len(token_ids)
        self.prompt_mask[row] = False
        self.prompt_mask[row, to_device(token_ids[:num_prompt], self.device, torch.int64)] = True
        self.output_counts[row] = 0
        if len(token_ids) > num_prompt:
            out = to_device(token_ids[num_prompt:], self.device, torch.int64)
            self.output_counts[row].index_add_(0, out, torch.ones(len(out), device=self.device))

    def _count_known_tokens(self, recount: list[tuple[int, int, list[int]]]) -> None:
        """Tokens the host now holds. One past what was counted is counted now. The last token counted, sampled
        on the device, is swapped for the one the host holds (the same token, except under beam search, where a
        beam may keep another candidate); a row has then at most one sampled token outstanding. Earlier
        outstanding tokens (async scheduling, two steps in flight, no beam search) were counted as they are."""
        rows, tokens, undo_rows = [], [], []
        for row, first, new_tokens in recount:
            for pos, tok in enumerate(new_tokens, start=first):
                upto = self.counted_upto[row]
                if pos < self.num_prompt[row] or pos < upto - 1:
                    continue
                if pos == upto - 1:
                    undo_rows.append(row)
                else:
                    self.counted_upto[row] = pos + 1
                rows.append(row)
                tokens.append(tok)
        dev = self.device
        if undo_rows:
            r = to_device(undo_rows, dev, torch.int64)
            self._add_counts(r, self._last_sampled[r], -1.0)
        if rows:
            self._add_counts(to_device(rows, dev, torch.int64), to_device(tokens, dev, torch.int64), 1.0)

    def _add_counts(self, rows: torch.Tensor, tokens: torch.Tensor, value: float) -> None:
        """output_counts[rows[i], tokens[i]] += value, repeated pairs adding up (one index_add_ on the flat view,
        which never waits for the device)."""
        flat = rows * self.vocab_size + tokens
        self.output_counts.view(-1).index_add_(0, flat, torch.full((len(flat),), value, device=self.device))

    def sampled(self, rows: np.ndarray, tokens: torch.Tensor | None = None, counts: np.ndarray | None = None) -> None:
        """These rows sampled a token this step (in this order): one placeholder each. With the sampled tokens
        (on the device; the driver's), penalized rows count theirs at once. A multi-step round: `counts` tokens
        per row, `tokens` (steps, rows) of which row i's first counts[i] are its own; the round counted them as
        it went (`count_round_tokens`), and its last one is the provisional one here."""
        self.prev_sample_index[self._prev_rows] = -1
        self.prev_sample_index[rows] = np.arange(len(rows))
        self.prev_first[rows] = self.num_tokens[rows]
        self.prev_count[rows] = 1 if counts is None else counts
        self.prev_stride = len(rows)
        idx = self.penalized(rows) if tokens is not None else ()
        if len(idx):
            r = rows[idx]
            r_dev, i_dev = to_device(r, self.device), to_device(idx, self.device)
            if counts is None:
                self.counted_upto[r] = self.num_tokens[r] + 1  # counting the placeholder
                tok = tokens.index_select(0, i_dev)
                self._add_counts(r_dev, tok, 1.0)
            else:
                self.counted_upto[r] = self.num_tokens[r] + counts[idx]
                tok = tokens[to_device(counts[idx] - 1, self.device), i_dev]  # each row's last token
            self._last_sampled[r_dev] = tok
        self.num_tokens[rows] += 1 if counts is None else counts
        self._prev_rows = rows

    def penalized(self, rows: np.ndarray) -> np.ndarray:
        """Indices (into rows) of the rows with penalties."""
        if self.output_counts is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.extras[rows] & _PENALTIES)

    def count_round_tokens(self, rows: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
                           snapshot: torch.Tensor, snapshot_rows: torch.Tensor) -> None:
        """Multi-step rounds: the tokens one step sampled for penalized rows (device tensors), counted with
        `weights` (1 while a row is within its count, 0 past it) in the rows' counts and in the round's sampling
        snapshot of them (`snapshot_rows`: their rows there), before the next step samples."""
        v = self.vocab_size
        self.output_counts.view(-1).index_add_(0, rows * v + tokens, weights)
        snapshot.view(-1).index_add_(0, snapshot_rows * v + tokens, weights)

    # ---- sampling metadata ----------------------------------------------------------

    def sampling_metadata(self, rows: np.ndarray, ahead: np.ndarray | None = None) -> SamplingMetadata:
        """`ahead` (speculative decoding: a row repeated per position it samples at): how many tokens past the
        row's output each entry samples, for its seeded draw and its min_tokens bans."""
        b = len(rows)
        dev = self.device
        extras = self.extras[rows]
        used = int(np.bitwise_or.reduce(extras)) if b else 0
        params = [self.params[r] for r in rows] if used & (_PENALTIES | _LOGIT_BIAS | _ALLOWED | _BANNED) else None
        temp = self.temperature[rows]
        greedy_np = temp < 1e-5
        num_out = self.num_tokens[rows] - self.num_prompt[rows]
        if ahead is not None:
            num_out = num_out + ahead
        uniforms = np.where(greedy_np, 0.0, counter_uniforms(self.seeds[rows], num_out))
        top_k = self.top_k[rows]
        top_p = self.top_p[rows]
        min_p = self.min_p[rows]
        ks = self.num_logprobs[rows]
        asked = bool((ks >= 0).any())
        return SamplingMetadata(
            num_rows=b,
            temperature=to_device(np.where(greedy_np, 1.0, temp).astype(np.float32), dev),
            greedy=to_device(greedy_np, dev),
            all_greedy=bool(greedy_np.all()),
            all_random=not greedy_np.any(),
            all_temperature_one=bool(np.all(greedy_np | (temp == 1.0))),
            uniforms=to_device(uniforms, dev),
            top_k=to_device(np.where(top_k > 0, top_k, self.vocab_size), dev) if (top_k > 0).any() else None,
            top_p=to_device(top_p, dev) if (top_p < 1.0).any() else None,
            min_p=to_device(min_p, dev) if (min_p > 0).any() else None,
            **(self._penalties(rows) if used & _PENALTIES else _NO_PENALTIES),
            logit_bias=self._logit_bias(params) if used & _LOGIT_BIAS else None,
            allowed_mask=self._allowed_mask(params) if used & _ALLOWED else None,
            banned=self._banned(rows, params, 0 if ahead is None else ahead) if used & _BANNED else None,
            num_logprobs=[k if k >= 0 else None for k in ks.tolist()] if asked else [None] * b,
            max_num_logprobs=int(ks.max()) if asked else None,
            processed_logprobs=to_device((extras & _PROCESSED) > 0, dev) if used & _PROCESSED else None,
        )

    def _penalties(self, rows: np.ndarray) -> dict:
        pres, freq, rep = self.penalties[rows].T
        use_rep, use_pres, use_freq = bool((rep != 1.0).any()), bool(pres.any()), bool(freq.any())
        out = dict(_NO_PENALTIES)
        dev = self.device
        r = to_device(rows, dev)
        out["output_counts"] = self.output_counts.index_select(0, r)
        out["prompt_mask"] = self.prompt_mask.index_select(0, r)
        # Rows without penalties have neutral values (0, 0, 1), so the state their rows hold is never applied.
        if use_rep:
            out["repetition_penalties"] = to_device(np.ascontiguousarray(rep), dev)
        if use_pres:
            out["presence_penalties"] = to_device(np.ascontiguousarray(pres), dev)
        if use_freq:
            out["frequency_penalties"] = to_device(np.ascontiguousarray(freq), dev)
        return out

    def _logit_bias(self, params: list[SamplingParams]):
        rows, ids, vals = [], [], []
        for i, p in enumerate(params):
            if p.logit_bias:
                for tok, bias in p.logit_bias.items():
                    rows.append(i)
                    ids.append(tok)
                    vals.append(bias)
        if not rows:
            return None
        dev = self.device
        return to_device(rows, dev), to_device(ids, dev), to_device(vals, dev, torch.float32)

    def _allowed_mask(self, params: list[SamplingParams]) -> torch.Tensor | None:
        if all(p.allowed_token_ids is None for p in params):
            return None
        mask = torch.ones(len(params), self.vocab_size, dtype=torch.bool)
        for i, p in enumerate(params):
            if p.allowed_token_ids is not None:
                mask[i] = False
                mask[i, p.allowed_token_ids] = True
        return to_device(mask, self.device)

    def banned_ahead(self, rows: np.ndarray, ahead: int):
        """The banned tokens (as in SamplingMetadata.banned) of the step `ahead` steps after this one in a
        multi-step round, whose outputs are that much longer (min_tokens); None if no row bans any."""
        if not len(rows) or not int(np.bitwise_or.reduce(self.extras[rows])) & _BANNED:
            return None
        return self._banned(rows, [self.params[r] for r in rows], ahead)

    def _banned(self, rows: np.ndarray, params: list[SamplingParams], ahead: int | np.ndarray = 0):
        """Tokens forced to -inf: EOS and stop ids before min_tokens; the last token of a bad word
        whose prefix was just generated (multi-step rounds and speculative steps have no bad words of several
        tokens). `ahead`: tokens past each row's output (one number, or one per row)."""
        b_rows: list[int] = []
        b_ids: list[int] = []
        per_row = isinstance(ahead, np.ndarray)
        for i, (r, p) in enumerate(zip(rows, params)):
            num_out = int(self.num_tokens[r] - self.num_prompt[r]) + (int(ahead[i]) if per_row else ahead)
            if num_out < p.min_tokens:
                stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                b_rows += [i] * len(stop_ids)
                b_ids += stop_ids
            for word in p._bad_words_token_ids or ():
                prefix = word[:-1]
                if len(prefix) > num_out:
                    continue
                nt = int(self.num_known[r])
                if not prefix or list(self.token_ids[r, nt - len(prefix):nt]) == prefix:
                    b_rows.append(i)
                    b_ids.append(word[-1])
        if not b_rows:
            return None
        return to_device(b_rows, self.device), to_device(b_ids, self.device)
