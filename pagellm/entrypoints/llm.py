"""The offline API: `LLM(model).generate(prompts, params)` and `LLM.chat(messages, params)`.

    prompts -> validate all (nothing runs if one is bad) -> engine.add_request each
            -> engine.step() until done (tqdm progress bar) -> RequestOutputs in input order
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from pagellm.core.beam_search import BeamSearchPolicy
from pagellm.core.scheduler import check_priority
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.chat_utils import apply_chat_template, chat_prompt
from pagellm.engine.input_processor import PromptType
from pagellm.engine.llm_engine import EngineDeadError, LLMEngine
from pagellm.lora.request import LoRARequest
from pagellm.outputs import (
    BeamSearchOutput,
    BeamSearchSequence,
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from pagellm.pooling_params import PoolingParams
from pagellm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

ChatMessages = list[dict[str, Any]]


class LLM:
    """An engine for offline batch generation.

    Keyword arguments are EngineArgs fields (vLLM's names): dtype, block_size,
    max_model_len, max_num_seqs, max_num_batched_tokens, kv_cache_memory,
    enable_prefix_caching, load_format, seed, ...
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        valid = set(EngineArgs.__dataclass_fields__)
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise TypeError(f"unknown LLM arguments {unknown}; valid: {sorted(valid - {'model'})}")
        self.engine_args = EngineArgs(model=model, **kwargs)
        if self.engine_args.data_parallel_size != 1:
            raise ValueError("data_parallel_size is for `pagellm serve` (replicas behind one server); offline, "
                             "run one LLM per replica.")
        self.tracer = None  # a span per finished request (otlp_traces_endpoint)
        if self.engine_args.otlp_traces_endpoint:
            from pagellm.tracing import init_tracer

            self.tracer = init_tracer(self.engine_args.otlp_traces_endpoint)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() and chat() use without sampling params: SamplingParams' defaults with the model's
        generation config on top (`generation_config`, `override_generation_config`)."""
        return SamplingParams(**self.llm_engine.config.model.default_sampling)

    def shutdown(self) -> None:
        """Stop tensor-parallel workers now (they also stop when the LLM is collected or the process exits), and
        send the trace spans still queued."""
        self.llm_engine.shutdown()
        if self.tracer is not None:
            self.tracer.flush()

    # ---- between rollouts (RL post-training; vLLM's calls) ----------------------------

    def sleep(self, level: int = 1) -> None:
        """Free the device memory of the weights and the KV cache (needs enable_sleep_mode=True and an idle
        engine). level 1 keeps a host copy of the weights; level 2 discards them: update or reload them after
        wake_up(). The prefix cache is forgotten."""
        self.llm_engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back the memory put to sleep: tags "weights" and / or "kv_cache" (default both), e.g. the weights
        first to update them before the cache takes its memory."""
        self.llm_engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.llm_engine.is_sleeping()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False (nothing forgotten) while a request holds KV blocks."""
        return self.llm_engine.reset_prefix_cache()

    def update_weights(self, weights) -> int:
        """New weights for the model, e.g. from a trainer: (name, tensor) pairs or a state dict, Hugging Face
        checkpoint names, whole (unsharded) tensors; some or all of the model's weights. Every tensor-parallel rank
        takes its slice. The prefix cache is forgotten. Returns how many of the model's parameters were written."""
        return self.llm_engine.update_weights(weights)

    def reload_weights(self, model_dir: str | None = None) -> None:
        """The weights again from a checkpoint directory of the same model (default: the one it was loaded from)."""
        self.llm_engine.reload_weights(model_dir)

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list:
        """Call a worker method (its name; worker_extension_cls adds methods) or a function taking the worker first,
        on every rank; returns the results in rank order. `timeout` is accepted for vLLM's signature: in one process
        the call runs to its end, and under tensor parallelism a rank that does not answer within
        distributed_timeout makes the engine dead."""
        return self.llm_engine.collective_rpc(method, tuple(args), kwargs)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order. `priority`: one per prompt, lower first
        (needs scheduling_policy="priority"). `lora_request`: the LoRA adapter for every prompt, or one per prompt
        (None: the base model; needs enable_lora=True)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_per_prompt(len(prompts), sampling_params)
        if priority is not None:
            priority = list(priority)
            if len(priority) != len(prompts):
                raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts; give one per prompt.")
            if any(not isinstance(p, int) or isinstance(p, bool) for p in priority):
                raise ValueError(f"priority must hold integers, got {priority[:5]}.")
        loras = None
        if lora_request is not None:
            loras = [lora_request] * len(prompts) if isinstance(lora_request, LoRARequest) else list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts; give one, or one per "
                                 "prompt.")
            if any(lr is not None and not isinstance(lr, LoRARequest) for lr in loras):
                raise ValueError("lora_request must hold LoRARequest objects (or None).")
        return self._run(prompts, params, use_tqdm, priority=priority, loras=loras)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = True) -> list[BeamSearchOutput]:
        """Beam search per prompt; each BeamSearchOutput holds the beam_width best beams, best first
        (vLLM's shape: `.sequences`, each with `.tokens` and `.text` that include the prompt, `.cum_logprob`).

        Matches Hugging Face `generate(num_beams=beam_width, do_sample=False, length_penalty=...,
        early_stopping=...)`; beams honour logit_bias, bad_words, min_tokens and the penalties.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        eos = self.llm_engine.config.model.eos_token_ids
        num_eos = 0 if params.ignore_eos else len(eos)
        policy_args = dict(beam_width=params.beam_width, length_penalty=params.length_penalty,
                           early_stopping=params.early_stopping, num_eos=num_eos)
        sp = params.sampling_params(BeamSearchPolicy(**policy_args).num_candidates)
        outs = self._run(list(prompts), [sp] * len(prompts), use_tqdm,
                         policy_factory=lambda: BeamSearchPolicy(**policy_args))
        return [self._beams(out) for out in outs]

    def _beams(self, out: RequestOutput) -> BeamSearchOutput:
        tok = self.get_tokenizer()
        seqs = []
        for c in out.outputs:
            tokens = list(out.prompt_token_ids) + list(c.token_ids)
            text = tok.decode(tokens, skip_special_tokens=True) if tok is not None else None
            seqs.append(BeamSearchSequence(tokens, c.logprobs, c.cumulative_logprob or 0.0, text, c.finish_reason,
                                           c.stop_reason))
        return BeamSearchOutput(seqs)

    def chat(self, messages: ChatMessages | list[ChatMessages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             mm_processor_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the tokenizer's chat template
        (`chat_template_kwargs`: more template variables, e.g. {"enable_thinking": False}; `tools`: OpenAI-style
        tool definitions for the template; `lora_request` as in generate). A multimodal model's messages may hold
        images: content parts {"type": "image_url", "image_url": {"url": ...}} or {"type": "image_pil",
        "image_pil": image}; `mm_processor_kwargs` go to the image processor for them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [chat_prompt(self.get_tokenizer(), self.llm_engine.input_processor.mm, c, chat_template,
                               add_generation_prompt, continue_final_message, tools, chat_template_kwargs,
                               mm_processor_kwargs) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def apply_chat_template(self, conversation: ChatMessages, chat_template: str | None = None,
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            chat_template_kwargs: dict[str, Any] | None = None,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        return apply_chat_template(self.get_tokenizer(), conversation, chat_template, add_generation_prompt,
                                   continue_final_message, tools, chat_template_kwargs)

    # ---- pooling models (runner="pooling") -------------------------------------------

    def encode(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True,
               pooling_task: str | None = None,
               truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        """A pooling model's raw outputs, one per prompt (`outputs.data`, a float32 tensor). `pooling_task`: embed
        or token_embed (embedding models: the pooled vector, or one per prompt token), classify or score
        (classification models), token_classify (*ForTokenClassification: class probabilities per prompt token);
        default: what the model serves."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params = [pooling_params or PoolingParams()] * len(prompts)
        else:
            params = list(pooling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} pooling params for {len(prompts)} prompts; pass one, or one per "
                                 "prompt.")
        changes: dict[str, Any] = {}
        if pooling_task is not None:
            changes["task"] = pooling_task
        if truncate_prompt_tokens is not None:
            changes["truncate_prompt_tokens"] = truncate_prompt_tokens
        params = [p.clone(**changes) if changes else p for p in params]
        engine = self.llm_engine
        inputs = _checked(prompts, lambda i: engine.process_pooling_input(prompts[i], params[i]))
        outs = self._drive(inputs, [None] * len(inputs), use_tqdm)
        for out in outs:
            if not isinstance(out, PoolingRequestOutput):  # the engine failed it (aborted, with its error)
                raise RuntimeError(f"pooling request {out.request_id} failed in the engine: {out.error or 'aborted'}")
        return outs

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (`outputs.embedding`, a list of floats): the model's pooler (LAST by default,
        sentence-transformers' own), L2-normalized unless pooling_params says normalize=False."""
        outs = self.encode(prompts, pooling_params, use_tqdm, "embed", truncate_prompt_tokens)
        return [_typed(o, EmbeddingOutput(o.outputs.data.tolist())) for o in outs]

    def classify(self, prompts: PromptType | Sequence[PromptType],
                 pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, use_tqdm: bool = True,
                 truncate_prompt_tokens: int | None = None) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (`outputs.probs`) from a *ForSequenceClassification checkpoint's head on
        the last token: softmax, or sigmoid for a single label (use_activation=False: the raw logits)."""
        outs = self.encode(prompts, pooling_params, use_tqdm, "classify", truncate_prompt_tokens)
        return [_typed(o, ClassificationOutput(o.outputs.data.tolist())) for o in outs]

    def score(self, data_1: str | Sequence[str], data_2: str | Sequence[str], use_tqdm: bool = True,
              pooling_params: PoolingParams | None = None,
              truncate_prompt_tokens: int | None = None) -> list[ScoringRequestOutput]:
        """Scores of text pairs (`outputs.score`): data_1 one text against each of data_2, or pairwise when both
        hold as many. An embedding model scores by the cosine similarity of the two embeddings; a cross-encoder
        (a classification model with one label) by its sigmoid on the pair, tokenized as the tokenizer pairs texts."""
        pairs = score_pairs(data_1, data_2)
        task, prompts = score_inputs(self.llm_engine.config.model.pooler, self.get_tokenizer(), pairs)
        outs = self.encode(prompts, pooling_params, use_tqdm, task, truncate_prompt_tokens)
        scores = pair_scores(task, [o.outputs.data for o in outs])
        if task == "score":
            return [_typed(o, ScoringOutput(v)) for o, v in zip(outs, scores)]
        n = len(pairs)  # an embedding model: both sides embedded, first sides then second sides
        return [PoolingRequestOutput(f"{a.request_id}_{b.request_id}", ScoringOutput(v),
                                     a.prompt_token_ids + b.prompt_token_ids)
                for a, b, v in zip(outs[:n], outs[n:], scores)]

    # ---- internals ------------------------------------------------------------------

    def _params_per_prompt(self, n: int, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts; pass one, or one per prompt.")
        return params

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool,
             policy_factory=None, priority: list[int] | None = None,
             loras: list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        engine = self.llm_engine
        policies = [policy_factory() if policy_factory else None for _ in prompts]
        inputs = _checked(prompts, lambda i: engine.process_input(
            prompts[i], params[i], policies[i].max_seqs if policies[i] else None, logprobs_cap=policies[i] is None))
        for inp, p in zip(inputs, priority or ()):  # checked before any is queued
            check_priority(engine.config.scheduler.policy, p)
            inp.priority = p
        for inp, lora in zip(inputs, loras or ()):
            if lora is not None:
                engine.core.add_lora(lora)  # loaded (or refused) before any request is queued
            inp.lora = lora
        return self._drive(inputs, policies, use_tqdm)

    def _drive(self, inputs: list, policies: list, use_tqdm: bool) -> list:
        """Queue processed inputs and step the engine until every one has its final output (input order)."""
        engine = self.llm_engine
        ids = []
        for inp, policy in zip(inputs, policies):
            inp.params.output_kind = RequestOutputKind.FINAL_ONLY
            rid = str(next(self._ids))
            engine.add_request(rid, inp, policy=policy)
            ids.append(rid)
        finals: dict[str, Any] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2, dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([r for r in ids if r not in finals])
            raise
        finally:
            bar.close()
        if engine.dead is not None:
            raise EngineDeadError(f"the engine died while generating: {engine.dead}")
        if self.tracer is not None:
            name = engine.config.model.served_model_name
            for rid, inp in zip(ids, inputs):
                if isinstance(finals[rid], RequestOutput):
                    self.tracer.request_span(finals[rid], inp.params, name)
        return [finals[r] for r in ids]


def _checked(prompts: list, process) -> list:
    """process(i) for every prompt, each checked (the KV-cache fit included) before any is queued; a ValueError
    names the prompt when there are several."""
    inputs = []
    for i in range(len(prompts)):
        try:
            inputs.append(process(i))
        except ValueError as e:
            if len(prompts) > 1:
                raise ValueError(f"prompt {i}: {e}") from e
            raise
    return inputs


def _typed(out: PoolingRequestOutput, outputs: Any) -> PoolingRequestOutput:
    return PoolingRequestOutput(out.request_id, outputs, out.prompt_token_ids, out.finished, out.prompt,
                                out.num_cached_tokens)


def score_pairs(data_1: str | Sequence[str], data_2: str | Sequence[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: one text against each of the others (1:N), or pairwise (N:N); ValueError otherwise."""
    one = [data_1] if isinstance(data_1, str) else list(data_1)
    two = [data_2] if isinstance(data_2, str) else list(data_2)
    if not one or not two:
        raise ValueError("score needs at least one text on each side.")
    if not all(isinstance(t, str) for t in one + two):
        raise ValueError("score takes texts (strings).")
    if len(one) == 1:
        return [(one[0], b) for b in two]
    if len(one) != len(two):
        raise ValueError(f"score pairs one text with N, or N with N; got {len(one)} and {len(two)}.")
    return list(zip(one, two))


