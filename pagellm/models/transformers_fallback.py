"""The transformers fallback: a causal LM with no native pagellm implementation runs through
Hugging Face's own modules, with pagellm's paged attention plugged into transformers' attention
interface, so continuous batching, the paged KV cache, prefix caching and the sampler all apply.

    TransformersForCausalLM.forward(input_ids (T,), positions (T,), kv_caches, meta, backend)
        -> hf.base_model(input_ids[None], position_ids=positions[None], use_cache=False, pagellm_step=step)
             each attention layer -> ALL_ATTENTION_FUNCTIONS["pagellm"](module, q, k, v, ...)
                 -> backend.forward(q, k, v, kv_caches[module.layer_idx], meta, AttentionParams(...))
        -> hidden (T, hidden)
    compute_logits: the model's output embeddings, then the logit scaling the config declares
        (logit_scale, logits_scaling, final_logit_softcapping)

The whole flat batch is one "sequence" of length T to transformers; no mask is built (transformers
skips mask creation for attention functions it does not know), because the paged backend knows
where each sequence starts from the step's metadata. The step reaches the attention function through
a holder that this model's attention modules share, set only for the duration of one forward pass
(not every modeling file passes extra forward keywords down to its attention).

Requirements, checked before loading (`fallback_unsupported_reason`): transformers has a causal-LM
class for the config, the model is decoder-only, its attention calls the attention interface
(`_supports_attention_backend`, or the modeling file dispatches through ALL_ATTENTION_FUNCTIONS), every layer
is an attention layer (config.layer_types), and the attention is plain causal attention (no chunked attention:
Llama 4; attention sinks, which GPT-OSS passes to the interface, are refused when the call brings them).
Sliding windows the model passes to the interface are honoured by the kernels; KV blocks are not
freed early on this path.

Once the weights are loaded, a probe checks what the flat batch relies on: that tokens meet only inside the
attention interface. With every attention call answering zeros, the hidden state of a token must not change when
another token does; a state-space, convolution or linear-attention layer (Mamba hybrids: Falcon-H1, Jamba, ...)
mixes tokens outside it, which the flat batch would run across sequences and without their state: refused.

Weights load through transformers' own `from_pretrained` (the model is built on the meta device first): its
checkpoint conversions apply (mixture-of-experts checkpoints store one tensor per expert, which transformers 5
stacks), as they do for transformers itself.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, AttentionParams, KVCache
from pagellm.config import ModelGeometry
from pagellm.models.base import CausalLM
from pagellm.models.layers import lm_head_logits

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "pagellm"


@dataclass
class PagedStep:
    """What one forward pass's attention layers need."""

    kv_caches: list[KVCache]  # per layer, indexed by the attention module's layer_idx
    meta: AttentionMetadata
    backend: AttentionBackend


class StepHolder:
    """Shared by one model's attention modules (as `module.pagellm_steps`); holds the step only while
    that model's forward pass runs."""

    def __init__(self, kv_shape: tuple[int, int] = (0, 0)) -> None:
        self.current: PagedStep | None = None
        self.kv_shape = kv_shape  # (K/V heads, head_dim) the cache was sized for, from the config

    @contextlib.contextmanager
    def active(self, step: PagedStep):
        self.current = step
        try:
            yield
        finally:
            self.current = None


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                            sliding_window: int | None = None, softcap: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: q (1, H, T, D), k/v (1, KVH, T, D) -> (1, T, H, D)."""
    holder: StepHolder | None = getattr(module, "pagellm_steps", None)
    step = holder.current if holder is not None else None
    if step is None:
        raise RuntimeError("pagellm attention was called outside a pagellm forward pass")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx: this model cannot run on the fallback")
    for name in ("s_aux", "sinks"):  # (seen first by the probe after loading: the model is refused there)
        if kwargs.get(name) is not None:
            raise ValueError(f"cannot run {type(module).__name__}'s model on the transformers fallback: it passes "
                             f"attention sinks ({name}) to the attention interface, and pagellm's paged attention "
                             "has no sinks.")
    if tuple(key.shape[1:2]) + tuple(key.shape[3:]) != holder.kv_shape:
        heads, dim = holder.kv_shape
        raise ValueError(f"cannot run {type(module).__name__}'s model on the transformers fallback: its attention "
                         f"passes keys of {key.shape[1]} heads x {key.shape[3]} where the config gives {heads} K/V "
                         f"heads x {dim} (keys repeated or reshaped inside the layer), so the paged cache cannot hold "
                         "them.")
    if step is PROBE:  # the token-mixing probe: attention contributes nothing
        return torch.zeros_like(query.transpose(1, 2)), None
    q = query[0].transpose(0, 1)  # (T, H, D)
    k = key[0].transpose(0, 1)  # (T, KVH, D)
    v = value[0].transpose(0, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    params = AttentionParams(scale, sliding_window or None, softcap or None)
    out = step.backend.forward(q, k, v, step.kv_caches[layer], step.meta, params)  # (T, H, D)
    return out[None], None


PROBE = object()  # StepHolder.current while the token-mixing probe runs


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


def hf_causal_lm_class(hf_config):
    """The class transformers' AutoModelForCausalLM builds for this config, or None."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(hf_config) not in mapping:
        return None
    return mapping[type(hf_config)]


