"""Parameters of a pooling request (embeddings, classification, scores), with vLLM's names.

A pooling model (`runner="pooling"`) runs each prompt once and returns one vector per prompt (or one
per prompt token for the token tasks) instead of generated tokens. What a request may ask depends on
its task:

    embed          the pooled hidden state; dimensions (Matryoshka models), normalize
    token_embed    every prompt token's hidden state; normalize
    classify       the class probabilities of a *ForSequenceClassification head; use_activation
    score          classify's head on a text pair (cross-encoders); use_activation
    token_classify the class probabilities of every prompt token (*ForTokenClassification: NER); use_activation

Pure Python: imported by `core/`, so no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pagellm.sampling_params import ParamError

POOLING_TASKS = ("embed", "token_embed", "classify", "score", "token_classify")
TOKEN_TASKS = ("token_embed", "token_classify")  # one output row per prompt token
# What a pooling model serves, by its task (the architecture, or --convert): the request tasks it takes.
SERVED_TASKS = {"embed": ("embed", "token_embed"), "classify": ("classify", "score"),
                "token_classify": ("token_classify",)}
_TASK_FIELDS = {
    "embed": ("dimensions", "normalize"),
    "token_embed": ("normalize",),
    "classify": ("use_activation",),
    "score": ("use_activation",),
    "token_classify": ("use_activation",),
}


@dataclass
class PoolingParams:
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens (-1: max_model_len - 1)
    dimensions: int | None = None  # embed: the first `dimensions` features (Matryoshka models only)
    normalize: bool | None = None  # embed / token_embed: L2-normalize (None: the model's pooler config, on)
    use_activation: bool | None = None  # classify / score: softmax (sigmoid for one label); None: on
    task: str | None = None  # set by LLM.embed / classify / score / encode and the server's routes

    # Set by the engine: the request pools more than the last position (MEAN, CLS, token_embed), so every
    # prompt position is computed (no prefix-cache hits).
    needs_all_hidden = False

    def pooling_kind(self, pooling_type: str) -> str:
        """Which positions this request pools under the model's pooling_type: ALL for the token tasks, else it."""
        return "ALL" if self.task in TOKEN_TASKS else pooling_type

    def __post_init__(self) -> None:
        t = self.truncate_prompt_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or (t < 1 and t != -1)):
            raise ParamError(f"truncate_prompt_tokens must be a positive integer or -1, got {t!r}.",
                             param="truncate_prompt_tokens")
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ParamError(f"dimensions must be a positive integer, got {d!r}.", param="dimensions")
        for name in ("normalize", "use_activation"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ParamError(f"{name} must be a boolean, got {v!r}.", param=name)
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ParamError(f"task must be one of {', '.join(POOLING_TASKS)}, got {self.task!r}.", param="task")

    def clone(self, **changes: object) -> PoolingParams:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return PoolingParams(**values)

    def check_task(self) -> None:
        """ParamError naming the fields this request's task does not take."""
        allowed = _TASK_FIELDS[self.task]
        given = [name for name in ("dimensions", "normalize", "use_activation") if getattr(self, name) is not None]
        wrong = [name for name in given if name not in allowed]
        if wrong:
            raise ParamError(f"the {self.task} task does not take {', '.join(wrong)} (it takes "
                             f"{', '.join(allowed)}).", param=wrong[0])
