"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (Qwen2VLForConditionalGeneration and the classes below): images at
their own resolution, and multimodal RoPE.

    image -> the checkpoint's image processor: patches (N, C * temporal * patch * patch) and grid (t, h, w) ->
        the vision transformer (transformers' module: patch embedding, 2D rotary attention blocks, a merger
        that folds each spatial_merge_size^2 patches into one) -> (t * h * w / merge^2, text hidden)
    prompt: <|vision_start|><|image_pad|><|vision_end|> per image; the pad token is expanded to the image's positions
    decoder: Qwen2's (pagellm's Qwen2ForCausalLM), with M-RoPE: a position is (temporal, height, width); text
        positions are equal in all three and count on from the largest position before them, image positions are
        (start, start + row, start + column) over the merged grid.

So an image of any size fills as many positions as its merged grid has cells. The 3-D positions of a prompt are
computed with the prompt (`rope_positions`): only the stretch from the first image to the end of the last differs
from plain positions; after it a sequence's positions are its index plus one offset (`delta`, <= 0). The worker
uses the table for prompt tokens in that stretch (3-D positions, eager steps) and index + delta elsewhere (1-D:
decode steps keep CUDA graphs).

Checkpoint names: the hub's ("model.layers.*", "visual.*", "lm_head.*") and transformers 5's
("model.language_model.*", "model.visual.*").
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import VisionLanguageModel
from pagellm.models.hybrid import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
from pagellm.models.layers import MRotaryEmbedding
from pagellm.models.llama import Qwen2ForCausalLM, Qwen3ForCausalLM
from pagellm.models.moe import Qwen3MoeForCausalLM
from pagellm.models.parallel_layers import SINGLE


