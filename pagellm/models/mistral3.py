"""Mistral 3 with images (Mistral3ForConditionalGeneration: Mistral-Small-3.1 / 3.2): Pixtral's vision encoder.

    an image resized to fit the processor's longest edge, its sides multiples of patch_size x spatial_merge_size
    -> Pixtral (transformers' module: 2-D RoPE over the patch grid, every image of the batch in one sequence with
       block-diagonal attention) -> the patch features -> RMSNorm, 2x2 patch merger, linear, act, linear
       (transformers' Mistral3MultiModalProjector) -> one feature per merged patch, row by row
    input_ids -> the decoder's embeddings, the [IMG] rows replaced by the features -> pagellm's native decoder

An image's tokens are a grid: each row of merged patches is that many [IMG] tokens and an [IMG_BREAK], the last row
ending with [IMG_END] instead (`image_prompt`, as PixtralProcessor writes them). The image's span covers the whole
grid; its features hold the image features at the [IMG] positions and nothing at the others, which the forward
leaves to their token embeddings. The language model is pagellm's class for text_config (Mistral, LLaMA),
sharded as usual; the vision encoder and projector are replicated.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import TowerProjectorLayout, VisionLanguageModel
from pagellm.models.parallel_layers import SINGLE


class Mistral3ForConditionalGeneration(TowerProjectorLayout, VisionLanguageModel):
    @classmethod
    def placeholder_id(cls, config) -> int:
        return config.image_token_index  # [IMG]

    @classmethod
    def image_tokens(cls, config) -> int | None:
        return None  # the image's grid: it depends on the image's size

    @classmethod
    def merged_patch(cls, config) -> int:
        """Pixels on a side of one merged patch (one feature)."""
        return config.vision_config.patch_size * config.spatial_merge_size

    @classmethod
    def image_input(cls, config, image_processor, image, **kwargs) -> tuple[int, Any]:
        side = cls.merged_patch(config)
        kwargs = {"patch_size": {"height": side, "width": side}, **kwargs}  # as PixtralProcessor asks for it
        out = image_processor(images=[image], return_tensors="pt", **kwargs)
        height, width = (int(x) for x in out["image_sizes"][0])
        pixels = out["pixel_values"][0][:, :height, :width]
        if height % side or width % side:
            raise ValueError(f"the image processor made {height} x {width} pixels; Mistral 3 takes multiples of "
                             f"{side} (patch_size x spatial_merge_size).")
        rows, cols = height // side, width // side
        return rows * (cols + 1), pixels.float().numpy().copy()

    @classmethod
    def image_prompt(cls, config, tokenizer, size: int, data: Any) -> tuple[list[int], int, int]:
        """Rows of [IMG] tokens, each ended by [IMG_BREAK], the last by [IMG_END]; the span is the whole grid."""
        if tokenizer is None:
            raise ValueError("expanding [IMG] needs the tokenizer; without one, send the prompt expanded as "
                             "PixtralProcessor writes it.")
        side = cls.merged_patch(config)
        rows, cols = data.shape[1] // side, data.shape[2] // side
        brk, end = tokenizer.convert_tokens_to_ids("[IMG_BREAK]"), tokenizer.convert_tokens_to_ids("[IMG_END]")
        tokens = ([config.image_token_index] * cols + [brk]) * rows
        tokens[-1] = end
        return tokens, 0, len(tokens)

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

        # transformers' Pixtral vision model and Mistral 3's projector (RMSNorm, patch merger, MLP)
        self.init_parts(config, max_model_len, tp, Mistral3MultiModalProjector(config))
        self.image_token_id = config.image_token_index

    def encode_images(self, data: list, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every image of the step in one call (padded to the largest; Pixtral crops each to its size), then each
        image's features laid out on its grid, zeros at the row ends."""
        sizes = [d.shape[1:] for d in data]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        pixels = np.zeros((len(data), 3, height, width), dtype=np.float32)
        for i, d in enumerate(data):
            pixels[i, :, :d.shape[1], :d.shape[2]] = d
        image_sizes = torch.tensor(sizes)
        out = self.vision_tower(torch.from_numpy(pixels).to(device, dtype), image_sizes=image_sizes,
                                output_hidden_states=True)
        feats = torch.cat(self.feature_layers(out), dim=-1).squeeze(0)
        feats = self.multi_modal_projector(feats, image_sizes)
        side = self.merged_patch(self.config)
        grids = []
        for (h, w), f in zip(sizes, feats.split([(h // side) * (w // side) for h, w in sizes])):
            rows, cols = h // side, w // side
            grid = f.new_zeros(rows, cols + 1, f.shape[-1])
            grid[:, :cols] = f.view(rows, cols, -1)
            grids.append(grid.view(rows * (cols + 1), -1))
        return grids

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend,
                mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if mm_embeds is not None:  # only the [IMG] positions of a grid take features; the row ends keep their tokens
            index, features = mm_embeds
            keep = input_ids.index_select(0, index) == self.image_token_id
            mm_embeds = (index[keep], features[keep])
        return super().forward(input_ids, positions, kv_caches, meta, backend, mm_embeds=mm_embeds)
