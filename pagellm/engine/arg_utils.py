"""EngineArgs: every engine flag in one place, shared by `LLM(...)` and the command line.

    LLM(model, **kwargs) / `pagellm serve --flags`  -> EngineArgs -> create_engine_config() -> EngineConfig

Each field's `help` metadata becomes its `--flag` help text, so the Python
keyword and the CLI flag (underscores -> dashes) can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pagellm.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    MultiModalConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = DTYPES + ("fp8", "fp8_e4m3")  # fp8 = e4m3 with per-tensor scales, as vLLM names it


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineArgs:
    model: str = _f("", "Local directory of a Hugging Face checkpoint.", positional=True)
    tokenizer: str | None = _f(None, "Tokenizer directory (default: the model directory).")
    skip_tokenizer_init: bool = _f(False, "Run without a tokenizer: token-id prompts only, no output text.")
    dtype: str = _f("auto", "Compute dtype; auto = the checkpoint's, except on a CPU: a float16 or bfloat16 "
                            "checkpoint runs in bfloat16 where the CPU multiplies bf16 natively "
                            "(avx512_bf16 / AMX), else in float32.", choices=DTYPES)
    kv_cache_dtype: str = _f("auto", "KV cache dtype; auto = the compute dtype. fp8 (= fp8_e4m3) stores K/V in "
                                     "8 bits (twice the sequences in the same memory), read by every attention "
                                     "backend.", choices=KV_CACHE_DTYPES)
    quantization: str | None = _f(
        None, "Quantized weights: int8 (any checkpoint, quantized at load: int8 weights, plus int8 activations "
              "where the CPU has VNNI/AMX); fp8 (any checkpoint, quantized at load: fp8 e4m3 weights with "
              "per-channel scales, dequantized in each matmul); gptq, awq and fp8 checkpoints are read from "
              "config.json's quantization_config without this flag.", choices=("int8", "fp8", "gptq", "awq"))
    block_size: int = _f(16, "Tokens per KV cache block.")
    max_model_len: int | None = _f(None, "Maximum prompt + output tokens per sequence (default: the model's).")
    max_num_seqs: int = _f(256, "Maximum sequences in one step.")
    max_num_batched_tokens: int | None = _f(
        None, "Maximum tokens computed in one step (default: max(2048, max_model_len)).")
    kv_cache_memory: int | None = _f(None, "Bytes for the KV cache (default: a fraction of free memory).")
    gpu_memory_utilization: float = _f(0.25, "Fraction of free memory (RAM on CPU) for the KV cache when "
                                             "--kv-cache-memory is not given.")
    num_gpu_blocks_override: int | None = _f(None, "Exact number of KV cache blocks (testing).")
    enable_prefix_caching: bool = _f(True, "Reuse the KV blocks of identical prompt prefixes (and, for models with "
                                           "Mamba layers, checkpoints of their recurrent state).")
    mamba_block_size: int | None = _f(
        None, "Models with Mamba / linear-attention layers, with prefix caching: tokens between two checkpoints of "
              "a sequence's recurrent state (a multiple of --block-size); a cached prefix is reused up to its last "
              "checkpoint. Default: 256 rounded up to a multiple of --block-size.")
    num_state_checkpoints: int | None = _f(
        None, "Models with Mamba / linear-attention layers, with prefix caching: recurrent-state checkpoints kept "
              "(least recently used replaced first), each the size of one sequence's state. Default: max_num_seqs.")
    load_format: str = _f("auto", "Weights format; dummy = random weights (benchmarks).",
                          choices=("auto", "safetensors", "pt", "dummy"))
    seed: int = _f(0, "Engine seed: dummy weights and requests that give no seed.")
    device: str = _f("cpu", "Device: cpu or cuda.")
    num_threads: int | None = _f(None, "Torch threads on CPU (default: torch's choice, usually the core count).")
    enforce_eager: bool = _f(False, "CUDA: run every step eagerly instead of replaying the CUDA graphs captured "
                                    "at start-up for decode batches.")
    enable_sleep_mode: bool = _f(False, "Allow sleep(level) / wake_up(tags) (LLM methods; the server's /sleep and "
                                        "/wake_up with --server-dev-mode): free the device memory of the weights "
                                        "(level 1 keeps a host copy, level 2 none) and of the KV cache between "
                                        "rollouts, and take it back.")
    async_scheduling: bool | None = _f(
        None, "Schedule and prepare step N+1 while the device runs step N (the next step's input tokens come "
              "from step N's sampled tokens on the device). Default: on for one CUDA GPU, off on CPU, where "
              "there is nothing to overlap; tensor parallelism runs without it.")
    num_scheduler_steps: int = _f(
        1, "Decode steps the device runs per scheduling round: when every sequence of a step is decoding, its "
           "next tokens are computed back to back on the device, each step's input the token sampled before it, "
           "and the host schedules, applies stop conditions and builds outputs once for all of them. While a "
           "request with beam search, structured outputs or multi-token bad words runs, steps run one at a time. "
           "A sequence that stops early discards the tokens computed past its stop.")
    scheduling_policy: str = _f(
        "fcfs", "Order of service: fcfs (first come, first served) or priority (each request's priority, lower "
                "first, then arrival; a waiting request may preempt running ones of a lower priority).",
        choices=("fcfs", "priority"))
    speculative_config: dict | None = _f(
        None, "Speculative decoding, a JSON object as in vLLM: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
              "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' or '{\"model\": \"DRAFT_DIR\", "
              "\"num_speculative_tokens\": 4}' (method draft_model) or '{\"method\": \"mtp\", "
              "\"num_speculative_tokens\": 1}' (the model's own multi-token-prediction layer: DeepSeek-V3 / V3.2, "
              "GLM-4.5 / 4.7 / 5). Each decoding sequence proposes up to "
              "num_speculative_tokens tokens: with ngram those that followed the latest earlier occurrence of its last "
              "n tokens (n from prompt_lookup_max down to prompt_lookup_min; both 5 when neither is given), with a "
              "draft model (a smaller checkpoint with the same tokenizer, its own KV cache beside the model's) its "
              "greedy tokens; one step checks them all: a step yields every proposed token the model agrees with, "
              "plus one. Outputs are the same as without it, sampled ones included (each position samples with its "
              "own seed and output index). Sequences with structured outputs or beam search, and steps with prompt "
              "tokens of the same sequence, do not speculate; a request that speculates runs steps one at a time (no "
              "async scheduling, no multi-step rounds) while it lives. disable_by_batch_size N (vLLM's field): no "
              "drafts in a step while more than N requests are running (large batches gain little from drafts and "
              "pay for their extra rows).")
    runner: str = _f("auto", "What the model serves: generate (text), pooling (embeddings, classification: "
                             "LLM.embed / classify / score, /v1/embeddings, /classify, /score, /rerank), or auto: "
                             "pooling for *Model and *ForSequenceClassification checkpoints, else generate.",
                     choices=("auto", "generate", "pooling"))
    model_impl: str = _f("auto", "Which implementation runs the model (vLLM's --model-impl): pagellm's native one, "
                                 "transformers' modules with pagellm's paged attention (the fallback), or auto: the "
                                 "native one where there is one, else the fallback.",
                         choices=("auto", "pagellm", "transformers"))
    convert: str = _f("auto", "With runner pooling: embed (pooled hidden states) or classify (the checkpoint's "
                              "classification head, `score.weight`); auto: classify for *ForSequenceClassification "
                              "checkpoints, else embed.", choices=("auto", "none", "embed", "classify"))
    hf_overrides: dict | None = _f(
        None, "Values that replace config.json's (vLLM's --hf-overrides), a JSON object: "
              "'{\"max_position_embeddings\": 8192}'; a nested object updates a nested config or dict "
              "(rope_parameters, text_config) key by key.")
    pooler_config: dict | None = _f(
        None, "A pooling model's pooler, a JSON object as in vLLM: '{\"pooling_type\": \"MEAN\", \"normalize\": "
              "false}'. pooling_type LAST (decoders' default), CLS (BERT's and RoBERTa's) or MEAN; a "
              "sentence-transformers checkpoint's own by default; "
              "normalize (embeddings, default true); use_activation (classification: softmax, or sigmoid for one "
              "label; default true); dimensions (Matryoshka models: the default embedding size).")
    limit_mm_per_prompt: dict | None = _f(
        None, "Multimodal models: the most items of each modality one prompt may carry, a JSON object as in vLLM: "
              "'{\"image\": 2}' (default 999 per modality; 0 refuses that modality).")
    mm_processor_kwargs: dict | None = _f(
        None, "Multimodal models: settings for the checkpoint's image processor, a JSON object as in vLLM, e.g. "
              "'{\"max_pixels\": 1003520}' (Qwen2-VL: the most pixels an image keeps, so the most positions it "
              "fills); a request's own mm_processor_kwargs go on top.")
    enable_prompt_embeds: bool = _f(
        False, "Accept prompts given as embeddings (vLLM's flag): {'prompt_embeds': tensor (tokens, hidden)} offline, "
               "'prompt_embeds' (base64 of torch.save) in /v1/completions. Text-only native models.")
    logits_processors: list | None = _f(
        None, "Custom logits processors (vLLM's option): classes, or module.Class names the engine imports, "
              "each built once and applied to every step's logits (pagellm.sample.logits_processor). A request's "
              "extra_args (the server: vllm_xargs) reach them through its SamplingParams.", nargs="+")
    allowed_local_media_path: str = _f(
        "", "Multimodal models: a directory whose files requests may name as file:// image URLs (default: none; "
            "only for trusted clients).")
    otlp_traces_endpoint: str | None = _f(
        None, "Send an OpenTelemetry span per finished request (vLLM's llm_request: sampling parameters, token "
              "counts, queue / first-token / end-to-end latencies) to this OTLP endpoint, e.g. "
              "http://collector:4318/v1/traces (HTTP/protobuf; gRPC with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc). "
              "Needs pip install 'pagellm[otel]'. The server continues a trace the request's traceparent header "
              "names.")
    enable_lora: bool = _f(False, "Serve LoRA adapters (PEFT format: adapter_config.json + adapter_model.safetensors) "
                                  "beside the base model: LLM.generate(..., lora_request=LoRARequest(name, id, path)), "
                                  "or `pagellm serve --lora-modules name=path` and the name as the request's model. "
                                  "Adapters may target the decoder's linear layers (q/k/v/o, gate/up/down, GPT-2's "
                                  "c_attn/c_proj/c_fc, ...); steps run without CUDA graphs.")
    max_loras: int = _f(1, "Distinct LoRA adapters in one step; requests of other adapters wait their turn.")
    max_lora_rank: int = _f(16, "Largest rank a LoRA adapter may have.")
    max_cpu_loras: int | None = _f(
        None, "LoRA adapters kept loaded in host memory (default: max_loras, as in vLLM); beyond it the least "
              "recently requested adapter that no live request uses is dropped and read from its path again "
              "when a request names it. The device holds max_loras adapters' weights.")
    lora_modules: list[str] | None = _f(
        None, "LoRA adapters loaded at start-up, each name=path or a JSON object {\"name\": ..., \"path\": ...} "
              "(needs --enable-lora); the server answers to each name as a model (ids 1..N in this order).",
        nargs="+")
    attention_backend: str = _f("auto", "Attention backend: auto, torch_ref, cpu_paged (CPU kernel) or "
                                        "triton_paged (CUDA).")
    served_model_name: str | None = _f(None, "Model name in the API (default: the model path).")
    max_waiting_requests: int | None = _f(None, "Queue limit; the server answers 429 beyond it.")
    max_logprobs: int = _f(20, "Largest logprobs / top_logprobs / prompt_logprobs a request may ask for "
                               "(-1: the vocabulary size).")
    tensor_parallel_size: int = _f(1, "Shard the model over this many worker processes (torch.distributed; "
                                      "gloo on CPU, NCCL on CUDA).", aliases=("-tp",))
    pipeline_parallel_size: int = _f(1, "Split the decoder layers over this many stages, each of "
                                        "tensor_parallel_size processes: the hidden states pass from stage to stage, "
                                        "each stage holds only its layers' weights and KV cache (LLaMA's and GPT-2's "
                                        "families). One step runs through the stages in turn.", aliases=("-pp",))
    distributed_executor_backend: str | None = _f(
        None, "Where tensor-parallel workers run: mp (local processes, the default) or ray (Ray actors, "
              "multi-node; pip install pagellm[ray]).", choices=("mp", "ray"))
    data_parallel_size: int = _f(1, "Engine replicas behind one server (pagellm serve), each with its own KV "
                                    "cache; requests go to the least loaded.", aliases=("-dp",))
    enable_expert_parallel: bool = _f(False, "Mixture-of-experts models under tensor parallelism: each rank holds "
                                             "num_experts / tensor_parallel_size whole experts instead of a slice "
                                             "of every expert (vLLM's flag); attention and shared experts stay "
                                             "tensor-parallel.")
    worker_extension_cls: str | None = _f(None, "A class (module.Class) whose methods every rank's worker gains, for "
                                       "LLM.collective_rpc (vLLM's option): e.g. receiving new weights from a "
                                       "trainer; the worker's model_runner.model is the model.")
    distributed_timeout: float = _f(60.0, "Seconds a worker may keep the others waiting before the engine "
                                          "reports it dead.")
    generation_config: str = _f(
        "auto", "Where the default sampling parameters come from: auto = the model's generation_config.json "
                "(its temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens as max_tokens), "
                "vllm = SamplingParams' own defaults, or a directory holding a generation_config.json. The "
                "defaults fill what a request leaves unset (LLM.generate without sampling params, API fields "
                "left out); max_tokens from it caps every request's.")
    override_generation_config: dict | None = _f(
        None, "JSON object of generation-config fields that replace the loaded ones, e.g. "
              "'{\"temperature\": 0.5}' (the same six fields, max_new_tokens by that name).")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, model_optional: bool = True,
                     skip: frozenset[str] = frozenset()) -> argparse.ArgumentParser:
        """Add a flag per field; fields in `skip` are left to the command (e.g. `generate` owns --seed)."""
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            if meta.pop("positional", False):
                parser.add_argument(f.name, nargs="?" if model_optional else None, default=None, help=help_text)
                continue
            flags = ["--" + f.name.replace("_", "-"), *meta.pop("aliases", ())]
            if f.type in ("bool", bool, "bool | None"):
                parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            else:
                kind = {"int": int, "int | None": int, "float": float, "float | None": float,
                        "dict | None": _json_object}.get(str(f.type), str)
                parser.add_argument(*flags, type=kind, default=f.default, help=help_text, **meta)
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace, skip: frozenset[str] = frozenset()) -> EngineArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
                      if hasattr(ns, f.name) and f.name not in skip})

    def _state_checkpoints(self, used: bool) -> tuple[int, int]:
        """(mamba_block_size, num_state_checkpoints) of a model with recurrent layers under prefix caching, else
        (0, 0)."""
        for name in ("mamba_block_size", "num_state_checkpoints"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        if self.mamba_block_size is not None and self.mamba_block_size % self.block_size:
            raise ValueError(f"mamba_block_size ({self.mamba_block_size}) must be a multiple of block_size "
                             f"({self.block_size}).")
        if not used:
            return 0, 0
        interval = self.mamba_block_size or -(-256 // self.block_size) * self.block_size
        return interval, self.num_state_checkpoints or self.max_num_seqs

    def create_engine_config(self) -> EngineConfig:
        model_cfg = self._model_config()
        max_len = model_cfg.max_model_len
        _positive("block_size", self.block_size)
        _positive("max_num_seqs", self.max_num_seqs)
        batched = self.max_num_batched_tokens or max(2048, max_len)
        _positive("max_num_batched_tokens", batched)
        from pagellm.models.base import images_attend_both_ways
        from pagellm.models.registry import get_model_class

        encoder = getattr(get_model_class(model_cfg.architecture), "is_encoder", False)
        mm = model_cfg.multimodal
        if (mm is not None and mm.image_tokens is not None and batched < mm.image_tokens
                and images_attend_both_ways(get_model_class(model_cfg.architecture), model_cfg.hf_config)):
            raise ValueError(f"{model_cfg.architecture} computes an image's {mm.image_tokens} positions in one step: "
                             f"max_num_batched_tokens ({batched}) must be >= {mm.image_tokens}.")
        prefix_caching, num_blocks = self.enable_prefix_caching, self.num_gpu_blocks_override
        if encoder:  # bidirectional attention: whole prompts in one step, nothing cached or shared
            if batched < max_len:
                raise ValueError(f"{model_cfg.architecture} computes each prompt in one step: max_num_batched_tokens "
                                 f"({batched}) must be >= max_model_len ({max_len}).")
            prefix_caching = False
            if num_blocks is None:  # the KV cache is bookkeeping only: what one step's prompts hold
                num_blocks = -(-batched // self.block_size) + self.max_num_seqs
        if self.kv_cache_memory is not None:
            _positive("kv_cache_memory", self.kv_cache_memory)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}.")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("num_scheduler_steps", self.num_scheduler_steps)
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if self.num_scheduler_steps > 1 and getattr(self, name) > 1:
                raise ValueError(f"num_scheduler_steps > 1 needs {name}=1 (the ranks would need the sampled tokens "
                                 f"between steps), got {name}={getattr(self, name)}.")
        _positive("data_parallel_size", self.data_parallel_size)
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}.")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError("distributed_executor_backend must be mp or ray, got "
                             f"{self.distributed_executor_backend!r}.")
        if not self.distributed_timeout > 0:
            raise ValueError(f"distributed_timeout must be > 0 seconds, got {self.distributed_timeout}.")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}.")
        async_scheduling = self.async_scheduling
        single = self.tensor_parallel_size == 1 and self.pipeline_parallel_size == 1
        if async_scheduling is None:
            async_scheduling = self.device != "cpu" and single
        elif async_scheduling and not single:
            raise ValueError("async_scheduling needs tensor_parallel_size=1 and pipeline_parallel_size=1 (the ranks "
                             f"would need the sampled tokens; pipeline stages overlap micro-batches of other "
                             f"sequences instead), got {self.tensor_parallel_size} and {self.pipeline_parallel_size}.")
        speculative = speculative_config(self.speculative_config)
        if speculative is not None and self.pipeline_parallel_size > 1:
            raise ValueError("speculative_config needs pipeline_parallel_size=1 (the drafts and their checks would "
                             "cross the stages).")
        mamba_block, checkpoints = self._state_checkpoints(model_cfg.stateful and prefix_caching)
        if speculative is not None and speculative.method == "draft_model" and _is_eagle3(speculative.model):
            speculative = dataclasses.replace(speculative, method="eagle3")  # vLLM infers it from the head too
        if speculative is not None and speculative.method == "draft_model":
            speculative = dataclasses.replace(speculative, draft=self._draft_model_config(speculative.model, model_cfg))
        elif speculative is not None and speculative.method == "eagle3":
            draft, aux = self._eagle3_config(speculative.model, model_cfg)
            speculative = dataclasses.replace(speculative, draft=draft, aux_layers=aux)
        elif speculative is not None and speculative.method == "eagle":
            speculative = dataclasses.replace(speculative, draft=self._eagle_config(speculative.model, model_cfg))
        elif speculative is not None and speculative.method == "mtp":
            speculative = dataclasses.replace(speculative, draft=self._mtp_config(model_cfg))
        if model_cfg.logits_processors:
            why = ("a pooling model samples nothing" if model_cfg.pooler is not None else
                   "speculative decoding" if speculative is not None else
                   "num_scheduler_steps > 1 (steps sampled on the device back to back)"
                   if self.num_scheduler_steps > 1 else None)
            if why:
                raise ValueError(f"logits_processors cannot run with {why}.")
            if async_scheduling and self.async_scheduling:
                raise ValueError("logits_processors need async_scheduling off (they read each step's sampled tokens "
                                 "on the host).")
            async_scheduling = False
        if model_cfg.pooler is not None:
            if speculative is not None:
                raise ValueError("speculative_config is for generative models; this one runs as a pooling model "
                                 "(runner pooling).")
            if self.enable_lora:
                raise ValueError("enable_lora is for generative models; this one runs as a pooling model "
                                 "(runner pooling).")
        lora = None
        if self.enable_lora:
            _positive("max_loras", self.max_loras)
            _positive("max_lora_rank", self.max_lora_rank)
            max_cpu = self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras
            _positive("max_cpu_loras", max_cpu)
            if max_cpu < self.max_loras:
                raise ValueError(f"max_cpu_loras ({max_cpu}) must be >= max_loras ({self.max_loras}).")
            lora = LoRAConfig(self.max_loras, self.max_lora_rank, lora_modules(self.lora_modules or []), max_cpu)
        elif self.lora_modules:
            raise ValueError("lora_modules needs enable_lora=True (--enable-lora).")
        return EngineConfig(
            model=model_cfg,
            cache=CacheConfig(self.block_size, self.kv_cache_memory, self.gpu_memory_utilization,
                              self.kv_cache_dtype, prefix_caching, num_blocks, mamba_block, checkpoints),
            scheduler=SchedulerConfig(self.max_num_seqs, batched, max_len, self.max_waiting_requests,
                                      async_scheduling, self.num_scheduler_steps, self.scheduling_policy,
                                      speculative, chunked_prefill=not encoder),
            parallel=ParallelConfig(self.tensor_parallel_size, self.distributed_executor_backend or "mp",
                                    self.data_parallel_size, float(self.distributed_timeout),
                                    bool(self.enable_expert_parallel), self.worker_extension_cls or None,
                                    self.pipeline_parallel_size),
            device=DeviceConfig(self.device, self.num_threads, self.attention_backend, self.enforce_eager,
                                bool(self.enable_sleep_mode)),
            lora=lora,
        )

    def _model_config(self) -> ModelConfig:
        from transformers import AutoConfig

        from pagellm.models.registry import get_model_class
        from pagellm.quantization import resolve_quantization

        path = self.model
        if not path:
            raise ValueError("model must be the path of a local Hugging Face checkpoint directory.")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {path!r} does not exist (pagellm loads local checkpoints "
                                    "only: a directory with config.json, weights and tokenizer files).")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model directory {path!r} has no config.json.")
        try:
            hf = AutoConfig.from_pretrained(path)
        except ValueError as e:  # a model_type this transformers does not know
            from pagellm.models.registry import supported_architectures

            raise ValueError(f"cannot read {path}/config.json: {e} Natively supported architectures: "
                             f"{', '.join(supported_architectures())}.") from None
        if self.hf_overrides:
            apply_hf_overrides(hf, self.hf_overrides)
        arch, pooler = self._runner(path, hf)
        cls = get_model_class(arch)
        if self.tensor_parallel_size > 1 and not cls.supports_tp:
            raise ValueError(f"{arch} runs on the transformers fallback, which cannot be sharded: "
                             "tensor_parallel_size must be 1.")
        quantization = resolve_quantization(self.quantization, hf)
        if self.enable_lora and not cls.supports_tp:
            raise ValueError(f"{arch} runs on the transformers fallback, which pagellm does not fit with LoRA "
                             "adapters: enable_lora needs a natively supported architecture.")
        if quantization is not None and not cls.supports_tp:
            raise ValueError(f"{arch} runs on the transformers fallback, which pagellm does not quantize: "
                             f"quantization={quantization!r} needs a natively supported architecture.")
        _positive("pipeline_parallel_size", self.pipeline_parallel_size)
        if self.pipeline_parallel_size > 1 and not cls.supports_pp:
            raise ValueError(f"{arch} does not run in pipeline stages in pagellm (LLaMA's and GPT-2's families do): "
                             "pipeline_parallel_size must be 1.")
        geometry = cls.geometry(hf, self.tensor_parallel_size)  # the model owns its (per-rank) KV-cache shape
        if 1 < self.pipeline_parallel_size > geometry.num_layers:
            raise ValueError(f"{arch} has {geometry.num_layers} decoder layers, fewer than pipeline_parallel_size="
                             f"{self.pipeline_parallel_size} stages.")
        text = hf.get_text_config()  # a multimodal checkpoint's language model; the config itself otherwise
        derived = cls.max_positions(hf) if hasattr(cls, "max_positions") else _derived_max_len(text)
        max_len = self.max_model_len or derived
        if max_len > derived:
            raise ValueError(f"max_model_len ({max_len}) is larger than the model's maximum ({derived}).")
        _positive("max_model_len", max_len)
        return ModelConfig(
            model=path,
            tokenizer=None if self.skip_tokenizer_init else (self.tokenizer or path),
            architecture=arch,
            hf_config=hf,
            dtype=_resolve_dtype(self.dtype, hf, self.device),
            max_model_len=max_len,
            vocab_size=text.vocab_size,
            num_layers=geometry.num_layers,
            num_kv_heads=geometry.num_kv_heads,
            head_dim=geometry.head_dim,
            kv_shared=geometry.kv_shared,
            kv_layer_shapes=geometry.kv_layer_shapes,
            num_state_layers=geometry.num_state_layers,
            state_shapes=geometry.state_shapes,
            state_dtypes=geometry.state_dtypes,
            sliding_window=geometry.kv_sliding_window(max_len),
            eos_token_ids=_eos_ids(path, hf) | _eos_ids(path, text),
            load_format=self.load_format,
            seed=self.seed,
            served_model_name=self.served_model_name or path,
            max_logprobs=self.max_logprobs if self.max_logprobs >= 0 else text.vocab_size,
            quantization=quantization,
            default_sampling=generation_defaults(path, self.generation_config, self.override_generation_config),
            pooler=pooler,
            multimodal=self._multimodal_config(cls, hf),
            prompt_embeds=self._prompt_embeds(cls, pooler),
            logits_processors=self._logits_processors(),
        )

    def _logits_processors(self) -> tuple:
        """Each processor as "module:Class" where it has an importable name, else the class cloudpickled (a class
        of a script or a notebook): the config crosses to other processes. Each is checked to load."""
        import cloudpickle

        from pagellm.sample.logits_processor import load_logits_processors

        specs = list(self.logits_processors or [])
        load_logits_processors(specs)
        return tuple(s if isinstance(s, str) else f"{s.__module__}:{s.__qualname__}"
                     if s.__module__ != "__main__" and "<locals>" not in s.__qualname__ else cloudpickle.dumps(s)
                     for s in specs)

    def _prompt_embeds(self, cls, pooler) -> bool:
        """enable_prompt_embeds, checked against the model: a text-only generative native model whose forward takes
        inputs_embeds."""
        import inspect

        if not self.enable_prompt_embeds:
            return False
        if pooler is not None or getattr(cls, "modalities", ()) or not getattr(cls, "supports_tp", True):
            raise ValueError(f"enable_prompt_embeds: {cls.__name__} does not take prompt embeddings (pagellm takes "
                             "them for text-only generative native models).")
        if "inputs_embeds" not in inspect.signature(cls.forward).parameters or not getattr(
                cls, "embeds_prompt", True):
            raise ValueError(f"enable_prompt_embeds: {cls.__name__} computes from token ids beyond their embeddings; "
                             "it cannot take prompt embeddings.")
        return True

    def _mtp_config(self, target: ModelConfig) -> ModelConfig:
        """The MTP drafter's model (models/mtp.py): the model's own config and checkpoint, one cache layer shaped as
        the model's; a ValueError naming speculative_config where the model has no MTP layer to draft with."""
        from pagellm.models.deepseek import DeepseekV2ForCausalLM, Glm4MoeForCausalLM
        from pagellm.models.hybrid import Qwen3NextForCausalLM
        from pagellm.models.mtp import mtp_layers
        from pagellm.models.registry import get_model_class

        cls = get_model_class(target.architecture)
        if not issubclass(getattr(cls, "text_class", cls),
                          (DeepseekV2ForCausalLM, Glm4MoeForCausalLM, Qwen3NextForCausalLM)):
            raise ValueError(f"speculative_config.method 'mtp' drafts with the multi-token-prediction layer of "
                             f"DeepSeek-V3 / V3.2, GLM-4.5 / 4.7 / 5, Qwen3-Next and Qwen3.5 checkpoints; "
                             f"{target.architecture} has none that pagellm serves.")
        if mtp_layers(target.hf_config) < 1:
            raise ValueError("speculative_config.method 'mtp': this checkpoint declares no multi-token-prediction "
                             "layer (num_nextn_predict_layers / mtp_num_hidden_layers is 0).")
        if self.num_scheduler_steps > 1:
            raise ValueError("speculative_config: the MTP drafter runs one step per round: num_scheduler_steps "
                             f"must be 1, got {self.num_scheduler_steps}.")
        shapes = target.layer_kv_shapes()[-1:]
        return dataclasses.replace(target, num_layers=1, kv_layer_shapes=tuple(shapes), sliding_window=None,
                                   num_state_layers=0, state_shapes=(), state_dtypes=())  # (the layer attends)

    def _eagle_head_config(self, path: str, target: ModelConfig, kind: str):
        """An EAGLE head's transformers config, checked against the model (a ValueError naming speculative_config)."""
        from transformers import AutoConfig

        from pagellm.models.llama import LlamaForCausalLM
        from pagellm.models.registry import get_model_class

        cls = get_model_class(target.architecture)
        if not issubclass(cls, LlamaForCausalLM) or cls.forward is not LlamaForCausalLM.forward:
            raise ValueError(f"speculative_config: an {kind} head reads the hidden states of LLaMA-family models "
                             f"(LLaMA, Qwen, Mistral, GPT-OSS, DeepSeek, ...); {target.architecture} is not one.")
        if self.num_scheduler_steps > 1:
            raise ValueError(f"speculative_config: the {kind} head runs one step per round: num_scheduler_steps "
                             f"must be 1, got {self.num_scheduler_steps}.")
        if not os.path.isfile(os.path.join(path or "", "config.json")):
            raise ValueError(f"speculative_config.model: {path!r} is not a checkpoint directory (config.json).")
        return AutoConfig.from_pretrained(path)

    def _eagle_config(self, path: str, target: ModelConfig) -> ModelConfig:
        """An EAGLE-1 head's ModelConfig (its cache layers)."""
        from pagellm.models.eagle import EagleLlamaForCausalLM

        hf = self._eagle_head_config(path, target, "EAGLE")
        if hf.vocab_size != target.vocab_size or hf.hidden_size != target.hf_config.hidden_size:
            raise ValueError(f"speculative_config.model: the EAGLE head (vocabulary {hf.vocab_size}, hidden size "
                             f"{hf.hidden_size}) does not fit the model ({target.vocab_size}, "
                             f"{target.hf_config.hidden_size}).")
        geo = EagleLlamaForCausalLM.geometry(hf)
        return dataclasses.replace(target, model=path, architecture="EagleLlamaForCausalLM", hf_config=hf,
                                   num_layers=geo.num_layers, num_kv_heads=geo.num_kv_heads, head_dim=geo.head_dim,
                                   kv_shared=False, kv_layer_shapes=(), num_state_layers=0, state_shapes=(),
                                   state_dtypes=(), sliding_window=None, quantization=None)

    def _eagle3_config(self, path: str, target: ModelConfig) -> tuple[ModelConfig, tuple[int, ...]]:
        """An EAGLE-3 head's ModelConfig (its one cache layer) and the model layers it reads; a ValueError naming
        speculative_config where the pair cannot work."""
        from pagellm.models.eagle3 import Eagle3LlamaForCausalLM, aux_layer_ids

        hf = self._eagle_head_config(path, target, "EAGLE-3")
        if getattr(hf, "num_hidden_layers", 1) != 1:
            raise ValueError(f"speculative_config.model: EAGLE-3 heads have one decoder layer; this one has "
                             f"{hf.num_hidden_layers}.")
        if hf.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config.model: the EAGLE-3 head's vocabulary ({hf.vocab_size}) is not the "
                             f"model's ({target.vocab_size}).")
        geo = Eagle3LlamaForCausalLM.geometry(hf)
        aux = aux_layer_ids(hf, target.hf_config.num_hidden_layers)
        draft = dataclasses.replace(target, model=path, architecture="Eagle3LlamaForCausalLM", hf_config=hf,
                                    num_layers=1, num_kv_heads=geo.num_kv_heads, head_dim=geo.head_dim,
                                    kv_shared=False, kv_layer_shapes=((geo.num_kv_heads, geo.head_dim),),
                                    num_state_layers=0, state_shapes=(), state_dtypes=(), sliding_window=None,
                                    quantization=None)
        return draft, aux

    def _draft_model_config(self, path: str, target: ModelConfig) -> ModelConfig:
        """The draft model of speculative decoding, run like the target (dtype, load format, device) at the
        target's max_model_len; a ValueError naming speculative_config where the pair cannot work."""
        from pagellm.models.registry import get_model_class

        if target.multimodal is not None or target.pooler is not None:
            raise ValueError("speculative_config: a draft model needs a text-only generative model; "
                             f"{target.architecture} is not one.")
        if target.sliding_window is not None:
            raise ValueError("speculative_config: a draft model reads the whole context, but this model frees the "
                             f"blocks that fall behind its sliding window ({target.sliding_window} tokens).")
        if self.num_scheduler_steps > 1:
            raise ValueError("speculative_config: a draft model runs one step per round: num_scheduler_steps "
                             f"must be 1, got {self.num_scheduler_steps}.")
        args = dataclasses.replace(self, model=path, tokenizer=None, skip_tokenizer_init=True, dtype=target.dtype,
                                   max_model_len=None, runner="generate", convert="auto", pooler_config=None,
                                   quantization=None, enable_lora=False, limit_mm_per_prompt=None,
                                   mm_processor_kwargs=None, generation_config="vllm",
                                   override_generation_config=None, hf_overrides=None,
                                   tensor_parallel_size=1)  # unsharded: every rank runs the whole draft
        try:
            draft = args._model_config()
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"speculative_config.model: {e}") from None
        cls = get_model_class(draft.architecture)
        if getattr(cls, "modalities", ()):
            raise ValueError(f"speculative_config.model: {draft.architecture} is multimodal; a draft model takes "
                             "text only.")
        if draft.max_model_len < target.max_model_len:
            raise ValueError(f"speculative_config.model: the draft model's maximum length ({draft.max_model_len}) "
                             f"is below max_model_len ({target.max_model_len}).")
        if draft.vocab_size < target.vocab_size:
            raise ValueError(f"speculative_config.model: the draft model's vocabulary ({draft.vocab_size} tokens) is "
                             f"smaller than the model's ({target.vocab_size}); it must embed every token the model "
                             "may produce (a draft model shares the model's tokenizer).")
        if draft.stateful:
            raise ValueError(f"speculative_config.model: {draft.architecture} keeps a recurrent state per sequence "
                             "(Mamba layers); a draft model must be attention-only (its cache follows the target's "
                             "blocks).")
        if draft.sliding_window is not None and draft.sliding_window < target.max_model_len:
            raise ValueError(f"speculative_config.model: the draft model has a sliding window "
                             f"({draft.sliding_window}); a draft model must read the whole context.")
        return dataclasses.replace(draft, max_model_len=target.max_model_len)

    def _multimodal_config(self, cls, hf) -> MultiModalConfig | None:
        """A multimodal architecture's placeholder, its image size in tokens and the per-prompt limits (ValueError
        naming the flag); None for a text-only model, which refuses the multimodal flags."""
        modalities = getattr(cls, "modalities", ())
        if not modalities:
            for name in ("limit_mm_per_prompt", "mm_processor_kwargs"):
                if getattr(self, name):
                    raise ValueError(f"{name} applies to multimodal models; {cls.__name__} takes text only.")
            return None
        limits = {m: 999 for m in modalities}
        for m, n in (self.limit_mm_per_prompt or {}).items():
            if m not in limits:
                raise ValueError(f"limit_mm_per_prompt: {cls.__name__} takes {', '.join(modalities)}, not {m!r}.")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"limit_mm_per_prompt[{m!r}] must be an integer >= 0, got {n!r}.")
            limits[m] = n
        if hasattr(cls, "rope_positions") and self.num_scheduler_steps > 1:
            raise ValueError(f"{cls.__name__} (multimodal RoPE) runs one decode step per round: num_scheduler_steps "
                             f"must be 1, got {self.num_scheduler_steps}.")
        path = self.allowed_local_media_path or None
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"allowed_local_media_path {path!r} is not a directory.")
        kwargs = self.mm_processor_kwargs or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"mm_processor_kwargs must be a dict (JSON object), got {type(kwargs).__name__}.")
        return MultiModalConfig(cls.placeholder_id(hf), cls.image_tokens(hf), limits,
                                os.path.realpath(path) if path else None, dict(kwargs))

    def _runner(self, path: str, hf) -> tuple[str, Any]:
        """The native architecture that runs the checkpoint, and the pooler when it runs as a pooling model."""
        from pagellm.models.pooling import make_pooler_config, pooling_task_of
        from pagellm.models.registry import FALLBACK, MODELS, POOLING_MODELS, get_model_class, resolve_architecture

        if self.runner not in ("auto", "generate", "pooling"):
            raise ValueError(f"runner must be auto, generate or pooling, got {self.runner!r}.")
        if self.model_impl not in ("auto", "pagellm", "transformers"):
            raise ValueError(f"model_impl must be auto, pagellm or transformers, got {self.model_impl!r}.")
        if self.convert not in ("auto", "none", "embed", "classify"):
            raise ValueError(f"convert must be auto, none, embed or classify, got {self.convert!r}.")
        archs = list(getattr(hf, "architectures", None) or [])
        declared = next((t for t in map(pooling_task_of, archs) if t), None)
        encoder = next((a for a in archs if a in POOLING_MODELS), None)  # served as a pooling model only
        runner = self.runner if self.runner != "auto" else ("pooling" if declared or encoder else "generate")
        if runner == "generate":
            if self.pooler_config is not None or self.convert not in ("auto", "none"):
                raise ValueError("pooler_config and convert need runner pooling (--runner pooling).")
            if declared or encoder:
                raise ValueError(f"{archs} is a pooling architecture ({declared}); it cannot run with "
                                 "runner='generate'.")
            return resolve_architecture(archs, hf, self.model_impl), None
        if self.model_impl == "transformers":
            raise ValueError("pooling models run on pagellm's native models: model_impl='transformers' needs runner "
                             "generate.")
        task = self.convert if self.convert in ("embed", "classify") else (declared or "embed")
        if encoder is not None:
            arch = encoder
        else:
            from pagellm.models.transformers_fallback import hf_causal_lm_class

            causal = hf_causal_lm_class(hf)
            candidates = [a for a in archs if not pooling_task_of(a)] + ([causal.__name__] if causal else [])
            arch = next((a for a in candidates if a in MODELS and a != FALLBACK), None)
            if arch is None:
                raise ValueError(f"pooling models run on pagellm's native models; {archs} (model_type "
                                 f"{getattr(hf, 'model_type', None)!r}) has none.")
        if getattr(get_model_class(arch), "modalities", ()):
            raise ValueError(f"{arch} is a multimodal model; pagellm serves it as a generative model only "
                             "(runner generate).")
        default_type = getattr(get_model_class(arch), "default_pooling_type", "LAST")
        return arch, make_pooler_config(path, hf, task, self.pooler_config, default_type)


