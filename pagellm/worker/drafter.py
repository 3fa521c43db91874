"""Speculative decoding with a draft model (method draft_model): the draft model, its own paged KV cache kept
in step with the target's, and its greedy proposals.

    Drafter.propose(batch, spec_token_ids, scratch_slot) -> {seq_id: draft tokens}   (before the target's forward)
    Drafter.mirror(input_ids, positions, meta)                                      (after the target's forward)

The draft cache has the target's block layout (the same block ids, tables and slots) with the draft model's
layers and heads. Invariant: wherever the target's cache holds the K/V of a token at a position, the draft's
holds the draft model's K/V of that token there. mirror() keeps it: the draft model computes every batch the
target computes, with the same tokens, positions, slots and metadata. Prefix-cache hits, copy-on-write (the
worker copies blocks in both caches) and recomputation after preemption then need nothing of their own.

propose() serves the sequences the scheduler gave k placeholders. Sequence i's last token x sits at position n,
not computed yet (its K/V is this step's to write). Pass j (0 .. k_max - 1) feeds x (j = 0) or the token pass
j - 1 proposed at position n + j, and takes the argmax of the draft's logits as draft token j + 1. A sequence
with k_i < k_max repeats its last pass's position from pass k_i on, its K/V sent to the scratch slot. Every
slot the passes write (n .. n + k_i - 1) is one the scheduler allocated for the step, and mirror() writes it
again with the same token once the target has checked the drafts:

    n = 7, k = 3: pass 0 feeds x at 7 -> d1; pass 1 feeds d1 at 8 -> d2; pass 2 feeds d2 at 9 -> d3
    the target computes [x, d1, d2, d3] at 7 .. 10, and mirror() the same into the draft cache

The draft tokens come to the host in one copy after the last pass (the target's inputs are built there).
The draft's proposals only decide how many tokens a step keeps: the target's sampler decides every token.

Tensor parallelism: the draft is not sharded (draft_tensor_parallel_size 1). Every rank holds the whole draft
model and its cache, and runs the passes and mirror() on the same batch; rank 0's proposals are broadcast so that
every rank builds the same input ids, whatever the ranks' rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pagellm.attention.backend import AttentionMetadata
from pagellm.config import EngineConfig
from pagellm.distributed.parallel import TPGroup
from pagellm.worker.kv_cache import allocate_kv_cache
from pagellm.worker.step_buffers import to_device


class Drafter:
    def __init__(self, config: EngineConfig, backend, device: torch.device, tp: TPGroup | None = None) -> None:
        from pagellm.worker.model_runner import MIN_BATCH_ROWS, load_model

        spec = config.scheduler.speculative
        self.config = dataclasses.replace(config, model=spec.draft, lora=None)  # the draft's model and cache
        self.model = load_model(self.config)
        self.backend = backend
        self.device = device
        self.vocab = min(config.model.vocab_size, spec.draft.vocab_size)  # a draft token the target can embed
        self.kv_caches: list = []
        self.min_rows = MIN_BATCH_ROWS  # passes padded as the model's batches are (the same GEMM paths)
        self.tp = tp  # the target's group: rank 0's proposals go to every rank

    def init_kv_cache(self, num_blocks: int) -> None:
        """num_blocks: the target cache's count, its scratch block included."""
        self.kv_caches = allocate_kv_cache(self.config, num_blocks)

    def mirror(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Compute the target's batch into the draft cache (the hidden states are not needed)."""
        self.model(input_ids, positions, self.kv_caches, meta, self.backend)

    def propose(self, batch, spec_token_ids: dict[int, list[int]], scratch_slot: int) -> dict[int, list[int]]:
        seq_ids = list(spec_token_ids)
        rows = np.fromiter((batch.row_of[s] for s in seq_ids), dtype=np.int64, count=len(seq_ids))
        ks = np.fromiter((len(spec_token_ids[s]) for s in seq_ids), dtype=np.int64, count=len(seq_ids))
        n = batch.num_computed[rows].astype(np.int64)
        if (batch.num_tokens[rows] != n + 1).any():
            raise RuntimeError("a sequence speculates with tokens the host does not hold")
        bs, dev, b = self.config.cache.block_size, self.device, len(rows)
        cu = np.arange(b + 1, dtype=np.int64)
        cu_list, cu_dev = cu.tolist(), to_device(cu.astype(np.int32), dev)  # one query token per sequence and pass
        max_blocks = int(-(-(n + ks).max() // bs))
        tables = to_device(batch.block_table[rows, :max_blocks], dev)
        pad = max(b, self.min_rows)
        ids = torch.zeros(pad, dtype=torch.long, device=dev)
        ids[:b] = to_device(batch.token_ids[rows, n], dev)
        pos_pad = np.zeros(pad, dtype=np.int64)
        out = []
        for j in range(int(ks.max())):
            pos = n + np.minimum(j, ks - 1)
            slots = np.where(j < ks, batch.block_table[rows, pos // bs].astype(np.int64) * bs + pos % bs,
                             scratch_slot)
            lens = pos + 1
            fresh = pos == 0
            paged = np.flatnonzero(~fresh)
            meta = AttentionMetadata(
                num_tokens=b, slot_mapping=to_device(slots, dev), query_start_loc=cu_dev,
                seq_lens=to_device(lens.astype(np.int32), dev), block_tables=tables,
                paged_seq_ids=to_device(paged, dev), query_start_loc_cpu=cu_list, seq_lens_cpu=lens.tolist(),
                fresh_seqs=np.flatnonzero(fresh).tolist(), paged_seqs=paged.tolist(), max_seq_len=int(lens.max()),
                block_size=bs, max_query_len=1)
            pos_pad[:b] = pos
            hidden = self.model(ids, to_device(pos_pad.copy(), dev), self.kv_caches, meta, self.backend)
            tokens = self.model.compute_logits(hidden[:b])[:, :self.vocab].argmax(dim=-1)
            out.append(tokens)
            ids[:b] = tokens  # the next pass's input (stream-ordered after this pass on a GPU)
        drafts = torch.stack(out, dim=1).tolist()
        if self.tp is not None and self.tp.size > 1:
            drafts = self.tp.broadcast_object(drafts)
        return {s: d[:k] for s, d, k in zip(seq_ids, drafts, ks.tolist())}
