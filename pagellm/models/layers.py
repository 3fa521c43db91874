"""Building blocks shared by the model files: norms, rotary embedding, packed linears, gated MLP,
mixture of experts, attention, and the per-parameter weight loaders behind them.

Every model works on a flat batch: `(num_tokens, hidden)` activations, no
padding, no batch dimension. Attention reads and writes the paged KV cache
through the backend chosen at start-up, with the step's `AttentionMetadata`
passed down explicitly.

Weight loading is declared on the parameters themselves: a parameter may carry
`weight_loader(param, tensor, shard_id)` (how a checkpoint tensor lands in it:
a part of a packed q/k/v, one expert of a mixture, a transposed Conv1D) and
`shard_ids` (the parts a checkpoint must provide; a whole tensor, shard None,
covers all of them). The loader (models/loader.py) only routes names.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from pagellm.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionParams,
    KVCache,
    image_block_attention,
)
from pagellm.distributed.parallel import TPGroup
from pagellm.models.parallel_layers import SINGLE, ColumnParallelLinear, RowParallelLinear, even_part
from pagellm.models.weight_utils import (  # noqa: F401 - the loaders' home; re-exported for model files
    CheckpointTensor,
    ckpt_narrow,
    ckpt_shape,
    copy_into,
    default_weight_loader,
    set_weight_loader,
    transposed_loader,
)

logger = logging.getLogger(__name__)


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The sliding window of one layer, from a Hugging Face config (None: full attention).

    Configs with `layer_types` (Gemma 2, Qwen2/3, recent transformers) name each layer's kind;
    older ones (Mistral, Mixtral, Phi-3) apply `sliding_window` to every layer.
    """
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if window is None or types is None:
        return window
    return window if types[layer_idx] == "sliding_attention" else None


def activation(name: str):
    """Hugging Face activation by name; the tanh-approximated GELUs use torch's fused kernel.

    `gelu_new` (GPT-2) is the same formula as torch's tanh GELU; Hugging Face computes it in
    several elementwise steps (10x slower here, results within 2.4e-7).
    """
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return functools.partial(torch.nn.functional.gelu, approximate="tanh")
    from transformers.activations import ACT2FN

    return ACT2FN[name]


@functools.lru_cache(maxsize=1)
def _triton_ops():
    """pagellm.models.triton_ops when Triton imports (CUDA tensors only use it); None with
    PAGELLM_FUSED_ELEMENTWISE=0 or without Triton."""
    if os.environ.get("PAGELLM_FUSED_ELEMENTWISE", "1") == "0":
        return None
    try:
        from pagellm.models import triton_ops
    except Exception:  # no Triton: the torch formulas below
        return None
    return triton_ops


def fused_ops(x: torch.Tensor):
    """The fused kernels for a CUDA tensor, else None."""
    return _triton_ops() if x.is_cuda else None


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, computed in float32 like Hugging Face's (one fused kernel on CUDA)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Fp32WeightRMSNorm(RMSNorm):
    """RMSNorm whose weight multiplies in float32, before the cast back (LLaMA's casts first): GPT-OSS, Nemotron-H."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores w, the scale is (1 + w), all in float32, cast at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps, gemma=True)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(N, hidden) x (vocab, hidden)^T -> (N, vocab) float32 logits.

    On CPU in float32 the vocabulary is computed in chunks of `chunk` rows in the W x^T
    orientation: for GPT-2's 50k vocabulary at 16-64 rows this is 1.8x faster than one matmul
    (the chunk's weights stay in cache), with bitwise the same result.
    """
    if hidden.dtype != torch.float32 or hidden.device.type != "cpu":
        return torch.nn.functional.linear(hidden, weight).float()
    out_t = torch.empty(weight.shape[0], hidden.shape[0], dtype=torch.float32)
    x_t = hidden.t()
    for start in range(0, weight.shape[0], chunk):
        w = weight[start:start + chunk]
        torch.mm(w, x_t, out=out_t[start:start + w.shape[0]])
    return out_t.t().contiguous()


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up in one matmul (LLaMA's SwiGLU, Gemma's GeGLU);
    tensor parallel: gate/up column-parallel, down row-parallel (one all-reduce)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False,
                 tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [even_part(intermediate_size, tp)] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp=tp)
        self.act = activation(act)
        self.silu = act in ("silu", "swish")  # SiLU-and-mul is one fused kernel on CUDA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        ops = fused_ops(gate_up) if self.silu else None
        if ops is not None:
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(self.act(gate) * up)