def fallback_unsupported_reason(hf_config) -> str | None:
    """None if the model can run on the fallback, else why not (for the error message)."""
    if getattr(hf_config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; pagellm runs decoder-only causal LMs"
    cls = hf_causal_lm_class(hf_config)
    if cls is None:
        return f"transformers has no causal-LM class for model_type {getattr(hf_config, 'model_type', '?')!r}"
    other = sorted({t for t in (getattr(hf_config, "layer_types", None) or []) if "attention" not in str(t)})
    if other:
        return (f"its layers are not all attention layers ({', '.join(map(str, other))} in config.layer_types): "
                "pagellm's cache holds attention keys and values, not the state such layers carry")
    if getattr(hf_config, "attention_chunk_size", None):
        return ("it uses chunked local attention (attention_chunk_size), which the paged kernels do not mask; "
                "pagellm's attention is causal, with an optional sliding window")
    if not getattr(cls, "_supports_attention_backend", False) and \
            "ALL_ATTENTION_FUNCTIONS" not in inspect.getsource(sys.modules[cls.__module__]):
        return (f"{cls.__name__}'s attention does not go through transformers' attention interface, so the paged "
                "KV cache cannot be plugged in")
    return None


class TransformersForCausalLM(CausalLM):
    """Any decoder-only causal LM transformers can build, run on pagellm's paged attention."""

    supports_tp = False  # transformers' own modules are not sharded

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        g = super().geometry(config)
        # Windows stay in the kernels (the model passes them per call); blocks are never freed early here,
        # since pagellm cannot check that every layer really applies config.sliding_window.
        return ModelGeometry(g.num_layers, g.num_kv_heads, g.head_dim, (None,) * g.num_layers)

    def __init__(self, config, max_model_len: int, tp=None) -> None:
        super().__init__()
        _register()
        cls = hf_causal_lm_class(config)
        reason = fallback_unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"cannot run {type(config).__name__} on the transformers fallback: {reason}")
        logger.warning("%s has no native pagellm implementation: running it on the transformers fallback "
                       "(Hugging Face modules with pagellm's paged attention; slower than a native model)",
                       cls.__name__)
        self.config = config
        self.hf_class = cls
        g = self.geometry(config)
        self.steps = StepHolder((g.num_kv_heads, g.head_dim))
        with torch.device("meta"):  # no memory until the weights come (load_checkpoint) or are made (materialize)
            self._attach(cls._from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32))

    def _attach(self, hf) -> None:
        self.hf = hf.eval()
        layers = [m for m in hf.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        if not layers:
            raise ValueError(f"cannot run {type(hf).__name__} on the transformers fallback: no module has a layer_idx")
        for m in layers:
            m.pagellm_steps = self.steps
        self.tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight

    def load_checkpoint(self, model_dir: str, load_format: str) -> None:
        """The checkpoint's weights through transformers' from_pretrained (its checkpoint conversions apply)."""
        use_safetensors = {"safetensors": True, "pt": False}.get(load_format)
        hf = self.hf_class.from_pretrained(model_dir, config=self.config, attn_implementation=ATTN_IMPLEMENTATION,
                                           dtype=torch.float32, local_files_only=True, use_safetensors=use_safetensors)
        self._attach(hf)

    def materialize(self) -> None:
        """The model built again on the CPU, for load_format="dummy" (its buffers, such as RoPE's, computed)."""
        self._attach(self.hf_class._from_config(self.config, attn_implementation=ATTN_IMPLEMENTATION,
                                                dtype=torch.float32))

    @torch.inference_mode()
    def after_load(self) -> None:
        """The token-mixing probe (module docstring): refuse a model whose tokens meet outside attention."""
        emb = self.hf.get_input_embeddings().weight
        vocab = emb.shape[0]
        ids = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab, 4 % vocab]], device=emb.device)
        other = ids.clone()
        other[0, 0] = 5 % vocab
        pos = torch.arange(4, device=emb.device)[None]
        with self.steps.active(PROBE):
            a = self.hf.base_model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            b = self.hf.base_model(input_ids=other, position_ids=pos, use_cache=False).last_hidden_state
        if not torch.allclose(a[0, 1:].float(), b[0, 1:].float(), atol=1e-5, rtol=1e-4, equal_nan=True):
            raise ValueError(f"cannot run {type(self.hf).__name__} on the transformers fallback: its tokens meet "
                             "outside attention (a state-space, convolution or linear-attention layer), which the "
                             "fallback's flat batch cannot run per sequence or carry from step to step.")

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        if any(s in name for s in self.skip_weights):
            return None
        if self.tied and name == "lm_head.weight":
            return None
        return "hf." + name, None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        with self.steps.active(PagedStep(kv_caches, meta, backend)):
            out = self.hf.base_model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        return out.last_hidden_state[0]  # (T, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.hf.get_output_embeddings()
        logits = lm_head_logits(hidden, head.weight)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias.float()
        cfg = self.config
        if getattr(cfg, "logit_scale", None) is not None:  # Cohere
            logits = logits * cfg.logit_scale
        if getattr(cfg, "logits_scaling", None) is not None:  # Granite
            logits = logits / cfg.logits_scaling
        cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
