"""What every pagellm model class declares; the loader, the KV cache and the registry read it.

    cls(hf_config, max_model_len, tp)             the model, holding only this rank's shard of every layer
    cls.geometry(hf_config, tp_size) -> ModelGeometry    layers, K/V heads per rank, head_dim, windows
    model.load_checkpoint(dir, load_format)       the weights (default: load_weights over the checkpoint's tensors)
    model.materialize()                           before dummy weights (a model built on the meta device)
    model.after_load()                            once the weights are final, cast and on the device
    model.bind_states(states)                     a hybrid's recurrent state tensors (Mamba layers), once
    keep_float32 = (".mlp.gate.weight", ...)      parameters the cast to the compute dtype leaves in float32
    model.map_weight(checkpoint name) -> (parameter name, shard id) | None
    model.forward(input_ids, positions, kv_caches, meta, backend) -> hidden (T, hidden)
        (supports_pp: a pipeline stage after the first takes `intermediate=` hidden states in place of the
        embeddings; one before the last returns its last layer's output)
    model.compute_logits(hidden (N, hidden)) -> (N, vocab) float32

A model keeps Hugging Face's module names, so most checkpoint names are its own
parameter names. What differs is declared, not coded in the loader:
    packed_modules = {"q_proj": ("qkv_proj", 0), ...}   HF part -> (our packed module, shard id)
    skip_weights = ("rotary_emb.inv_freq", ...)           checkpoint tensors that are not parameters
    hf_name(name) -> str | None                           a rename, or None to skip
How a tensor lands in its parameter (a part of a packed matrix, an expert, a transpose)
is the parameter's own `weight_loader` (layers.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagellm.config import ModelGeometry
from pagellm.models.layers import layer_sliding_window
from pagellm.models.parallel_layers import SINGLE, VocabParallelEmbedding, kv_heads_per_rank, parallel_logits


class CausalLM(nn.Module):
    packed_modules: dict[str, tuple[str, Any]] = {}
    skip_weights: tuple[str, ...] = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
    supports_tp = True  # built from the parallel layers: can be sharded over tensor_parallel_size ranks
    # builds only its pipeline stage's layers (tp.pp) and takes `intermediate` hidden states in forward
    supports_pp = False
    keep_float32: tuple[str, ...] = ()  # name suffixes of parameters kept in float32 (DeepSeek's routers)
    # load_weights may write the live parameters (weight updates): after_load can run again on new weights
    updatable_in_place: bool = True

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        """This rank's K/V cache geometry; models whose attention differs override `kv_heads`."""
        heads = config.num_attention_heads
        layers = config.num_hidden_layers
        if heads % tp_size:
            raise ValueError(f"{heads} attention heads do not split over tensor_parallel_size={tp_size}")
        return ModelGeometry(
            num_layers=layers,
            num_kv_heads=kv_heads_per_rank(cls.kv_heads(config), tp_size),
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            sliding_windows=tuple(layer_sliding_window(config, i) for i in range(layers)),
        )

    @classmethod
    def kv_heads(cls, config) -> int:
        """K/V heads of the whole model."""
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def hf_name(self, name: str) -> str | None:
        return name

    def prompt_embeds(self, x: torch.Tensor) -> torch.Tensor:
        """A prompt's embeddings (enable_prompt_embeds) as they take the place of `embed`'s rows: what transformers'
        forward does to inputs_embeds (nothing, unless a model scales them: Granite)."""
        return x

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        """Checkpoint tensor name -> (parameter name, shard id), or None to skip it."""
        if any(s in name for s in self.skip_weights):
            return None
        renamed = self.hf_name(name)
        if renamed is None:
            return None
        parts = renamed.split(".")
        if len(parts) >= 2 and parts[-2] in self.packed_modules:
            target, shard = self.packed_modules[parts[-2]]
            return ".".join(parts[:-2] + [target, parts[-1]]), shard
        return renamed, None

    def load_checkpoint(self, model_dir: str, load_format: str) -> None:
        """The checkpoint's weights, each through its parameter's loader (the transformers fallback overrides)."""
        from pagellm.models.loader import iterate_weights, load_weights

        load_weights(self, iterate_weights(model_dir, load_format))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's model API for weight updates: checkpoint-named tensors (some or all of them) copied into the live
        parameters through their weight loaders, each rank its slice. Returns the names of the parameters written.
        The caller runs after_load() once the update is complete (ModelRunner.update_weights)."""
        if not self.updatable_in_place:
            raise ValueError(f"{type(self).__name__} derives its attention weights at load (absorbed into the latent "
                             "attention); its weights are not updated in place: reload_weights(model_dir) reads a "
                             "checkpoint.")
        from pagellm.models.loader import load_weights

        return load_weights(self, weights, update=True)

    def materialize(self) -> None:
        """Real tensors for load_format="dummy" (nothing to do unless the model was built on the meta device)."""

    def after_load(self) -> None:
        """Work on the final weights (in the compute dtype, on the device): nothing by default."""

    def bind_states(self, states: list[tuple[torch.Tensor, ...]]) -> None:
        """A model whose geometry has state layers (Mamba) takes their recurrent state tensors, one tuple per layer,
        each (max_num_seqs, *shape): a sequence's row is meta.state_rows."""
        raise NotImplementedError(f"{type(self).__name__} keeps no recurrent state")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RecurrentLM(CausalLM):
    """What the models with recurrent layers (Mamba, Gated DeltaNet, short convolutions) share: the recurrent state
    tensors (bind_states), an LM head tied to the embeddings or not, checkpoint names without the tied head and the
    multi-token-prediction layers ("mtp."), and, with backbone_names, transformers' module names ("model.") read as
    the checkpoints' ("backbone.")."""

    backbone_names = False

    def init_lm_head(self, config, embed_tokens: nn.Module, tp) -> None:
        self.config, self.tp = config, tp
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)  # the LM head's rows
        if self.tied:
            self.lm_head.weight = embed_tokens.weight
        self.states: list[tuple[torch.Tensor, ...]] = []

    def bind_states(self, states: list[tuple[torch.Tensor, ...]]) -> None:
        self.states = states

    def hf_name(self, name: str) -> str | None:
        if self.tied and name == "lm_head.weight" or name.startswith("mtp."):
            return None
        if self.backbone_names and name.startswith("model."):  # transformers' module names (LoRA adapters)
            return "backbone." + name.removeprefix("model.")
        return name

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return parallel_logits(hidden, self.lm_head.weight, self.config.vocab_size, self.tp)


