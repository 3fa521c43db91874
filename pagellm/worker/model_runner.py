"""SchedulerOutput -> model inputs -> forward -> sample -> ModelRunnerOutput.

    execute_model(sched):
      1. InputBatch absorbs the step's diffs (new rows, appended tokens, table patches, removed rows)
      2. copy-on-write block copies
      3. flat inputs: input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables
      4. model.forward -> hidden (T, hidden); only the last position of each sampled sequence
         (and the prompt positions of prompt_logprobs requests) go through the LM head
      5. Sampler -> tokens, logprobs -> StepResult (copies to the host queued) -> ModelRunnerOutput

Multi-step decode (sched.num_steps K > 1, every sequence decoding): after the first step, K - 1 more run
back to back on the device, each one's input tokens the tokens the one before sampled, with positions,
slots and context lengths prepared on the host for all of them at once (a sequence with fewer tokens
to compute repeats its last position and writes to the scratch slot); the K samples go to the host
in one copy.

A pooling model (config.model.pooler) samples nothing: step 4 hands each sequence's chunk of hidden states to
the Pooler, and a sequence whose prompt is computed gets its output in ModelRunnerOutput.pooled.

execute_model_async returns once the step's work is queued on the device; StepResult.result() waits
for it. With async scheduling the engine schedules and launches the next step in between, and a
token that step computes but the host does not hold yet (the one this step samples) is taken from
this step's sampled tokens on the device.

Worked example for step 3, two sequences with rows 4 and 1, computing 3 and 1 tokens
from positions 0 and 7 (block_size 4, row 1's table [5, 9]):

    tok_rows  [4, 4, 4, 1]    positions [0, 1, 2, 7]
    slots     [t4[0]*4+0, t4[0]*4+1, t4[0]*4+2, 9*4+3]
    query_start_loc [0, 3, 4]   seq_lens [3, 8]
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import time

import numpy as np
import torch

from pagellm.attention.backend import AttentionMetadata
from pagellm.attention.registry import get_attention_backend
from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, PromptLogprobs, SampleResult, SchedulerOutput
from pagellm.distributed.parallel import TPGroup
from pagellm.models.loader import finish_loading, init_dummy_weights
from pagellm.models.parallel_layers import SINGLE
from pagellm.models.registry import get_model_class
from pagellm.sample.sampler import Sampler, SamplerOutput, prompt_logprobs
from pagellm.worker.cuda_graphs import CudaGraphRunner, graphs_supported
from pagellm.worker.input_batch import InputBatch, counter_uniforms
from pagellm.worker.kv_cache import allocate_kv_cache, allocate_states, copy_blocks, determine_num_blocks, torch_dtype
from pagellm.worker.step_buffers import to_device

logger = logging.getLogger(__name__)

# Pad the batch to at least this many rows: this CPU's GEMM picks a different
# reduction order for very small row counts, and padding keeps a row's result
# independent of how many other rows share the step (M >= 12 measured invariant).
MIN_BATCH_ROWS = 16


_frozen = False


def freeze_startup_objects() -> None:
    """Move everything alive after the first engine's start-up (the model, torch's and transformers' module
    objects) out of the collector's generations, so full collections stop traversing it: at large batches
    (thousands of short-lived objects per step) they cost 15-25% of a step. Once per process: frozen objects
    that later become cyclic garbage are never collected, so a process that builds many engines (tests, a
    notebook) pays that once, not per engine."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)  # let interpreter shutdown finalize them as usual


def load_model(config: EngineConfig, tp: TPGroup = SINGLE, cls: type | None = None) -> torch.nn.Module:
    """This rank's shard of the model, weights loaded (each weight loader reads only its slice); `cls` in place of
    the architecture's class (the MTP drafter's)."""
    m = config.model
    cls = cls or get_model_class(m.architecture)
    if m.pooler is not None:
        from pagellm.models.pooling import as_pooling_model

        cls = as_pooling_model(cls, m.pooler)
    t0 = time.perf_counter()
    with torch.device("cpu"):
        model = cls(m.hf_config, config.scheduler.max_model_len, tp)
    method = None
    if m.quantization is not None:
        from pagellm.quantization import get_method, prepare_model

        method = get_method(m.quantization, m.hf_config)
        prepare_model(model, method)
    if m.load_format == "dummy":
        model.materialize()
        init_dummy_weights(model, m.seed)
    else:
        model.load_checkpoint(m.model, m.load_format)
    device, dtype = torch.device(config.device.device), torch_dtype(m.dtype)
    if method is not None:  # from the float32 (or checkpoint) weights, before the cast to the compute dtype
        from pagellm.quantization import finish_model

        finish_model(model, method, dtype, device)
    model = finish_loading(model, device, dtype)
    n = sum(p.numel() for p in model.parameters())
    where = (f" on rank {tp.rank} of {tp.size}" if tp.size > 1 else "") + (
        f" in stage {tp.pp.rank} of {tp.pp.size}" if tp.pp.size > 1 else "")
    logger.info("loaded %s (%.1fM parameters%s, %s) in %.1fs", m.architecture, n / 1e6, where, m.dtype,
                time.perf_counter() - t0)
    return model


