"""EAGLE-1 draft heads (speculative decoding, method "eagle"; vLLM's EagleLlamaForCausalLM): LLaMA decoder layers
trained to predict the model's next tokens from its last hidden state.

    entry at position p, from the token t_{p+1} and f_p:
        f_p = the model's final hidden state at p (after its last norm) for the model's positions, the head's own
              output for its later passes
        x = fc([embed(t_{p+1}), f_p])          (HASS heads, config add_para_norm: each half RMS-normed first)
        x = decoder layers (LLaMA's; the first without its input norm)  -> the output, the next pass's f
        logits = the model's lm_head(x)        (no final norm)

The head's checkpoint (its own directory, `speculative_config.model`: the EAGLE authors' layout, fc.* and
layers.N.*, or the speculators one, fusion_fc.*) shares the model's embedding and LM head, read from the model's
checkpoint. It runs unsharded beside the model: worker/drafter.py keeps its cache in step with the model's, as
for an MTP layer.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.config import ModelGeometry
from pagellm.models.layers import RMSNorm
from pagellm.models.llama import LlamaForCausalLM, LlamaModel
from pagellm.models.parallel_layers import SINGLE, Linear, VocabParallelEmbedding

RENAMES = {"fusion_fc.weight": "fc.weight", "fusion_fc.bias": "fc.bias",
           "pre_lm_head_layernorm.weight": "hidden_states_layernorm.weight"}


class EagleLlamaForCausalLM(LlamaForCausalLM):
    """The head (built from its own config; `target_dir`: the model's checkpoint, for the embedding and LM head)."""

    supports_tp = False

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        return super().geometry(config, 1)

    def __init__(self, config, max_model_len: int, tp=SINGLE, target_dir: str | None = None) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.tp = SINGLE
        self.target_dir = target_dir
        self.model = LlamaModel(config, max_model_len, type(self), SINGLE)
        self.model.layers[0].input_layernorm = nn.Identity()  # EAGLE's first layer reads fc's output as it is
        del self.model.norm
        h = config.hidden_size
        self.fc = Linear(2 * h, h, bias=True)
        with torch.no_grad():
            self.fc.bias.zero_()
        self.fc.bias.shard_ids = frozenset()  # optional: the authors' heads have it, vLLM's own layout does not
        self.hass = bool(getattr(config, "add_para_norm", False))
        if self.hass:
            self.embedding_layernorm = RMSNorm(h, config.rms_norm_eps)
            self.hidden_states_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = VocabParallelEmbedding(config.vocab_size, h, SINGLE)
        self.tied = False

    def hf_name(self, name: str) -> str | None:
        name = RENAMES.get(name, name)
        if name.startswith(("transformer.", "embed_tokens.", "model.embed_tokens.", "lm_head.")):
            return None  # the model's own are read instead (vLLM shares them too)
        if name.endswith("layers.0.input_layernorm.weight"):
            return None
        if name.startswith(("fc.", "embedding_layernorm.", "hidden_states_layernorm.", "model.")):
            return name
        return "model." + name  # layers.N.* -> model.layers.N.*

    def load_checkpoint(self, model_dir: str, load_format: str) -> None:
        """The head's tensors, then the model's embedding and LM head."""
        from pagellm.models.loader import iterate_weights, load_weights

        def weights():
            yield from iterate_weights(model_dir, load_format)
            found = {}
            for name, tensor in iterate_weights(self.target_dir, load_format):
                if name in ("model.embed_tokens.weight", "lm_head.weight"):
                    found[name] = tensor
            yield "__embed", found["model.embed_tokens.weight"]
            yield "__lm_head", found.get("lm_head.weight", found["model.embed_tokens.weight"])  # (tied)

        load_weights(self, weights())

    def map_weight(self, name: str):
        if name == "__embed":
            return "model.embed_tokens.weight", None
        if name == "__lm_head":
            return "lm_head.weight", None
        return super().map_weight(name)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: the tokens t_{p+1}; positions: p; hidden_states: f_p -> the head's output (no norm)."""
        e = self.model.embed_tokens(input_ids)
        f = hidden_states.to(e.dtype)
        if self.hass:
            e, f = self.embedding_layernorm(e), self.hidden_states_layernorm(f)
        x = self.fc(torch.cat((e, f), dim=-1))
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(positions, x, self.model.rotary, kv_cache, meta, backend)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.lm_head.weight.t()).float()
