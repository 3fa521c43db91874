"""Engine configuration: frozen dataclasses, built once by `EngineArgs.create_engine_config()`.

Pure Python (the scheduler imports it): dtypes are strings here and become
torch dtypes in the worker.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


def import_by_name(spec: str, what: str) -> Any:
    """The object a "module.Name" (or "module:Name") names; a ValueError naming `what` when it cannot be imported."""
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{what} {spec!r} cannot be imported: {e}") from None

@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a model's KV cache, as the model class reports it (`cls.geometry(hf_config)`)."""

    num_layers: int
    num_kv_heads: int  # K/V heads per layer (1 for multi-query attention)
    head_dim: int
    sliding_windows: tuple[int | None, ...] = ()  # per layer: keys a query sees, None = the whole context
    kv_shared: bool = False  # V is K: one cache tensor per layer (MLA's latent cache, DeepSeek)
    # Per cache layer (K/V heads, head_dim) where they differ between layers (Gemma 4's global layers); empty: every
    # layer has num_kv_heads x head_dim.
    kv_layer_shapes: tuple[tuple[int, int], ...] = ()
    # Layers that carry a recurrent state per sequence instead of a KV cache (Mamba): how many, and the shapes of one
    # layer's state tensors for one sequence (Mamba2: the convolution's last inputs, the SSM state). num_layers
    # counts the attention layers only.
    num_state_layers: int = 0
    state_shapes: tuple[tuple[int, ...], ...] = ()
    state_dtypes: tuple[str | None, ...] = ()  # per state tensor: a dtype name, or None (the compute dtype)

    def kv_sliding_window(self, max_model_len: int) -> int | None:
        """The window after which a token's K/V is dead in every layer (blocks may be freed), else None."""
        windows = self.sliding_windows
        if not windows or any(w is None for w in windows):
            return None
        window = max(windows)
        return window if window < max_model_len else None


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling model (`runner="pooling"`) turns a prompt's hidden states into its output (vLLM's
    `pooler_config`, read from sentence-transformers' modules.json when the checkpoint has one)."""

    task: str  # embed | classify | token_classify: what the model serves (the architecture, or --convert)
    hidden_size: int  # features of an embedding
    pooling_type: str = "LAST"  # LAST | MEAN | CLS: the prompt token(s) whose hidden states are pooled
    normalize: bool = True  # embed: L2-normalize, unless the request says otherwise
    use_activation: bool = True  # classify: softmax (sigmoid with one label), unless the request says otherwise
    dimensions: int | None = None  # embed: the first `dimensions` features by default (Matryoshka models)
    matryoshka: tuple[int, ...] | bool = False  # dimensions a request may ask for: True = any, a tuple = those
    labels: tuple[str, ...] = ()  # classify: the class names (config.json's id2label), one per class


