"""Structured output with xgrammar: compiled grammars cached by their text, one matcher per constrained sequence.

    GrammarCompiler.compile(StructuredOutputsParams) -> CompiledGrammar   (ParamError with the compiler's
                                                                         message when it does not compile)
    StructuredOutputManager                                              (the scheduler's GrammarHook)
        add / fork / sync / free: one xgrammar GrammarMatcher per sequence, advanced by accepted tokens
        bitmask(seq ids) -> (B, ceil(V / 32)) int32: bit t of row i set = token t allowed next

The sampler applies the bitmask to the logits after logit_bias and the other processors (xgrammar's
apply_token_bitmask_inplace: one vectorised pass, no Python loop over the vocabulary). A grammar that
is complete allows only the end-of-sequence tokens, so a constrained sequence ends when its output is
a full sentence of the language. JSON is compiled compact (no free whitespace): a small or untrained
model cannot wander into endless whitespace.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

import numpy as np

from pagellm.sampling_params import ParamError, StructuredOutputsParams

logger = logging.getLogger(__name__)


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # a dependency, but keep the message clear if it is missing
        raise ImportError("structured outputs need xgrammar: pip install xgrammar") from e
    return xgrammar


_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def make_manager(tokenizer_path: str | None, tokenizer: Any, vocab_size: int,
                 stop_token_ids: frozenset[int]) -> StructuredOutputManager | None:
    """A manager for a model with a tokenizer (given, or loaded from tokenizer_path on first use); None without."""
    if tokenizer is None and tokenizer_path is None:
        return None

    def build() -> GrammarCompiler:
        tok = tokenizer
        if tok is None:
            from pagellm.engine.llm_engine import load_tokenizer

            tok = load_tokenizer(tokenizer_path)
        return GrammarCompiler(tok, vocab_size, sorted(stop_token_ids))

    return StructuredOutputManager(build)


def choice_grammar(choices: list[str]) -> str:
    """EBNF for 'exactly one of these strings' (literals JSON-escaped, which the EBNF string syntax shares)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def structural_tag(text: str) -> Any:
    """xgrammar's StructuralTag from vLLM's structural_tag JSON: {"type": "structural_tag", "format": {...}}, or the
    older {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (each structure a tag whose content
    follows its JSON schema, entered when the text reaches one of the triggers)."""
    xgr = _xgr()
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("a structural tag is a JSON object")
    if "format" in obj:
        return xgr.StructuralTag.from_json({**obj, "type": "structural_tag"})
    items = [xgr.StructuralTagItem(begin=s["begin"], schema=s.get("schema") or {}, end=s["end"])
             for s in obj.get("structures") or []]
    if not items:
        raise ValueError("a structural tag needs format, or structures with begin / schema / end")
    return xgr.StructuralTag.from_legacy_structural_tag(items, list(obj.get("triggers") or []))