class FusedMoE(nn.Module):
    """Mixture of gated-MLP experts with top-k routing (Mixtral, Qwen2-MoE).

        router logits (T, E) -> softmax (float32) -> top-k weights (renormalised if asked)
        token-expert pairs sorted by expert -> one matmul pair per expert over its rows
        -> weighted rows added back to their tokens, in expert order (as Hugging Face adds them)

    Weights: w13 (E, 2 * I, H) holds each expert's gate and up rows, w2 (E, H, I) its down projection. Checkpoints
    give one expert part at a time (shard (e, 0 | 1) for w13, e for w2) or the whole stacked tensor (shard None), in
    that layout or transposed (told apart by shape). Tensor parallel: every rank holds every expert's slice I / tp
    of the intermediate dimension, and the weighted sum is all-reduced at the end. Expert parallel
    (tp.expert_parallel): rank r holds experts [r * E / tp, (r + 1) * E / tp) whole, computes its experts' pairs
    only, and the same all-reduce adds the ranks' parts. With apply_router_weight_on_input (Llama 4) a token's
    weight scales its row before the expert instead of the expert's output. FP8 checkpoints keep the experts in 8
    bits, each expert's weights widened when a step uses it (quantization/fp8.py: `quant_method`).
    """

    quant_method = None  # set by an FP8 checkpoint's method: expert_weights(moe, e, dtype) -> (w13[e], w2[e])

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, act: str,
                 renormalize: bool, tp: TPGroup = SINGLE, apply_router_weight_on_input: bool = False) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        # Llama 4: each token enters its expert already scaled by its weight (expert(w x), not w expert(x))
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.tp = tp
        self.full_intermediate = intermediate_size
        self.ep = tp.expert_parallel and tp.size > 1
        if self.ep:  # whole experts: E / tp of them on each rank
            if num_experts % tp.size:
                raise ValueError(f"{num_experts} experts do not split over tensor_parallel_size={tp.size} "
                                 "(enable_expert_parallel)")
            self.e_start, self.num_local_experts = tp.shard(num_experts)
            self.i_start, self.intermediate_size = 0, intermediate_size
        else:
            self.e_start, self.num_local_experts = 0, num_experts
            self.i_start, self.intermediate_size = tp.shard(intermediate_size)
        local, experts = self.intermediate_size, range(self.e_start, self.e_start + self.num_local_experts)
        self.w13 = nn.Parameter(torch.empty(self.num_local_experts, 2 * local, hidden_size))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, local))
        set_weight_loader(self.w13, self.load_expert, frozenset((e, j) for e in experts for j in (0, 1)))
        set_weight_loader(self.w2, self.load_expert, frozenset(experts))
        self.act = activation(act)

    def local_expert(self, e: int) -> int | None:
        """The index of (global) expert e among this rank's experts, or None when another rank holds it."""
        i = e - self.e_start
        return i if 0 <= i < self.num_local_experts else None

    def load_expert(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        full, start, local = self.full_intermediate, self.i_start, self.intermediate_size
        if shard_id is None:  # stacked: gate_up (E, 2I, H) or down (E, H, I); or transposed (Qwen3-VL-MoE's hub
            tensor = ckpt_narrow(tensor, 0, self.e_start, self.num_local_experts)  # layout: (E, H, 2I), (E, I, H))
            hidden = param.shape[1] if param is self.w2 else param.shape[2]
            inner = full if param is self.w2 else 2 * full
            ours = (hidden, inner) if param is self.w2 else (inner, hidden)
            if tuple(tensor.shape[1:]) != ours and tuple(tensor.shape[1:]) == ours[::-1]:
                tensor = tensor.transpose(1, 2)
            if param is self.w2:
                copy_into(param, tensor[:, :, start:start + local])
            else:
                copy_into(param[:, :local], tensor[:, start:start + local])
                copy_into(param[:, local:], tensor[:, full + start:full + start + local])
            return
        e = self.local_expert(shard_id[0] if isinstance(shard_id, tuple) else shard_id)
        if e is None:
            return  # another rank's expert
        if isinstance(shard_id, tuple):  # (expert, 0 gate | 1 up): (I, H)
            part = shard_id[1]
            copy_into(param[e, part * local:(part + 1) * local], ckpt_narrow(tensor, 0, start, local))
        else:  # one expert's down projection: (H, I)
            copy_into(param[e], ckpt_narrow(tensor, 1, start, local))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        # x (T, H), router_logits (T, E) -> (T, H)
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (T, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.dispatch(x, weights, experts)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (T, H) through the experts a router chose: experts (T, k) ids, weights (T, k) -> (T, H)."""
        weights = weights.to(x.dtype)
        flat = experts.flatten()  # pair p = (token p // k, expert flat[p])
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync per layer
        tokens = order // self.top_k
        rows = x[tokens]  # (T * k, H), grouped by expert
        pair_weights = weights.flatten()[order, None]
        if self.apply_router_weight_on_input:
            rows = rows * pair_weights
        out_rows = torch.zeros_like(rows) if self.ep else torch.empty_like(rows)  # others' pairs: 0 here
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = slice(start, start + n)
            start += n
            local = self.local_expert(e)
            if local is not None:
                out = self.expert_forward(local, rows[seg])
                out_rows[seg] = out if self.apply_router_weight_on_input else out * pair_weights[seg]
        return self.tp.all_reduce(torch.zeros_like(x).index_add_(0, tokens, out_rows))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's expert e's (2I, H) gate/up and (H, I) down weights (widened from 8 bits when quantized)."""
        if self.quant_method is None:
            return self.w13[e], self.w2[e]
        return self.quant_method.expert_weights(self, e, dtype)

    def expert_forward(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """This rank's expert e on its rows (n, H) -> (n, H): down(act(gate(x)) * up(x))."""
        w13, w2 = self.expert_weights(e, rows.dtype)
        gate, up = torch.nn.functional.linear(rows, w13).chunk(2, dim=-1)
        return torch.nn.functional.linear(self.act(gate) * up, w2)


def rope_inv_freq(hf_config, layer_type: str | None = None, max_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, from Hugging Face's own RoPE initialisers. `layer_type`: configs
    whose rope_parameters differ per kind of layer (Gemma 3: {"sliding_attention": ..., "full_attention": ...}).

    LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) has two sets of factors: transformers turns a sequence with the
    short ones while it fits original_max_position_embeddings and recomputes it with the long ones once it is
    longer. Here, as in vLLM, `max_len` (max_model_len) picks one set for every sequence: the short factors when no
    sequence can outgrow the original length, the long ones otherwise (transformers' output for prompts longer
    than that length; shorter prompts are turned as transformers would turn them past it)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "dynamic":
        raise ValueError(f"rope_scaling type {rope_type!r} depends on the batch's sequence length and is not "
                         "supported; supported: default, linear, llama3, yarn, longrope.")
    if rope_type == "default":
        base = params.get("rope_theta") or getattr(hf_config, "rope_theta", 10000.0)
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        dim = int(dim * params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS[rope_type]
    if rope_type == "longrope":
        original = params.get("original_max_position_embeddings") or hf_config.original_max_position_embeddings
        long = max_len is not None and max_len > original
        logger.info("LongRoPE: the %s factors for every sequence (max_model_len %s %s original_max_position_embeddings "
                    "%d)", "long" if long else "short", max_len, ">" if long else "<=", original)
        kw = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, attn_scaling = fn(hf_config, None, seq_len=max_len, **kw)
        return inv_freq.float(), float(attn_scaling)
    try:
        inv_freq, attn_scaling = fn(hf_config) if layer_type is None else fn(hf_config, layer_type=layer_type)
    except TypeError:  # transformers 4.x signature
        inv_freq, attn_scaling = fn(hf_config, None)
    return inv_freq.float(), float(attn_scaling)


class RotaryEmbedding(nn.Module):
    """NeoX-style (rotate-half) RoPE with a cos/sin table for every position up to max_len."""

    def __init__(self, hf_config, max_len: int, layer_type: str | None = None) -> None:
        super().__init__()
        inv_freq, attn_scaling = rope_inv_freq(hf_config, layer_type, max_len)
        freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, rotary_dim)
        self.register_buffer("cos", emb.cos() * attn_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attn_scaling, persistent=False)
        self.rotary_dim = emb.shape[-1]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (num_tokens, num_heads, head_dim), k: (num_tokens, num_kv_heads, head_dim)
        ops = fused_ops(q)
        if ops is not None:
            return (ops.rotary(positions, q, self.cos, self.sin, self.rotary_dim),
                    ops.rotary(positions, k, self.cos, self.sin, self.rotary_dim))
        cos = self.cos[positions].to(q.dtype)[:, None, :]  # (num_tokens, 1, rotary_dim)
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One tensor (num_tokens, heads, head_dim) alone (a layer that reads another layer's keys)."""
        ops = fused_ops(x)
        if ops is not None:
            return ops.rotary(positions, x, self.cos, self.sin, self.rotary_dim)
        cos = self.cos[positions].to(x.dtype)[:, None, :]
        sin = self.sin[positions].to(x.dtype)[:, None, :]
        return _rotate(x, cos, sin, self.rotary_dim)


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's multimodal RoPE: positions (3, T) of (temporal, height, width); the rotary frequencies are split
    into `mrope_section` parts, part i turned by position row i. Text positions are equal in all three rows, which
    is plain RoPE: 1-D positions (T,) take the parent's path (and its fused kernel).

    interleaved (Qwen3-VL): frequency f is turned by the height row when f % 3 == 1 and f < 3 x section[1], by the
    width row when f % 3 == 2 and f < 3 x section[2], else by the temporal row. sections [2, 3, 3] over 8
    frequencies: sectioned T T H H H W W W, interleaved T H W T H W T H."""

    def __init__(self, hf_config, max_len: int, mrope_section: list[int], interleaved: bool = False) -> None:
        super().__init__(hf_config, max_len)
        if 2 * sum(mrope_section) != self.rotary_dim:
            raise ValueError(f"mrope_section {mrope_section} must add up to half the rotary dimension "
                             f"({self.rotary_dim // 2}).")
        self.mrope_section = list(mrope_section)
        if interleaved:
            rows = torch.zeros(self.rotary_dim // 2, dtype=torch.long)
            for row in (1, 2):
                rows[row:3 * mrope_section[row]:3] = row
        else:
            rows = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(mrope_section)])
        self.register_buffer("freq_rows", rows, persistent=False)  # the position row that turns each frequency
        self.register_buffer("freq_cols", torch.arange(self.rotary_dim // 2), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        at = positions[self.freq_rows].t()  # (T, rotary_dim / 2): each frequency's position
        cos, sin = self.cos[at, self.freq_cols], self.sin[at, self.freq_cols]
        cos = torch.cat((cos, cos), -1).to(q.dtype)[:, None, :]
        sin = torch.cat((sin, sin), -1).to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    rot, rest = (x, None) if rotary_dim == x.shape[-1] else (x[..., :rotary_dim], x[..., rotary_dim:])
    half = rot.shape[-1] // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


class Attention(nn.Module):
    """Paged attention of one layer: store new K/V in the cache, attend over the sequence's context."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.params = AttentionParams(scale, sliding_window, logits_soft_cap)
        self.image_blocks = True  # False: a layer whose images stay causal (Gemma 4's global layers)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        # q: (num_tokens, num_heads * head_dim) -> out: (num_tokens, num_heads * head_dim)
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache, meta, self.params)
        if meta.image_blocks and self.image_blocks:  # Gemma 3's images attend to themselves both ways
            image_block_attention(out, q, kv_cache, meta, self.params)
        return out.reshape(t, self.num_heads * self.head_dim)
