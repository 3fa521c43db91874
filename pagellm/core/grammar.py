"""The scheduler's view of structured output: a grammar hook that follows each constrained sequence.

    add(seq, spec)            a constrained sequence starts (spec: the request's StructuredOutputsParams)
    fork(parent, child)       the child continues from the parent's grammar state (n / best_of, beams)
    sync(seq, output ids)     accept the tokens appended since the last sync (after every step)
    bitmask(seq ids)          the next-token masks, one row per sequence that samples this step
    free(seq)                 the sequence finished

The scheduler owns when these happen; what a grammar is (xgrammar matchers, compiled grammars, the
bitmask array) lives behind the hook (pagellm/structured_output/), so core/ stays free of torch.
Syncing from each sequence's own token list makes the order of forks and appends inside a policy
irrelevant: a fork copies the parent's state at the tokens both share.

Pure Python: no torch import.
"""

from __future__ import annotations

from typing import Any, Protocol


class GrammarHook(Protocol):
    def add(self, seq_id: int, spec: Any) -> None: ...

    def fork(self, parent_id: int, child_id: int) -> None: ...

    def sync(self, seq_id: int, output_token_ids: list[int]) -> None: ...

    def bitmask(self, seq_ids: list[int]) -> Any: ...

    def free(self, seq_id: int) -> None: ...
