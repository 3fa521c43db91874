"""Hugging Face architecture name -> pagellm model class, imported lazily, with what each one uses.

    resolve_architecture(config.architectures) -> the first name pagellm runs natively, else
        the transformers fallback (models/transformers_fallback.py) when transformers can build it
    get_model_class(name) -> the class (imported only now)
    model_table() -> rows for `pagellm list-models`
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

FALLBACK = "TransformersForCausalLM"  # pseudo-architecture: any causal LM transformers builds


@dataclass(frozen=True)
class ModelEntry:
    target: str  # "module:Class"
    features: tuple[str, ...]  # what the implementation covers, for the model table
    example: str = ""  # a checkpoint family users know


MODELS: dict[str, ModelEntry] = {
    "GPT2LMHeadModel": ModelEntry("pagellm.models.gpt2:GPT2LMHeadModel", ("learned positions",), "GPT-2"),
    "GPTBigCodeForCausalLM": ModelEntry("pagellm.models.gpt_bigcode:GPTBigCodeForCausalLM",
                                        ("multi-query attention",), "SantaCoder, StarCoder"),
    "LlamaForCausalLM": ModelEntry("pagellm.models.llama:LlamaForCausalLM",
                                   ("GQA", "RoPE scaling (linear, llama3, yarn)", "tied embeddings"),
                                   "Llama 2/3.x, TinyLlama"),
    "MistralForCausalLM": ModelEntry("pagellm.models.llama:MistralForCausalLM", ("GQA", "sliding window"),
                                     "Mistral 7B"),
    "Qwen2ForCausalLM": ModelEntry("pagellm.models.llama:Qwen2ForCausalLM",
                                   ("GQA", "q/k/v bias", "sliding window (per layer)"), "Qwen2, Qwen2.5"),
    "Qwen3ForCausalLM": ModelEntry("pagellm.models.llama:Qwen3ForCausalLM",
                                   ("GQA", "q/k RMSNorm", "sliding window (per layer)"), "Qwen3"),
    "GraniteForCausalLM": ModelEntry("pagellm.models.llama:GraniteForCausalLM",
                                     ("embedding, attention, residual and logits multipliers", "GQA"), "Granite 3.x"),
    "Starcoder2ForCausalLM": ModelEntry("pagellm.models.llama:Starcoder2ForCausalLM",
                                        ("LayerNorm", "biases", "GELU MLP", "sliding window"), "StarCoder2"),
    "Olmo2ForCausalLM": ModelEntry("pagellm.models.olmo2:Olmo2ForCausalLM",
                                   ("norms after attention and MLP", "q/k RMSNorm over all heads (TP: all-reduced)"),
                                   "OLMo 2"),
    "Phi3ForCausalLM": ModelEntry("pagellm.models.llama:Phi3ForCausalLM",
                                  ("packed qkv and gate_up weights", "partial rotary", "sliding window",
                                   "LongRoPE (factors by max_model_len)"),
                                  "Phi-3 mini/medium, Phi-3.5-mini, Phi-4-mini"),
    "Gemma2ForCausalLM": ModelEntry("pagellm.models.gemma2:Gemma2ForCausalLM",
                                    ("soft-capping (attention, logits)", "alternating sliding/global layers",
                                     "(1 + w) RMSNorm", "scaled embeddings"), "Gemma 2"),
    "GemmaForCausalLM": ModelEntry("pagellm.models.gemma2:GemmaForCausalLM",
                                   ("(1 + w) RMSNorm", "scaled embeddings", "GeGLU", "multi-query attention (2B)"),
                                   "Gemma"),
    "Gemma3ForCausalLM": ModelEntry("pagellm.models.gemma2:Gemma3ForCausalLM",
                                    ("q/k (1 + w) RMSNorm", "RoPE per layer kind (local / global)",
                                     "5:1 sliding/global layers"), "Gemma 3 (text: 1B, or a text-only checkpoint)"),
    "Gemma3ForConditionalGeneration": ModelEntry("pagellm.models.gemma3_mm:Gemma3ForConditionalGeneration",
                                                 ("images: SigLIP tower, pooled to 256 positions",
                                                  "bidirectional attention within an image"),
                                                 "Gemma 3 4B / 12B / 27B, MedGemma"),
    "Gemma4ForCausalLM": ModelEntry("pagellm.models.gemma4:Gemma4ForCausalLM",
                                    ("two head sizes", "K/V shared between layers", "per-layer input embeddings",
                                     "experts beside the dense MLP"), "Gemma 4 (text)"),
    "Gemma4ForConditionalGeneration": ModelEntry("pagellm.models.gemma4:Gemma4ForConditionalGeneration",
                                                 ("images at their own aspect ratio (up to max_soft_tokens)",
                                                  "images attend both ways in sliding layers (larger models)",
                                                  "no audio encoder"), "Gemma 4"),
    "GPTNeoXForCausalLM": ModelEntry("pagellm.models.gpt_neox:GPTNeoXForCausalLM",
                                     ("parallel residual", "partial rotary"), "Pythia, GPT-NeoX"),
    "OPTForCausalLM": ModelEntry("pagellm.models.opt:OPTForCausalLM",
                                 ("learned positions (offset 2)", "pre/post LayerNorm"), "OPT"),
    "MixtralForCausalLM": ModelEntry("pagellm.models.moe:MixtralForCausalLM",
                                     ("mixture of experts (top-k)", "GQA", "sliding window"), "Mixtral 8x7B"),
    "Qwen2MoeForCausalLM": ModelEntry("pagellm.models.moe:Qwen2MoeForCausalLM",
                                      ("mixture of experts + shared expert", "q/k/v bias"), "Qwen1.5-MoE, Qwen2-MoE"),
    "Qwen3MoeForCausalLM": ModelEntry("pagellm.models.moe:Qwen3MoeForCausalLM",
                                      ("mixture of experts", "q/k RMSNorm"), "Qwen3-30B-A3B, Qwen3-235B-A22B"),
    "DeepseekV2ForCausalLM": ModelEntry("pagellm.models.deepseek:DeepseekV2ForCausalLM",
                                        ("multi-head latent attention: a latent KV cache (kv_lora_rank + rope dims)",
                                         "mixture of experts + shared experts, group-limited routing"),
                                        "DeepSeek-V2, DeepSeek-V2-Lite, DeepSeek-Coder-V2"),
    "DeepseekV3ForCausalLM": ModelEntry("pagellm.models.deepseek:DeepseekV3ForCausalLM",
                                        ("multi-head latent attention: a latent KV cache", "low-rank queries",
                                         "sigmoid routing with bias correction, expert groups"),
                                        "DeepSeek-V3, DeepSeek-R1, Moonlight"),
    "DeepseekV32ForCausalLM": ModelEntry("pagellm.models.deepseek_v32:DeepseekV32ForCausalLM",
                                         ("DeepSeek Sparse Attention: an indexer picks the index_topk tokens each "
                                          "query attends to", "its keys in the latent cache row"),
                                         "DeepSeek-V3.2, V3.2-Speciale"),
    "GlmMoeDsaForCausalLM": ModelEntry("pagellm.models.deepseek_v32:GlmMoeDsaForCausalLM",
                                       ("DeepSeek Sparse Attention (interleaved indexer RoPE, shared selections)",
                                        "DeepSeek-V3 routing"), "GLM-5"),
    "Glm4MoeForCausalLM": ModelEntry("pagellm.models.deepseek:Glm4MoeForCausalLM",
                                     ("GQA with q/k/v bias and partial rotary", "DeepSeek-V3 routing, shared experts"),
                                     "GLM-4.5, GLM-4.5-Air, GLM-4.6"),
    "Glm4MoeLiteForCausalLM": ModelEntry("pagellm.models.deepseek:Glm4MoeLiteForCausalLM",
                                         ("multi-head latent attention: a latent KV cache", "DeepSeek-V3 routing"),
                                         "GLM-4.7-Flash"),
    "GptOssForCausalLM": ModelEntry("pagellm.models.gpt_oss:GptOssForCausalLM",
                                    ("attention sinks", "alternating sliding / full layers", "MoE with clamped SwiGLU",
                                     "MXFP4 experts (widened at load)"),
                                    "gpt-oss-20b, gpt-oss-120b"),
    "Llama4ForCausalLM": ModelEntry("pagellm.models.llama4:Llama4ForCausalLM",
                                    ("chunked local attention, NoPE global layers", "MoE with a shared expert",
                                     "interleaved RoPE, L2 q/k norm"), "Llama 4 Scout, Maverick (text)"),
    "Llama4ForConditionalGeneration": ModelEntry("pagellm.models.llama4:Llama4ForConditionalGeneration",
                                                 ("the language model only: text prompts (images are refused)",),
                                                 "Llama-4-Scout-17B-16E-Instruct, Llama-4-Maverick"),
    "BambaForCausalLM": ModelEntry("pagellm.models.hybrid:BambaForCausalLM",
                                   ("Mamba2 layers with a recurrent state per sequence, among attention layers",
                                    "partial RoPE"), "Bamba-9B"),
    "Qwen3NextForCausalLM": ModelEntry("pagellm.models.hybrid:Qwen3NextForCausalLM",
                                       ("Gated DeltaNet layers with a recurrent state per sequence, among gated "
                                        "attention layers", "MoE with a gated shared expert"),
                                       "Qwen3-Next-80B-A3B"),
    "Qwen3_5ForCausalLM": ModelEntry("pagellm.models.hybrid:Qwen3_5ForCausalLM",
                                     ("Gated DeltaNet layers with a recurrent state per sequence, among gated "
                                      "attention layers",), "Qwen3.5 (dense, text)"),
    "Qwen3_5MoeForCausalLM": ModelEntry("pagellm.models.hybrid:Qwen3_5MoeForCausalLM",
                                        ("Gated DeltaNet layers with a recurrent state per sequence",
                                         "MoE with a gated shared expert"), "Qwen3.5 MoE (text)"),
    "Qwen3_5ForConditionalGeneration": ModelEntry(
        "pagellm.models.qwen2_vl:Qwen3_5ForConditionalGeneration",
        ("images at their own resolution", "interleaved multimodal RoPE", "the hybrid decoder of Qwen3.5"),
        "Qwen3.5 dense checkpoints"),
    "Qwen3_5MoeForConditionalGeneration": ModelEntry(
        "pagellm.models.qwen2_vl:Qwen3_5MoeForConditionalGeneration",
        ("images at their own resolution", "interleaved multimodal RoPE", "the hybrid MoE decoder of Qwen3.5"),
        "Qwen3.5 MoE checkpoints"),
    "NemotronHForCausalLM": ModelEntry("pagellm.models.nemotron_h:NemotronHForCausalLM",
                                       ("Mamba2 blocks with a recurrent state per sequence, attention, squared-ReLU "
                                        "MLP and MoE blocks",), "Nemotron-H, Nemotron Nano 2, Nemotron 3 Nano"),
    "Lfm2ForCausalLM": ModelEntry("pagellm.models.lfm2:Lfm2ForCausalLM",
                                  ("gated short convolutions (their last inputs a state per sequence) among "
                                   "attention layers",), "LFM2"),
    "Lfm2MoeForCausalLM": ModelEntry("pagellm.models.lfm2:Lfm2MoeForCausalLM",
                                     ("short convolutions", "experts with sigmoid routing and a load-balancing bias"),
                                     "LFM2-8B-A1B"),
    "OlmoHybridForCausalLM": ModelEntry("pagellm.models.olmo_hybrid:OlmoHybridForCausalLM",
                                        ("Gated DeltaNet layers with OLMo 3's attention", "no position embedding"),
                                        "OLMo Hybrid"),
    "MiniMaxForCausalLM": ModelEntry("pagellm.models.minimax:MiniMaxForCausalLM",
                                     ("lightning attention (a recurrent state per sequence) among softmax attention "
                                      "layers", "experts in every layer"), "MiniMax-Text-01, MiniMax-M1"),
    "MiniMaxM2ForCausalLM": ModelEntry("pagellm.models.minimax_m2:MiniMaxM2ForCausalLM",
                                       ("q/k RMSNorm over all heads", "partial rotary",
                                        "experts chosen by sigmoid scores with a bias"),
                                       "MiniMax-M2, M2.1, M2.5"),
    "KimiLinearForCausalLM": ModelEntry("pagellm.models.kimi_linear:KimiLinearForCausalLM",
                                        ("Kimi Delta Attention layers (a decay per key channel: a recurrent state per "
                                         "sequence) among latent attention layers without position embedding",
                                         "DeepSeek-V3's experts"), "Kimi-Linear-48B-A3B"),
    "BailingHybridForCausalLM": ModelEntry("pagellm.models.kimi_linear:BailingHybridForCausalLM",
                                           ("Kimi Delta Attention layers with a bounded decay gate",
                                            "latent attention with RoPE and a gate per head", "DeepSeek-V3's experts"),
                                           "Ling 3 hybrids"),
    "FalconH1ForCausalLM": ModelEntry("pagellm.models.falcon_h1:FalconH1ForCausalLM",
                                      ("attention and Mamba2 side by side in every layer", "muP multipliers"),
                                      "Falcon-H1"),
    "JambaForCausalLM": ModelEntry("pagellm.models.hybrid:JambaForCausalLM",
                                   ("Mamba (1) layers with a recurrent state per sequence, among attention layers",
                                    "MoE every other layer"), "Jamba 1.5 / 1.6 / 1.7, Jamba Reasoning"),
    "MambaForCausalLM": ModelEntry("pagellm.models.mamba_lm:MambaForCausalLM",
                                   ("Mamba (1) blocks only: a recurrent state per sequence, no KV cache",),
                                   "state-spaces mamba-*-hf"),
    "FalconMambaForCausalLM": ModelEntry("pagellm.models.mamba_lm:FalconMambaForCausalLM",
                                         ("Mamba (1) blocks with weightless dt / B / C norms, no KV cache",),
                                         "Falcon Mamba 7B"),
    "Mamba2ForCausalLM": ModelEntry("pagellm.models.mamba_lm:Mamba2ForCausalLM",
                                    ("Mamba2 blocks only: a recurrent state per sequence, no KV cache",),
                                    "Mamba-Codestral, mamba2-*"),
    "GraniteMoeHybridForCausalLM": ModelEntry("pagellm.models.hybrid:GraniteMoeHybridForCausalLM",
                                              ("Mamba2 layers with a recurrent state per sequence, among attention "
                                               "layers", "MoE with a shared MLP", "Granite multipliers"),
                                              "Granite 4.0-H (Micro, Tiny, Small)"),
    "LlavaForConditionalGeneration": ModelEntry("pagellm.models.llava:LlavaForConditionalGeneration",
                                                ("image inputs (CLIP / SigLIP vision tower, MLP projector)",
                                                 "a LLaMA-family language model"),
                                                "LLaVA 1.5, BakLLaVA, LLaVA-Interleave"),
    "LlavaNextForConditionalGeneration": ModelEntry("pagellm.models.llava:LlavaNextForConditionalGeneration",
                                                    ("anyres images: a grid of tiles plus the whole image",
                                                     "a row-end newline feature", "a LLaMA-family language model"),
                                                    "LLaVA-NeXT (LLaVA 1.6)"),
    "Mistral3ForConditionalGeneration": ModelEntry("pagellm.models.mistral3:Mistral3ForConditionalGeneration",
                                                   ("images at their own size: Pixtral encoder, 2x2 patch merger",
                                                    "[IMG_BREAK] / [IMG_END] row ends", "Mistral language model"),
                                                   "Mistral Small 3.1 / 3.2"),
    "Qwen2VLForConditionalGeneration": ModelEntry("pagellm.models.qwen2_vl:Qwen2VLForConditionalGeneration",
                                                  ("images at their own resolution", "multimodal RoPE (M-RoPE)",
                                                   "Qwen2 language model"), "Qwen2-VL"),
    "Qwen3VLForConditionalGeneration": ModelEntry(
        "pagellm.models.qwen2_vl:Qwen3VLForConditionalGeneration",
        ("images at their own resolution", "interleaved multimodal RoPE", "deepstack features in the first layers"),
        "Qwen3-VL (dense)"),
    "Qwen3VLMoeForConditionalGeneration": ModelEntry(
        "pagellm.models.qwen2_vl:Qwen3VLMoeForConditionalGeneration",
        ("Qwen3-VL with Qwen3-MoE's decoder", "stacked experts in either layout"), "Qwen3-VL-30B-A3B, 235B-A22B"),
    "Qwen2_5_VLForConditionalGeneration": ModelEntry(
        "pagellm.models.qwen2_vl:Qwen2_5_VLForConditionalGeneration",
        ("images at their own resolution", "multimodal RoPE (M-RoPE)", "windowed vision attention"), "Qwen2.5-VL"),
    FALLBACK: ModelEntry("pagellm.models.transformers_fallback:TransformersForCausalLM",
                         ("any decoder-only causal LM whose attention uses transformers' attention interface",),
                         "StableLM, OLMo (1), Cohere, InternLM, ..."),
}


# Architectures served only as pooling models (embeddings, classification): encoder-only, bidirectional.
POOLING_MODELS: dict[str, ModelEntry] = {
    "BertModel": ModelEntry("pagellm.models.bert:BertModel",
                            ("encoder-only, bidirectional attention", "pooling only (embed)"),
                            "BERT, MiniLM, BGE, E5 (sentence-transformers)"),
    "BertForSequenceClassification": ModelEntry("pagellm.models.bert:BertModel",
                                                ("encoder-only, bidirectional attention",
                                                 "pooling only (classify, score: cross-encoders)"),
                                                "BERT classifiers and rerankers (ms-marco cross-encoders)"),
    "RobertaModel": ModelEntry("pagellm.models.bert:RobertaModel",
                               ("encoder-only, bidirectional attention", "positions after the padding index",
                                "pooling only (embed)"), "RoBERTa, all-distilroberta, nomic-style embedders"),
    "XLMRobertaModel": ModelEntry("pagellm.models.bert:RobertaModel",
                                  ("encoder-only, bidirectional attention", "pooling only (embed)"),
                                  "bge-m3, multilingual-e5"),
    "RobertaForSequenceClassification": ModelEntry("pagellm.models.bert:RobertaModel",
                                                   ("encoder-only, bidirectional attention",
                                                    "pooling only (classify, score)"), "RoBERTa classifiers"),
    "XLMRobertaForSequenceClassification": ModelEntry("pagellm.models.bert:RobertaModel",
                                                      ("encoder-only, bidirectional attention",
                                                       "pooling only (classify, score: cross-encoders)"),
                                                      "bge-reranker-v2-m3, XLM-R classifiers"),
    "BertForTokenClassification": ModelEntry("pagellm.models.bert:BertModel",
                                             ("encoder-only, bidirectional attention",
                                              "pooling only (token_classify: a label per token)"), "BERT NER taggers"),
    "RobertaForTokenClassification": ModelEntry("pagellm.models.bert:RobertaModel",
                                                ("encoder-only, bidirectional attention",
                                                 "pooling only (token_classify)"), "RoBERTa taggers"),
    "XLMRobertaForTokenClassification": ModelEntry("pagellm.models.bert:RobertaModel",
                                                   ("encoder-only, bidirectional attention",
                                                    "pooling only (token_classify)"), "XLM-R NER taggers"),
}


def supported_architectures() -> list[str]:
    return sorted(a for a in MODELS if a != FALLBACK)


def resolve_architecture(architectures: list[str] | None, hf_config=None, model_impl: str = "auto") -> str:
    """The first architecture of config.json that pagellm runs natively; else the transformers
    fallback if transformers can build it; ValueError naming the supported ones otherwise.
    model_impl "pagellm" insists on a native one, "transformers" on the fallback."""
    if model_impl != "transformers":
        for arch in architectures or []:
            if arch in MODELS and arch != FALLBACK:
                return arch
    if hf_config is not None:
        from pagellm.models.transformers_fallback import fallback_unsupported_reason, hf_causal_lm_class

        hf_cls = hf_causal_lm_class(hf_config)  # what transformers would build for config.model_type
        if model_impl != "transformers" and hf_cls is not None and hf_cls.__name__ in MODELS:
            return hf_cls.__name__
        if model_impl == "pagellm":
            raise ValueError(f"model_impl='pagellm', but model architecture {architectures} has no native "
                             f"implementation in pagellm. Natively supported architectures: "
                             f"{', '.join(supported_architectures())}.")
        reason = fallback_unsupported_reason(hf_config)
        if reason is not None and model_impl == "transformers":
            raise ValueError(f"model_impl='transformers', but {architectures} cannot run on the transformers "
                             f"fallback: {reason}.")
        if reason is None:
            return FALLBACK
        raise ValueError(f"model architecture {architectures} has no native implementation in pagellm and cannot "
                         f"run on the transformers fallback: {reason}. Natively supported architectures: "
                         f"{', '.join(supported_architectures())}.")
    raise ValueError(f"model architecture {architectures} is not supported; supported architectures: "
                     f"{', '.join(supported_architectures())}.")


def get_model_class(architecture: str):
    entry = MODELS.get(architecture) or POOLING_MODELS.get(architecture)
    if entry is None:
        resolve_architecture([architecture])  # raises the error naming what is supported
    module, cls = entry.target.split(":")
    return getattr(importlib.import_module(module), cls)


def model_table() -> list[tuple[str, str, str]]:
    """(architecture, example checkpoints, features) per entry, natively supported first."""
    rows = [(a, MODELS[a].example, ", ".join(MODELS[a].features)) for a in supported_architectures()]
    rows += [(a, e.example, ", ".join(e.features)) for a, e in POOLING_MODELS.items()]
    fb = MODELS[FALLBACK]
    return rows + [(f"other ({FALLBACK})", fb.example, ", ".join(fb.features))]
