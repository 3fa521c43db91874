"""GPT-OSS (GptOssForCausalLM: gpt-oss-20b, gpt-oss-120b): LLaMA's block with attention sinks, alternating
sliding-window (128) and full layers, YaRN RoPE, biases on every projection, and a mixture of experts with a
clamped SwiGLU.

    attention   q/k/v/o with biases; each query head's learned sink joins its softmax's sum (AttentionParams.sinks:
                every backend); sliding and full layers from config.layer_types
    router      logits = x W^T + b -> top-k logits -> softmax over those k (not over all experts)
    experts     gate_up (interleaved in checkpoints: gate = even columns, up = odd) + bias, then
                gate = min(gate, limit), up = clamp(up, -limit, limit), (up + 1) * gate * sigmoid(alpha * gate),
                down + bias; alpha 1.702, limit config.swiglu_limit (7)

Checkpoints: transformers' layout (experts.gate_up_proj (E, H, 2I), experts.down_proj (E, I, H), and their biases)
or OpenAI's MXFP4 one (experts.gate_up_proj_blocks / _scales, experts.down_proj_blocks / _scales: 32 4-bit e2m1
values per block with a power-of-two scale), widened to the compute dtype as they load. The experts are held as
FusedMoE's w13 (gate rows, then up rows) and w2, so tensor parallelism splits the intermediate dimension as for
every other mixture of experts (the down bias is added by rank 0 alone, before the all-reduce).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.layers import Fp32WeightRMSNorm, FusedMoE, set_weight_loader
from pagellm.models.llama import AttentionOptions, LlamaAttention, LlamaForCausalLM
from pagellm.models.parallel_layers import SINGLE, Linear
from pagellm.models.weight_utils import ckpt_full, copy_into

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 (..., G, 16) uint8 blocks (two e2m1 values a byte, the low nibble first) and (..., G) uint8 scales
    (exponent + 127) -> (..., G * 32) float32."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    blocks, exp = blocks.to(torch.uint8), scales.to(torch.int32) - 127
    out = torch.empty(*blocks.shape[:-1], blocks.shape[-1] * 2, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, exp[..., None])
    return out.reshape(*out.shape[:-2], -1)


class GptOssAttention(LlamaAttention):
    """LLaMA's attention with one learned sink per query head (this rank's heads under tensor parallelism)."""

    def __init__(self, config, layer_idx: int, opts: AttentionOptions, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, layer_idx, opts, tp)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))
        start = tp.rank * self.num_heads
        set_weight_loader(self.sinks, lambda p, t, shard=None: copy_into(p, ckpt_full(t)[start:start + p.numel()]))

    def use_sinks(self) -> None:
        """The sinks into the layer's AttentionParams, in float32 (once the weights are final)."""
        self.attn.params = dataclasses.replace(self.attn.params, sinks=self.sinks.detach().float())


class GptOssExperts(FusedMoE):
    """FusedMoE with biases and GPT-OSS's clamped SwiGLU; loads transformers' layout and MXFP4 blocks."""

    def __init__(self, config, tp: TPGroup = SINGLE) -> None:
        super().__init__(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                         config.intermediate_size, "silu", False, tp)
        e, local = self.num_local_experts, self.intermediate_size
        self.b13 = nn.Parameter(torch.zeros(e, 2 * local))
        self.b2 = nn.Parameter(torch.zeros(e, config.hidden_size))
        self.alpha, self.limit = 1.702, float(getattr(config, "swiglu_limit", 7.0))
        for p in (self.w13, self.w2):  # one dense tensor (shard None), or MXFP4's blocks and scales
            set_weight_loader(p, self.load_gpt_oss, frozenset(("blocks", "scales")))
        for p in (self.b13, self.b2):
            set_weight_loader(p, self.load_gpt_oss, None)
        self._mxfp4: dict[str, dict[str, torch.Tensor]] = {}  # blocks / scales waiting for their other half

    def load_gpt_oss(self, param: torch.Tensor, tensor, shard_id=None) -> None:
        """shard_id: None (transformers' layout), or "blocks" / "scales" (MXFP4; widened once both came). Every
        tensor is stacked over the experts: this rank's (all, or its own under expert parallelism) are kept."""
        t = ckpt_full(tensor)[self.e_start:self.e_start + self.num_local_experts]
        if shard_id in ("blocks", "scales"):
            key = "w13" if param is self.w13 else "w2"
            pending = self._mxfp4.setdefault(key, {})
            pending[shard_id] = t
            if len(pending) < 2:
                return
            w = dequantize_mxfp4(pending.pop("blocks"), pending.pop("scales"))  # (E, out, in), as nn.Linear
            self._place(param, w)
        elif param is self.w13:
            self._place(param, t.transpose(1, 2))  # (E, H, 2I) -> (E, 2I, H)
        elif param is self.w2:
            self._place(param, t.transpose(1, 2))  # (E, I, H) -> (E, H, I)
        elif param is self.b13:
            self._place(param, t)
        else:
            copy_into(param, t)

    def _place(self, param: torch.Tensor, w: torch.Tensor) -> None:
        """Interleaved gate/up rows (or the down projection's columns) -> this rank's [gate; up] (or columns)."""
        start, local = self.i_start, self.intermediate_size
        if param is self.w2:
            copy_into(param, w[..., start:start + local])
            return
        gate, up = w[:, 0::2], w[:, 1::2]
        copy_into(param, torch.cat((gate[:, start:start + local], up[:, start:start + local]), dim=1))

    def expert_forward(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.expert_weights(e, rows.dtype)
        gate, up = (torch.nn.functional.linear(rows, w13) + self.b13[e]).chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        out = torch.nn.functional.linear((up + 1) * (gate * torch.sigmoid(gate * self.alpha)), w2)
        return out + self.b2[e] if self.tp.rank == 0 or self.ep else out  # the bias once, before the all-reduce


class GptOssMoE(nn.Module):
    def __init__(self, config, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.router = Linear(config.hidden_size, config.num_local_experts, bias=True)  # replicated
        self.experts = GptOssExperts(config, tp)
        self.top_k = config.num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, ids = torch.topk(self.router(x), self.top_k, dim=-1)
        return self.experts.dispatch(x, torch.softmax(top.float(), dim=-1), ids)


class GptOssForCausalLM(LlamaForCausalLM):
    norm_cls = Fp32WeightRMSNorm  # the weight multiplies in float32
    attention_cls = GptOssAttention  # LLaMA's, biases from config.attention_bias (true), and the sinks
    _EXPERTS = {"gate_up_proj": "w13", "down_proj": "w2", "gate_up_proj_bias": "b13", "down_proj_bias": "b2",
                "gate_up_proj_blocks": "w13", "gate_up_proj_scales": "w13", "down_proj_blocks": "w2",
                "down_proj_scales": "w2"}

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return GptOssMoE(config, tp)

    def map_weight(self, name: str):
        prefix, sep, last = name.rpartition(".experts.")
        if sep and last in self._EXPERTS:
            kind = last.rpartition("_")[2] if last.endswith(("_blocks", "_scales")) else None
            return f"{prefix}.experts.{self._EXPERTS[last]}", kind
        return super().map_weight(name)

    def after_load(self) -> None:
        for layer in self.own_layers():
            layer.self_attn.use_sinks()
