"""Pure state-space language models: Mamba (MambaForCausalLM), FalconMamba (FalconMambaForCausalLM) and Mamba2
(Mamba2ForCausalLM). No attention, so no KV cache: every layer keeps a recurrent state per sequence (models/mamba.py)
and the paged blocks are bookkeeping only.

    x = embeddings(ids); per block: x += mixer(RMSNorm(x)) (the residual in float32 with residual_in_fp32);
    logits = lm_head(norm_f(x))

Checkpoint names are kept (backbone.layers.N.mixer..., backbone.norm_f; transformers' module names "model." too).
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import RecurrentLM
from pagellm.models.layers import RMSNorm
from pagellm.models.mamba import MambaMixer, MambaMixer2, mamba1_state_shapes, mamba2_state_shapes
from pagellm.models.parallel_layers import SINGLE, VocabParallelEmbedding


class MambaBlock(nn.Module):
    def __init__(self, config, mixer: nn.Module) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = mixer


class MambaForCausalLM(RecurrentLM):
    backbone_names = True

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return MambaMixer(config.hidden_size, config.intermediate_size, config.state_size, config.conv_kernel,
                          int(config.time_step_rank), config.layer_norm_epsilon, bool(config.use_bias),
                          bool(config.use_conv_bias), tp, norms="none")

    @classmethod
    def state_shapes(cls, config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
        return mamba1_state_shapes(config.intermediate_size, config.state_size, config.conv_kernel, tp_size)

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        return ModelGeometry(num_layers=0, num_kv_heads=1, head_dim=1, num_state_layers=config.num_hidden_layers,
                             state_shapes=cls.state_shapes(config, tp_size))

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.backbone.layers = nn.ModuleList(MambaBlock(config, self.make_mixer(config, tp))
                                             for _ in range(config.num_hidden_layers))
        self.backbone.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.init_lm_head(config, self.backbone.embeddings, tp)
        self.residual_fp32 = bool(getattr(config, "residual_in_fp32", False))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        dtype = x.dtype
        for block, state in zip(self.backbone.layers, self.states):
            h = block.mixer(block.norm(x.to(dtype)), state, meta)
            x = (x.float() if self.residual_fp32 else x) + h
        return self.backbone.norm_f(x.to(dtype))


class FalconMambaForCausalLM(MambaForCausalLM):
    """Mamba with weightless RMS norms on dt, B and C (mixer_rms_eps)."""

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return MambaMixer(config.hidden_size, config.intermediate_size, config.state_size, config.conv_kernel,
                          int(config.time_step_rank), config.mixer_rms_eps, bool(config.use_bias),
                          bool(config.use_conv_bias), tp, norms="weightless")


class Mamba2ForCausalLM(MambaForCausalLM):
    """Mamba2 blocks (models/mamba.py: MambaMixer2)."""

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return MambaMixer2(config.hidden_size, config.num_heads, config.head_dim, config.state_size, config.n_groups,
                           config.conv_kernel, config.chunk_size, config.layer_norm_epsilon, bool(config.use_bias),
                           bool(config.use_conv_bias), tuple(config.time_step_limit or (0.0, float("inf"))), tp)

    @classmethod
    def state_shapes(cls, config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
        return mamba2_state_shapes(config.num_heads, config.head_dim, config.state_size, config.n_groups,
                                   config.conv_kernel, tp_size)