class LanguageModelOnly(CausalLM):
    """A multimodal checkpoint served for its text: the language model alone (`text_class` on config.text_config), the
    vision encoder neither built nor loaded, so prompts with images are refused. `prefixes` map the checkpoint's
    names of the language model's weights to the language model's own ("model.language_model." -> "model."); other
    weights (the vision tower, the projector, multi-token-prediction layers) are skipped."""

    text_class: type[CausalLM]
    prefixes: tuple[tuple[str, str], ...] = ()

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        return cls.text_class.geometry(config.text_config, tp_size)

    def __init__(self, config, max_model_len: int, tp=SINGLE) -> None:
        super().__init__()
        self.config = config
        self.language_model = self.text_class(config.text_config, max_model_len, tp)

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        for ckpt, ours in self.prefixes:
            if name.startswith(ckpt):
                target = self.language_model.map_weight(ours + name[len(ckpt):])
                return None if target is None else ("language_model." + target[0], target[1])
        return None

    def bind_states(self, states: list[tuple[torch.Tensor, ...]]) -> None:
        self.language_model.bind_states(states)

    def after_load(self) -> None:
        self.language_model.after_load()

    @property
    def updatable_in_place(self) -> bool:
        return self.language_model.updatable_in_place

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend) -> torch.Tensor:
        return self.language_model(input_ids, positions, kv_caches, meta, backend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden)


class VisionLanguageModel(CausalLM):
    """A vision encoder in front of a native decoder (`self.language_model`, any class whose forward takes
    `inputs_embeds`). Subclasses build both and declare how images become features (models/llava.py,
    models/qwen2_vl.py; the contract is in docs/ARCHITECTURE.md, "Multimodal models")."""

    modalities = ("image",)  # what a prompt may carry besides text
    language_model: nn.Module

    def _language(self, name: str) -> tuple[str, Any] | None:
        """A checkpoint name of the decoder (its own naming: "model.layers.0...", "lm_head.weight") -> ours."""
        target = self.language_model.map_weight(name)
        return None if target is None else ("language_model." + target[0], target[1])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed(input_ids)

    def after_load(self) -> None:
        self.language_model.after_load()

    @property
    def updatable_in_place(self) -> bool:
        return self.language_model.updatable_in_place

    def bind_states(self, states: list[tuple[torch.Tensor, ...]]) -> None:
        self.language_model.bind_states(states)  # a hybrid decoder's recurrent states (Qwen3.5)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta, backend,
                mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`mm_embeds`: (batch indices, features) of this step's image positions, put in place of their embeddings."""
        x = self.embed(input_ids)
        if mm_embeds is not None:
            index, features = mm_embeds
            x = x.index_copy(0, index, features.to(x.dtype))
        return self.language_model(input_ids, positions, kv_caches, meta, backend, inputs_embeds=x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden)


