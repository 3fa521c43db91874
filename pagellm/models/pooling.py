"""Pooling models: a native decoder run for embeddings or sequence classification instead of generation.

    runner "pooling" (auto for *Model / *ForSequenceClassification checkpoints, or any causal LM with --runner
    pooling) -> as_pooling_model(causal LM class) -> the same layers, no LM head, plus a `score` head (classify)
    -> the worker pools the final hidden states of each prompt (Pooler) and returns one vector per prompt

The decoder is the generative model's class: the paged KV cache, chunked prefill, tensor parallelism and
every attention backend work unchanged; a pooling request is a prompt that ends when its last chunk is
computed. Checkpoints saved from the bare decoder (`LlamaModel`: "layers.0..." without the "model." prefix)
load too.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from pagellm.config import PoolerConfig

logger = logging.getLogger(__name__)

POOLING_TYPES = ("LAST", "MEAN", "CLS")


def pooling_task_of(arch: str) -> str | None:
    """The task an architecture name declares (vLLM's table): classify for *ForSequenceClassification,
    token_classify for *ForTokenClassification, embed for *Model / *ForTextEncoding / *EmbeddingModel, None for a
    generative one."""
    if arch.endswith(("ForSequenceClassification", "ClassificationModel")):
        return "classify"
    if arch.endswith("ForTokenClassification"):
        return "token_classify"
    if arch.endswith(("ForTextEncoding", "EmbeddingModel")) or (arch.endswith("Model")
                                                                 and not arch.endswith("LMHeadModel")):
        return "embed"
    return None


def _sentence_transformers(path: str) -> dict:
    """Pooling settings from a sentence-transformers checkpoint (modules.json + the Pooling module's config):
    {"pooling_type": ..., "normalize": ...}; {} when the checkpoint is not one. Modules pagellm would not
    apply (Dense projections, max pooling, ...) are a ValueError: the embeddings would silently differ."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return {}
    with open(modules_file) as f:
        modules = json.load(f)
    out: dict = {}
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            out["normalize"] = True
        elif kind == "Pooling":
            with open(os.path.join(path, m.get("path", ""), "config.json")) as f:
                cfg = json.load(f)
            modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
            by_mode = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN",
                       "pooling_mode_cls_token": "CLS"}
            if len(modes) != 1 or modes[0] not in by_mode:
                raise ValueError(f"{path}: sentence-transformers pooling {modes} is not supported (one of "
                                 "lasttoken, mean_tokens, cls_token).")
            if cfg.get("include_prompt") is False:
                raise ValueError(f"{path}: sentence-transformers pooling with include_prompt=false is not supported.")
            out["pooling_type"] = by_mode[modes[0]]
        else:
            raise ValueError(f"{path}: the sentence-transformers module {m.get('type')!r} is not supported "
                             "(pagellm applies Pooling and Normalize).")
    return out


POOLER_CONFIG_FIELDS = ("pooling_type", "normalize", "use_activation", "dimensions")


def make_pooler_config(path: str, hf, task: str, overrides: dict | None, default_type: str = "LAST") -> PoolerConfig:
    """The checkpoint's pooler (LAST pooling by default for decoders, CLS for BERT, as vLLM; sentence-transformers'
    own when it has one), with `--pooler-config` on top. ValueError naming a bad field."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(POOLER_CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"pooler_config: unknown fields {unknown}; it takes {', '.join(POOLER_CONFIG_FIELDS)}.")
    values = {"pooling_type": default_type, **_sentence_transformers(path), **overrides}
    ptype = str(values["pooling_type"]).upper()
    if ptype not in POOLING_TYPES:
        raise ValueError(f"pooler_config.pooling_type must be one of {', '.join(POOLING_TYPES)}, got "
                         f"{values['pooling_type']!r}.")
    for name in ("normalize", "use_activation"):
        if name in values and not isinstance(values[name], bool):
            raise ValueError(f"pooler_config.{name} must be a boolean, got {values[name]!r}.")
    hidden = hf.hidden_size
    dims = getattr(hf, "matryoshka_dimensions", None)
    matryoshka = tuple(dims) if dims else bool(getattr(hf, "is_matryoshka", False))
    default_dims = values.get("dimensions")
    if default_dims is not None and (isinstance(default_dims, bool) or not isinstance(default_dims, int)
                                     or not 1 <= default_dims <= hidden):
        raise ValueError(f"pooler_config.dimensions must be an integer in [1, {hidden}], got {default_dims!r}.")
    labels: tuple[str, ...] = ()
    if task in ("classify", "token_classify"):
        n = getattr(hf, "num_labels", None) or len(getattr(hf, "id2label", None) or {}) or 2
        id2label = getattr(hf, "id2label", None) or {}
        labels = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n))
    return PoolerConfig(task=task, hidden_size=hidden, pooling_type=ptype, normalize=values.get("normalize", True),
                        use_activation=values.get("use_activation", True), dimensions=default_dims,
                        matryoshka=matryoshka, labels=labels)


class _PoolingMixin:
    """What turns a causal LM class into a pooling model: the untied LM head dropped (never run), a `score`
    head for classification, and checkpoint names of a bare decoder mapped under the model's prefix."""

    pooler_config: PoolerConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for attr in ("lm_head", "embed_out"):
            head = getattr(self, attr, None)
            if isinstance(head, nn.Module) and not getattr(self, "tied", True):
                setattr(self, attr, None)  # an untied LM head: vocab x hidden that pooling never reads
        pc = self.pooler_config
        if pc.task == "classify":
            self.score = nn.Linear(pc.hidden_size, len(pc.labels), bias=False)  # transformers' classification head
        elif pc.task == "token_classify":  # transformers' token classification head has a bias (by default)
            bias = bool(getattr(self.config, "token_classification_bias", True))
            self.score = nn.Linear(pc.hidden_size, len(pc.labels), bias=bias)
        names = [n for n, _ in self.named_parameters()]
        self._param_names = set(names)
        firsts = [n.split(".")[0] for n in names if n.split(".")[0] != "score"]
        self._base_prefix = max(set(firsts), key=firsts.count) + "." if firsts else ""

    def map_weight(self, name: str):
        if name.startswith("score."):
            return (name, None) if self.pooler_config.task in ("classify", "token_classify") else None
        if name.startswith(("lm_head.", "embed_out.")) and not any(n.startswith(name.split(".")[0] + ".")
                                                                    for n in self._param_names):
            return None  # a causal LM checkpoint run as a pooling model: its LM head is not used
        target = super().map_weight(name)
        if target is not None and target[0] not in self._param_names and self._base_prefix:
            bare = super().map_weight(self._base_prefix + name)  # a bare decoder's checkpoint (LlamaModel)
            if bare is not None and bare[0] in self._param_names:
                return bare
        return target

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """(m, hidden) pooled states -> (m, num_labels) float32 logits."""
        return self.score(pooled.to(self.score.weight.dtype)).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a pooling model has no LM head: it serves embed / classify requests, not generation.")


def as_pooling_model(cls: type, pooler: PoolerConfig) -> type:
    """A subclass of the causal LM class `cls` that serves `pooler.task` (an encoder-only class, BERT, is a pooling
    model already: it only gets the config)."""
    bases = (cls,) if getattr(cls, "is_encoder", False) else (_PoolingMixin, cls)
    return type(f"{cls.__name__}As{pooler.task.capitalize()}", bases, {"pooler_config": pooler})


class Pooler:
    """Per-request pooling in the worker. A prompt may be computed over several steps (chunked prefill):
    MEAN sums its chunks as they come, CLS keeps the first position; LAST and the token task need only the
    last chunk (LAST) or keep every chunk (token_embed)."""

    def __init__(self, model: nn.Module, config: PoolerConfig) -> None:
        self.model = model
        self.config = config
        self.params: dict = {}  # seq_id -> PoolingParams of the sequences the worker holds
        self.state: dict[int, list] = {}  # seq_id -> what the earlier chunks left (sum and count, or chunks)

    def add(self, seq_id: int, params) -> None:
        self.params[seq_id] = params

    def forget(self, seq_id: int) -> None:
        self.params.pop(seq_id, None)
        self.state.pop(seq_id, None)

    def step(self, hidden: torch.Tensor, chunks: list[tuple]) -> dict:
        """One step's chunks [(seq_id, first batch index, end, chunk starts the prompt, chunk ends it)] -> the
        outputs of the sequences whose prompt is now computed, as float32 numpy arrays (one copy to the host)."""
        done = {}
        for seq_id, lo, hi, first, last in chunks:
            out = self.chunk(seq_id, hidden[lo:hi], first, last)
            if out is not None:
                done[seq_id] = out
        if not done:
            return {}
        flat = torch.cat([o.reshape(-1) for o in done.values()]).cpu().numpy()
        out, at = {}, 0
        for seq_id, o in done.items():
            out[seq_id] = flat[at:at + o.numel()].reshape(tuple(o.shape))
            at += o.numel()
        return out

    def chunk(self, seq_id: int, hidden: torch.Tensor, first: bool, last: bool) -> torch.Tensor | None:
        """Feed one chunk's hidden states (n, hidden) of a sequence; the request's output once `last`."""
        params = self.params[seq_id]
        kind = params.pooling_kind(self.config.pooling_type)
        if kind == "LAST":
            pooled = hidden[-1:] if last else None
        elif kind == "CLS":
            if first:  # a copy: a view would keep the whole step's hidden states alive
                self.state[seq_id] = [hidden[:1].clone()]
            pooled = self.state.pop(seq_id)[0] if last else None
        elif kind == "MEAN":
            acc = self.state.setdefault(seq_id, [torch.zeros(1, hidden.shape[1], dtype=torch.float32,
                                                             device=hidden.device), 0])
            acc[0] += hidden.float().sum(dim=0, keepdim=True)
            acc[1] += hidden.shape[0]
            pooled = (acc[0] / acc[1]) if last else None
            if last:
                del self.state[seq_id]
        else:  # ALL
            parts = self.state.setdefault(seq_id, [])
            parts.append(hidden if last else hidden.clone())
            pooled = torch.cat(parts) if last else None
            if last:
                del self.state[seq_id]
        return None if pooled is None else self.head(pooled, params)

    @torch.inference_mode()
    def head(self, pooled: torch.Tensor, params) -> torch.Tensor:
        """(m, hidden) pooled states -> the task's output in float32: (hidden,) / (m, hidden) embeddings,
        (num_labels,) class probabilities (scores), or (m, num_labels) per token (token_classify)."""
        c = self.config
        if params.task in ("classify", "score", "token_classify"):
            logits = self.model.classify(pooled)
            if params.task != "token_classify":
                logits = logits[0]
            if params.use_activation if params.use_activation is not None else c.use_activation:
                logits = torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)
            return logits
        x = pooled.float()
        dims = params.dimensions or c.dimensions
        if dims is not None:
            x = x[:, :dims]
        if params.normalize if params.normalize is not None else c.normalize:
            x = nn.functional.normalize(x, p=2, dim=-1)
        return x[0] if params.task == "embed" else x
