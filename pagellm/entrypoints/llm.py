"""The offline API: `LLM(model).generate(prompts, params)` and `LLM.chat(messages, params)`.

    prompts -> validate all (nothing runs if one is bad) -> engine.add_request each
            -> engine.step() until done (tqdm progress bar) -> RequestOutputs in input order
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagellm.core.beam_search import BeamSearchPolicy
from pagellm.core.scheduler import check_priority
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.chat_utils import apply_chat_template
from pagellm.engine.input_processor import PromptType
from pagellm.engine.llm_engine import EngineDeadError, LLMEngine
from pagellm.lora.request import LoRARequest
from pagellm.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
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
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() and chat() use without sampling params: SamplingParams' defaults with the model's
        generation config on top (`generation_config`, `override_generation_config`)."""
        return SamplingParams(**self.llm_engine.config.model.default_sampling)

    def shutdown(self) -> None:
        """Stop tensor-parallel workers now (they also stop when the LLM is collected or the process exits)."""
        self.llm_engine.shutdown()

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
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the tokenizer's chat template
        (`chat_template_kwargs`: more template variables, e.g. {"enable_thinking": False}; `tools`: OpenAI-style
        tool definitions for the template; `lora_request` as in generate)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, chat_template, add_generation_prompt,
                                                                 continue_final_message, chat_template_kwargs, tools)}
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def apply_chat_template(self, conversation: ChatMessages, chat_template: str | None = None,
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            chat_template_kwargs: dict[str, Any] | None = None,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        return apply_chat_template(self.get_tokenizer(), conversation, chat_template, add_generation_prompt,
                                   continue_final_message, tools, chat_template_kwargs)

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
        inputs = []
        for i, (prompt, p, policy) in enumerate(zip(prompts, params, policies)):
            try:  # every prompt is checked, the KV-cache fit included, before any is queued
                inputs.append(engine.process_input(prompt, p, policy.max_seqs if policy else None,
                                                   logprobs_cap=policy is None))
            except ValueError as e:
                if len(prompts) > 1:
                    raise ValueError(f"prompt {i}: {e}") from e
                raise
        for inp, p in zip(inputs, priority or ()):  # checked before any is queued
            check_priority(engine.config.scheduler.policy, p)
            inp.priority = p
        for inp, lora in zip(inputs, loras or ()):
            if lora is not None:
                engine.core.add_lora(lora)  # loaded (or refused) before any request is queued
            inp.lora = lora
        ids = []
        for inp, policy in zip(inputs, policies):
            inp.params.output_kind = RequestOutputKind.FINAL_ONLY
            rid = str(next(self._ids))
            engine.add_request(rid, inp, policy=policy)
            ids.append(rid)
        finals: dict[str, RequestOutput] = {}
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
        return [finals[r] for r in ids]
