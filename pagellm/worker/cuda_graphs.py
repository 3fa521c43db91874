"""CUDA graphs for decode batches: the model's forward captured once per batch size, replayed per step.

A decode step launches hundreds of small kernels (every layer's norms, projections, rotary, the K/V
write, attention); launched one by one from Python, the GPU waits for the host. At start-up the runner
captures the forward for a ladder of batch sizes

    1, 2, 4, 8, 16, 24, 32, ... (multiples of 8) ... max_num_seqs

largest first, in one shared memory pool. A decode-only step of n sequences (one new token each, no
prompt logprobs) is padded to the next captured size: the padding rows are sequences of length 0
(the attention kernel reads nothing for them) whose K/V go to a scratch block past the cache's last
block. Every input the graph reads lives in StepBuffers at a fixed address, so a step fills the host
buffer, sends it in one copy and replays. Capture bakes in everything else a kernel launch takes:
the grid (from the padded size), the split count of flash-decoding (planned for max_model_len), the
tensors' addresses.

Steps with prompts, prefill chunks, prompt logprobs or more sequences than the largest size run
eagerly, as does everything with `enforce_eager=True`, tensor parallelism, MoE layers (their expert
routing syncs with the host) or the transformers fallback.

For tests on CPU, `emulate=True` "captures" a closure that runs the model eagerly on the same static
buffers and metadata, so the padding and buffer logic is exercised without a GPU (with the Triton
backend under TRITON_INTERPRET=1, exactly the launches a graph would hold; a CPU backend, which reads
host-side lists, gets them rebuilt from the buffers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from pagellm.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


def graphs_supported(model: torch.nn.Module) -> str | None:
    """Why the model cannot be captured, or None."""
    from pagellm.models.layers import FusedMoE

    if not getattr(model, "supports_tp", True):
        return "the transformers fallback"
    if any(isinstance(m, FusedMoE) for m in model.modules()):
        return "MoE layers (expert routing syncs with the host)"
    return next((m.host_sync_reason for m in model.modules() if getattr(m, "host_sync_reason", None)), None)


class CudaGraphRunner:
    def __init__(self, runner, pad_slot: int, emulate: bool = False) -> None:
        self.runner = runner  # ModelRunner: model, backend, kv_caches, buffers
        self.pad_slot = pad_slot
        self.emulate = emulate
        self.sizes = capture_sizes(runner.config.scheduler.max_num_seqs)
        self.graphs: dict[int, tuple[Callable[[], None], torch.Tensor, AttentionMetadata]] = {}
        self.pool = None
        self.replays: dict[int, int] = {}  # size -> steps it ran

    def size_for(self, num_seqs: int) -> int | None:
        """The captured size a decode batch of num_seqs sequences pads to (None: too large)."""
        for s in self.sizes:
            if s >= num_seqs:
                return s
        return None

    def fill_padding(self, first_seq: int, first_token: int, size: int) -> None:
        """Host buffer rows first_seq .. size - 1: length-0 sequences of one token writing to the scratch slot."""
        b = self.runner.buffers.np
        n = size - first_seq
        b["input_ids"][first_token:first_token + n] = 0
        b["positions"][first_token:first_token + n] = 0
        b["slot_mapping"][first_token:first_token + n] = self.pad_slot
        b["query_start_loc"][first_seq + 1:size + 1] = first_token + 1 + np.arange(n)
        b["seq_lens"][first_seq:size] = 0
        b["paged_seq_ids"][first_seq:size] = np.arange(first_seq, size)  # every row reads the cache

    def meta(self, size: int) -> AttentionMetadata:
        """Metadata whose tensors are the static buffers, for a batch of `size` one-token sequences."""
        d = self.runner.buffers.dev
        qsl = list(range(size + 1))
        return AttentionMetadata(
            num_tokens=size, slot_mapping=d["slot_mapping"][:size], query_start_loc=d["query_start_loc"][:size + 1],
            seq_lens=d["seq_lens"][:size], block_tables=d["block_tables"][:size], query_start_loc_cpu=qsl,
            seq_lens_cpu=[1] * size, fresh_seqs=[], paged_seqs=list(range(size)),
            paged_seq_ids=d["paged_seq_ids"][:size], max_seq_len=self.runner.config.scheduler.max_model_len,
            block_size=self.runner.block_size, max_query_len=1)

    @torch.inference_mode()
    def capture(self) -> None:
        r = self.runner
        t0 = time.perf_counter()
        d = r.buffers.dev
        for size in reversed(self.sizes):
            r.buffers.wait_free()
            self.fill_padding(0, 0, size)
            r.buffers.send(size)
            meta = self.meta(size)
            ids, pos = d["input_ids"][:size], d["positions"][:size]

            def forward(ids=ids, pos=pos, meta=meta):
                return r.model(ids, pos, r.kv_caches, meta, r.backend)

            if self.emulate:
                out = forward()
                self.graphs[size] = (forward, out, meta)
                continue
            for _ in range(2):  # compile the kernels, settle the allocator
                forward()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = forward()
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[size] = (g.replay, out, meta)
        if not self.emulate:
            torch.cuda.synchronize()
        logger.info("captured CUDA graphs for %d decode batch sizes (1 .. %d) in %.1fs", len(self.sizes),
                    self.sizes[-1], time.perf_counter() - t0)

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of `size` on what the static buffers hold now; its (size, hidden) output."""
        run, out, meta = self.graphs[size]
        self.replays[size] = self.replays.get(size, 0) + 1
        if not self.emulate:
            run()
            return out
        if not hasattr(self.runner.backend, "attention"):  # a CPU backend reads host lists: give it this step's
            h = self.runner.buffers.np
            meta = AttentionMetadata(**{**meta.__dict__,
                                        "query_start_loc_cpu": h["query_start_loc"][:size + 1].tolist(),
                                        "seq_lens_cpu": h["seq_lens"][:size].tolist()})
        return run(meta=meta)