def _text_config(config):
    """The language model's config, with the settings the checkpoint keeps at the top level."""
    text = copy.copy(config.text_config)
    text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    return text


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    vision_module = "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VisionTransformerPretrainedModel"
    text_class: type = Qwen2ForCausalLM
    interleaved_mrope = False

    @classmethod
    def text_config(cls, config):
        return _text_config(config)

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        return cls.text_class.geometry(cls.text_config(config), tp_size)

    @classmethod
    def placeholder_id(cls, config) -> int:
        return config.image_token_id

    @classmethod
    def image_tokens(cls, config) -> int | None:
        return None  # an image fills as many positions as its merged patch grid has cells

    @classmethod
    def image_input(cls, config, image_processor, image, **kwargs) -> tuple[int, Any]:
        out = image_processor(images=[image], return_tensors="pt", **kwargs)
        grid = out["image_grid_thw"][0].numpy().astype(np.int64)
        merge = config.vision_config.spatial_merge_size
        data = {"pixel_values": out["pixel_values"].float().numpy().copy(), "image_grid_thw": grid}
        return int(grid.prod()) // merge ** 2, data

    @classmethod
    def rope_positions(cls, config, features: list) -> tuple[int, int, np.ndarray, int] | None:
        """(a, b, table, delta): the 3-D positions (3, b - a) of prompt positions a..b-1 (the first image's start to
        the last one's end); positions before a are plain, positions from b on are index + delta. None without
        images."""
        if not features:
            return None
        merge = config.vision_config.spatial_merge_size
        a, b = features[0].offset, features[-1].end
        parts, cur, last = [], a, a  # plain positions up to the first image
        for f in features:
            n = f.offset - last  # text before this image
            parts.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
            cur += n
            t, h, w = (int(x) for x in f.data["image_grid_thw"])
            gh, gw = h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            parts.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
            cur += max(gh, gw)
            last = f.end
        return a, b, np.concatenate(parts, axis=1).astype(np.int64), cur - b

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        import importlib

        self.config = config
        text = self.text_config(config)
        self.language_model = self.text_class(text, max_model_len, tp)
        section = (getattr(text, "rope_parameters", None) or {}).get("mrope_section") or \
            (getattr(text, "rope_scaling", None) or {}).get("mrope_section")
        if not section:
            raise ValueError("this Qwen2-VL checkpoint's text config has no rope mrope_section.")
        self.language_model.model.rotary = MRotaryEmbedding(text, max_model_len, section, self.interleaved_mrope)
        module, name = self.vision_module.split(":")
        vision = config.vision_config
        vision._attn_implementation = "sdpa"
        self.visual = getattr(importlib.import_module(module), name)._from_config(vision)
        self.merge = vision.spatial_merge_size

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        if name.startswith("model.language_model."):
            return self._language("model." + name[len("model.language_model."):])
        if name.startswith(("model.visual.", "visual.")):
            return name[name.index("visual."):], None
        if name.startswith(("model.", "lm_head.")):
            return self._language(name)
        return None

    def encode_images(self, data: list, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        pixels = torch.from_numpy(np.concatenate([d["pixel_values"] for d in data])).to(device, dtype)
        grid = torch.from_numpy(np.stack([d["image_grid_thw"] for d in data])).to(device)
        out = self.visual(pixels, grid_thw=grid)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return list(torch.split(feats, (grid.prod(-1) // self.merge ** 2).tolist()))


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):  # noqa: N801 - transformers' name
    """Qwen2.5-VL: the same decoder and M-RoPE; a vision transformer with windowed attention, RMSNorm and a gated
    MLP (transformers' module)."""

    vision_module = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VisionTransformerPretrainedModel"


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen3-VL (dense): Qwen3's decoder (q/k norms) with interleaved M-RoPE, and a vision transformer (transformers'
    module: learned position embeddings interpolated to the grid, LayerNorm blocks) whose merger output takes the
    image positions and whose "deepstack" features, taken after some vision blocks, are added to the hidden states of
    the image positions after the first decoder layers (one feature set per layer). encode_images returns each
    image's features side by side, (positions, hidden x (1 + deepstack)); forward splits them."""

    vision_module = "transformers.models.qwen3_vl.modeling_qwen3_vl:Qwen3VLVisionModel"
    text_class = Qwen3ForCausalLM
    interleaved_mrope = True

    def encode_images(self, data: list, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        pixels = torch.from_numpy(np.concatenate([d["pixel_values"] for d in data])).to(device, dtype)
        grid = torch.from_numpy(np.stack([d["image_grid_thw"] for d in data])).to(device)
        out = self.visual(pixels, grid_thw=grid)
        feats = torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)
        return list(torch.split(feats, (grid.prod(-1) // self.merge ** 2).tolist()))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend,
                mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        lm = self.language_model
        x = self.embed(input_ids)
        deep: list[torch.Tensor] = []
        if mm_embeds is not None:
            index, features = mm_embeds
            main, *deep = features.to(x.dtype).split(x.shape[-1], dim=-1)
            x = x.index_copy(0, index, main)
        for i, (layer, kv_cache) in enumerate(zip(lm.model.layers, kv_caches)):
            x = layer(positions, x, lm.model.rotary, kv_cache, meta, backend)
            if i < len(deep):
                x = x.index_add(0, index, deep[i])
        return lm.model.norm(x)


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL MoE: the same with Qwen3-MoE's decoder (experts in every layer, their weights renormalised over the
    top k, as transformers' router always does). Hub checkpoints store the experts stacked and transposed
    (gate_up_proj (E, H, 2I), down_proj (E, I, H)): FusedMoE tells the layouts apart by shape."""

    text_class = Qwen3MoeForCausalLM

    @classmethod
    def text_config(cls, config):
        text = _text_config(config)
        text.norm_topk_prob = True
        return text


class Qwen3_5ForConditionalGeneration(Qwen2VLForConditionalGeneration):  # noqa: N801 - transformers' name
    """Qwen3.5 (dense), as its checkpoints ship: Qwen3-VL's vision transformer without deepstack features (the
    merger's output alone takes the image positions) in front of Qwen3.5's hybrid decoder (models/hybrid.py: Gated
    DeltaNet layers with a recurrent state per sequence among gated attention layers), interleaved M-RoPE over the
    partial rotary dimension. The multi-token-prediction weights (mtp.*) are not part of the model."""

    vision_module = "transformers.models.qwen3_5.modeling_qwen3_5:Qwen3_5VisionModel"
    text_class = Qwen3_5ForCausalLM
    interleaved_mrope = True


class Qwen3_5MoeForConditionalGeneration(Qwen3_5ForConditionalGeneration):  # noqa: N801 - transformers' name
    """Qwen3.5 MoE: the same with experts (and a gated shared expert) in every decoder layer."""

    vision_module = "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe:Qwen3_5MoeVisionModel"
    text_class = Qwen3_5MoeForCausalLM
