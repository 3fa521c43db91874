"""The worker's side of image inputs: which prompt positions of this step hold image features, and those features.

    add(seq_id, features) / forget(seq_id)            as sequences arrive and leave (finish, preemption)
    step(seq_ids, starts, counts, cu) -> (index, features) | None
        index (M,): the batch rows of this step that are image positions; features (M, hidden): what they hold
    whole_blocks: after step(), the images of the step whose positions attend to each other both ways (Gemma 3):
        (first batch row, rows, first position, image start, image end, sequence index in the step) each

RopeRows (multimodal RoPE, Qwen2-VL): per InputBatch row, the prompt's image stretch [a, b), the 3-D positions
of that stretch and the rotary offset after it, so a step's rotary positions are one vectorized expression
(index + delta past b) and the table is read only for tokens inside a stretch.

An image is encoded (vision tower + projector, one batched call for the step's new images) the first time a step
computes any of its positions, and its features are kept until the chunk that computes its last position: a chunked
prefill that splits an image encodes it once. A sequence that comes back after preemption brings its images again
and they are encoded again; so does a prompt whose prefix-cache hit ends inside an image.
"""

from __future__ import annotations

import numpy as np
import torch


class MultiModalInputs:
    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pending: dict[int, list] = {}  # seq_id -> its MultiModalFeatures with positions left to compute
        self.cache: dict[tuple[int, str], torch.Tensor] = {}  # (seq_id, identifier) -> (length, hidden) features
        self.num_encoded = 0  # images run through the vision encoder so far
        self.whole_blocks: list[tuple[int, int, int, int, int, int]] = []  # this step's bidirectional images

    def add(self, seq_id: int, features: list) -> None:
        self.pending[seq_id] = list(features)

    def forget(self, seq_id: int) -> None:
        self.pending.pop(seq_id, None)
        for key in [k for k in self.cache if k[0] == seq_id]:
            del self.cache[key]

    def step(self, seq_ids: list[int], starts: np.ndarray, counts: np.ndarray,
             cu: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        self.whole_blocks = []
        if not self.pending:
            return None
        parts = []  # (cache key, first feature row, end row, first batch row)
        for k, sid in enumerate(seq_ids):
            feats = self.pending.get(sid)
            if not feats:
                continue
            s, e = int(starts[k]), int(starts[k] + counts[k])
            for f in feats:
                if f.overlaps(s, e):
                    lo, hi = max(s, f.offset), min(e, f.end)
                    parts.append(((sid, f.identifier), f, lo - f.offset, hi - f.offset, int(cu[k]) + lo - s))
                    if f.whole:
                        if hi != f.end:
                            raise RuntimeError("a step ends inside an image whose positions attend to each other")
                        self.whole_blocks.append((int(cu[k]) + lo - s, hi - lo, lo, f.offset, f.end, k))
            left = [f for f in feats if f.end > e]
            if left:
                self.pending[sid] = left
            else:
                del self.pending[sid]
        if not parts:
            return None
        self._encode([(key, f) for key, f, *_ in parts if key not in self.cache])
        index = np.concatenate([np.arange(row, row + hi - lo) for _, _, lo, hi, row in parts])
        features = torch.cat([self.cache[key][lo:hi] for key, _, lo, hi, _ in parts])
        for key, f, _, hi, _ in parts:
            if hi == f.length:  # its last position is computed in this step
                self.cache.pop(key, None)
        return torch.from_numpy(index).to(self.device, non_blocking=True), features

    def _encode(self, todo: list) -> None:
        """Encode the images not in the cache yet, each distinct one once, in one call."""
        if not todo:
            return
        unique: dict[str, object] = {}
        for _, f in todo:
            unique.setdefault(f.identifier, f)
        by_id = {ident: torch.from_numpy(f.data).to(self.device, self.dtype)  # prompt embeddings: as given
                 for ident, f in unique.items() if f.modality == "embeds"}
        images = [f for ident, f in unique.items() if ident not in by_id]
        if images:
            out = self.model.encode_images([f.data for f in images], self.device, self.dtype)
            self.num_encoded += len(images)
            by_id.update((f.identifier, out[i]) for i, f in enumerate(images))
        for key, f in todo:
            self.cache[key] = by_id[f.identifier]


class RopeRows:
    def __init__(self, num_rows: int) -> None:
        self.lo = np.zeros(num_rows, dtype=np.int64)  # the image stretch [lo, hi) of each row's prompt (empty: 0, 0)
        self.hi = np.zeros(num_rows, dtype=np.int64)
        self.delta = np.zeros(num_rows, dtype=np.int64)  # rotary position - index from hi on
        self.tables: dict[int, np.ndarray] = {}  # row -> (3, hi - lo) positions of the stretch

    def set(self, row: int, rope: tuple | None) -> None:
        """A new sequence in `row`: its request's (a, b, table, delta), or None (no images)."""
        a, b, table, delta = rope if rope is not None else (0, 0, None, 0)
        self.lo[row], self.hi[row], self.delta[row] = a, b, delta
        if table is None:
            self.tables.pop(row, None)
        else:
            self.tables[row] = table

    def positions(self, tok_rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The step's rotary positions (T,), and (3, T) ones when a token lies in an image stretch (else None)."""
        lo, hi = self.lo[tok_rows], self.hi[tok_rows]
        rope = positions + np.where(positions >= hi, self.delta[tok_rows], 0)
        inside = np.flatnonzero((positions >= lo) & (positions < hi))
        if not len(inside):
            return rope, None
        rope3 = np.repeat(rope[None], 3, axis=0)
        rows = tok_rows[inside]
        for row in np.unique(rows):
            at = inside[rows == row]
            rope3[:, at] = self.tables[int(row)][:, positions[at] - self.lo[row]]
        return rope, rope3
