"""Multimodal inputs: images in prompts (LLaVA).

    inputs.py      MultiModalFeature: one image of a request, as the scheduler and the worker see it (pure Python)
    media.py       load_image: a PIL image from a PIL image, bytes, a data: URL, an http(s) URL or a file:// URL
    processing.py  MultiModalProcessor: a prompt's images -> pixel values, placeholders expanded, content hashes
"""

from pagellm.multimodal.inputs import MultiModalFeature

__all__ = ["MultiModalFeature"]
