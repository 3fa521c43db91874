"""A prompt's images -> pixel values and the prompt positions they fill.

    MultiModalProcessor(model_config, tokenizer).process(ids, {"image": [...]}) -> (ids, [MultiModalFeature])

The prompt names where each image goes with one placeholder token (LLaVA's "<image>"); each placeholder becomes
`image_tokens` of them, the positions the image's features fill. A prompt that arrives expanded already (as
transformers' LlavaProcessor writes it) is taken as is. Pixel values come from the checkpoint's own image processor
(preprocessor_config.json, through transformers' AutoImageProcessor), so resizing, cropping and normalization are
the model's. Each image's identifier is a hash of its pixel values: the prefix cache tells images apart by it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pagellm.multimodal.inputs import MultiModalFeature
from pagellm.multimodal.media import MediaError, load_image
from pagellm.sampling_params import ParamError


class MultiModalProcessor:
    def __init__(self, model_config, tokenizer: Any = None) -> None:
        from transformers import AutoImageProcessor

        mm = model_config.multimodal
        self.placeholder_id = mm.placeholder_id
        self.image_tokens = mm.image_tokens
        self.limits = dict(mm.limit_per_prompt)
        self.allowed_local_media_path = mm.allowed_local_media_path
        self.placeholder = tokenizer.convert_ids_to_tokens(mm.placeholder_id) if tokenizer is not None else None
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(model_config.model)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"the multimodal model {model_config.model!r} has no usable image processor "
                                    f"(preprocessor_config.json): {e}") from None

    def load(self, source: Any):
        """An RGB PIL image from a PIL image, bytes or a URL; ParamError (param multi_modal_data) otherwise."""
        try:
            return load_image(source, self.allowed_local_media_path)
        except MediaError as e:
            raise ParamError(str(e), param="multi_modal_data") from None

    def process(self, ids: list[int], data: Any) -> tuple[list[int], list[MultiModalFeature]]:
        if not isinstance(data, dict):
            raise ParamError(f"multi_modal_data must be a dict such as {{'image': [images]}}, got "
                             f"{type(data).__name__}.", param="multi_modal_data")
        unknown = sorted(set(data) - set(self.limits))
        if unknown:
            raise ParamError(f"multi_modal_data: this model takes {', '.join(self.limits)}, not {unknown}.",
                             param="multi_modal_data")
        images = data.get("image")
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        limit = self.limits["image"]
        if len(images) > limit:
            raise ParamError(f"at most {limit} image(s) per prompt (limit_mm_per_prompt), got {len(images)}.",
                             param="multi_modal_data")
        at = [i for i, t in enumerate(ids) if t == self.placeholder_id]
        n, size = len(images), self.image_tokens
        if len(at) == n:  # one placeholder per image: each becomes `size` of them
            out: list[int] = []
            spans, last = [], 0
            for i in at:
                out += ids[last:i]
                spans.append((len(out), size))
                out += [self.placeholder_id] * size
                last = i + 1
            ids = out + ids[last:]
        elif len(at) == n * size and all(at[k + size - 1] - at[k] == size - 1 for k in range(0, len(at), size)):
            spans = [(at[k], size) for k in range(0, len(at), size)]  # expanded already
        else:
            raise ParamError(f"the prompt has {len(at)} image placeholder token(s) "
                             f"({self.placeholder or self.placeholder_id!r}) for {n} image(s): put one placeholder "
                             "where each image goes.", param="multi_modal_data")
        feats = []
        for img, (start, length) in zip(images, spans):
            pixels = self.pixel_values(self.load(img))
            digest = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
            feats.append(MultiModalFeature("image", digest, start, length, pixels))
        return ids, feats

    def pixel_values(self, image) -> Any:
        """(3, H, W) float32 pixel values of one RGB image, by the checkpoint's image processor: a numpy array (it
        crosses process boundaries by value, where a torch tensor would go through shared memory)."""
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return pixels.float().numpy().copy()
