"""Gemma 4 (Gemma4ForCausalLM; Gemma4ForConditionalGeneration with images, at the end): Gemma 3's block with
heads of two sizes, K/V shared between layers, per-layer input embeddings and, in the MoE models, experts beside the
dense MLP.

    input_ids -> embed_tokens * sqrt(hidden) = x;  per-layer inputs (T, L, P):
        (RMSNorm(per_layer_model_projection(x) / sqrt(hidden)) + embed_tokens_per_layer(ids) * sqrt(P)) / sqrt(2)
    per layer i:
        x += post_attention_norm(attention(input_norm(x)))
            q = RoPE(q_norm(q)); k = RoPE(k_norm(k)); v = v_norm(v) (no weight); scale 1
            sliding layers: head_dim, num_key_value_heads, a local window, RoPE base 10k;
            full layers: global_head_dim, num_global_key_value_heads, V = K's projection where attention_k_eq_v,
            proportional RoPE (a quarter of the pairs turned)
        h = mlp(pre_ff_norm(x))   [MoE: post_ff_norm_1(h) + post_ff_norm_2(experts(pre_ff_norm_2(x)))]
        x += post_ff_norm(h)
        x += post_per_layer_norm(per_layer_projection(act(per_layer_input_gate(x)) * per-layer input i))
        x *= layer_scalar
    -> norm -> tied LM head -> cap * tanh(logits / cap) where final_logit_softcapping is set

KV sharing: the last num_kv_shared_layers layers compute no K/V. Each reads the cache of the last earlier layer of
its kind (its "store" layer: config.kv_sharing_modes), so only the other layers have a cache (ModelGeometry's layers
are those, kv_layer_shapes their two head sizes). A sharing layer passes the store layer's K/V of the step to the
same backend call, which writes them again to the same slots (the same values) and attends with the layer's own
queries.

Gemma4RMSNorm multiplies by its weight in float32 (no 1 + w, unlike Gemma 2 / 3's).
Tensor parallel: attention heads, the MLP and the experts split as LLaMA's; the per-layer input weights (small)
and the router are replicated, the per-layer embedding table splits its vocabulary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import CausalLM, VisionLanguageModel
from pagellm.models.layers import Attention, Fp32WeightRMSNorm, FusedMoE, GatedMLP, RotaryEmbedding, activation
from pagellm.models.llama import LlamaForCausalLM
from pagellm.models.mamba import WeightlessRMSNorm
from pagellm.models.moe import _MoEWeights
from pagellm.models.parallel_layers import (
    SINGLE,
    ColumnParallelLinear,
    Linear,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_heads_per_rank,
    parallel_logits,
    qkv_parts,
)


def cache_layers(config) -> list[int]:
    """The layers with a K/V cache of their own (the others read their store layer's)."""
    return [i for i, mode in enumerate(config.kv_sharing_modes) if mode != "reuse"]


def layer_heads(config, layer_idx: int) -> tuple[int, int]:
    """(K/V heads, head_dim) of a layer (Gemma 4's global layers have their own)."""
    c = config.per_layer_config[layer_idx]
    return c.num_key_value_heads, c.head_dim


class Gemma4Attention(nn.Module):
    def __init__(self, config, layer_idx: int, tp: TPGroup) -> None:
        super().__init__()
        h = config.num_attention_heads
        kvh, d = layer_heads(config, layer_idx)
        kind = config.layer_types[layer_idx]
        self.shares_kv = config.kv_sharing_modes[layer_idx] == "reuse"
        self.k_is_v = bool(config.attention_k_eq_v) and kind != "sliding_attention"
        self.num_heads, self.num_kv_heads, self.head_dim = h // tp.size, kv_heads_per_rank(kvh, tp.size), d
        parts = qkv_parts(h, kvh, d, tp)[:1 if self.shares_kv else 2 if self.k_is_v else 3]  # q | k | v
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, parts, bias=bool(config.attention_bias))
        self.o_proj = RowParallelLinear(h * d, config.hidden_size, bias=bool(config.attention_bias), tp=tp)
        eps = config.rms_norm_eps
        self.q_norm = Fp32WeightRMSNorm(d, eps)
        if not self.shares_kv:
            self.k_norm = Fp32WeightRMSNorm(d, eps)
            self.v_norm = WeightlessRMSNorm(eps)
        window = config.sliding_window if kind == "sliding_attention" else None
        self.attn = Attention(self.num_heads, d, self.num_kv_heads, 1.0, window)

    def forward(self, positions, x, rotary: RotaryEmbedding, kv_cache, meta, backend, shared: dict, kind: str,
                store: bool) -> torch.Tensor:
        t = x.shape[0]
        out = self.qkv_proj.split(self.qkv_proj(x))
        q = self.q_norm(out[0].reshape(t, self.num_heads, self.head_dim))
        if self.shares_kv:
            k, v, kv_cache = shared[kind]
            q = rotary.rotate(positions, q)
        else:
            k = out[1].reshape(t, self.num_kv_heads, self.head_dim)
            v = self.v_norm(k if self.k_is_v else out[2].reshape(t, self.num_kv_heads, self.head_dim))
            q, k = rotary(positions, q, self.k_norm(k))
            if store:
                shared[kind] = (k, v, kv_cache)
        return self.o_proj(self.attn(q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1), kv_cache, meta, backend))


