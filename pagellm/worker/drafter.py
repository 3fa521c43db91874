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
        self.mtp = spec.method == "mtp"  # the model's own MTP layer, sharded as the model
        self.eagle3 = spec.method == "eagle3"  # an EAGLE-3 head (unsharded), fed the model's aux hidden states
        self.eagle = spec.method == "eagle"  # an EAGLE-1 head (unsharded), fed the model's last hidden state
        self.hidden = self.mtp or self.eagle3 or self.eagle  # drafts from hidden states (the entries lag by one)
        if self.hidden:
            if self.mtp:
                self.model = self._load_mtp(self.config, tp, load_model)
                hf = config.model.hf_config
            else:
                self.model = self._load_head(self.config, config.model.model, load_model, spec.method)
                hf = spec.draft.hf_config
            k1, hidden = spec.num_speculative_tokens + 1, getattr(hf, "text_config", hf).hidden_size
            # each row's latest hidden states of the model: tail[row, i] is position tail_first[row] + i
            self.tail = torch.zeros(config.scheduler.max_num_seqs, k1, hidden, device=device)
            self.tail_first = np.full(config.scheduler.max_num_seqs, -1, dtype=np.int64)
            self.tail_len = np.zeros(config.scheduler.max_num_seqs, dtype=np.int64)
        else:
            self.model = load_model(self.config)
        self.backend = backend
        self.device = device
        self.vocab = min(config.model.vocab_size, spec.draft.vocab_size)  # a draft token the target can embed
        self.kv_caches: list = []
        self.min_rows = MIN_BATCH_ROWS  # passes padded as the model's batches are (the same GEMM paths)
        self.tp = tp  # the target's group: rank 0's proposals go to every rank
        self.rope = None  # the model's RopeRows (multimodal RoPE): an MTP entry turns by its position's rotary one

    def _rotary(self, tok_rows: np.ndarray, pos: np.ndarray, pad: int = 0) -> torch.Tensor:
        """Positions pos of batch rows tok_rows as the layer's rotary takes them ((3, T) where one lies in an image
        stretch), with pad zero positions after them."""
        rope3 = None
        if self.rope is not None:
            pos, rope3 = self.rope.positions(tok_rows, pos)
        out = pos if rope3 is None else rope3
        if pad:
            out = np.concatenate((out, np.zeros((*out.shape[:-1], pad), dtype=out.dtype)), axis=-1)
        return to_device(np.ascontiguousarray(out, dtype=np.int64), self.device)

    @staticmethod
    def _load_mtp(config: EngineConfig, tp: TPGroup | None, load_model):
        """The model's MTP layer (models/mtp.py), sharded as the model, from the model's checkpoint."""
        from pagellm.models.mtp import mtp_model_class, mtp_weights_at
        from pagellm.models.parallel_layers import SINGLE
        from pagellm.models.registry import get_model_class

        family = get_model_class(config.model.architecture)
        cls = mtp_model_class(family)  # (config.model: the MTP's, one layer)
        try:
            return load_model(config, tp or SINGLE, cls)
        except ValueError as e:
            raise ValueError(f"speculative_config.method 'mtp': {e} (the checkpoint's multi-token-prediction layer, "
                             f"{mtp_weights_at(family, config.model.hf_config)})") from None

    @staticmethod
    def _load_head(config: EngineConfig, target_dir: str, load_model, method: str):
        """An EAGLE head from its directory, with what it shares of the model's checkpoint (the embedding where an
        EAGLE-3 head stores none; an EAGLE-1 head's embedding and LM head)."""
        import functools

        from pagellm.models.eagle import EagleLlamaForCausalLM
        from pagellm.models.eagle3 import Eagle3LlamaForCausalLM

        base = Eagle3LlamaForCausalLM if method == "eagle3" else EagleLlamaForCausalLM
        cls = type("EagleHead", (base,), {"__init__": functools.partialmethod(base.__init__, target_dir=target_dir)})
        try:
            return load_model(config, cls=cls)
        except ValueError as e:
            raise ValueError(f"speculative_config.model: {e}") from None

    def reset_row(self, row: int) -> None:
        """A new sequence in `row`: no hidden states of its own there yet (MTP, EAGLE-3)."""
        if self.hidden:
            self.tail_first[row], self.tail_len[row] = -1, 0

    def init_kv_cache(self, num_blocks: int) -> None:
        """num_blocks: the target cache's count, its scratch block included."""
        self.kv_caches = allocate_kv_cache(self.config, num_blocks)

    def mirror(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
               hidden: torch.Tensor | None = None, rows: np.ndarray | None = None,
               block_table: np.ndarray | None = None, mm: tuple | None = None) -> None:
        """Compute the target's batch into the draft cache (a draft model: the same tokens at the same positions;
        MTP: the entries the step's hidden states allow, see _mirror_mtp; rows: the step's batch rows, block_table:
        the host's tables by row; mm: the step's image rows and features, which MTP entries read as the model's
        embeddings there, as vLLM's drafters do)."""
        if self.hidden:
            if self.eagle3:  # the model's aux hidden states (T, 3 x hidden) -> the head's g (T, hidden)
                hidden = self.model.combine(hidden)
            self._mirror_mtp(input_ids, meta, hidden, rows, block_table, mm if self.mtp else None)
        else:
            self.model(input_ids, positions, self.kv_caches, meta, self.backend)

    def _mirror_mtp(self, input_ids: torch.Tensor, meta: AttentionMetadata, hidden: torch.Tensor,
                    rows: np.ndarray, block_table: np.ndarray, mm: tuple | None = None) -> None:
        """A sequence computed at positions a .. b this step: the MTP entries a - 1 .. b - 1, from the tokens
        t_a .. t_b and the hidden states h_{a-1} (kept from its earlier step) .. h_{b-1}; without h_{a-1} (a fresh
        prompt, a prefix hit, a fork) from a. Then its last hidden states are kept for the next proposal."""
        qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        t_real, dev, bs = meta.num_tokens, hidden.device, self.config.cache.block_size
        tok_idx, hid_idx, positions, kept, counts, prev = [], [], [], [], [], []
        for i, row in enumerate(rows.tolist()):
            s, e = qsl[i], qsl[i + 1]
            a = lens[i] - (e - s)
            first, have = self.tail_first[row], self.tail_len[row]
            back = a > 0 and first >= 0 and first <= a - 1 < first + have
            m = (e - s) if back else (e - s) - 1
            if m > 0:
                p0 = a - 1 if back else a
                tok_idx.append(np.arange(e - m, e))
                hid = np.arange(s, e - 1)
                if back:
                    hid = np.concatenate(([t_real + len(prev)], hid))
                    prev.append((row, a - 1 - first))
                hid_idx.append(hid)
                positions.append(np.arange(p0, p0 + m))
                kept.append(i)
                counts.append(m)
        if kept:
            tables = meta.block_tables[torch.as_tensor(kept, device=meta.block_tables.device)]
            pos = np.concatenate(positions)
            cu = np.zeros(len(kept) + 1, dtype=np.int64)
            np.cumsum(counts, out=cu[1:])
            slot_rows = np.repeat(rows[kept], counts)
            slots = block_table[slot_rows, pos // bs].astype(np.int64) * bs + pos % bs
            ends = (pos[cu[1:] - 1] + 1).astype(np.int64)
            starts = pos[cu[:-1]]
            fresh = starts == 0
            paged = np.flatnonzero(~fresh)
            sub = AttentionMetadata(
                num_tokens=int(cu[-1]), slot_mapping=to_device(slots, dev), query_start_loc=to_device(
                    cu.astype(np.int32), dev), seq_lens=to_device(ends.astype(np.int32), dev), block_tables=tables,
                paged_seq_ids=to_device(paged, dev), query_start_loc_cpu=cu.tolist(), seq_lens_cpu=ends.tolist(),
                fresh_seqs=np.flatnonzero(fresh).tolist(), paged_seqs=paged.tolist(), max_seq_len=int(ends.max()),
                block_size=bs, max_query_len=int(max(counts)))
            source = hidden[:t_real]
            if prev:
                source = torch.cat((source, self.tail[[r for r, _ in prev], [j for _, j in prev]].to(hidden.dtype)))
            h = source[to_device(np.concatenate(hid_idx), dev)]
            tok = to_device(np.concatenate(tok_idx), dev)
            ids = input_ids[tok]
            extra = {}
            if mm is not None and hasattr(self.model, "embed_tokens"):  # image rows: the features, not the placeholder
                index, feats = mm
                where = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=dev)
                where[index] = torch.arange(index.shape[0], device=dev)
                sel = where[tok]
                e = self.model.embed_tokens(ids)
                f = feats[sel.clamp(min=0), :e.shape[-1]].to(e.dtype)  # (deepstack models: the merger's part)
                extra["inputs_embeds"] = torch.where((sel >= 0)[:, None], f, e)
            self.model(ids, self._rotary(slot_rows, pos), self.kv_caches, sub, self.backend, hidden_states=h,
                       **extra)
        # each sequence's last (up to k + 1) hidden states, for its next proposal: one indexed copy
        ends = np.asarray(qsl[1:], dtype=np.int64)
        m = np.minimum(np.diff(np.asarray(qsl, dtype=np.int64)), self.tail.shape[1])
        within = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)  # 0 .. m_i - 1 for each sequence
        src = np.repeat(ends - m, m) + within
        self.tail[to_device(np.repeat(rows, m), dev), to_device(within, dev)] = \
            hidden[to_device(src, dev)].to(self.tail.dtype)
        self.tail_first[rows] = np.asarray(lens, dtype=np.int64) - m
        self.tail_len[rows] = m

    def propose(self, batch, spec_token_ids: dict[int, list[int]], scratch_slot: int) -> dict[int, list[int]]:
        """Pass j feeds the draft model its token at position n + j (a draft model) or the MTP layer its entry at
        n - 1 + j (the token at n + j and, for j = 0, the model's hidden state at n - 1, then the layer's own output
        of the pass before)."""
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
        out = []
        h = None
        if self.hidden:  # h_{n-1}: the model's hidden state at the last computed position (zeros where none is kept)
            h = torch.zeros(pad, self.tail.shape[2], device=dev)
            idx = n - 1 - self.tail_first[rows]
            ok = np.flatnonzero((self.tail_first[rows] >= 0) & (idx >= 0) & (idx < self.tail_len[rows]))
            if len(ok):
                h[to_device(ok, dev)] = self.tail[to_device(rows[ok], dev), to_device(idx[ok], dev)]
            n = n - 1  # the entries sit one position before the tokens they read
        # a one-token prompt (MTP: n = -1 here) has no entry to draft from: its passes run on scratch slots, its
        # drafts are noise (the model rejects them)
        live = n >= 0
        for j in range(int(ks.max())):
            pos = np.maximum(n + np.minimum(j, ks - 1), 0)
            slots = np.where((j < ks) & live, batch.block_table[rows, pos // bs].astype(np.int64) * bs + pos % bs,
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
            extra = {"hidden_states": h} if self.hidden else {}
            hidden = h = self.model(ids, self._rotary(rows, pos, pad - b), self.kv_caches, meta, self.backend,
                                    **extra)
            logits = self.model.compute_logits(hidden[:b])  # (an MTP layer sharded as the model: on rank 0 only)
            tokens = logits[:, :self.vocab].argmax(dim=-1) if logits is not None else None
            if self.mtp and self.tp is not None and self.tp.size > 1:  # every rank feeds the next pass the same
                tokens = torch.tensor(self.tp.broadcast_object(tokens.tolist() if tokens is not None else None),
                                      dtype=torch.long, device=dev)
            out.append(tokens)
            ids[:b] = tokens  # the next pass's input (stream-ordered after this pass on a GPU)
        drafts = torch.stack(out, dim=1).tolist()
        if self.tp is not None and self.tp.size > 1 and not self.mtp:
            drafts = self.tp.broadcast_object(drafts)
        return {s: d[:k] for s, d, k in zip(seq_ids, drafts, ks.tolist())}