class GrammarCompiler:
    """Compiles each distinct grammar once (cached by its kind and text) for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        xgr = _xgr()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.bitmask_width = -(-vocab_size // 32)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        kind, text = key
        try:
            if kind == "json":
                schema = json.loads(text) if isinstance(spec.json, str) else spec.json
                grammar = self._compile_json_schema(schema)
            elif kind == "json_object":
                grammar = self._compiler.compile_json_schema({"type": "object"}, any_whitespace=False)
            elif kind == "regex":
                grammar = self._compiler.compile_regex(text)
            elif kind == "choice":
                grammar = self._compiler.compile_grammar(choice_grammar(spec.choice))
            elif kind == "structural_tag":
                grammar = self._compiler.compile_structural_tag(structural_tag(text))
            else:
                grammar = self._compiler.compile_grammar(text)
        except Exception as e:  # noqa: BLE001 - the compiler's own message is the answer
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = _SOURCE_PREFIX.sub("", msg)  # "[12:00:00] /project/cpp/x.cc:83: Regex ..." -> "Regex ..."
            raise ParamError(f"structured_outputs.{kind} does not compile: {msg}", param="structured_outputs",
                             code="invalid_grammar") from None
        with self._lock:
            self._cache[key] = grammar
        return grammar


    def _compile_json_schema(self, schema: Any) -> Any:
        """The schema's grammar, with xgrammar's strings of bounded length (minLength / maxLength) corrected: it
        writes their characters as [^"\\\r\n], which lets raw control characters into JSON strings (invalid
        JSON) and leaves out escape sequences. They become one character of a JSON string each: any but
        U+0000-U+001F, '"' and '\\', or an escape."""
        text = str(_xgr().Grammar.from_json_schema(schema, any_whitespace=False))
        fixed = fix_bounded_strings(text)
        if fixed == text:
            return self._compiler.compile_json_schema(schema, any_whitespace=False)
        return self._compiler.compile_grammar(fixed)


# A rule xgrammar writes for the characters of a string with minLength / maxLength (printed EBNF).
_BOUNDED_CHARS = re.compile(r"^(\S*characters) ::= " + re.escape(r'(([^\"\\\r\n]))') + "$", re.M)


def fix_bounded_strings(ebnf: str) -> str:
    """Rewrite the character rules of length-bounded JSON strings in xgrammar's EBNF (see _compile_json_schema)."""
    if "basic_escape ::=" not in ebnf:
        return ebnf
    return _BOUNDED_CHARS.sub(lambda m: m.group(1) + r' ::= (([^\0-\x1f\"\\]) | ("\\" basic_escape))', ebnf)


class StructuredOutputManager:
    """The scheduler's grammar hook (core/grammar.py). The compiler is built on first use: a model that never
    gets a constrained request never loads xgrammar."""

    def __init__(self, make_compiler) -> None:
        self._make_compiler = make_compiler  # () -> GrammarCompiler
        self._compiler: GrammarCompiler | None = None
        self._states: dict[int, list] = {}  # seq_id -> [GrammarMatcher, tokens accepted]

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = self._make_compiler()
        return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> Any:
        return self.compiler.compile(spec)

    def add(self, seq_id: int, spec: StructuredOutputsParams) -> None:
        # state: [matcher, tokens synced, phase, think tokens]; phase "grammar", or before it (a reasoning
        # model, spec.think_tokens): "think" (unconstrained until the end tag) or "open" (the first token may
        # open the thinking)
        phase = "grammar" if spec.think_tokens is None else ("think" if spec.thinking else "open")
        self._states[seq_id] = [_xgr().GrammarMatcher(self.compile(spec)), 0, phase, spec.think_tokens]

    def fork(self, parent_id: int, child_id: int) -> None:
        matcher, *rest = self._states[parent_id]
        self._states[child_id] = [matcher.fork(), *rest]

    def sync(self, seq_id: int, output_token_ids: list[int]) -> None:
        state = self._states.get(seq_id)
        if state is None:
            return
        matcher, n, phase, tags = state
        for token in output_token_ids[n:]:
            if phase == "think":
                phase = "grammar" if token == tags[1] else phase
                continue
            if phase == "open":
                if token == tags[0]:
                    phase = "think"
                    continue
                phase = "grammar"
            if not matcher.is_terminated() and not matcher.accept_token(token):
                logger.warning("sequence %d: token %d is outside its grammar", seq_id, token)
        state[1], state[2] = len(output_token_ids), phase

    def bitmask(self, seq_ids: list[int]) -> np.ndarray:
        mask = np.full((len(seq_ids), self.compiler.bitmask_width), -1, dtype=np.int32)  # -1: every bit set
        bits = mask.view(np.uint32)
        for row, seq_id in enumerate(seq_ids):
            state = self._states.get(seq_id)  # gone: the sequence ended while this step was in flight
            if state is None or state[2] == "think":
                continue
            if not state[0].is_terminated():
                state[0].fill_next_token_bitmask(mask, row)
            if state[2] == "open":  # the grammar's first tokens, or the tag that opens the thinking
                start = state[3][0]
                bits[row, start // 32] |= np.uint32(1 << (start % 32))
        return mask

    def free(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    @property
    def num_active(self) -> int:
        return len(self._states)
