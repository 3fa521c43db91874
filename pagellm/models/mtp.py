"""Multi-token prediction (MTP) layers as a drafter (speculative decoding, method "mtp": vLLM's deepseek_mtp):
DeepSeek-V3 / R1 / V3.2, GLM-4.5 / 4.6 / 4.7 and GLM-4.7-Flash store after their decoder layers one more layer
(model.layers.<num_hidden_layers>.*) trained to predict the token after next:

    entry at position p, from the token t_{p+1} and the model's last hidden state h_p (after its final norm):
        x = eh_proj([enorm(embed(t_{p+1})), hnorm(h_p)])   (the embedding zeroed at position 0, as vLLM does)
        x = decoder layer (the model's own kind: its attention with a KV cache of one layer, its experts)
        logits = head(shared_head.norm(x))  -> t_{p+2}

Drafting k tokens for a sequence whose last token x = t_n is not computed yet: the entry at n - 1 (x, h_{n-1})
gives d1; the entry at n (d1, the MTP layer's own output at n - 1 in place of h_n) gives d2, and so on: the one layer
is used k times. worker/drafter.py keeps its cache in step with the model's (the entries of every position the model
computes, from the model's hidden states) and keeps each sequence's latest hidden states for the next proposal.

MTPModel(family) builds, from the model's own class, the one decoder layer (layer index num_hidden_layers: its
attention and experts sharded as the model's under tensor parallelism) and the MTP parts around it, named as the
checkpoint names them, so the family's weight mapping (packed projections, experts) applies unchanged.

Qwen3-Next and Qwen3.5 (vLLM's qwen3_next_mtp / qwen3_5_mtp) store theirs apart, under mtp.*, and differ in the parts
around the layer (QwenNextMTP): no embedding masking, Gemma-style norms, and the layer's output normalised (that
normalised output is what the next pass reads, as the model's final hidden states are):

        x = fc([pre_fc_norm_embedding(embed(t_{p+1})), pre_fc_norm_hidden(h_p)])
        x = norm(decoder layer (full attention, the model's MLP or experts))
        logits = lm_head(x)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.layers import MRotaryEmbedding, RMSNorm, RotaryEmbedding
from pagellm.models.parallel_layers import SINGLE, ColumnParallelLinear, VocabParallelEmbedding, parallel_logits


def mtp_layers(config) -> int:
    """The checkpoint's MTP layers (DeepSeek's and GLM's num_nextn_predict_layers, Qwen's mtp_num_hidden_layers in
    the text config; 0: none)."""
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "num_nextn_predict_layers", None) or getattr(text, "mtp_num_hidden_layers", None) or 0)


def mtp_model_class(family: type) -> type:
    """The MTP drafter of a model class (DeepseekV2/V3/V32ForCausalLM, Glm4Moe(Lite)ForCausalLM, GlmMoeDsa;
    Qwen3-Next and Qwen3.5, their multimodal checkpoints' included)."""
    from pagellm.models.hybrid import Qwen3NextForCausalLM

    text_family = getattr(family, "text_class", family)  # a vision-language checkpoint: its decoder's class
    if issubclass(text_family, Qwen3NextForCausalLM):
        return type(f"{text_family.__name__}MTP", (QwenNextMTP, text_family), {})
    return type(f"{family.__name__}MTP", (MTPModel, family), {})


def mtp_weights_at(family: type, config) -> str:
    """Where a checkpoint keeps the MTP layer's weights (for error messages)."""
    from pagellm.models.hybrid import Qwen3NextForCausalLM

    if issubclass(getattr(family, "text_class", family), Qwen3NextForCausalLM):
        return "mtp.*"
    return f"model.layers.{config.num_hidden_layers}.*"


class MTPModel:
    """Mixed in before the model's class: its hooks (make_attention, make_mlp, map_weight) build and load the layer."""

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        nn.Module.__init__(self)
        self.config, self.tp = config, tp
        self.index = config.num_hidden_layers  # the MTP layer's index in the checkpoint
        layer = self.decoder_layer(config, self.index, type(self), tp)
        hidden = config.hidden_size
        layer.enorm = RMSNorm(hidden, config.rms_norm_eps)
        layer.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        layer.eh_proj = ColumnParallelLinear.single(2 * hidden, hidden, False)  # replicated
        layer.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, tp)
        layer.shared_head = nn.Module()
        layer.shared_head.norm = RMSNorm(hidden, config.rms_norm_eps)
        layer.shared_head.head = VocabParallelEmbedding(config.vocab_size, hidden, tp)  # the head's rows
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(self.index): layer})
        self.layer = layer
        self.rotary = RotaryEmbedding(config, max_model_len)
        self.tied = False

    def hf_name(self, name: str) -> str | None:
        """The MTP layer's tensors; the model's embedding and LM head stand in where the layer has none."""
        prefix = f"model.layers.{self.index}."
        if name.startswith(prefix):
            return name
        if name == "model.embed_tokens.weight":
            return prefix + "embed_tokens.weight"
        if name == "lm_head.weight":
            return prefix + "shared_head.head.weight"
        return None

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        renamed = self.hf_name(name)
        return None if renamed is None else super().map_weight(renamed)

    def after_load(self) -> None:
        if hasattr(self.layer.self_attn, "absorb"):  # latent attention: W_UK and W_UV out of kv_b_proj
            w = self.layer.embed_tokens.weight
            self.layer.self_attn.absorb(w.dtype, w.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: the tokens t_{p+1}; positions: p; hidden_states: h_p (T, hidden) -> the layer's output."""
        layer = self.layer
        e = layer.embed_tokens(input_ids)
        e = e.masked_fill((positions == 0)[:, None], 0)
        x = layer.eh_proj(torch.cat((layer.enorm(e), layer.hnorm(hidden_states.to(e.dtype))), dim=-1))
        return layer(positions, x, self.rotary, kv_caches[0], meta, backend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        layer = self.layer
        return parallel_logits(layer.shared_head.norm(hidden), layer.shared_head.head.weight, self.config.vocab_size,
                               self.tp)


class QwenNextMTP:
    """Qwen3-Next's and Qwen3.5's MTP layer, mixed in before the decoder's class (Qwen3NextForCausalLM or a subclass):
    one full-attention decoder layer built by the family's hooks (index num_hidden_layers, so its MLP is the model's
    kind), fc and the norms around it. Checkpoint names: mtp.fc, mtp.pre_fc_norm_embedding / _hidden, mtp.norm,
    mtp.layers.0.* (the layer, mapped as the family maps model.layers.*), and the model's embedding and LM head
    (model.embed_tokens or model.language_model.embed_tokens, lm_head). With M-RoPE (Qwen3.5) the layer's rotary
    takes the 3-D positions the drafter gives it."""

    @classmethod
    def is_state_layer(cls, config, layer_idx: int) -> bool:
        return False  # the MTP layer attends

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        nn.Module.__init__(self)
        text = config.text_config if hasattr(config, "text_config") else config
        self.config, self.tp = text, tp
        self.index = text.num_hidden_layers
        hidden, eps = text.hidden_size, text.rms_norm_eps
        layer = self.decoder_layer(text, self.index, type(self), tp)
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(self.index): layer})
        self.layer = layer
        self.fc = ColumnParallelLinear.single(2 * hidden, hidden, False)  # replicated
        self.pre_fc_norm_embedding = self.norm_cls(hidden, eps)
        self.pre_fc_norm_hidden = self.norm_cls(hidden, eps)
        self.norm = self.norm_cls(hidden, eps)
        self.embed_tokens = VocabParallelEmbedding(text.vocab_size, hidden, tp)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = VocabParallelEmbedding(text.vocab_size, hidden, tp)  # the head's rows
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight
        rope = getattr(text, "rope_parameters", None) or {}
        section = rope.get("mrope_section")
        self.rotary = (MRotaryEmbedding(text, max_model_len, section, bool(rope.get("mrope_interleaved")))
                       if section else RotaryEmbedding(text, max_model_len))

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        if name.startswith("model.language_model."):  # a multimodal checkpoint's decoder
            name = "model." + name[len("model.language_model."):]
        if name.startswith("mtp.layers.0."):
            return super().map_weight(f"model.layers.{self.index}." + name[len("mtp.layers.0."):])
        if name in ("mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
                    "mtp.norm.weight"):
            return name[len("mtp."):], None
        if name == "model.embed_tokens.weight" or (name == "lm_head.weight" and not self.tied):
            return name.removeprefix("model."), None
        return None

    def after_load(self) -> None:
        pass

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend,
                hidden_states: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: the tokens t_{p+1}; positions: p (or its 3-D rotary positions); hidden_states: h_p;
        inputs_embeds: their embeddings where they differ from the tokens' (image features)."""
        e = self.pre_fc_norm_embedding(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        x = self.fc(torch.cat((e, self.pre_fc_norm_hidden(hidden_states.to(e.dtype))), dim=-1))
        return self.norm(self.layer(positions, x, self.rotary, kv_caches[0], meta, backend))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return parallel_logits(hidden, self.lm_head.weight, self.config.vocab_size, self.tp)
