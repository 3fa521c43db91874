"""Sampling parameters, with vLLM's names and defaults.

Every field is validated in `__post_init__`; a bad value raises `ValueError`
naming the field and the allowed range, before any work is done. Checks that
need the model (token ids against the vocabulary, lengths against
max_model_len) happen in `engine/input_processor.py`.

Pure Python: imported by `core/`, so no torch here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

SAMPLING_EPS = 1e-5  # temperatures below this are greedy


class RequestOutputKind(enum.IntEnum):
    """What each RequestOutput of a stream carries."""

    CUMULATIVE = 0  # everything generated so far
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # a single output when the request finishes


class LogprobsMode(str, enum.Enum):
    """Which distribution `logprobs` / `prompt_logprobs` report (vLLM's `logprobs_mode`)."""

    RAW_LOGPROBS = "raw_logprobs"  # log-softmax of the model's logits (default, as vLLM)
    PROCESSED_LOGPROBS = "processed_logprobs"  # after bias, penalties, temperature and top-k/top-p/min-p


class ParamError(ValueError):
    """A ValueError about one request field; `param` names it (the server reports it as OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _err(name: str, expected: str, got: object) -> ParamError:
    return ParamError(f"{name} must be {expected}, got {got!r}.", param=name)


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a language (vLLM's names). Exactly one of the fields is set.

    json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex: the output
    fullmatches it; choice: the output is one of these strings; grammar: an EBNF grammar (GBNF
    style, root rule `root`); structural_tag: xgrammar's structural tag as JSON text (vLLM's field), either
    {"type": "structural_tag", "format": {...}} or the older {"structures": [{"begin", "schema", "end"}],
    "triggers": [...]}: free text, with what follows a trigger held to its tag. JSON is generated compact (no
    free whitespace between tokens).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    # A reasoning model's (start, end) tag tokens (set by the server's --reasoning-parser): the constraint
    # applies after the thinking. `thinking`: the output begins inside it (its template opened it); else the
    # first token may open it or start the constrained answer. The thinking itself is unconstrained.
    think_tokens: tuple[int, int] | None = None
    thinking: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ParamError("structured_outputs must set exactly one of json, regex, choice, grammar, json_object, "
                             f"structural_tag; got {given or 'none'}.", param="structured_outputs")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ParamError("structured_outputs.choice must be a non-empty list of non-empty strings.",
                             param="structured_outputs")
        for name in ("regex", "grammar", "structural_tag"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ParamError(f"structured_outputs.{name} must be a non-empty string.", param="structured_outputs")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ParamError("structured_outputs.json must be a JSON schema (an object or its JSON text).",
                             param="structured_outputs")
        t = self.think_tokens
        if t is not None and (not isinstance(t, (tuple, list)) or len(t) != 2
                              or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in t)):
            raise ParamError(f"structured_outputs.think_tokens must be two token ids (start, end), got {t!r}.",
                             param="structured_outputs")

    def key(self) -> tuple[str, str]:
        """(kind, text): what the compiled grammar is cached by."""
        import json as _json

        if self.json is not None:
            text = self.json if isinstance(self.json, str) else _json.dumps(self.json, sort_keys=True)
            return "json", text
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", _json.dumps(self.choice)
        if self.structural_tag is not None:
            return "structural_tag", self.structural_tag
        return "grammar", self.grammar


@dataclass
class SamplingParams:
    """How to sample one request. Defaults follow vLLM."""

    n: int = 1  # completions returned
    best_of: int | None = None  # completions generated (>= n); the n with the highest cumulative logprob are returned
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a generated token
    repetition_penalty: float = 1.0  # CTRL-style penalty over prompt and generated tokens (1 = off)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens below min_p x the top probability
    seed: int | None = None  # per-request seed; the output does not depend on the rest of the batch
    stop: str | list[str] | None = None  # stop strings, matched on the detokenized output
    stop_token_ids: list[int] | None = None  # extra token ids that end the sequence
    bad_words: list[str] | None = None  # words that must never be generated
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False  # keep generating past EOS
    max_tokens: int | None = 16  # None = up to max_model_len
    min_tokens: int = 0  # EOS and stop_token_ids are suppressed until this many tokens exist
    logprobs: int | None = None  # top-k logprobs per generated token (the chosen token is always added)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logprobs_mode: LogprobsMode = LogprobsMode.RAW_LOGPROBS
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (JSON schema, regex, ...)
    extra_args: dict[str, Any] | None = None  # for custom logits processors (the server's vllm_xargs)
    # Filled from the bad_words strings by the input processor (token sequences, any prefix form).
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise _err("logit_bias", "a mapping of token id -> float", self.logit_bias) from e
        self.output_kind = RequestOutputKind(self.output_kind)
        self.logprobs_mode = LogprobsMode(self.logprobs_mode)
        self._validate()
        if self.temperature < SAMPLING_EPS:
            # Greedy: the filters cannot change the argmax.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _validate(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("best_of", self.best_of, self.n, f"an integer >= n ({self.n})")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                raise _err(name, "in [-2, 2]", v)
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise _err("repetition_penalty", "> 0", self.repetition_penalty)
        if not _is_number(self.temperature) or self.temperature < 0:
            raise _err("temperature", ">= 0", self.temperature)
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise _err("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise _err("top_k", "an integer >= 1, or 0 / -1 to disable", self.top_k)
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise _err("min_p", "in [0, 1]", self.min_p)
        if self.seed is not None:
            _check_int("seed", self.seed, None, "an integer or None")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _err("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                _check_int(name, v, 0, "an integer >= 0 or None")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1, "an integer >= 1 or None")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise _err("stop", "a list of non-empty strings", self.stop)
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name)
            if ids is not None and any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
                raise _err(name, "a list of non-negative token ids", ids)
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            raise _err("allowed_token_ids", "a non-empty list", self.allowed_token_ids)
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise _err("bad_words", "a list of non-empty strings", self.bad_words)
        if not self.detokenize and self.stop:
            raise ParamError("stop strings are matched on text: stop needs detokenize=True.", param="stop")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _err("structured_outputs", "a StructuredOutputsParams", self.structured_outputs)

    @property
    def sampling_type_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def clone(self, **changes: object) -> SamplingParams:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if "n" in changes and "best_of" not in changes:
            values["best_of"] = None
        values.update(changes)
        return SamplingParams(**values)


@dataclass
class BeamSearchParams:
    """Beam search (vLLM's `LLM.beam_search` API)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # only 0 (deterministic beams) is supported
    length_penalty: float = 1.0  # score = sum logprobs / len ** length_penalty (HF's definition)
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False  # HF semantics: True, False or "never"
    # Logits processors beams honour (applied before each step's log-softmax):
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    structured_outputs: StructuredOutputsParams | None = None  # every beam stays in the language

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width, 1)
        _check_int("max_tokens", self.max_tokens, 1)
        if self.temperature != 0.0:
            raise _err("temperature", "0 for beam search", self.temperature)
        if not _is_number(self.length_penalty):
            raise _err("length_penalty", "a number", self.length_penalty)
        if self.early_stopping not in (True, False, "never"):
            raise _err("early_stopping", "True, False or 'never'", self.early_stopping)
        self.sampling_params(0)  # validates the processor fields with SamplingParams' rules

    def sampling_params(self, num_candidates: int) -> SamplingParams:
        """What each beam samples with: greedy, top-`num_candidates` processed logprobs, the processors."""
        return SamplingParams(
            temperature=0.0, max_tokens=self.max_tokens, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            logprobs=num_candidates, logprobs_mode=LogprobsMode.PROCESSED_LOGPROBS, logit_bias=self.logit_bias,
            bad_words=self.bad_words, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output, structured_outputs=self.structured_outputs)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN fails v == v


def _check_int(name: str, v: object, minimum: int | None, expected: str | None = None) -> None:
    ok = isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)
    if not ok:
        raise _err(name, expected or f"an integer >= {minimum}", v)
