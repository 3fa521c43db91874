"""Prompt + SamplingParams -> validated token ids and per-request parameters.

    "text" | {"prompt": "text"} | {"prompt_token_ids": [...]} -> ProcessedInput
    (multimodal models: a dict prompt may add "multi_modal_data": {"image": image or [images]})

Every check that needs the model happens here, before the request reaches the
scheduler, so a bad request fails alone with a ValueError naming the field and
the limit, and nothing is allocated for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagellm.config import ModelConfig
from pagellm.lora.request import LoRARequest
from pagellm.pooling_params import SERVED_TASKS, PoolingParams
from pagellm.sampling_params import ParamError, SamplingParams

PromptType = str | dict[str, Any]


@dataclass
class ProcessedInput:
    prompt: str | None  # text, when the prompt was given as text
    prompt_token_ids: list[int]
    params: SamplingParams  # a private copy with max_tokens resolved and bad words tokenized
    cache_salt: str | None = None
    priority: int = 0  # scheduling_policy "priority": lower first
    beam: dict | None = None  # beam search (the API's use_beam_search): BeamSearchPolicy's arguments
    lora: LoRARequest | None = None  # the LoRA adapter the request runs with (enable_lora)
    pooling: PoolingParams | None = None  # a pooling model's request (params then only carry its seed)
    mm_features: list | None = None  # MultiModalFeature per image, in prompt order (multimodal models)
    mm_rope: Any = None  # multimodal RoPE (Qwen2-VL): (a, b, 3-D positions of prompt positions a..b-1, delta)

    @property
    def embeds_prompt(self) -> bool:
        """The prompt came as embeddings (its token ids are placeholders)."""
        return bool(self.mm_features) and self.mm_features[0].modality == "embeds"


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Any, structured: Any = None,
                 max_num_batched_tokens: int | None = None, block_size: int = 16) -> None:
        self.block_size = block_size  # prompt embeddings are keyed for the prefix cache a block at a time
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.structured = structured  # StructuredOutputManager: compiles grammars (a 400 if one does not compile)
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.vocab_size
        self.logits_processors: list[type] = []  # custom logits processors: their validate_params see each request
        if model_config.logits_processors:
            from pagellm.sample.logits_processor import load_logits_processors

            self.logits_processors = load_logits_processors(model_config.logits_processors)
        self.mm = None  # MultiModalProcessor: images -> pixel values and placeholder positions
        if model_config.multimodal is not None:
            from pagellm.multimodal.processing import MultiModalProcessor

            self.mm = MultiModalProcessor(model_config, tokenizer, max_num_batched_tokens)

    def process(self, prompt: PromptType, params: SamplingParams, logprobs_cap: bool = True) -> ProcessedInput:
        """`logprobs_cap=False` for internal candidates (beam search asks for 2 x beam_width of them)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}.")
        if self.model_config.pooler is not None:
            raise ValueError("this model runs as a pooling model (runner pooling): it serves LLM.embed / classify / "
                             "score / encode, not generation.")
        text, ids, salt, mm = self._prompt_ids(prompt, params.truncate_prompt_tokens)
        rope = self.mm.rope_positions(mm) if mm and self.mm is not None else None
        if mm and mm[0].modality == "embeds":
            for name, bad in (("prompt_logprobs", params.prompt_logprobs is not None),
                              ("repetition_penalty", params.repetition_penalty != 1.0)):
                if bad:
                    raise ParamError(f"{name} needs the prompt's token ids; a prompt given as prompt_embeds has none.",
                                     param=name)
        n = len(ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise ParamError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds "
                             f"max_model_len ({self.max_model_len}); lower max_tokens to at most "
                             f"{self.max_model_len - n}.", param="max_tokens", code="context_length_exceeded")
        self._check_token_ids(params, logprobs_cap)
        if self.tokenizer is None and (params.stop or params.bad_words):
            raise ValueError("stop strings and bad_words need a tokenizer (the engine runs with skip_tokenizer_init).")
        params = params.clone(max_tokens=max_tokens, best_of=params.best_of)
        if self.logits_processors:
            from pagellm.sample.logits_processor import validate_request

            validate_request(self.logits_processors, params)
        if self.tokenizer is None:
            params.detokenize = False
        if params.bad_words:
            params._bad_words_token_ids = self._bad_words(params.bad_words)
        if params.structured_outputs is not None:
            if self.structured is None:
                raise ParamError("structured_outputs need a tokenizer (the engine runs with skip_tokenizer_init).",
                                 param="structured_outputs")
            self.structured.compile(params.structured_outputs)  # fails here, before any work, if it cannot compile
        return ProcessedInput(text, list(ids), params, salt, mm_features=mm, mm_rope=rope)

    def _prompt_ids(self, prompt: PromptType, truncate: int | None,
                    pooling: bool = False) -> tuple[str | None, list[int], str | None, list | None]:
        """The prompt's token ids (the last `truncate` of them; a multimodal prompt's with its image placeholders
        expanded) and its images, checked against the vocabulary and max_model_len (a pooling request's prompt
        may fill it: nothing is generated after it)."""
        if isinstance(prompt, dict) and "prompt_embeds" in prompt:
            return self._embeds(prompt, truncate, pooling)
        text, ids, salt = self._tokenize(prompt)
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        mm = None
        if data is not None or (self.mm is not None and self.mm.placeholder_id in ids):
            if self.mm is None:
                raise ParamError(f"the model {self.model_config.served_model_name!r} takes text only; "
                                 "multi_modal_data needs a multimodal model.", param="multi_modal_data")
            if truncate is not None:
                raise ParamError("truncate_prompt_tokens cannot cut a prompt with images.",
                                 param="truncate_prompt_tokens")
            ids, mm = self.mm.process(list(ids), data if data is not None else {}, prompt.get("mm_processor_kwargs")
                                      if isinstance(prompt, dict) else None)
            mm = mm or None
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]
        if not ids:
            raise ParamError("prompt must not be empty (it has 0 tokens).", param="prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size and (mm is None or t != self.mm.placeholder_id)]
        if bad:
            raise ParamError(f"prompt_token_ids must be in [0, {self.vocab_size}) (the vocabulary size); "
                             f"got {bad[:5]}.", param="prompt")
        n = len(ids)
        if pooling and n > self.max_model_len:
            raise ParamError(f"the prompt has {n} tokens, more than max_model_len ({self.max_model_len}).",
                             param="prompt", code="context_length_exceeded")
        if not pooling and n >= self.max_model_len:
            raise ParamError(f"the prompt has {n} tokens, but max_model_len is {self.max_model_len}: "
                             f"the prompt must be shorter than max_model_len to leave room for output.",
                             param="prompt", code="context_length_exceeded")
        return text, ids, salt, mm

    def _embeds(self, prompt: dict, truncate: int | None,
                pooling: bool) -> tuple[None, list[int], str | None, list]:
        """A prompt given as embeddings (tokens, hidden): one placeholder token id (0) per embedding, and features
        that hold them a cache block at a time (the worker puts them in place of the placeholders' embeddings; the
        prefix cache keys each block by its own, chained as block hashes are)."""
        import hashlib

        import numpy as np

        from pagellm.multimodal.inputs import MultiModalFeature

        if not self.model_config.prompt_embeds or pooling:
            raise ParamError("prompt_embeds need a generative model started with enable_prompt_embeds=True "
                             "(--enable-prompt-embeds).", param="prompt_embeds")
        for other in ("prompt", "prompt_token_ids", "multi_modal_data"):
            if prompt.get(other) is not None:
                raise ParamError(f"a prompt takes prompt_embeds or {other}, not both.", param="prompt_embeds")
        e = prompt["prompt_embeds"]
        try:
            arr = (e.detach().to("cpu").float().numpy() if hasattr(e, "detach") else np.asarray(e, dtype=np.float32))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ParamError(f"prompt_embeds must be a tensor (tokens, hidden): {err}", param="prompt_embeds") from None
        hf = self.model_config.hf_config
        hidden = getattr(getattr(hf, "text_config", None) or hf, "hidden_size", None)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != hidden:
            raise ParamError(f"prompt_embeds must have shape (tokens > 0, {hidden}) (the model's hidden size), got "
                             f"{tuple(arr.shape)}.", param="prompt_embeds")
        if not np.isfinite(arr).all():
            raise ParamError("prompt_embeds hold inf or NaN.", param="prompt_embeds")
        if truncate is not None and arr.shape[0] > truncate:
            arr = arr[-truncate:]
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        n = arr.shape[0]
        if n >= self.max_model_len:
            raise ParamError(f"the prompt has {n} embeddings, but max_model_len is {self.max_model_len}: the prompt "
                             "must be shorter than max_model_len to leave room for output.", param="prompt_embeds",
                             code="context_length_exceeded")
        feats = []
        for a in range(0, n, self.block_size):  # one feature per cache block: a prefix hit ends where they differ
            part = arr[a:a + self.block_size]
            feats.append(MultiModalFeature("embeds", hashlib.sha256(part.tobytes()).hexdigest(), a, len(part), part))
        return None, [0] * n, prompt.get("cache_salt"), feats

    def process_pooling(self, prompt: PromptType, params: PoolingParams) -> ProcessedInput:
        """A pooling model's request: the prompt checked as for generation, the params against the model's task
        (ParamError naming the field)."""
        pooler = self.model_config.pooler
        if pooler is None:
            raise ValueError("this model runs as a generative model; embed / classify / score / encode need a "
                             "pooling model (runner='pooling', --runner pooling).")
        if not isinstance(params, PoolingParams):
            raise TypeError(f"pooling params must be PoolingParams, got {type(params).__name__}.")
        task = params.task or pooler.task
        served = SERVED_TASKS[pooler.task]
        if task not in served:
            need = next(model_task for model_task, tasks in SERVED_TASKS.items() if task in tasks)
            how = "a *ForTokenClassification checkpoint" if need == "token_classify" else f"a model converted to {need}"
            raise ParamError(f"this model serves {' and '.join(served)} (runner pooling, task {pooler.task}); the "
                             f"{task} task needs {how}.", param="task")
        params = params.clone(task=task)
        params.check_task()
        if params.dimensions is not None:
            m = pooler.matryoshka
            if not m:
                raise ParamError(f"the model {self.model_config.served_model_name!r} does not support Matryoshka "
                                 "representation (config.json has no is_matryoshka / matryoshka_dimensions): "
                                 "changing the output dimensions would give poor embeddings.", param="dimensions")
            if m is not True and params.dimensions not in m:
                raise ParamError(f"dimensions must be one of {list(m)} (the model's matryoshka_dimensions), got "
                                 f"{params.dimensions}.", param="dimensions")
            if params.dimensions > pooler.hidden_size:
                raise ParamError(f"dimensions must be <= {pooler.hidden_size} (the model's hidden size), got "
                                 f"{params.dimensions}.", param="dimensions")
        truncate = params.truncate_prompt_tokens
        if truncate == -1:
            truncate = self.max_model_len
        text, ids, salt, _ = self._prompt_ids(prompt, truncate, pooling=True)
        params.needs_all_hidden = params.pooling_kind(pooler.pooling_type) != "LAST"
        sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, seed=0)
        return ProcessedInput(text, list(ids), sp, salt, pooling=params)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int], str | None]:
        if isinstance(prompt, str):
            return prompt, self.encode(prompt), None
        if isinstance(prompt, dict):
            salt = prompt.get("cache_salt")
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                  for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers.")
                return prompt.get("prompt"), list(ids), salt
            if isinstance(prompt.get("prompt"), str):
                return prompt["prompt"], self.encode(prompt["prompt"]), salt
        raise ValueError("a prompt must be a string, {'prompt': str} or {'prompt_token_ids': list[int]}; "
                         f"got {type(prompt).__name__}.")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (the engine runs with skip_tokenizer_init); "
                             "pass {'prompt_token_ids': [...]}.")
        return self.tokenizer.encode(text, add_special_tokens=True)

    def _check_token_ids(self, params: SamplingParams, logprobs_cap: bool) -> None:
        v = self.vocab_size
        so = params.structured_outputs
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                          ("logit_bias", list(params.logit_bias or {})),
                          ("structured_outputs", so.think_tokens if so is not None else None)):
            bad = [t for t in ids or [] if not 0 <= t < v]
            if bad:
                raise ParamError(f"{name} must hold token ids in [0, {v}) (the vocabulary size); got {bad[:5]}.",
                                 param=name)
        cap = min(v, self.model_config.max_logprobs) if logprobs_cap else v
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > cap:
                raise ParamError(f"{name} must be <= {cap} (max_logprobs={self.model_config.max_logprobs}, "
                                 f"vocabulary size {v}), got {k}.", param=name)

    def _bad_words(self, words: list[str]) -> list[list[int]]:
        """Each word as tokenized alone and after a space (vLLM's rule: both forms are banned)."""
        out: list[list[int]] = []
        for word in words:
            for form in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(form, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out