def copy_module_tensors(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Every parameter, buffer and tensor attribute of `src` into the one of `dst` at the same name (built alike)."""
    from pagellm.worker.worker import own_tensors

    mods = dict(dst.named_modules())
    with torch.no_grad():
        for name, m in src.named_modules():
            live = {n: t for n, t, _ in own_tensors(mods[name])} if name in mods else {}
            for attr, t, _ in own_tensors(m):
                u = live.get(attr)
                if u is None or u.shape != t.shape:
                    raise ValueError(f"the reloaded weight {name}.{attr} {tuple(t.shape)} has no match in the live "
                                     f"model ({None if u is None else tuple(u.shape)})")
                u.copy_(t)


class ModelRunner:
    """Runs one rank's shard of the model; with tensor parallelism every rank runs every step in
    lockstep (the same SchedulerOutput), and only the driver (rank 0) samples and returns results."""

    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE) -> None:
        self.config = config
        self.tp = tp
        self.device = torch.device(config.device.device)
        self.block_size = config.cache.block_size
        self.model = load_model(config, tp)
        self.states = None  # a hybrid model's recurrent state per layer (Mamba): one row per batch row
        if config.model.stateful:
            self.states = allocate_states(config)
            self._checkpoint_base = config.scheduler.max_num_seqs  # state row of checkpoint slot 0
            # speculative decoding: the state after token j of batch row r's step is saved in row
            # _spec_base + r * k + j (j < k), to put back when the drafts after it are rejected (state_rewinds)
            self._spec_base = self._checkpoint_base + config.cache.num_state_checkpoints
            self.model.bind_states(self.states)
        self.backend = get_attention_backend(config.device.attention_backend, config.device.device)
        self.sampler = Sampler()
        self.logitsprocs = None  # custom logits processors, on the rank that samples
        if config.model.logits_processors and tp.samples:
            from pagellm.sample.logits_processor import BatchLogitsProcessors, load_logits_processors

            self.logitsprocs = BatchLogitsProcessors(load_logits_processors(config.model.logits_processors), config,
                                                     self.device)
        self.kv_caches: list = []  # per cache layer (None for a layer of another pipeline stage)
        # pipeline parallelism: the cache layers this stage holds, and the hidden states crossing stage boundaries
        self.cache_layers = tp.pp.layers(config.model.num_layers) if tp.pp.size > 1 else None
        self.hidden_size = config.model.hf_config.get_text_config().hidden_size
        self.batch = InputBatch(config.scheduler.max_num_seqs, config.scheduler.max_model_len, self.block_size,
                                config.model.vocab_size, config.model.eos_token_ids, self.device)
        # CUDA: a step's inputs go through one pinned buffer and one copy; decode batches replay CUDA graphs.
        # PAGELLM_STAGED_INPUTS=1 / PAGELLM_EMULATE_CUDA_GRAPHS=1 run the same paths on CPU (tests).
        self.emulate_graphs = os.environ.get("PAGELLM_EMULATE_CUDA_GRAPHS") == "1"
        staged = self.device.type == "cuda" or self.emulate_graphs or os.environ.get("PAGELLM_STAGED_INPUTS") == "1"
        self.buffers = None
        if staged:
            from pagellm.worker.step_buffers import StepBuffers

            max_tokens = max(config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs, MIN_BATCH_ROWS)
            self.buffers = StepBuffers(max_tokens, config.scheduler.max_num_seqs, self.batch.block_table.shape[1],
                                       self.device)
        self.lora = None  # LoRAManager: loaded adapters and this step's tokens per adapter
        if config.lora is not None:
            from pagellm.lora.layers import LoRAManager

            sc = config.scheduler
            self.lora = LoRAManager(self.model, config.lora.max_loras, config.lora.max_lora_rank,
                                    max(sc.max_num_batched_tokens, sc.max_num_seqs, MIN_BATCH_ROWS), self.device,
                                    torch_dtype(config.model.dtype))
        self.pooler = None  # a pooling model's Pooler: prompts pooled instead of sampled
        if config.model.pooler is not None:
            from pagellm.models.pooling import Pooler

            self.pooler = Pooler(self.model, config.model.pooler)
        self.mm = None  # MultiModalInputs: the images of the sequences held, encoded when their positions are computed
        self.rope = None  # multimodal RoPE (Qwen2-VL): each batch row's prompt image stretch and rotary offset
        if config.model.multimodal is not None or config.model.prompt_embeds:  # (images, or prompt embeddings)
            from pagellm.worker.mm_inputs import MultiModalInputs, RopeRows

            self.mm = MultiModalInputs(self.model, self.device, torch_dtype(config.model.dtype))
            if hasattr(self.model, "rope_positions"):
                self.rope = RopeRows(config.scheduler.max_num_seqs)
        self.drafter = None  # speculative decoding with a draft model: its model, cache and proposals
        spec = config.scheduler.speculative
        if spec is not None and spec.draft is not None:
            from pagellm.worker.drafter import Drafter

            self.drafter = Drafter(config, self.backend, self.device, tp)
            self.drafter.rope = self.rope
            if spec.aux_layers:  # an EAGLE-3 head reads the residual stream entering these layers
                self.model.aux_layers = spec.aux_layers
        self.graphs: CudaGraphRunner | None = None
        self._prev_tokens: torch.Tensor | None = None  # the last sampling step's tokens, on the device
        self.scratch_slot = -1  # a KV slot past the cache's last block (graph padding, multi-step decode)

    def determine_num_blocks(self) -> int:
        return determine_num_blocks(self.config, self.cache_layers)

    def init_kv_cache(self, num_blocks: int) -> None:
        why_not = self._why_no_graphs()
        # CUDA graphs pad decode batches with rows whose K/V land in one scratch block past the last; multi-step
        # decode sends the steps past a sequence's last token there, and a draft model its passes past a sequence's
        # drafts.
        scratch = why_not is None or self.config.scheduler.num_scheduler_steps > 1 or self.drafter is not None
        self.kv_caches = allocate_kv_cache(self.config, num_blocks + scratch, self.cache_layers)
        self.scratch_slot = num_blocks * self.block_size
        if self.drafter is not None:
            self.drafter.init_kv_cache(num_blocks + scratch)
        if why_not is None:
            self.capture_graphs()
        elif self.device.type == "cuda":
            logger.info("decode steps run eagerly: %s", why_not)
        freeze_startup_objects()

    def capture_graphs(self) -> None:
        """Capture the decode CUDA graphs (at start-up, and again when sleep mode moved the weights and caches)."""
        if self._why_no_graphs() is not None:
            return
        if self.lora is not None:  # the graphs hold the adapters' update: it runs in every step
            self.lora.always = True
        self.graphs = CudaGraphRunner(self, self.scratch_slot, emulate=self.device.type != "cuda")
        self.graphs.capture()

    def drop_graphs(self) -> None:
        self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- sleep mode and weight updates (worker/worker.py) ---------------------------

    def weight_modules(self) -> list[torch.nn.Module]:
        """The modules whose tensors are weights: the model's, and a draft model's."""
        return [self.model] + ([self.drafter.model] if self.drafter is not None else [])

    def cache_tensors(self) -> list[torch.Tensor]:
        """Per-request device memory: the KV caches (the draft model's too) and the recurrent states."""
        from pagellm.worker.kv_cache import layer_tensors

        caches = list(self.kv_caches) + (list(self.drafter.kv_caches) if self.drafter is not None else [])
        out = [t for kv in caches if kv is not None for t in layer_tensors(kv)]
        if self.states is not None:
            out += [t for layer in self.states for t in layer]
        return out

    def update_weights(self, weights) -> set[str]:
        """Checkpoint-named tensors into the target model's live parameters, through their weight loaders (each
        rank takes its slice), then the model's after-load work again; the parameters written. The CUDA graphs
        read the parameters where they are, so they need no new capture. A draft model keeps its weights."""
        if self.config.model.quantization is not None:
            raise ValueError(f"the weights of a quantized model ({self.config.model.quantization}) are not updated in "
                             "place; reload_weights(model_dir) reads a checkpoint.")
        with torch.no_grad():
            written = self.model.load_weights(weights)
            self.model.after_load()
        return written

    def reload_weights(self, model_dir: str | None = None) -> None:
        """The weights again from a checkpoint directory (default: the model's): streamed into the live parameters
        where a model can take them in place, else loaded beside them and copied over (quantized weights, DeepSeek's
        absorbed attention)."""
        import dataclasses

        from pagellm.models.loader import iterate_weights

        m = self.config.model
        path = model_dir or m.model
        if m.quantization is None and self.model.updatable_in_place:
            with torch.no_grad():
                self.model.load_weights(iterate_weights(path, m.load_format if model_dir is None else "auto"))
                self.model.after_load()
            return
        config = dataclasses.replace(self.config, model=dataclasses.replace(m, model=path))
        fresh = load_model(config, self.tp)
        copy_module_tensors(fresh, self.model)
        del fresh
        if self.model.updatable_in_place:  # derived tensors outside the module tree (GPT-OSS's sinks)
            self.model.after_load()

    def _why_no_graphs(self) -> str | None:
        if self.device.type != "cuda" and not self.emulate_graphs:
            return "not a CUDA device"
        if self.config.device.enforce_eager:
            return "enforce_eager"
        if self.pooler is not None:
            return "a pooling model computes prompts only (the graphs serve decode steps)"
        if self.tp.world_size > 1:
            return "tensor or pipeline parallelism"
        if self.drafter is not None:
            return "speculative decoding with a draft model (its passes and the checks run eagerly)"
        if self.states is not None:
            return "Mamba layers (each sequence's prompt and decode steps update its recurrent state eagerly)"
        if not hasattr(self.backend, "attention") and not self.emulate_graphs:
            return f"attention backend {self.backend.name} reads host-side metadata"
        return graphs_supported(self.model)

    def add_lora(self, lora) -> bool:
        """Load a LoRA adapter (ValueError if it cannot be served here); False when it was loaded already. The
        engine core calls these only with enable_lora."""
        return self.lora.add(lora)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.lora.remove(lora_int_id)

    # ---- one step -------------------------------------------------------------------

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(sched).result()

    @torch.inference_mode()
    def execute_model_async(self, sched: SchedulerOutput) -> StepResult:
        """Queue the step's work (forward pass, sampling, copies of the results to the host) and return. A
        grammar_deferred step stops before sampling: finish_sampling() brings the grammar masks."""
        self._update_state(sched)
        res = StepResult(self.device)
        if sched.is_empty:
            return res
        copy_blocks(self.kv_caches, sched.blocks_to_copy)
        drafts = None
        if self.drafter is not None:
            copy_blocks(self.drafter.kv_caches, sched.blocks_to_copy)
            if sched.spec_token_ids:  # the placeholders become the draft model's tokens
                drafts = self.drafter.propose(self.batch, sched.spec_token_ids, self.scratch_slot)
        inputs = self._prepare_inputs(sched, drafts)
        if inputs.graph_size:
            hidden = self.graphs.replay(inputs.graph_size)
        elif inputs.mm is not None and self.config.model.multimodal is None and self.tp.pp.is_first:
            index, rows = inputs.mm  # prompt embeddings, a text model
            x = self.model.embed(inputs.input_ids)
            rows = self.model.prompt_embeds(rows.to(x.dtype))
            hidden = self._forward(inputs, inputs_embeds=x.index_copy(0, index, rows))
        elif inputs.mm is not None and self.tp.pp.is_first:
            hidden = self._forward(inputs, mm_embeds=inputs.mm)
        else:
            hidden = self._forward(inputs)
        if hidden is None:  # a pipeline stage before the last: its hidden states went on to the next stage
            if self.pooler is None:
                self._sample(res, None, inputs, (), None)  # (the placeholders of the tokens sampled downstream)
            return res
        if self.drafter is not None:  # (an EAGLE-3 head reads the aux hidden states (T, 3 x hidden) instead)
            seen = torch.cat([self.model.aux_hidden[i] for i in self.model.aux_layers], dim=-1) \
                if self.drafter.eagle3 else hidden
            self.drafter.mirror(inputs.input_ids, inputs.positions, inputs.meta, seen, inputs.rows,
                                self.batch.block_table, inputs.mm)
        driver = self.tp.samples
        if self.pooler is not None:
            if driver:
                res.pooled = self.pooler.step(hidden, inputs.pool)
            return res
        for seq_id, row, idx, targets, start in inputs.prompt_lp:
            logits = self.model.compute_logits(hidden[idx])
            if driver:
                res.add_prompt_logprobs(seq_id, start, prompt_logprobs(logits, targets,
                                                                       self.batch.params[row].prompt_logprobs))
        logits = None
        if len(inputs.sample_rows):
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # gathered on the driver only
        if sched.grammar_deferred:
            res.deferred = (logits, inputs, sched.grammar_seq_ids)
            return res
        if inputs.multi is not None:
            self._run_more_steps(res, logits, inputs)
        else:
            self._sample(res, logits, inputs, sched.grammar_seq_ids, sched.grammar_bitmask)
        return res

    def _forward(self, inputs: _StepInputs, **kw) -> torch.Tensor | None:
        """The model over this step's tokens. A pipeline stage after the first takes its input hidden states from the
        stage before (in place of the embeddings); one before the last sends its output on and returns None."""
        pp = self.tp.pp
        if pp.size > 1 and not pp.is_first:
            dtype = torch_dtype(self.config.model.dtype)
            kw["intermediate"] = self.tp.recv_hidden((len(inputs.input_ids), self.hidden_size), dtype, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend, **kw)
        if pp.size > 1 and not pp.is_last:
            self.tp.send_hidden(hidden)
            return None
        return hidden

    def _run_more_steps(self, res: StepResult, logits: torch.Tensor, inputs: _StepInputs) -> None:
        """Multi-step decode: sample the first step, then run and sample the others, each fed the tokens the
        one before sampled (no grammars or prompt logprobs here: the scheduler rules them out). Penalized rows
        count each step's tokens on the device before the next step samples; min_tokens bans by each step's
        output length."""
        ms = inputs.multi
        rows = inputs.sample_rows
        md = self.batch.sampling_metadata(rows)
        outs = [self.sampler(logits, md)]
        b = len(rows)
        pen = self.batch.penalized(rows)
        bans = md.banned is not None
        if len(pen):
            dev = self.device
            pen_dev, pen_rows = to_device(pen, dev), to_device(rows[pen], dev)
            within = to_device((np.arange(len(ms.seq_lens_np) + 1)[:, None] < ms.counts[pen]).astype(np.float32), dev)
        ids, pos = inputs.input_ids, inputs.positions
        for k in range(len(ms.seq_lens_np)):
            if len(pen):
                self.batch.count_round_tokens(pen_rows, outs[-1].token_ids.index_select(0, pen_dev), within[k],
                                              md.output_counts, pen_dev)
            ids[:b].copy_(outs[-1].token_ids)
            pos[:b].copy_(ms.positions[k])
            if inputs.graph_size:
                d = self.buffers.dev
                d["slot_mapping"][:b].copy_(ms.slots[k])
                d["seq_lens"][:b].copy_(ms.seq_lens[k])
                hidden = self.graphs.replay(inputs.graph_size)
            else:
                lens = ms.seq_lens_np[k]
                meta = AttentionMetadata(**{**inputs.meta.__dict__, "slot_mapping": ms.slots[k],
                                            "seq_lens": ms.seq_lens[k], "seq_lens_cpu": lens.tolist(),
                                            "max_seq_len": int(lens.max())})
                hidden = self.model(ids, pos, self.kv_caches, meta, self.backend)
            md.uniforms = ms.uniforms[k]
            if bans:
                md.banned = self.batch.banned_ahead(rows, k + 1)
            outs.append(self.sampler(self.model.compute_logits(hidden[inputs.logits_indices]), md))
        so = SamplerOutput(*(None if getattr(outs[0], f) is None else torch.stack([getattr(o, f) for o in outs])
                             for f in ("token_ids", "logprobs", "ranks", "top_ids", "top_logprobs")))
        if len(pen):  # the last step's tokens
            self.batch.count_round_tokens(pen_rows, outs[-1].token_ids.index_select(0, pen_dev), within[-1],
                                          md.output_counts, pen_dev)
        res.add_samples(inputs.sample_seq_ids, so, md.num_logprobs, ms.counts)
        self._prev_tokens = so.token_ids.reshape(-1)  # step k's row i at k * rows + i
        self.batch.sampled(rows, so.token_ids, ms.counts)
        res.queued()

    @torch.inference_mode()
    def finish_sampling(self, res: StepResult, grammar_bitmask) -> None:
        """Sample a grammar_deferred step with its masks (queued behind its forward pass)."""
        logits, inputs, grammar_seq_ids = res.deferred
        res.deferred = None
        self._sample(res, logits, inputs, grammar_seq_ids, grammar_bitmask)

    def _sample(self, res: StepResult, logits, inputs: _StepInputs, grammar_seq_ids: list[int],
                grammar_bitmask) -> None:
        tokens = None
        if logits is not None and self.tp.samples:
            spec = inputs.spec
            if spec is None:
                md = self.batch.sampling_metadata(inputs.sample_rows)
            else:  # one sampling row per position a sequence samples at
                md = self.batch.sampling_metadata(spec.rows, spec.ahead)
                if md.output_counts is not None:  # penalties: each position also counts the drafts before it
                    spec.count_drafts(md.output_counts)
            first = range(len(inputs.sample_seq_ids)) if spec is None else spec.first.tolist()  # each one's 1st row
            if grammar_seq_ids:
                row_of = dict(zip(inputs.sample_seq_ids, first))
                rows = to_device([row_of[s] for s in grammar_seq_ids], self.device)
                md.grammar = (to_device(grammar_bitmask, self.device), rows)
            if self.logitsprocs is not None:  # (never with drafts: refused at start-up)
                rows, greedy = inputs.sample_rows, md.all_greedy
                md.custom = lambda x: self.logitsprocs.apply(x, rows, greedy)
            so = self.sampler(logits, md)
            if spec is None:
                res.add_samples(inputs.sample_seq_ids, so, md.num_logprobs)
            else:
                so, counts = spec.verify(so)
                res.add_samples(inputs.sample_seq_ids, so, [md.num_logprobs[f] for f in first], counts)
            self._prev_tokens = tokens = so.token_ids if spec is None else so.token_ids[0]
        self.batch.sampled(inputs.sample_rows, tokens)  # every rank: the placeholders decide what the next step samples
        res.queued()

    def _update_state(self, sched: SchedulerOutput) -> None:
        if (sched.state_rewinds or sched.state_promotions) and self.states is not None:
            self._apply_verdicts(sched)  # before the rows of sequences that finished go
        lp = self.logitsprocs
        for seq_id in sched.finished_seq_ids:
            if lp is not None and seq_id in self.batch.row_of:
                lp.remove(self.batch.row_of[seq_id])
            self.batch.remove(seq_id)
            if self.pooler is not None:
                self.pooler.forget(seq_id)
            if self.mm is not None:
                self.mm.forget(seq_id)
        # recurrent layers: a new row starts from zero, a checkpoint (prefix hit) or its live parent's row (a fork)
        zeroed, copied = [], []
        for d in sched.new_seqs:
            self.batch.add(d)
            if self.drafter is not None:
                self.drafter.reset_row(self.batch.row_of[d.seq_id])
            if self.states is not None:
                row = self.batch.row_of[d.seq_id]
                if d.state_checkpoint >= 0:
                    copied.append((row, self._checkpoint_base + d.state_checkpoint))
                elif d.state_parent >= 0:  # the parent is live (not sent this step): its row holds that state
                    copied.append((row, self.batch.row_of[d.state_parent]))
                elif d.num_computed_tokens:
                    raise RuntimeError(f"sequence {d.seq_id} arrives with {d.num_computed_tokens} tokens computed "
                                       "but no checkpoint of its recurrent state to start from")
                else:
                    zeroed.append(row)
            if d.mm_features:
                self.mm.add(d.seq_id, d.mm_features)
            if self.rope is not None:  # every new row: a row reused from another sequence must not keep its offset
                self.rope.set(self.batch.row_of[d.seq_id], d.mm_rope)
            if d.pooling_params is not None:
                self.pooler.add(d.seq_id, d.pooling_params)
            if lp is not None:
                n = d.num_prompt_tokens
                lp.add(self.batch.row_of[d.seq_id], d.sampling_params, list(d.token_ids[:n]), list(d.token_ids[n:]))
        self.batch.update(sched.cached_seqs)
        if lp is not None:
            c = sched.cached_seqs
            for seq_id, new in zip(c.seq_ids, c.new_token_ids):
                if new:
                    lp.extend(self.batch.row_of[seq_id], new)
        if zeroed or copied:
            self._start_states(zeroed, copied)

    def _apply_verdicts(self, sched: SchedulerOutput) -> None:
        """The last speculative step's verdicts, in one copy per state tensor: each sequence that rejected drafts
        gets back the state saved after its last token kept, and checkpoints within the kept drafts are copied
        into their slots (every source read before any row is written)."""
        k = self.config.scheduler.speculative.num_speculative_tokens
        row_of, base = self.batch.row_of, self._spec_base
        src, dst = [], []
        for seq_id, j in sched.state_rewinds.items():
            src.append(base + row_of[seq_id] * k + j)
            dst.append(row_of[seq_id])
        for seq_id, planned in sched.state_promotions.items():
            row = row_of[seq_id]
            for j, slot in planned:
                src.append(row if j < 0 else base + row * k + j)
                dst.append(self._checkpoint_base + slot)
        self._write_state_rows(src, dst)

    def _start_states(self, zeroed: list[int], copied: list[tuple[int, int]]) -> None:
        """The step's new rows: zeroed, or copied from a checkpoint's row or a live parent's row."""
        self._write_state_rows([c for _, c in copied], [r for r, _ in copied], zeroed)

    def _write_state_rows(self, src: list[int], dst: list[int], zeroed: list[int] = ()) -> None:
        """Rows src copied to rows dst and rows `zeroed` cleared, in every state tensor: one gather, one fill and
        one scatter per tensor, every source read before any row is written."""
        dev = self.device
        zero = torch.tensor(zeroed, device=dev) if zeroed else None
        src_t, dst_t = (torch.tensor(src, device=dev), torch.tensor(dst, device=dev)) if src else (None, None)
        for layer in self.states:
            for t in layer:
                values = t.index_select(0, src_t) if src else None
                if zero is not None:
                    t.index_fill_(0, zero, 0)
                if src:
                    t.index_copy_(0, dst_t, values)

    def _prepare_inputs(self, sched: SchedulerOutput, drafts: dict[int, list[int]] | None = None) -> _StepInputs:
        """`drafts`: a draft model's tokens for the scheduler's placeholders (sched.spec_token_ids)."""
        b = self.batch
        seq_ids = list(sched.num_scheduled_tokens)
        rows = np.fromiter((b.row_of[s] for s in seq_ids), dtype=np.int64, count=len(seq_ids))
        counts = np.fromiter(sched.num_scheduled_tokens.values(), dtype=np.int64, count=len(seq_ids))
        multi_counts = None
        if sched.num_steps > 1:  # the first of the steps computes one token per sequence
            multi_counts, counts = counts, np.ones_like(counts)
        starts = b.num_computed[rows]
        total = int(counts.sum())
        cu = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=cu[1:])
        # seq_lens [2, 5, 3] -> query_start_loc [0, 2, 7, 10]; token t of seq i sits at starts[i] + t - cu[i]
        tok_rows = np.repeat(rows, counts)
        if self.lora is not None:
            self.lora.set_step(b.lora_ids[tok_rows])
        positions = np.arange(total) - np.repeat(cu[:-1] - starts, counts)
        input_ids = b.token_ids[tok_rows, positions]
        bs = self.block_size
        slots = b.block_table[tok_rows, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = starts + counts
        spec_ids = sched.spec_token_ids if drafts is None else drafts
        n_draft = (np.fromiter((len(spec_ids.get(s, ())) for s in seq_ids), dtype=np.int64, count=len(seq_ids))
                   if spec_ids else None)
        # the chunk reaches the last known token (before any drafts): sample
        ends_known = (seq_lens if n_draft is None else seq_lens - n_draft) == b.num_tokens[rows]

        sample_idx = np.flatnonzero(ends_known)
        prompt_lp = self._prompt_logprob_inputs(seq_ids, rows, starts, counts, cu)
        fresh = starts == 0
        max_blocks = int(-(-(seq_lens if multi_counts is None else starts + multi_counts).max() // bs))
        max_query_len = int(counts.max())
        rope, rope3 = positions, None  # rotary positions; (3, total) when a prompt's image stretch is in the step
        if self.rope is not None:
            rope, rope3 = self.rope.positions(tok_rows, positions)
        arrays = dict(input_ids=input_ids, positions=rope, slot_mapping=slots, query_start_loc=cu,
                      seq_lens=seq_lens, block_tables=b.block_table[rows, :max_blocks],
                      paged_seq_ids=np.flatnonzero(~fresh), logits_indices=cu[1:][sample_idx] - 1)
        if self.states is not None:
            arrays["state_rows"] = rows
        beyond = positions >= b.num_known[tok_rows]
        spec = None
        if n_draft is not None:
            spec, draft_at = self._spec_inputs(spec_ids, seq_ids, rows, cu, n_draft, sample_idx)
            input_ids[draft_at] = [t for d in spec.draft_lists for t in d]  # drafting sequences all sample
            beyond[draft_at] = False
            arrays["logits_indices"] = spec.logits_indices
        unknown = np.flatnonzero(beyond)
        if len(unknown):  # placeholders: tokens the previous step sampled, still on the device
            u_rows = tok_rows[unknown]
            col, j = b.prev_sample_index[u_rows], positions[unknown] - b.prev_first[u_rows]
            if self._prev_tokens is None or (col < 0).any() or (j < 0).any() or (j >= b.prev_count[u_rows]).any():
                raise RuntimeError("the step computes tokens that neither the host holds nor the previous step "
                                   "sampled")
            arrays["prev_dst"], arrays["prev_src"] = unknown, j * b.prev_stride + col
        mm = self.mm.step(seq_ids, starts, counts, cu) if self.mm is not None else None
        # A decode-only batch that a CUDA graph covers is padded to the graph's size and replayed by execute_model.
        graph = None
        if (self.graphs is not None and max_query_len == 1 and not fresh.any() and not prompt_lp and mm is None
                and rope3 is None):
            graph = self.graphs.size_for(len(rows))
        padded = graph or max(total, MIN_BATCH_ROWS)
        t = self._stage(arrays, padded, graph) if self.buffers is not None else self._tensors(arrays, padded)
        if len(unknown):
            t["input_ids"].index_copy_(0, t["prev_dst"], self._prev_tokens.index_select(0, t["prev_src"]))
        if graph:
            meta = self.graphs.graphs[graph][2]
        else:
            meta = AttentionMetadata(
                num_tokens=total, slot_mapping=t["slot_mapping"], query_start_loc=t["query_start_loc"],
                seq_lens=t["seq_lens"], block_tables=t["block_tables"], paged_seq_ids=t["paged_seq_ids"],
                query_start_loc_cpu=cu.tolist(), seq_lens_cpu=seq_lens.tolist(),
                fresh_seqs=np.flatnonzero(fresh).tolist(), paged_seqs=arrays["paged_seq_ids"].tolist(),
                max_seq_len=int(seq_lens.max()), block_size=bs, max_query_len=max_query_len)
            if self.states is not None:
                meta.state_rows, meta.state_rows_cpu = t["state_rows"], rows.tolist()
                meta.state_saves = self._state_saves(sched, seq_ids, rows, n_draft)
        multi = None if multi_counts is None else self._multi_step_inputs(sched.num_steps, rows, starts, multi_counts)
        pool = None
        if self.pooler is not None:  # (seq_id, chunk's first and end batch index, chunk starts / ends the prompt)
            pool = list(zip(seq_ids, cu[:-1].tolist(), cu[1:].tolist(), fresh.tolist(), ends_known.tolist()))
        if mm is not None and self.mm.whole_blocks:  # Gemma 3: images attend to themselves both ways
            meta.image_blocks = [(row, n, pos, lo, hi, t["block_tables"][k])
                                 for row, n, pos, lo, hi, k in self.mm.whole_blocks]
        if rope3 is not None:
            t["positions"] = torch.zeros(3, padded, dtype=torch.int64)
            t["positions"][:, :total] = torch.from_numpy(rope3)
            t["positions"] = t["positions"].to(self.device, non_blocking=True)
        inputs = _StepInputs(t["input_ids"], t["positions"], meta, t["logits_indices"], rows[sample_idx],
                             [seq_ids[i] for i in sample_idx], prompt_lp, graph, multi, spec, pool, mm)
        inputs.rows = rows
        return inputs

    def _state_saves(self, sched: SchedulerOutput, seq_ids: list[int], rows: np.ndarray,
                     n_draft: np.ndarray | None) -> dict[int, list[tuple[int, int]]] | None:
        """Where the recurrent layers save a sequence's state within its chunk (batch index -> [(chunk offset, state
        row)]): the scheduler's checkpoints, and for a speculative step the state after each token but the last (the
        state after the last is the row's own)."""
        saves = {}
        if sched.state_saves:  # (a decode step has none: no pass over the batch)
            base = self._checkpoint_base
            saves = {i: [(offset, base + slot) for offset, slot in sched.state_saves[s]]
                     for i, s in enumerate(seq_ids) if s in sched.state_saves}
        if n_draft is not None:
            k = self.config.scheduler.speculative.num_speculative_tokens
            for i in np.flatnonzero(n_draft).tolist():
                first = self._spec_base + int(rows[i]) * k
                saves.setdefault(i, []).extend((j + 1, first + j) for j in range(int(n_draft[i])))
        return saves or None

    def _spec_inputs(self, spec_ids: dict[int, list[int]], seq_ids: list[int], rows: np.ndarray, cu: np.ndarray,
                     n_draft: np.ndarray, sample_idx: np.ndarray) -> tuple[_SpecInputs, np.ndarray]:
        """Speculative decoding: where the drafts go in the batch (the last n_draft[i] tokens of sequence i), and
        the positions each sampled sequence samples at (its last known token and its drafts), expanded to one
        sampling row per position.

            seq_lens [3, 4] computing 1 and 3 tokens (2 drafts): query_start_loc [0, 1, 4]
            drafts at batch indices [2, 3]; logits_indices [0, 1, 2, 3]; npos [1, 3]; first [0, 1]
        """
        total = int(n_draft.sum())
        draft_at = np.repeat(cu[1:] - n_draft, n_draft) + np.arange(total) - np.repeat(np.cumsum(n_draft) - n_draft,
                                                                                      n_draft)
        npos = 1 + n_draft[sample_idx]
        first = np.cumsum(npos) - npos  # each sampled sequence's first sampling row
        ahead = np.arange(int(npos.sum())) - np.repeat(first, npos)
        logits_indices = np.repeat(cu[1:][sample_idx] - npos, npos) + ahead
        k = int(npos.max())
        cols = np.arange(k)
        gather = first[:, None] + np.minimum(cols, npos[:, None] - 1)  # (B, K): row of each sequence's j-th sample
        drafts = np.full((len(sample_idx), k - 1), -1, dtype=np.int64)
        lists = [spec_ids.get(seq_ids[j], ()) for j in sample_idx]
        for i, d in enumerate(lists):
            if d:
                drafts[i, :len(d)] = d
        dev = self.device
        return _SpecInputs(np.repeat(rows[sample_idx], npos), ahead, first, logits_indices, to_device(gather, dev),
                           to_device(drafts, dev), lists), draft_at

    def _multi_step_inputs(self, num_steps: int, rows: np.ndarray, starts: np.ndarray,
                           counts: np.ndarray) -> _MultiStepInputs:
        """Steps 2 .. num_steps of a multi-step decode, row i of step k at position starts[i] + k while k <
        counts[i], then repeating its last position with its K/V sent to the scratch slot."""
        b, bs = self.batch, self.block_size
        k = np.arange(1, num_steps)[:, None]
        pos = starts + np.minimum(k, counts - 1)
        slots = np.where(k < counts, b.block_table[rows, pos // bs].astype(np.int64) * bs + pos % bs,
                         self.scratch_slot)
        seq_lens = (pos + 1).astype(np.int32)
        num_out = b.num_tokens[rows] - b.num_prompt[rows]  # the first step samples output index num_out
        uniforms = np.where(b.temperature[rows] < 1e-5, 0.0, counter_uniforms(b.seeds[rows], num_out + k))
        dev = self.device
        return _MultiStepInputs(counts, to_device(pos, dev), to_device(slots, dev), to_device(seq_lens, dev), seq_lens,
                                to_device(uniforms, dev))

    def _tensors(self, arrays: dict[str, np.ndarray], padded: int) -> dict[str, torch.Tensor]:
        """The step's arrays as tensors on the device (CPU: the numpy memory itself); token ids and positions
        zero-padded to `padded` rows."""
        out = {}
        for name, a in arrays.items():
            if name in ("input_ids", "positions"):
                t = torch.zeros(padded, dtype=torch.long)
                t[:len(a)] = torch.from_numpy(a)
            else:
                t = torch.from_numpy(a.astype(np.int32) if name in ("query_start_loc", "seq_lens") else a)
            out[name] = t.to(self.device)
        return out

    def _stage(self, arrays: dict[str, np.ndarray], padded: int, graph: int | None) -> dict[str, torch.Tensor]:
        """The step's arrays written into StepBuffers and sent in one copy; device views of the same shapes
        (token ids and positions `padded` rows; with a graph, its padding rows filled too)."""
        buf = self.buffers
        buf.wait_free()
        h, d = buf.np, buf.dev
        out = {}
        for name, a in arrays.items():
            if name == "block_tables":
                h[name][:a.shape[0], :a.shape[1]] = a
                out[name] = d[name][:a.shape[0], :a.shape[1]]
            else:
                h[name][:len(a)] = a
                out[name] = d[name][:len(a)]
        total, n_seqs = len(arrays["input_ids"]), len(arrays["seq_lens"])
        if graph:
            self.graphs.fill_padding(n_seqs, total, graph)
        else:
            h["input_ids"][total:padded] = 0
            h["positions"][total:padded] = 0
        out["input_ids"], out["positions"] = d["input_ids"][:padded], d["positions"][:padded]
        buf.send(graph or n_seqs)
        return out

    def _prompt_logprob_inputs(self, seq_ids, rows, starts, counts, cu) -> list:
        """For prompt_logprobs requests: batch indices of prompt positions p whose next token p+1 is a prompt token."""
        out = []
        b = self.batch
        for i in np.flatnonzero(b.wants_prompt_logprobs[rows]):
            row = rows[i]
            n_prompt = int(b.num_prompt[row])
            first, last = int(starts[i]), min(int(starts[i] + counts[i]), n_prompt - 1)
            if last <= first:
                continue
            idx = torch.arange(int(cu[i]), int(cu[i]) + last - first, device=self.device)
            targets = to_device(b.token_ids[row, first + 1:last + 1].copy(), self.device)
            out.append((seq_ids[i], row, idx, targets, first + 1))
        return out


class _MultiStepInputs:
    __slots__ = ("counts", "positions", "slots", "seq_lens", "seq_lens_np", "uniforms")

    def __init__(self, counts, positions, slots, seq_lens, seq_lens_np, uniforms):
        self.counts = counts  # (B,) tokens each sequence samples (<= num_steps)
        self.positions = positions  # (K - 1, B) int64 on the device: steps 2 .. K
        self.slots = slots  # (K - 1, B) int64: where each step's K/V go
        self.seq_lens = seq_lens  # (K - 1, B) int32: context lengths
        self.seq_lens_np = seq_lens_np  # the same on the host (eager steps' metadata)
        self.uniforms = uniforms  # (K - 1, B) float64: each step's sampling draws


class _SpecInputs:
    """A speculative step's sampling: sequence i samples at npos[i] = 1 + drafts positions, rows first[i] ..
    first[i] + npos[i] - 1 of the sampler's batch."""

    __slots__ = ("rows", "ahead", "first", "logits_indices", "gather", "drafts", "draft_lists")

    def __init__(self, rows, ahead, first, logits_indices, gather, drafts, draft_lists):
        self.rows = rows  # (N,) InputBatch row of each sampling row
        self.ahead = ahead  # (N,) its position after the sequence's last known token (0 .. drafts)
        self.first = first  # (B,) each sequence's first sampling row
        self.logits_indices = logits_indices  # (N,) batch index of each sampling row's token
        self.gather = gather  # (B, K) on the device: sampling row of sequence i's j-th sample (the last repeated)
        self.drafts = drafts  # (B, K - 1) on the device: the drafts, -1 past a sequence's own
        self.draft_lists = draft_lists  # B lists: each sequence's drafts

    def count_drafts(self, counts: torch.Tensor) -> None:
        """Penalties at position j see the output so far plus the drafts before j (they are the output if j's
        sample is kept): add them to the sampling rows' copy of the generated-token counts (N, V)."""
        rows, toks = [], []
        for f, d in zip(self.first.tolist(), self.draft_lists):
            for j in range(1, len(d) + 1):
                rows += [f + j] * j
                toks += d[:j]
        if rows:
            flat = torch.tensor(rows, dtype=torch.long) * counts.shape[1] + torch.tensor(toks, dtype=torch.long)
            flat = flat.to(counts.device)
            counts.view(-1).index_add_(0, flat, torch.ones(len(rows), dtype=counts.dtype, device=counts.device))

    def verify(self, so: SamplerOutput) -> tuple[SamplerOutput, torch.Tensor]:
        """Keep each sequence's samples up to and including the first that differs from the draft at its place.
        Sampling position j with the same seed and output index as a plain step would, and keeping it only when
        every draft before it was sampled too, gives the tokens plain decoding gives. Returns the samples with a
        leading step axis (K, B) and the count each sequence keeps, on the device."""
        g = self.gather
        tokens = so.token_ids[g]  # (B, K)
        kept = (tokens[:, :-1] == self.drafts).long().cumprod(dim=1).sum(dim=1) + 1

        def steps(t):
            return None if t is None else t[g].transpose(0, 1)

        return SamplerOutput(tokens.transpose(0, 1), steps(so.logprobs), steps(so.ranks), steps(so.top_ids),
                             steps(so.top_logprobs)), kept


class _StepInputs:
    __slots__ = ("input_ids", "positions", "meta", "logits_indices", "sample_rows", "sample_seq_ids", "prompt_lp",
                 "graph_size", "multi", "spec", "pool", "mm", "rows")

    def __init__(self, input_ids, positions, meta, logits_indices, sample_rows, sample_seq_ids, prompt_lp,
                 graph_size=None, multi=None, spec=None, pool=None, mm=None):
        self.input_ids = input_ids  # (T_padded,) int64
        self.positions = positions  # (T_padded,) int64
        self.meta = meta  # AttentionMetadata
        self.logits_indices = logits_indices  # (B,) batch index of each sampled sequence's last token
        self.sample_rows = sample_rows  # (B,) InputBatch rows of the sampled sequences
        self.sample_seq_ids = sample_seq_ids  # B sequence ids
        self.prompt_lp = prompt_lp  # [(seq_id, row, batch indices, target ids, first position)]
        self.graph_size = graph_size  # the CUDA graph (decode batch size) that runs this step, or None
        self.multi = multi  # _MultiStepInputs of a multi-step decode, or None
        self.spec = spec  # _SpecInputs of a step with draft tokens, or None
        self.pool = pool  # a pooling model's step: [(seq_id, first, end batch index, prompt starts, prompt ends)]
        self.mm = mm  # (batch index (M,), features (M, hidden)) of this step's image positions, or None
        self.rows = None  # (num_seqs,) InputBatch rows of the step's sequences, in the batch's order


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy on the host, queued behind the step's work (pinned memory on CUDA); the tensor itself on CPU."""
    return t if t is None or t.device.type == "cpu" else t.to("cpu", non_blocking=True)


class StepResult:
    """One step's results on their way to the host. The copies are queued behind the step's work;
    result() waits for them (an event on CUDA) and builds the ModelRunnerOutput."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._samples = None  # (seq ids, host tensors, num_logprobs per row)
        self._counts = None  # multi-step decode: tokens per row
        self._prompt_lp: list[tuple] = []  # (seq id, first position, host tensors)
        self.pooled: dict[int, np.ndarray] = {}  # a pooling model's outputs (seq id -> float32)
        self._event = None
        self._out: ModelRunnerOutput | None = None
        self.deferred = None  # (logits, inputs, grammar seq ids) of a step waiting for its grammar masks

    def add_samples(self, seq_ids: list[int], so, num_logprobs: list[int | None], counts=None) -> None:
        """`counts` (multi-step decode, speculative steps): the tensors have a leading step axis, row i keeps its
        first counts[i] (numpy, or a device tensor)."""
        self._counts = _to_host(counts) if isinstance(counts, torch.Tensor) else counts
        if self.device.type == "cpu":
            cols = (so.token_ids, so.logprobs, so.ranks)
        else:  # one copy for the per-row results (token ids < 2^53 are exact in float64)
            packed = _to_host(torch.stack([c.double() for c in (so.token_ids, so.logprobs, so.ranks)
                                           if c is not None]))
            cols = (packed[0], packed[1], packed[2] if so.ranks is not None else None)
        self._samples = (seq_ids, cols, _to_host(so.top_ids), _to_host(so.top_logprobs), num_logprobs)

    def add_prompt_logprobs(self, seq_id: int, start: int, tensors: tuple[torch.Tensor, ...]) -> None:
        self._prompt_lp.append((seq_id, start, [_to_host(t) for t in tensors]))

    def queued(self) -> None:
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> ModelRunnerOutput:
        if self._out is not None:
            return self._out
        if self.deferred is not None:
            raise RuntimeError("the step waits for its grammar masks (ModelRunner.finish_sampling)")
        if self._event is not None:
            self._event.synchronize()
        out = ModelRunnerOutput()
        if self._samples is not None:
            seq_ids, (tokens, lps, ranks), top_ids, top_lps, num_logprobs = self._samples
            tokens = tokens.long().tolist()
            lps = lps.tolist()
            ranks = ranks.long().tolist() if ranks is not None else None
            top_ids = top_ids.tolist() if top_ids is not None else None
            top_lps = top_lps.tolist() if top_lps is not None else None

            def sample(tokens, lps, ranks, top_ids, top_lps, i: int) -> SampleResult:
                res = SampleResult(tokens[i], lps[i])
                k = num_logprobs[i]
                if k is not None:
                    res.rank = ranks[i]
                    res.top_ids = top_ids[i][:k] if k and top_ids else []
                    res.top_logprobs = top_lps[i][:k] if k and top_lps else []
                return res

            if self._counts is None:  # one step: its tokens, logprobs, ranks, top-k
                steps, counts = [(tokens, lps, ranks, top_ids, top_lps)], [1] * len(seq_ids)
            else:  # a multi-step round: the same per step
                n = len(tokens)
                steps = list(zip(tokens, lps, ranks or [None] * n, top_ids or [None] * n, top_lps or [None] * n))
                counts = self._counts.tolist()
            for i, (seq_id, c) in enumerate(zip(seq_ids, counts)):
                out.samples[seq_id] = sample(*steps[0], i)
                if c > 1:
                    out.extra_samples[seq_id] = [sample(*steps[k], i) for k in range(1, c)]
        for seq_id, start, (lp, ranks, top_ids, top_lp) in self._prompt_lp:
            out.prompt_logprobs[seq_id] = PromptLogprobs(start, lp.tolist(), ranks.tolist(), top_ids.tolist(),
                                                          top_lp.tolist())
        out.pooled = self.pooled
        self._out = out
        self._samples = None
        self._prompt_lp = []
        return out