@dataclass(frozen=True)
class MultiModalConfig:
    """A model whose prompts may carry images (vLLM's multimodal config). An image fills `image_tokens` prompt
    positions, each holding the placeholder token `placeholder_id`: the prompt names where each image goes with one
    placeholder, which pagellm expands."""

    placeholder_id: int  # config.image_token_index
    image_tokens: int  # positions one image fills (its features)
    limit_per_prompt: dict[str, int] = field(default_factory=dict)  # modality -> most items in one prompt
    allowed_local_media_path: str | None = None  # file:// image URLs are read only under this directory
    processor_kwargs: dict[str, Any] = field(default_factory=dict)  # for the image processor (--mm-processor-kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """The checkpoint and how to run it."""

    model: str  # local directory with config.json, weights and tokenizer
    tokenizer: str | None  # tokenizer directory (defaults to model); None = run on token ids only
    architecture: str  # the HF architecture name served (config.architectures[0])
    hf_config: Any = field(compare=False, repr=False)  # transformers.PretrainedConfig
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    max_model_len: int = 1024  # prompt + output tokens per sequence
    vocab_size: int = 0
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    kv_shared: bool = False  # V is K: each layer caches one tensor (multi-head latent attention)
    kv_layer_shapes: tuple[tuple[int, int], ...] = ()  # per cache layer (K/V heads, head_dim) where they differ
    num_state_layers: int = 0  # layers with a recurrent state per sequence (Mamba; ModelGeometry)
    state_shapes: tuple[tuple[int, ...], ...] = ()  # one such layer's state tensors, for one sequence
    state_dtypes: tuple[str | None, ...] = ()  # their dtypes (None or missing: the compute dtype)
    sliding_window: int | None = None  # every layer's window is at most this: older K/V blocks are freed
    eos_token_ids: frozenset[int] = frozenset()  # from generation_config.json, config.json and the tokenizer
    load_format: str = "auto"  # auto | safetensors | pt | dummy
    seed: int = 0  # engine seed: dummy weights and the seeds of requests that give none
    served_model_name: str = ""  # the name the server answers to
    max_logprobs: int = 20  # largest logprobs / prompt_logprobs a request may ask for (-1: no cap)
    quantization: str | None = None  # int8 (at load time) | gptq | awq (4-bit checkpoints); None: dense
    # Sampling defaults for what a request leaves unset (SamplingParams names: temperature, top_p, top_k, min_p,
    # repetition_penalty, max_tokens), from the generation config (--generation-config); empty: SamplingParams'.
    default_sampling: dict[str, Any] = field(default_factory=dict, compare=False)
    pooler: PoolerConfig | None = None  # a pooling model (embeddings, classification); None: generative
    multimodal: MultiModalConfig | None = None  # a model that takes images (LLaVA); None: text only
    prompt_embeds: bool = False  # enable_prompt_embeds: prompts may come as embeddings (tokens, hidden)
    logits_processors: tuple = ()  # custom logits processors: "module:Class" names, or classes (offline)

    def layer_kv_shapes(self) -> list[tuple[int, int]]:
        """(K/V heads, head_dim) of each cache layer (this rank's heads)."""
        return list(self.kv_layer_shapes) or [(self.num_kv_heads, self.head_dim)] * self.num_layers

    @property
    def stateful(self) -> bool:
        """Some layers keep a recurrent state per sequence (a hybrid of attention and Mamba layers)."""
        return self.num_state_layers > 0


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16  # token slots per block
    kv_cache_memory: int | None = None  # bytes for K and V of all layers; None = a fraction of free memory
    kv_cache_memory_fraction: float = 0.25  # of available memory, when kv_cache_memory is None
    kv_cache_dtype: str = "auto"  # auto (= compute dtype) | float32 | bfloat16 | float16
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # fixed block count (tests); overrides the memory budget
    # Models with a recurrent state (Mamba layers) under prefix caching: the state is checkpointed every
    # mamba_block_size tokens (a multiple of block_size) into one of num_state_checkpoints slots.
    mamba_block_size: int = 0
    num_state_checkpoints: int = 0


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (`--speculative-config`, vLLM's names). method "ngram": the draft tokens are the ones
    that followed the latest earlier occurrence of the sequence's last n tokens (prompt lookup), n from
    prompt_lookup_max down to prompt_lookup_min. method "draft_model": a smaller model with the same tokenizer
    (`model`, its ModelConfig in `draft`) proposes them greedily, one forward pass per draft token. Either way
    the model checks them all in one step."""

    method: str = "ngram"  # ngram | draft_model | mtp (the model's own multi-token-prediction layer: models/mtp.py)
    # | eagle3 (an EAGLE-3 head in `model`, reading the model's hidden states: models/eagle3.py)
    # | eagle (an EAGLE-1 head in `model`, reading the model's last hidden state: models/eagle.py)
    num_speculative_tokens: int = 3  # draft tokens per sequence and step
    prompt_lookup_max: int = 5  # longest n-gram matched
    prompt_lookup_min: int = 5  # shortest n-gram matched
    model: str | None = None  # draft_model: the draft checkpoint's directory
    draft: ModelConfig | None = field(default=None, compare=False, repr=False)  # draft_model: how it runs
    disable_by_batch_size: int | None = None  # no drafts in a step while more requests than this are running
    aux_layers: tuple[int, ...] = ()  # eagle3: the model layers whose input the head reads


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens computed in one step (prefill chunks + decodes)
    max_model_len: int = 1024
    max_waiting_requests: int | None = None  # the server answers 429 beyond this queue length
    async_scheduling: bool = False  # schedule step N+1 while step N runs (one device)
    num_scheduler_steps: int = 1  # decode steps the device runs per scheduling round (multi-step decode)
    policy: str = "fcfs"  # fcfs | priority (Request.priority, lower first; may preempt lower priorities)
    speculative: SpeculativeConfig | None = None  # speculative decoding (draft tokens checked in one step)
    chunked_prefill: bool = True  # False (encoder-only models): a prompt is computed whole in one step


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is sharded and replicated."""

    tensor_parallel_size: int = 1  # ranks one model is sharded over (one process each)
    distributed_executor_backend: str = "mp"  # mp: local worker processes | ray: Ray actors (multi-node)
    data_parallel_size: int = 1  # engine replicas behind one server, each with its own KV cache
    distributed_timeout_s: float = 60.0  # a collective waiting longer on a peer fails (dead or stuck worker)
    enable_expert_parallel: bool = False  # MoE: each rank holds whole experts (E / tp of them), not I / tp of all
    worker_extension_cls: str | None = None  # "module.Class" whose methods every rank's worker gains (collective_rpc)
    pipeline_parallel_size: int = 1  # stages the decoder layers are split over, each tensor_parallel_size ranks

    @property
    def world_size(self) -> int:
        """Worker processes of one engine (rank 0 is the engine's own)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"  # cpu | cuda
    num_threads: int | None = None  # torch intra-op threads on CPU; None = leave torch's default
    attention_backend: str = "auto"  # auto | torch_ref | cpu_paged (C++ kernel) | triton_paged (CUDA)
    enforce_eager: bool = False  # CUDA: no CUDA graphs
    enable_sleep_mode: bool = False  # sleep() / wake_up() may free and take back the weights' and caches' memory


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters served beside the base model (`--enable-lora`, vLLM's names)."""

    max_loras: int = 1  # distinct adapters in one step (requests of other adapters wait)
    max_lora_rank: int = 16  # largest rank an adapter may have
    modules: tuple = ()  # LoRARequests loaded at start-up (--lora-modules), ids 1..N: the server's adapter names
    max_cpu_loras: int | None = None  # adapters kept loaded in host memory (LRU; evicted ones reload on demand)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: DeviceConfig
    lora: LoRAConfig | None = None  # None: no adapters
