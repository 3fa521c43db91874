"""A prompt's images -> pixel values and the prompt positions they fill.

    MultiModalProcessor(model_config, tokenizer).process(ids, {"image": [...]}) -> (ids, [MultiModalFeature])

The prompt names where each image goes with one placeholder token (LLaVA's "<image>", Qwen2-VL's "<|image_pad|>",
Gemma 3's "<start_of_image>"); each placeholder becomes as many feature tokens as the image fills positions (fixed
for LLaVA and Gemma 3, the image's merged patch grid for Qwen2-VL), with what the model puts around them (Gemma 3:
"\n\n<start_of_image>" before, "<end_of_image>\n\n" after: `image_replacement`). A prompt that arrives expanded
already (as transformers' processors write it) is taken as is.
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
    def __init__(self, model_config, tokenizer: Any = None) -> None:
        from transformers import AutoImageProcessor

        from pagellm.models.registry import get_model_class

        mm = model_config.multimodal
        self.model_cls = get_model_class(model_config.architecture)
        self.hf_config = model_config.hf_config
        self.placeholder_id = mm.placeholder_id
        fid = getattr(self.model_cls, "feature_token_id", None)
        self.feature_id = fid(self.hf_config) if fid is not None else mm.placeholder_id  # what features fill
        self.whole = bool(getattr(self.model_cls, "bidirectional_images", False))
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
        feat_at = at if self.feature_id == self.placeholder_id else [i for i, t in enumerate(ids)
                                                                         if t == self.feature_id]
        n = len(images)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ParamError(f"mm_processor_kwargs must be a dict, got {type(kwargs).__name__}.",
                             param="mm_processor_kwargs")
        inputs = [self._image_input(self.load(img), kwargs or {}) for img in images]
        sizes = [size for size, _ in inputs]
        expanded = (feat_at and len(feat_at) == sum(sizes) and self._contiguous(feat_at, sizes)
                    and (self.feature_id != self.placeholder_id or len(at) != n))
        if expanded:  # as transformers' processors write it
            starts = np.cumsum([0] + sizes[:-1])
            spans = [(feat_at[k], size) for k, size in zip(starts, sizes)]
        elif len(at) == n:  # one placeholder per image: each becomes `size` feature tokens (and what surrounds them)
            before, after = self._surroundings()
            out: list[int] = []
            spans, last = [], 0
            for i, size in zip(at, sizes):
                out += ids[last:i] + before
                spans.append((len(out), size))
                out += [self.feature_id] * size + after
                last = i + 1
            ids = out + ids[last:]
        else:
            raise ParamError(f"the prompt has {len(at)} image placeholder token(s) "
                             f"({self.placeholder or self.placeholder_id!r}) for {n} image(s): put one placeholder "
                             "where each image goes.", param="multi_modal_data")
        feats = []
        for (start, length), (_, data) in zip(spans, inputs):
            feats.append(MultiModalFeature("image", _digest(data), start, length, data, whole=self.whole))
        return ids, feats

    def _surroundings(self) -> tuple[list[int], list[int]]:
        fn = getattr(self.model_cls, "image_replacement", None)
        if fn is None:
            return [], []
        try:
            return fn(self.hf_config, self.tokenizer)
        except ValueError as e:
            raise ParamError(str(e), param="multi_modal_data") from None

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

    @staticmethod
    def _contiguous(at: list[int], sizes: list[int]) -> bool:
        k = 0
        for size in sizes:
            if at[k + size - 1] - at[k] != size - 1:
                return False
            k += size
        return True


def _digest(data: Any) -> str:
    """sha256 of an image's processed arrays (shapes included)."""
    h = hashlib.sha256()
    for arr in (data.values() if isinstance(data, dict) else [data]):
        arr = np.ascontiguousarray(arr)
        h.update(str((arr.shape, arr.dtype.str)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
