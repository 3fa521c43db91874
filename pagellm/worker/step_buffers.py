"""A step's integer inputs in one fixed-layout buffer: built on the host, sent with one copy.

    host (pinned on CUDA)  --one non-blocking copy-->  device
    [input_ids | positions | slot_mapping | logits_indices | paged_seq_ids | query_start_loc | seq_lens |
     prev_dst | prev_src | block_tables]

(prev_dst / prev_src: which input tokens are taken from the previous step's sampled tokens on the
device, with async scheduling.)

Every field sits at a fixed, 64-byte aligned offset sized for the largest step (max tokens, max
sequences, max blocks per sequence), so its device view never moves: the eager path slices it to the
step's sizes, and the CUDA graphs captured at start-up read the same addresses at every replay. Only
the prefix up to the last block-table row in use is copied. Before the host half is rewritten for the
next step, the previous copy is waited for (an event), so a step never overwrites bytes still in flight.

On CPU the host buffer is the device buffer: nothing is copied.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 64
_TORCH = {np.int64: torch.int64, np.int32: torch.int32}


def to_device(x, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data (a numpy array, a list, a CPU tensor) on `device`, without waiting for the work already queued
    there: a blocking host-to-device copy drains the stream first (the step in flight), a non-blocking one from
    pageable memory is staged by the driver before it returns, so the host data may change right after."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.as_tensor(x, dtype=dtype)
    return t.to(device, non_blocking=True)


class StepBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.device = device
        layout = [("input_ids", np.int64, max_tokens), ("positions", np.int64, max_tokens),
                  ("slot_mapping", np.int64, max_tokens), ("logits_indices", np.int64, max_tokens),
                  ("paged_seq_ids", np.int64, max_seqs), ("query_start_loc", np.int32, max_seqs + 1),
                  ("seq_lens", np.int32, max_seqs), ("prev_dst", np.int64, max_seqs), ("prev_src", np.int64, max_seqs),
                  ("state_rows", np.int64, max_seqs), ("block_tables", np.int32, max_seqs * max_blocks)]
        self.offsets: dict[str, tuple[int, np.dtype, int]] = {}
        off = 0
        for name, dt, n in layout:
            self.offsets[name] = (off, np.dtype(dt), n)
            off = -(-(off + n * np.dtype(dt).itemsize) // _ALIGN) * _ALIGN
        self.nbytes = off
        cuda = device.type == "cuda"
        self.host = torch.zeros(off, dtype=torch.uint8, pin_memory=cuda)
        self.dev_buf = torch.zeros(off, dtype=torch.uint8, device=device) if cuda else self.host
        self.np: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        host_np = self.host.numpy()
        for name, (o, dt, n) in self.offsets.items():
            self.np[name] = host_np[o:o + n * dt.itemsize].view(dt)
            self.dev[name] = self.dev_buf[o:o + n * dt.itemsize].view(_TORCH[dt.type])
        self.np["block_tables"] = self.np["block_tables"].reshape(max_seqs, max_blocks)
        self.dev["block_tables"] = self.dev["block_tables"].view(max_seqs, max_blocks)
        self._event = torch.cuda.Event() if cuda else None
        self._pending = False

    def wait_free(self) -> None:
        """Block until the last copy has read the host buffer (call before writing the next step)."""
        if self._pending:
            self._event.synchronize()
            self._pending = False

    def send(self, num_seqs: int) -> None:
        """Copy the host half to the device, up to block-table row num_seqs (non-blocking on CUDA)."""
        if self._event is None:
            return
        o, dt, _ = self.offsets["block_tables"]
        end = o + num_seqs * self.max_blocks * dt.itemsize
        self.dev_buf[:end].copy_(self.host[:end], non_blocking=True)
        self._event.record()
        self._pending = True