class Gemma4Router(nn.Module):
    """softmax(proj(RMSNorm(x) * scale / sqrt(hidden))) -> top-k, renormalised, times a scale per expert."""

    def __init__(self, config) -> None:
        super().__init__()
        self.norm = WeightlessRMSNorm(config.rms_norm_eps)
        self.proj = Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))
        self.root = config.hidden_size ** -0.5
        self.top_k = config.top_k_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.proj(self.norm(x) * self.scale * self.root).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, tp: TPGroup) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4Attention(config, layer_idx, tp)
        wide = bool(config.use_double_wide_mlp) and self.self_attn.shares_kv
        self.mlp = GatedMLP(hidden, config.intermediate_size * (2 if wide else 1), config.hidden_activation, tp=tp)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, Fp32WeightRMSNorm(hidden, eps))
        self.moe = bool(config.enable_moe_block)
        if self.moe:
            self.router = Gemma4Router(config)
            self.experts = FusedMoE(config.num_experts, config.top_k_experts, hidden, config.moe_intermediate_size,
                                    config.hidden_activation, False, tp)
            for name in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
                setattr(self, name, Fp32WeightRMSNorm(hidden, eps))
        self.per_layer = bool(config.hidden_size_per_layer_input)
        if self.per_layer:
            p = config.hidden_size_per_layer_input
            self.act = activation(config.hidden_activation)
            self.per_layer_input_gate = Linear(hidden, p, bias=False)
            self.per_layer_projection = Linear(p, hidden, bias=False)
            self.post_per_layer_input_norm = Fp32WeightRMSNorm(hidden, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, positions, x, per_layer_input, rotary, kv_cache, meta, backend, shared, kind, store):
        h = self.self_attn(positions, self.input_layernorm(x), rotary, kv_cache, meta, backend, shared, kind, store)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            weights, experts = self.router(x)
            routed = self.experts.dispatch(self.pre_feedforward_layernorm_2(x), weights, experts)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)
        x = x + self.post_feedforward_layernorm(h)
        if self.per_layer:
            g = self.per_layer_projection(self.act(self.per_layer_input_gate(x)) * per_layer_input)
            x = x + self.post_per_layer_input_norm(g)
        return x * self.layer_scalar