def images_attend_both_ways(cls, hf_config) -> bool:
    """A multimodal class's `bidirectional_images`: a flag (Gemma 3) or a classmethod of the config (Gemma 4, whose
    larger models only)."""
    flag = getattr(cls, "bidirectional_images", False)
    return bool(flag(hf_config) if callable(flag) else flag)


def text_model_class(config) -> type[CausalLM]:
    """pagellm's native class for the language model of a multimodal config (ValueError when there is none, or when
    it cannot take image features in place of token embeddings)."""
    from pagellm.models.registry import FALLBACK, MODELS, get_model_class
    from pagellm.models.transformers_fallback import hf_causal_lm_class

    text = config.text_config
    names = list(getattr(text, "architectures", None) or [])
    hf_cls = hf_causal_lm_class(text)
    names += [hf_cls.__name__] if hf_cls is not None else []
    arch = next((a for a in names if a in MODELS and a != FALLBACK), None)
    if arch is None:
        raise ValueError(f"the language model of this multimodal checkpoint (model_type "
                         f"{getattr(text, 'model_type', None)!r}) has no native implementation in pagellm.")
    cls = get_model_class(arch)
    if "inputs_embeds" not in inspect.signature(cls.forward).parameters:
        raise ValueError(f"{arch} cannot serve as the language model of a multimodal checkpoint in pagellm "
                         "(it takes token ids only).")
    return cls


class TowerProjectorLayout:
    """Checkpoint names of a `vision_tower` (a transformers vision model), a `multi_modal_projector` and a
    `language_model` (LLaVA, Gemma 3), in the hub's layout ("language_model.model.*", "language_model.lm_head.*",
    "vision_tower.vision_model.*", "multi_modal_projector.*") and in transformers 5's ("model.language_model.*",
    "lm_head.*", "model.vision_tower.*"). Newer transformers' vision models hold their layers directly, where older
    checkpoints name them under "vision_model.": a name is matched to the module's own."""

    vision_tower: nn.Module

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        """The language model's cache geometry (the tower keeps no cache)."""
        return text_model_class(config).geometry(config.text_config, tp_size)

    def init_parts(self, config, max_model_len: int, tp, projector: nn.Module) -> None:
        """The language model (pagellm's native class for config.text_config, sharded over `tp`), transformers'
        vision model for config.vision_config (SDPA attention) and the projector, as `language_model`,
        `vision_tower` and `multi_modal_projector`."""
        from transformers import AutoModel

        self.config = config
        self.language_model = text_model_class(config)(config.text_config, max_model_len, tp)
        vision = config.vision_config
        vision._attn_implementation = "sdpa"
        self.vision_tower = AutoModel.from_config(vision)
        self.multi_modal_projector = projector

    def feature_layers(self, out) -> list[torch.Tensor]:
        """The vision tower's hidden states of config.vision_feature_layer (one index, or a list: concatenated)."""
        layers = self.config.vision_feature_layer
        return [out.hidden_states[i] for i in (layers if isinstance(layers, (list, tuple)) else [layers])]

    @staticmethod
    def tower_pixels(config, pixels: torch.Tensor) -> Any:
        """Pixel values (..., 3, S, S) of a tower that takes S x S images, as a float32 numpy array (it crosses
        process pipes by value, where a torch tensor would go through shared memory); ValueError for another size."""
        size = config.vision_config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"the image processor made {tuple(pixels.shape[-2:])} pixels; the vision tower takes "
                             f"{size} x {size}.")
        return pixels.float().numpy().copy()

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        for prefix in ("model.", ""):
            if name.startswith(prefix + "language_model."):
                rest = name[len(prefix + "language_model."):]
                if prefix == "model.":
                    rest = "model." + rest  # transformers 5: model.language_model.layers.* -> model.layers.*
                return self._language(rest)
        if name.startswith("lm_head."):
            return self._language(name)
        if name.startswith("model."):
            name = name[len("model."):]
        if name.startswith("vision_tower."):
            rest = name[len("vision_tower."):]
            names = self.__dict__.get("_vision_names")
            if names is None:
                names = self.__dict__["_vision_names"] = {n for n, _ in self.vision_tower.named_parameters()}
            if rest not in names and rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            elif rest not in names and "vision_model." + rest in names:
                rest = "vision_model." + rest
            if rest.endswith("position_ids"):
                return None
            return "vision_tower." + rest, None
        if name.startswith("multi_modal_projector."):
            return name, None
        return None  # (e.g. image_newline of LLaVA-NeXT checkpoints, which its class maps itself)
