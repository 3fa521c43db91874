"""A prompt's images -> pixel values and the prompt positions they fill.

    MultiModalProcessor(model_config, tokenizer).process(ids, {"image": [...]}) -> (ids, [MultiModalFeature])

The prompt names where each image goes with one placeholder token (LLaVA's "<image>", Qwen2-VL's "<|image_pad|>",
Gemma 3's "<start_of_image>", Mistral 3's "[IMG]"); each placeholder becomes the tokens of the image's positions: by
default as many placeholders as the image fills positions (fixed for LLaVA and Gemma 3, the image's merged patch grid
for Qwen2-VL); a model may lay them out itself (`image_prompt`: Gemma 3 puts "\n\n<start_of_image>" before its soft
tokens and "<end_of_image>\n\n" after; Mistral 3 ends each row of [IMG] with [IMG_BREAK], the last with [IMG_END]).
A prompt that arrives expanded already (as transformers' processors write it: each image's tokens in order, no other
placeholder) is taken as is.
Pixel values come from the checkpoint's own image processor (preprocessor_config.json, through transformers'
AutoImageProcessor), so resizing, cropping and normalization are the model's; the model class turns its output
into what the worker encodes (`image_input`). Each image's identifier is a hash of that: the prefix cache tells
images apart by it. Models with multimodal RoPE also get the prompt's 3-D positions (`rope_positions`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from pagellm.multimodal.inputs import MultiModalFeature
from pagellm.multimodal.media import MediaError, load_image
from pagellm.sampling_params import ParamError


class MultiModalProcessor:
    def __init__(self, model_config, tokenizer: Any = None, max_num_batched_tokens: int | None = None) -> None:
        from transformers import AutoImageProcessor

        from pagellm.models.base import images_attend_both_ways
        from pagellm.models.registry import get_model_class

        mm = model_config.multimodal
        self.model_cls = get_model_class(model_config.architecture)
        self.hf_config = model_config.hf_config
        self.placeholder_id = mm.placeholder_id
        self.whole = images_attend_both_ways(self.model_cls, model_config.hf_config)
        self.max_whole = max_num_batched_tokens  # such an image is computed in one step: at most this many positions
        self.tokenizer = tokenizer
        self.limits = dict(mm.limit_per_prompt)
        self.allowed_local_media_path = mm.allowed_local_media_path
        self.placeholder = tokenizer.convert_ids_to_tokens(mm.placeholder_id) if tokenizer is not None else None
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(model_config.model, **mm.processor_kwargs)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"the multimodal model {model_config.model!r} has no usable image processor "
                             f"(preprocessor_config.json, mm_processor_kwargs {mm.processor_kwargs}): {e}") from None

    def load(self, source: Any):
        """An RGB PIL image from a PIL image, bytes or a URL; ParamError (param multi_modal_data) otherwise."""
        try:
            return load_image(source, self.allowed_local_media_path)
        except MediaError as e:
            raise ParamError(str(e), param="multi_modal_data") from None

    def process(self, ids: list[int], data: Any,
                kwargs: dict[str, Any] | None = None) -> tuple[list[int], list[MultiModalFeature]]:
        """`kwargs`: the request's mm_processor_kwargs, passed to the image processor for its images."""
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
        n = len(images)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ParamError(f"mm_processor_kwargs must be a dict, got {type(kwargs).__name__}.",
                             param="mm_processor_kwargs")
        inputs = [self._image_input(self.load(img), kwargs or {}) for img in images]
        layouts = [self._image_prompt(size, data) for size, data in inputs]  # (tokens, feature start, length)
        spans = self._expanded(ids, layouts)
        if spans is None and len(at) == n:  # one placeholder per image: each becomes its image's tokens
            out: list[int] = []
            spans, last = [], 0
            for i, (tokens, start, length) in zip(at, layouts):
                out += ids[last:i]
                spans.append((len(out) + start, length))
                out += tokens
                last = i + 1
            ids = out + ids[last:]
        elif spans is None:
            raise ParamError(f"the prompt has {len(at)} image placeholder token(s) "
                             f"({self.placeholder or self.placeholder_id!r}) for {n} image(s): put one placeholder "
                             "where each image goes.", param="multi_modal_data")
        feats = []
        for (start, length), (_, data) in zip(spans, inputs):
            if self.whole and self.max_whole is not None and length > self.max_whole:
                raise ParamError(f"an image of {length} positions is computed in one step (its positions attend to "
                                 f"each other both ways), more than max_num_batched_tokens ({self.max_whole}); "
                                 "send a smaller image (mm_processor_kwargs) or raise max_num_batched_tokens.",
                                 param="multi_modal_data")
            feats.append(MultiModalFeature("image", _digest(data), start, length, data, whole=self.whole))
        return ids, feats

    def _image_prompt(self, size: int, data: Any) -> tuple[list[int], int, int]:
        """The tokens of an image's positions, and where its features go among them (start, length)."""
        fn = getattr(self.model_cls, "image_prompt", None)
        if fn is None:
            return [self.placeholder_id] * size, 0, size
        try:
            return fn(self.hf_config, self.tokenizer, size, data)
        except ValueError as e:
            raise ParamError(str(e), param="multi_modal_data") from None

    def _expanded(self, ids: list[int], layouts: list[tuple[list[int], int, int]]) -> list[tuple[int, int]] | None:
        """The feature spans of a prompt that holds each image's tokens already, in order, and no placeholder
        besides theirs; None otherwise."""
        ph = self.placeholder_id
        if sum(t == ph for t in ids) != sum(tokens.count(ph) for tokens, _, _ in layouts) or not layouts:
            return None
        spans, pos = [], 0
        for tokens, start, length in layouts:
            k = len(tokens)
            i = next((i for i in range(pos, len(ids) - k + 1) if ids[i] == tokens[0] and ids[i:i + k] == tokens),
                     None)
            if i is None:
                return None
            spans.append((i + start, length))
            pos = i + k
        return spans

    def _image_input(self, image, kwargs: dict[str, Any]) -> tuple[int, Any]:
        try:
            return self.model_cls.image_input(self.hf_config, self.image_processor, image, **kwargs)
        except (TypeError, ValueError) as e:
            if not kwargs:
                raise
            raise ParamError(f"the image processor refused mm_processor_kwargs {kwargs}: {e}",
                             param="mm_processor_kwargs") from None

    def rope_positions(self, features: list[MultiModalFeature]) -> Any:
        fn = getattr(self.model_cls, "rope_positions", None)
        return fn(self.hf_config, features) if fn is not None else None



def _digest(data: Any) -> str:
    """sha256 of an image's processed arrays (shapes included)."""
    h = hashlib.sha256()
    for arr in (data.values() if isinstance(data, dict) else [data]):
        arr = np.ascontiguousarray(arr)
        h.update(str((arr.shape, arr.dtype.str)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