class Gemma4Model(nn.Module):
    def __init__(self, config, max_model_len: int, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(Gemma4DecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = Fp32WeightRMSNorm(config.hidden_size, config.rms_norm_eps)
        p = config.hidden_size_per_layer_input
        if p:
            n = config.num_hidden_layers * p
            self.embed_tokens_per_layer = VocabParallelEmbedding(config.vocab_size_per_layer_input, n, tp)
            self.per_layer_model_projection = Linear(config.hidden_size, n, bias=False)
            self.per_layer_projection_norm = Fp32WeightRMSNorm(p, config.rms_norm_eps)
        self.rotaries = nn.ModuleDict({t: RotaryEmbedding(config.per_layer_config[t], max_model_len, t)
                                       for t in sorted(set(config.layer_types))})


class Gemma4ForCausalLM(_MoEWeights, CausalLM):
    packed_modules = LlamaForCausalLM.packed_modules
    embeds_prompt = False  # the per-layer inputs read the token ids too

    @classmethod
    def check(cls, config) -> None:
        if getattr(config, "use_bidirectional_attention", None) == "all":
            raise ValueError("Gemma 4 with use_bidirectional_attention='all' (an encoder) is not a causal LM.")

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        cls.check(config)
        if config.num_attention_heads % tp_size:
            raise ValueError(f"{config.num_attention_heads} attention heads do not split over "
                             f"tensor_parallel_size={tp_size}")
        own = cache_layers(config)
        shapes = tuple((kv_heads_per_rank(kvh, tp_size), d) for kvh, d in (layer_heads(config, i) for i in own))
        windows = tuple(config.sliding_window if config.layer_types[i] == "sliding_attention" else None for i in own)
        return ModelGeometry(num_layers=len(own), num_kv_heads=shapes[0][0], head_dim=shapes[0][1],
                             sliding_windows=windows, kv_layer_shapes=shapes)

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.check(config)
        self.config, self.tp = config, tp
        self.model = Gemma4Model(config, max_model_len, tp)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        modes = config.kv_sharing_modes
        self.kinds = list(config.layer_types)
        self.stores = [m == "store" for m in modes]
        # layer i -> its cache's index among the layers with one (None: it reads its store layer's)
        index = {layer: c for c, layer in enumerate(cache_layers(config))}
        self.cache_of = [index.get(i) for i in range(config.num_hidden_layers)]

    def hf_name(self, name: str) -> str | None:
        if self.tied and name == "lm_head.weight":
            return None
        parts = name.split(".")
        if len(parts) > 4 and parts[1] == "layers" and parts[3] == "self_attn" and parts[4] in (
                "k_proj", "v_proj", "k_norm", "v_norm") and self.cache_of[int(parts[2])] is None:
            return None  # a layer that shares K/V: checkpoints may keep its unused projections
        return name

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """(T, L, P): the per-layer input of every layer."""
        cfg, m = self.config, self.model
        p = cfg.hidden_size_per_layer_input
        if not p:
            return None
        shape = (x.shape[0], cfg.num_hidden_layers, p)
        proj = m.per_layer_model_projection(x) * cfg.hidden_size ** -0.5
        proj = m.per_layer_projection_norm(proj.reshape(shape))
        tokens = m.embed_tokens_per_layer(input_ids)
        tokens = tokens * torch.tensor(p ** 0.5, dtype=tokens.dtype)
        return (proj + tokens.reshape(shape)) * 2.0 ** -0.5

    def forward(self, input_ids, positions, kv_caches, meta, backend, inputs_embeds=None,
                per_layer_inputs=None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        per_layer = self.per_layer_inputs(input_ids, x) if per_layer_inputs is None else per_layer_inputs
        shared: dict = {}
        rotaries = self.model.rotaries
        for i, layer in enumerate(self.model.layers):
            c = self.cache_of[i]
            kind = self.kinds[i]
            x = layer(positions, x, None if per_layer is None else per_layer[:, i], rotaries[kind],
                      None if c is None else kv_caches[c], meta, backend, shared, kind, self.stores[i])
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = parallel_logits(hidden, self.lm_head.weight, self.config.vocab_size, self.tp)
        cap = self.config.final_logit_softcapping
        return logits if cap is None or logits is None else torch.tanh(logits / cap) * cap


class Gemma4ForConditionalGeneration(VisionLanguageModel):
    """Gemma 4 with images (Gemma4ForConditionalGeneration, every Gemma 4 checkpoint):

        image -> Gemma 4's image processor: the image resized (aspect ratio kept) to at most max_soft_tokens x k^2
            patches, padded to that count, with each patch's (x, y) -> the vision encoder (transformers' module:
            2-D RoPE, k x k pooling, padding dropped) -> the multimodal embedder (weightless RMSNorm, a projection)
            -> one feature per soft token
        prompt: the image token where an image goes; it becomes <boi>, a soft token per feature, <eoi> (Gemma 4's
            processor), the features filling the soft tokens

    The per-layer inputs look the pad token up at image positions (their projection part reads the image
    features), as transformers does. Where the text config says use_bidirectional_attention "vision" (the larger
    models), an image's positions attend to each other both ways in the sliding layers only (the global layers stay
    causal): such an image is computed in one step (`bidirectional_images`, as Gemma 3's). The audio encoder is not
    implemented (its weights are skipped)."""

    @classmethod
    def bidirectional_images(cls, config) -> bool:
        return getattr(config.text_config, "use_bidirectional_attention", None) == "vision"

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        return Gemma4ForCausalLM.geometry(config.text_config, tp_size)

    @classmethod
    def placeholder_id(cls, config) -> int:
        return config.image_token_id

    @classmethod
    def image_tokens(cls, config) -> int | None:
        return None  # as many as the image processor gives the image (up to its max_soft_tokens)

    @classmethod
    def image_prompt(cls, config, tokenizer, size: int, data: Any) -> tuple[list[int], int, int]:
        return [config.boi_token_id] + [config.image_token_id] * size + [config.eoi_token_id], 1, size

    @classmethod
    def image_input(cls, config, image_processor, image, **kwargs) -> tuple[int, Any]:
        out = image_processor(images=[image], return_tensors="pt", **kwargs)
        data = {"pixel_values": out["pixel_values"][0].float().numpy().copy(),
                "image_position_ids": out["image_position_ids"][0].numpy().astype(np.int64)}
        return int(out["num_soft_tokens_per_image"][0]), data

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder

        self.config = config
        self.language_model = Gemma4ForCausalLM(config.text_config, max_model_len, tp)
        for layer, kind in zip(self.language_model.model.layers, config.text_config.layer_types):
            layer.self_attn.attn.image_blocks = kind == "sliding_attention"  # (only read with bidirectional images)
        vision = config.vision_config
        vision._attn_implementation = "sdpa"
        self.vision_tower = AutoModel.from_config(vision)
        for name in ("std_bias", "std_scale"):  # standardisation buffers: loaded as (frozen) parameters
            buf = getattr(self.vision_tower, name, None)
            if isinstance(buf, torch.Tensor):
                delattr(self.vision_tower, name)
                self.vision_tower.register_parameter(name, nn.Parameter(buf, requires_grad=False))
        self.embed_vision = Gemma4MultimodalEmbedder(vision, config.text_config)
        self.kernel = vision.pooling_kernel_size

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        if name.startswith("model.language_model."):
            return self._language("model." + name[len("model.language_model."):])
        if name.startswith("lm_head."):
            return self._language(name)
        if name.startswith(("model.vision_tower.", "model.embed_vision.")):
            return name[len("model."):], None
        return None  # the audio encoder and its embedder

    def encode_images(self, data: list, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Images padded to the same patch count go through the encoder together (the processor pads every image to
        its max_soft_tokens x k^2 patches; a request's mm_processor_kwargs may choose another count)."""
        out: list[torch.Tensor | None] = [None] * len(data)
        groups: dict[int, list[int]] = {}
        for i, d in enumerate(data):
            groups.setdefault(d["pixel_values"].shape[0], []).append(i)
        for idx in groups.values():
            pixels = torch.from_numpy(np.stack([data[i]["pixel_values"] for i in idx])).to(device, dtype)
            pos = torch.from_numpy(np.stack([data[i]["image_position_ids"] for i in idx])).to(device)
            hidden = self.vision_tower(pixel_values=pixels, pixel_position_ids=pos).last_hidden_state
            feats = self.embed_vision(hidden)  # the images' features one after another, padding dropped
            sizes = ((pos != -1).all(-1).sum(-1) // self.kernel ** 2).tolist()
            for i, f in zip(idx, torch.split(feats, sizes)):
                out[i] = f
        return out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend,
                mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        lm = self.language_model
        x = lm.embed(input_ids)
        per_layer = None
        if mm_embeds is not None:
            index, features = mm_embeds
            x = x.index_copy(0, index, features.to(x.dtype))
            ids = input_ids.index_fill(0, index, self.config.text_config.pad_token_id)
            per_layer = lm.per_layer_inputs(ids, x)
        return lm(input_ids, positions, kv_caches, meta, backend, inputs_embeds=x, per_layer_inputs=per_layer)