def score_inputs(pooler, tokenizer, pairs: list[tuple[str, str]]) -> tuple[str, list]:
    """(task, prompts) that score text pairs: an embedding model embeds every first text, then every second one;
    a cross-encoder (a classification model with one label) classifies each pair as its tokenizer joins the two.
    ValueError for any other model."""
    if pooler is None:
        raise ValueError("score needs a pooling model (runner='pooling').")
    if pooler.task == "embed":
        return "embed", [a for a, _ in pairs] + [b for _, b in pairs]
    if len(pooler.labels) != 1:
        raise ValueError(f"score needs an embedding model or a cross-encoder (a classification model with one "
                         f"label); this one has {len(pooler.labels)} labels: use classify.")
    if tokenizer is None:
        raise ValueError("score needs a tokenizer (the engine runs with skip_tokenizer_init).")
    return "score", [{"prompt_token_ids": tokenizer(a, b)["input_ids"]} for a, b in pairs]


def pair_scores(task: str, outputs: list[torch.Tensor]) -> list[float]:
    """The pairs' scores from score_inputs' outputs: cosine similarities of the two halves' embeddings, or the
    cross-encoder's score per pair."""
    if task == "embed":
        n = len(outputs) // 2
        return [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(outputs[:n], outputs[n:])]
    return [float(o[0]) for o in outputs]
