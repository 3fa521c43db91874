"""What the engine carries for one image of a request. Pure Python (the scheduler imports it): `data` is the
image's pixel values, which the worker's vision encoder reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class MultiModalFeature:
    modality: str  # "image"
    identifier: str  # hash of the processed content: the prefix-cache key of the positions it fills
    offset: int  # first prompt position of its placeholders
    length: int  # placeholder positions it fills (one feature each)
    data: Any = None  # pixel values (3, H, W), a float32 numpy array
    whole: bool = False  # its positions attend to each other both ways (Gemma 3): computed in one step

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, start: int, end: int) -> bool:
        return self.offset < end and start < self.end
