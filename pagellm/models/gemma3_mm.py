"""Gemma 3 with images (Gemma3ForConditionalGeneration: gemma-3-4b/12b/27b, MedGemma).

    pixel_values (N, 3, 896, 896) -> SigLIP (transformers' module) -> last hidden state (N, 4096 patches, vision
        hidden) -> average pool 4x4 over the patch grid -> (N, 256, vision hidden) -> Gemma RMSNorm -> x W
        -> image features (N, mm_tokens_per_image, text hidden)
    input_ids -> Gemma 3's scaled embeddings, the rows of image positions replaced by the features -> pagellm's
        Gemma3ForCausalLM -> hidden

The prompt holds "<start_of_image>" where an image goes; as Gemma 3's processor does, it becomes
"\\n\\n<start_of_image>" + mm_tokens_per_image x "<image_soft_token>" + "<end_of_image>\\n\\n", the features filling
the soft tokens (`image_replacement`). Those positions attend to each other both ways (transformers builds the
mask from the processor's token_type_ids): an image's positions are computed in one step (the scheduler does not
end a chunk inside one), and the attention layers recompute their rows with the image's later keys too
(attention/backend.py, `image_block_attention`). Everything else is Gemma 3's text path, sharded as usual; the
vision tower and projector are replicated.

Checkpoint names: the hub's ("language_model.model.*", "vision_tower.vision_model.*", "multi_modal_projector.*")
and transformers 5's ("model.language_model.*", "model.vision_tower.*", "lm_head.*").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import TowerProjectorLayout, VisionLanguageModel
from pagellm.models.layers import GemmaRMSNorm
from pagellm.models.parallel_layers import SINGLE


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        v = config.vision_config
        self.mm_input_projection_weight = nn.Parameter(torch.empty(v.hidden_size, config.text_config.hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.patches_per_side = v.image_size // v.patch_size
        tokens_per_side = int(config.mm_tokens_per_image ** 0.5)
        self.kernel = self.patches_per_side // tokens_per_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, patches, vision hidden) -> (N, mm_tokens_per_image, text hidden)
        n, _, h = x.shape
        grid = x.transpose(1, 2).reshape(n, h, self.patches_per_side, self.patches_per_side)
        pooled = nn.functional.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(x)


class Gemma3ForConditionalGeneration(TowerProjectorLayout, VisionLanguageModel):
    bidirectional_images = True  # an image's positions attend to each other both ways

    @classmethod
    def placeholder_id(cls, config) -> int:
        """What the prompt holds where an image goes: <start_of_image>."""
        return config.boi_token_index

    @classmethod
    def image_tokens(cls, config) -> int:
        return config.mm_tokens_per_image

    @classmethod
    def image_prompt(cls, config, tokenizer, size: int, data: Any) -> tuple[list[int], int, int]:
        """What replaces the prompt's <start_of_image>: "\\n\\n<start_of_image>", the soft tokens the features fill,
        "<end_of_image>\\n\\n" (without a tokenizer, prompts must come expanded)."""
        if tokenizer is None:
            raise ValueError("expanding <start_of_image> needs the tokenizer; without one, send the prompt expanded "
                             "as Gemma 3's processor writes it.")
        newlines = tokenizer.encode("\n\n", add_special_tokens=False)
        before = newlines + [config.boi_token_index]
        return before + [config.image_token_index] * size + [config.eoi_token_index] + newlines, len(before), size

    @classmethod
    def image_input(cls, config, image_processor, image, **kwargs) -> tuple[int, Any]:
        out = image_processor(images=[image], return_tensors="pt", **kwargs)
        pixels = out["pixel_values"]
        if pixels.shape[0] != 1:
            raise ValueError(f"the image processor made {pixels.shape[0]} crops of one image (pan and scan); "
                             "pagellm takes one per image.")
        return config.mm_tokens_per_image, cls.tower_pixels(config, pixels[0])

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        # transformers' SigLIP vision model
        self.init_parts(config, max_model_len, tp, Gemma3MultiModalProjector(config))

    # ---- forward ---------------------------------------------------------------------------------------------

    def encode_images(self, data: list, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        pixels = torch.from_numpy(np.stack(data)).to(device, dtype)
        hidden = self.vision_tower(pixel_values=pixels).last_hidden_state
        return list(self.multi_modal_projector(hidden))
