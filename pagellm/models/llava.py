"""LLaVA (LlavaForConditionalGeneration): a vision encoder and a projector in front of a native decoder.

    pixel_values (N, 3, H, W) -> vision tower (CLIP / SigLIP, transformers' module) -> hidden states of
        vision_feature_layer (the class token dropped with strategy "default") -> projector (linear, act, linear)
        -> image features (N, tokens per image, text hidden)
    input_ids (T,) -> the decoder's embeddings, the rows of image placeholder tokens replaced by image features
        (`mm_embeds`: batch indices and features, built by the worker) -> the decoder as usual -> hidden (T, hidden)

The prompt holds one placeholder token (config.image_token_index) per image feature, so each image fills
`image_tokens(config)` positions: they take part in the paged KV cache, prefix caching and chunked prefill like
any other token (the block hashes carry the image's content hash: core/kv_cache_manager.py). The language model is
pagellm's native class for config.text_config (any LLaMA-family decoder), sharded as usual under tensor
parallelism; the vision tower and projector are small and replicated on every rank.

Checkpoint names: llava-hf's ("language_model.model.*", "language_model.lm_head.*", "vision_tower.vision_model.*",
"multi_modal_projector.*") and transformers 5's ("model.language_model.*", "lm_head.*", "model.vision_tower.*").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import TowerProjectorLayout, VisionLanguageModel
from pagellm.models.layers import activation
from pagellm.models.parallel_layers import SINGLE


def image_tokens(config) -> int:
    """Placeholder tokens (positions) one image fills: a feature per position of the vision tower's output (the
    patches, and CLIP's class token), less the first with strategy "default" (transformers drops it)."""
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    cls = 0 if v.model_type.startswith("siglip") else 1  # SigLIP has no class token
    return patches + cls - (1 if config.vision_feature_select_strategy == "default" else 0)


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        layers = config.vision_feature_layer
        n = len(layers) if isinstance(layers, (list, tuple)) else 1
        bias = getattr(config, "multimodal_projector_bias", True)
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * n, hidden, bias=bias)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(TowerProjectorLayout, VisionLanguageModel):
    @classmethod
    def placeholder_id(cls, config) -> int:
        tid = getattr(config, "image_token_index", None)
        return tid if tid is not None else config.image_token_id

    @classmethod
    def image_tokens(cls, config) -> int | None:
        """Positions every image fills (None: it depends on the image)."""
        return image_tokens(config)

    @classmethod
    def image_input(cls, config, image_processor, image, **kwargs) -> tuple[int, Any]:
        """(positions the image fills, what the worker encodes: pixel values (3, H, W)). `kwargs`: the request's
        settings for the image processor."""
        pixels = image_processor(images=[image], return_tensors="pt", **kwargs)["pixel_values"][0]
        return image_tokens(config), cls.tower_pixels(config, pixels)

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        # transformers' CLIP / SigLIP vision model
        self.init_parts(config, max_model_len, tp, LlavaMultiModalProjector(config))
        self.drop_cls = config.vision_feature_select_strategy == "default"
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
                             "supported (default or full).")
        self.image_token_id = self.placeholder_id(config)
        self.vocab_size = config.text_config.vocab_size

    # ---- forward ---------------------------------------------------------------------------------------------

    def encode_images(self, data: list, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """The features (positions, text hidden) of each image, from what image_input made, in one batch."""
        import numpy as np

        pixels = torch.from_numpy(np.stack(data)).to(device, dtype)
        return list(self.image_features(pixels))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, image_tokens, text hidden): what the placeholders of N images hold."""
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        feats = self.feature_layers(out)
        if self.drop_cls:
            feats = [f[:, 1:] for f in feats]
        return self.multi_modal_projector(torch.cat(feats, dim=-1))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.image_token_id >= self.vocab_size:  # a placeholder outside the text vocabulary: its row is replaced
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.language_model.embed(input_ids)


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-NeXT (LLaVA 1.6): "anyres" images. The image processor cuts an image into a grid of tower-sized tiles
    (the grid of image_grid_pinpoints that fits the image best) plus the whole image resized; every tile goes
    through the tower and projector, the tiles' features are laid out as the grid, cropped back to the image's
    aspect ratio, and each row ends with the learned `image_newline`; the whole image's features come first.
    So an image fills base + rows x (columns + 1) positions, which depends on its size (`num_positions`).
    transformers' own `pack_image_features` does the layout, on the tiles pagellm encodes in one batch."""

    @classmethod
    def image_tokens(cls, config) -> int | None:
        return None  # depends on the image's size

    @classmethod
    def num_positions(cls, config, height: int, width: int) -> int:
        """Positions an image of height x width pixels fills (transformers' processor's count)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        v = config.vision_config
        side = v.image_size // v.patch_size
        rows, cols = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, v.image_size)
        h, w = rows * side, cols * side
        if width / height > w / h:  # unpad_image's arithmetic: the padding of the longer side is cropped
            h -= 2 * ((h - int(round(height * (w / width), 7))) // 2)
        else:
            w -= 2 * ((w - int(round(width * (h / height), 7))) // 2)
        return image_tokens(config) + h * (w + 1)

    @classmethod
    def image_input(cls, config, image_processor, image, **kwargs) -> tuple[int, Any]:
        out = image_processor(images=[image], return_tensors="pt", **kwargs)
        pixels, size = out["pixel_values"][0], out["image_sizes"][0]  # the tiles (P, 3, S, S)
        height, width = (int(x) for x in size)
        return cls.num_positions(config, height, width), {"pixel_values": cls.tower_pixels(config, pixels),
                                                          "image_size": size.numpy().copy()}

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, max_model_len, tp)
        side = config.vision_config.image_size // config.vision_config.patch_size
        if image_tokens(config) != side * side:
            raise ValueError("LLaVA-NeXT lays each tile's features out as a grid: vision_feature_select_strategy "
                             "must drop the class token of a CLIP tower (default).")
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        if name in ("image_newline", "model.image_newline"):
            return "image_newline", None
        return super().map_weight(name)

    def encode_images(self, data: list, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        import numpy as np
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        tiles = [d["pixel_values"] for d in data]
        pixels = torch.from_numpy(np.concatenate(tiles)).to(device, dtype)
        feats = list(self.image_features(pixels).split([len(t) for t in tiles]))
        sizes = torch.from_numpy(np.stack([d["image_size"] for d in data]))
        pack = LlavaNextModel.pack_image_features  # transformers' layout; it reads self.config only
        packed, lens = pack(self, feats, sizes, self.config.vision_feature_select_strategy, self.image_newline)
        if isinstance(packed, torch.Tensor):  # older transformers: one tensor of every image's features
            packed = packed.split([int(n) for n in lens])
        return list(packed)