def lora_modules(entries: list) -> tuple:
    """`--lora-modules name=path | {"name": ..., "path": ...} ...` as LoRARequests with ids 1..N."""
    from pagellm.lora.request import LoRARequest

    out: list[LoRARequest] = []
    for entry in entries:
        if isinstance(entry, str) and entry.lstrip().startswith("{"):
            try:
                entry = json.loads(entry)
            except json.JSONDecodeError as e:
                raise ValueError(f"lora_modules: {entry!r} is not JSON: {e}") from None
        if isinstance(entry, dict):
            name, path = entry.get("name"), entry.get("path")
        elif isinstance(entry, str) and "=" in entry:
            name, path = entry.split("=", 1)
        else:
            raise ValueError(f"lora_modules: expected name=path or {{\"name\": ..., \"path\": ...}}, got {entry!r}.")
        if not name or not path:
            raise ValueError(f"lora_modules: {entry!r} needs a name and a path.")
        if any(m.lora_name == name for m in out):
            raise ValueError(f"lora_modules: the name {name!r} is given twice.")
        out.append(LoRARequest(name, len(out) + 1, path))
    return tuple(out)


def speculative_config(spec: dict | None) -> SpeculativeConfig | None:
    """`--speculative-config` as a SpeculativeConfig (vLLM's fields and defaults), or a ValueError naming the field.
    A draft model's ModelConfig is added by EngineArgs (`_draft_model_config`), which knows the target's."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"speculative_config must be a dict (JSON object), got {type(spec).__name__}.")
    fields = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
              "draft_tensor_parallel_size", "disable_by_batch_size")
    unknown = sorted(set(spec) - set(fields))
    if unknown:
        raise ValueError(f"speculative_config: unknown fields {unknown}; it takes {', '.join(fields)}.")
    model = spec.get("model")
    method = spec.get("method")
    if method is None:  # vLLM infers it from the model: "ngram" names the method, a path a draft model
        method = "ngram" if model in (None, "ngram", "[ngram]") else "draft_model"
    if method == "[ngram]":
        method = "ngram"
    if method in ("deepseek_mtp", "glm4_moe_mtp", "qwen3_next_mtp", "qwen3_5_mtp"):  # vLLM's per-family names
        method = "mtp"
    if method not in ("ngram", "draft_model", "mtp", "eagle", "eagle3"):
        raise ValueError(f"speculative_config.method must be 'ngram', 'draft_model', 'mtp', 'eagle' or 'eagle3' "
                         f"(pagellm has no Medusa heads), got {method!r}.")
    k = spec.get("num_speculative_tokens")
    if k is None:
        raise ValueError("speculative_config.num_speculative_tokens is required (draft tokens per step).")
    _positive("speculative_config.num_speculative_tokens", k)
    off = spec.get("disable_by_batch_size")
    if off is not None and (not isinstance(off, int) or isinstance(off, bool) or off < 2):
        raise ValueError(f"speculative_config.disable_by_batch_size must be an integer >= 2 (the running requests "
                         f"above which steps go without drafts), got {off!r}.")
    if method in ("eagle", "eagle3"):
        head = "EAGLE-3" if method == "eagle3" else "EAGLE"
        if not isinstance(model, str) or not model:
            raise ValueError(f"speculative_config.model must be the {head} head's directory, got {model!r}.")
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            if name in spec:
                raise ValueError(f"speculative_config.{name} applies to method 'ngram', not '{method}'.")
        if spec.get("draft_tensor_parallel_size", 1) != 1:
            raise ValueError("speculative_config.draft_tensor_parallel_size must be 1 (the head runs unsharded).")
        return SpeculativeConfig(method, k, model=model, disable_by_batch_size=off)
    if method == "draft_model":
        if not isinstance(model, str) or not model:
            raise ValueError("speculative_config.model must be the draft checkpoint's directory for method "
                             f"'draft_model', got {model!r}.")
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            if name in spec:
                raise ValueError(f"speculative_config.{name} applies to method 'ngram', not 'draft_model'.")
        tp = spec.get("draft_tensor_parallel_size", 1)
        if tp != 1:
            raise ValueError(f"speculative_config.draft_tensor_parallel_size must be 1 (the draft model runs "
                             f"unsharded), got {tp!r}.")
        return SpeculativeConfig("draft_model", k, model=model, disable_by_batch_size=off)
    if method == "mtp":
        for name in ("model", "prompt_lookup_max", "prompt_lookup_min", "draft_tensor_parallel_size"):
            if spec.get(name) is not None:
                raise ValueError(f"speculative_config.{name} does not apply to method 'mtp' (the model's own "
                                 "multi-token-prediction layer drafts, sharded as the model).")
        return SpeculativeConfig("mtp", k, disable_by_batch_size=off)
    if "draft_tensor_parallel_size" in spec:
        raise ValueError("speculative_config.draft_tensor_parallel_size applies to method 'draft_model'.")
    lo, hi = spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")
    for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
        if v is not None:
            _positive(f"speculative_config.{name}", v)
    if lo is None and hi is None:
        lo = hi = 5
    lo = hi if lo is None else lo
    hi = lo if hi is None else hi
    if lo > hi:
        raise ValueError(f"speculative_config.prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi}).")
    return SpeculativeConfig("ngram", k, hi, lo, disable_by_batch_size=off)


def _is_eagle3(path: str | None) -> bool:
    """Whether a draft checkpoint is an EAGLE-3 head (its config's architectures)."""
    import json

    from pagellm.models.eagle3 import ARCHITECTURES

    try:
        with open(os.path.join(path or "", "config.json")) as f:
            return bool(set(json.load(f).get("architectures") or ()) & set(ARCHITECTURES))
    except (OSError, ValueError):
        return False


GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def generation_defaults(model: str, source: str, override: dict | None = None) -> dict[str, Any]:
    """The sampling defaults of `--generation-config SOURCE` with `--override-generation-config` on top, by
    SamplingParams' names (max_new_tokens -> max_tokens). Like vLLM: transformers' GenerationConfig reads the
    file, and only the values it holds that differ from transformers' defaults count."""
    from transformers import GenerationConfig

    if override is not None and not isinstance(override, dict):
        raise ValueError(f"override_generation_config must be a dict, got {type(override).__name__}.")
    unknown = sorted(set(override or {}) - set(GENERATION_CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"override_generation_config: unknown fields {unknown}; it takes "
                         f"{', '.join(GENERATION_CONFIG_FIELDS)}.")
    values: dict[str, Any] = {}
    if source != "vllm":
        folder = model if source == "auto" else source
        file = os.path.join(folder, "generation_config.json")
        if source != "auto" and not os.path.isfile(file):
            raise FileNotFoundError(f"generation_config: {file} does not exist (give auto, vllm or a directory "
                                    "with a generation_config.json).")
        if os.path.isfile(file):
            try:
                values = GenerationConfig.from_pretrained(folder).to_diff_dict()
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {file}: {e}") from None
    values.update(override or {})
    out = {k: values[k] for k in GENERATION_CONFIG_FIELDS if values.get(k) is not None}
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    if out:
        from pagellm.sampling_params import SamplingParams

        try:
            SamplingParams(**out)
        except ValueError as e:
            raise ValueError(f"the default sampling parameters from the generation config ({source}) are "
                             f"invalid: {e}") from None
        logger.info("default sampling parameters from the generation config (%s): %s; requests that leave these "
                    "unset get them (--generation-config vllm: SamplingParams' own defaults)", source, out)
    return out


def apply_hf_overrides(config, overrides: dict) -> None:
    """--hf-overrides into a transformers config: each key replaces the config's value, except a JSON object given
    for a nested config (updated key by key, recursively) or for a dict (merged)."""
    if not isinstance(overrides, dict):
        raise ValueError(f"hf_overrides must be a JSON object, got {overrides!r}.")
    for key, value in overrides.items():
        current = getattr(config, key, None)
        if isinstance(value, dict) and hasattr(current, "to_dict"):
            apply_hf_overrides(current, value)
        elif isinstance(value, dict) and isinstance(current, dict):
            setattr(config, key, {**current, **value})
        else:
            setattr(config, key, value)
    logger.info("config.json overridden by hf_overrides: %s", overrides)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _positive(name: str, v: int) -> None:
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}.")


def _derived_max_len(hf) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(hf, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16), per /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _resolve_dtype(dtype: str, hf, device: str, native_bf16: bool | None = None) -> str:
    """The compute dtype for `--dtype`: explicit, or from the checkpoint (`auto`).

    On CPU a 16-bit checkpoint runs in bfloat16 where the CPU has bf16 matrix instructions (fp16
    has no fast CPU path), and in float32 elsewhere (emulated bf16 is slower than fp32).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    if dtype != "auto":
        return dtype
    ckpt = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    name = str(ckpt).replace("torch.", "") if ckpt is not None else "float32"
    if name not in DTYPES:
        name = "float32"
    if device == "cpu" and name in ("float16", "bfloat16"):
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        chosen = "bfloat16" if native else "float32"
        logger.info("dtype auto: %s checkpoint runs in %s on this CPU (%s)", name, chosen,
                    "native bf16 instructions" if native else "no native bf16 instructions")
        name = chosen
    return name


def _eos_ids(path: str, hf) -> frozenset[int]:
    ids: set[int] = set()

    def add(v: Any) -> None:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(x for x in v if isinstance(x, int))

    add(getattr(hf, "eos_token_id", None))
    gen = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen) as f:
            add(json.load(f).get("eos_token_id"))
    return frozenset(ids)
