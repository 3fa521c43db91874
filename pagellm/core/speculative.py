"""Draft tokens for speculative decoding, as the scheduler asks for them.

    NgramProposer.propose(seq_id, token_ids, k) -> up to k draft tokens (n-gram lookup, on the host)
    DraftModelSlots.propose(seq_id, token_ids, k) -> k placeholders (-1) the worker's draft model fills in

The sequence's last n tokens are looked up earlier in its tokens (prompt and output); the tokens that
followed the match are the drafts. The longest match wins (n from prompt_lookup_max down to
prompt_lookup_min), the latest among equally long ones. Worked example, n_max 3, n_min 1, k 3:

    position  0 1 2 3 4 5 6 7 8 9 10
    token     a b c d x b c d y b c
    the last 3 (y b c) occur nowhere earlier; the last 2 (b c) end at 2 and at 6: the latest, 6, wins,
    and the drafts are the tokens at 7, 8, 9: (d y b)

Each sequence keeps an index from token id to the positions where it occurs, extended by the tokens
appended since the last call, so a proposal costs the candidates it checks (at most MAX_CANDIDATES,
latest first), not a scan of the whole context.

Pure Python: no torch import.
"""

from __future__ import annotations

from pagellm.config import SpeculativeConfig


class _SeqIndex:
    """Where each token id occurs in one sequence, for the positions below `upto`."""

    __slots__ = ("positions", "upto")

    def __init__(self) -> None:
        self.positions: dict[int, list[int]] = {}
        self.upto = 0


class NgramProposer:
    MAX_CANDIDATES = 64  # earlier occurrences of the last token checked per proposal, latest first

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.n_max = config.prompt_lookup_max
        self.n_min = config.prompt_lookup_min
        self._index: dict[int, _SeqIndex] = {}

    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        """Up to k draft tokens to follow `tokens` (fewer near the end of the match; [] without a match)."""
        if k <= 0 or len(tokens) < self.n_min + 1:
            return []
        index = self._index.get(seq_id)
        if index is None:
            index = self._index[seq_id] = _SeqIndex()
        positions = index.positions
        last = len(tokens) - 1
        for i in range(index.upto, last):  # every position but the last: a match must end before it
            occ = positions.get(tokens[i])
            if occ is None:
                positions[tokens[i]] = [i]
            else:
                occ.append(i)
        index.upto = last
        cands = positions.get(tokens[last])
        if not cands:
            return []
        n_max = self.n_max
        best, end = 0, -1
        for i in reversed(cands[-self.MAX_CANDIDATES:]):
            m = 1
            while m < n_max and m <= i and tokens[i - m] == tokens[last - m]:
                m += 1
            if m > best:
                best, end = m, i
                if m == n_max:
                    break
        if best < self.n_min:
            return []
        return tokens[end + 1:end + 1 + min(k, self.k)]

    def forget(self, seq_id: int) -> None:
        self._index.pop(seq_id, None)


class DraftModelSlots:
    """method draft_model: the drafts are the draft model's greedy tokens, computed by the worker at the start
    of the step that checks them (worker/drafter.py), so the scheduler schedules k placeholders per sequence."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens

    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        return [-1] * min(k, self.k)

    def forget(self, seq_id: int) -> None:
        pass


def make_proposer(config: SpeculativeConfig) -> NgramProposer | DraftModelSlots:
    if config.method in ("draft_model", "mtp", "eagle", "eagle3"):
        return DraftModelSlots(config)
    return NgramProposer(config)
