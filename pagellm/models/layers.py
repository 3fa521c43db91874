"""Building blocks shared by the model files: norms, rotary embedding, packed linears, attention.

Every model works on a flat batch: `(num_tokens, hidden)` activations, no
padding, no batch dimension. Attention reads and writes the paged KV cache
through the backend chosen at start-up, with the step's `AttentionMetadata`
passed down explicitly.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache


def activation(name: str):
    """Hugging Face activation by name; the tanh-approximated GELUs use torch's fused kernel.

    `gelu_new` (GPT-2) is the same formula as torch's tanh GELU; Hugging Face computes it in
    several elementwise steps (10x slower here, results within 2.4e-7).
    """
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return functools.partial(torch.nn.functional.gelu, approximate="tanh")
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, computed in float32 like Hugging Face's."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Linear(nn.Linear):
    """nn.Linear that, for float32 on CPU and up to TRANSPOSED_MAX_ROWS rows, computes out^T = W x^T + b.

    MKL runs this orientation 1.1-1.7x faster for the few-row inputs of decode steps
    (measured for GPT-2's shapes at 16-256 rows), with bitwise the same result; the output is a
    transposed view, which the next Linear consumes without a copy. Large prefill batches keep
    the usual orientation (slightly faster there).
    """

    TRANSPOSED_MAX_ROWS = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu"
                or x.shape[0] > self.TRANSPOSED_MAX_ROWS):
            return super().forward(x)
        if self.bias is None:
            return torch.mm(self.weight, x.t()).t()
        return torch.addmm(self.bias[:, None], self.weight, x.t()).t()


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


class PackedLinear(Linear):
    """One matmul for several projections of the same input (q/k/v, gate/up).

    Hugging Face checkpoints store the parts separately; `load_shard` copies
    part `shard` into its rows.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = out_sizes
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]

    def load_shard(self, shard: int, param_name: str, tensor: torch.Tensor) -> None:
        target = self.weight if param_name == "weight" else self.bias
        start, size = self.offsets[shard], self.out_sizes[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"packed shard {shard} expects {size} rows, checkpoint has {tuple(tensor.shape)}")
        with torch.no_grad():
            target[start:start + size].copy_(tensor)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.out_sizes, dim=-1)


def rope_inv_freq(hf_config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, from Hugging Face's own RoPE initialisers."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"rope_scaling type {rope_type!r} depends on the batch's sequence length and is not "
                         "supported; supported: default, linear, llama3, yarn.")
    if rope_type == "default":
        base = params.get("rope_theta") or getattr(hf_config, "rope_theta", 10000.0)
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        dim = int(dim * params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS[rope_type]
    try:
        inv_freq, attn_scaling = fn(hf_config)
    except TypeError:  # transformers 4.x signature
        inv_freq, attn_scaling = fn(hf_config, None)
    return inv_freq.float(), float(attn_scaling)


class RotaryEmbedding(nn.Module):
    """NeoX-style (rotate-half) RoPE with a cos/sin table for every position up to max_len."""

    def __init__(self, hf_config, max_len: int) -> None:
        super().__init__()
        inv_freq, attn_scaling = rope_inv_freq(hf_config)
        freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, rotary_dim)
        self.register_buffer("cos", emb.cos() * attn_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attn_scaling, persistent=False)
        self.rotary_dim = emb.shape[-1]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (num_tokens, num_heads, head_dim), k: (num_tokens, num_kv_heads, head_dim)
        cos = self.cos[positions].to(q.dtype)[:, None, :]  # (num_tokens, 1, rotary_dim)
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    rot, rest = (x, None) if rotary_dim == x.shape[-1] else (x[..., :rotary_dim], x[..., rotary_dim:])
    half = rot.shape[-1] // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


class Attention(nn.Module):
    """Paged attention of one layer: store new K/V in the cache, attend over the sequence's context."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        # q: (num_tokens, num_heads * head_dim) -> out: (num_tokens, num_heads * head_dim)
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale)
        return out.reshape(t, self.num_heads * self.head_dim)
