"""Speculative decoding with the model's own multi-token-prediction layer (method "mtp", vLLM's deepseek_mtp), on a
DeepSeek-V3 checkpoint given an MTP layer: every proposal equals the one transformers' modules compute for the same
tokens (the MTP layer built from transformers' DeepseekV3DecoderLayer, fed the model's final hidden states), and
the output is the model's own greedy output, with prefill chunks, several sequences, rejected drafts and TP=2."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagellm import LLM, SamplingParams
from pagellm.worker import drafter as drafter_mod
from tests.models.test_hybrid import assert_matches_hf, prompts

K = 2


def decoder_layer_class(path: str):
    """transformers' decoder layer class of the checkpoint's model."""
    import importlib

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = AutoConfig.from_pretrained(path)
    for field in ("mlp_layer_types", "layer_types"):  # the decoder's layers listed: the MTP layer is sparse, full
        if getattr(cfg, field, None):
            types = getattr(cfg, field)
            setattr(cfg, field, [*types, "sparse" if field.startswith("mlp") else types[-1]])
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type].replace("ForCausalLM", "DecoderLayer")
    module = importlib.import_module(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}")
    return getattr(module, name), cfg


def with_mtp_layer(src: str, dst: str) -> str:
    """The checkpoint with a random MTP layer (model.layers.<L>.*) in transformers' layout, without its own embedding
    and head (the model's stand in)."""
    shutil.copytree(src, dst)
    layer_cls, cfg = decoder_layer_class(src)
    L, hidden = cfg.num_hidden_layers, cfg.hidden_size
    torch.manual_seed(5)
    layer = layer_cls(cfg, L)
    extra = {f"model.layers.{L}.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
    for k, v in extra.items():
        if k.endswith("norm.weight"):
            v.uniform_(0.5, 1.5)
        elif v.dim() >= 2:
            v.normal_(0.0, 0.2)
        elif k.endswith("e_score_correction_bias"):
            v.normal_(0.0, 0.5)
    extra[f"model.layers.{L}.enorm.weight"] = torch.rand(hidden) + 0.5
    extra[f"model.layers.{L}.hnorm.weight"] = torch.rand(hidden) + 0.5
    extra[f"model.layers.{L}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden) * 0.2
    extra[f"model.layers.{L}.shared_head.norm.weight"] = torch.rand(hidden) + 0.5
    path = os.path.join(dst, "model.safetensors")
    save_file({**load_file(path), **extra}, path, metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 1
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


class Reference:
    """The MTP proposals computed with transformers' modules, the whole entry sequence each pass."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        layer_cls, layer_cfg = decoder_layer_class(path)
        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        L = self.hf.config.num_hidden_layers
        w = {k[len(f"model.layers.{L}."):]: v for k, v in load_file(os.path.join(path, "model.safetensors")).items()
             if k.startswith(f"model.layers.{L}.")}
        self.layer = layer_cls(layer_cfg, L).eval()
        self.layer.load_state_dict({k: v for k, v in w.items() if not k.startswith(("enorm", "hnorm", "eh_proj",
                                                                                     "shared_head"))})
        self.w = w
        self.eps = layer_cfg.rms_norm_eps

    def norm(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name]

    @torch.no_grad()
    def drafts(self, tokens: list[int], k: int) -> list[int]:
        """tokens: the computed ones and the last (x): the k drafts after x."""
        model = self.hf.model
        h = model(torch.tensor([tokens[:-1]])).last_hidden_state[0]  # after the final norm
        ids, hid, out = list(tokens[1:]), h, []
        for _ in range(k):
            n = len(ids)
            pos = torch.arange(n)[None]
            e = model.embed_tokens(torch.tensor(ids))
            e[0] = 0  # the entry at position 0: its embedding zeroed (vLLM's)
            x = torch.cat((self.norm(e, "enorm.weight"), self.norm(hid, "hnorm.weight")), -1) @ self.w[
                "eh_proj.weight"].t()
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            y = self.layer(x[None], attention_mask=mask, position_ids=pos,
                           position_embeddings=model.rotary_emb(x[None], pos))[0]
            d = int(self.hf.lm_head(self.norm(y[-1], "shared_head.norm.weight")).argmax())
            out.append(d)
            ids.append(d)
            hid = torch.cat((hid, y[-1:]))
        return out


def spy_proposals(monkeypatch) -> list:
    """(the sequence's tokens up to its last, its drafts) of every proposal from now on."""
    seen = []
    propose = drafter_mod.Drafter.propose

    def spy(self, batch, spec, scratch):
        drafts = propose(self, batch, spec, scratch)
        for s, d in drafts.items():
            row = batch.row_of[s]
            seen.append((batch.token_ids[row, :batch.num_computed[row] + 1].tolist(), d))
        return drafts

    monkeypatch.setattr(drafter_mod.Drafter, "propose", spy)
    return seen


@pytest.fixture(scope="module")
def mtp_paths(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    return {arch: with_mtp_layer(tiny_models[arch], str(root / arch))
            for arch in ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "deepseek_v32")}


# deepseek_v3: latent attention with a low-rank query, grouped routing; glm4_moe: grouped-query attention with q/k/v
# biases and partial rotary; glm4_moe_lite: latent attention with mlp_layer_types listing the decoder's layers only;
# deepseek_v32: sparse attention (its MTP layer has its own indexer; transformers' layer needs a cache: outputs only)
@pytest.mark.parametrize("arch, batched, tp", [
    ("deepseek_v3", 2048, 1), ("deepseek_v3", 5, 1), ("deepseek_v3", 2048, 2), ("glm4_moe", 5, 1),
    ("glm4_moe_lite", 2048, 1), ("deepseek_v32", 13, 1)])
def test_proposals_equal_transformers_modules_and_outputs_the_models(mtp_paths, monkeypatch, arch, batched, tp):
    mtp_path = mtp_paths[arch]
    seen = spy_proposals(monkeypatch)
    ps = prompts(512, lengths=(1, 4, 13, 30))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    llm = LLM(mtp_path, block_size=4, num_gpu_blocks_override=256, max_num_batched_tokens=batched,
              tensor_parallel_size=tp, speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": K})
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    assert_matches_hf(mtp_path, ps, outs, max_tokens=12)
    assert len(seen) >= 4 * 3  # proposals for every sequence, after rejected drafts too
    if arch == "deepseek_v32":
        return
    ref = Reference(mtp_path)
    assert any(len(tokens) == 1 for tokens, _ in seen)  # the 1-token prompt: nothing to draft from, noise
    for tokens, d in [x for x in seen if len(x[0]) > 1][:24]:
        assert d == ref.drafts(tokens, len(d)), f"proposal after {len(tokens)} tokens"
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_draft_tokens > 0 and stats.num_free_blocks == stats.num_total_blocks


def test_refusals(tiny_models):
    with pytest.raises(ValueError, match=r"method 'mtp'.*model\.layers\.3"):  # declared, but no weights
        LLM(tiny_models["deepseek_v3"], speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    with pytest.raises(ValueError, match="has none that pagellm serves"):
        LLM(tiny_models["llama"], speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    with pytest.raises(ValueError, match="speculative_config.model does not apply to method 'mtp'"):
        LLM(tiny_models["deepseek_v3"], speculative_config={"method": "mtp", "num_speculative_tokens": 1,
                                                            "model": tiny_models["llama"]})


def test_no_mtp_layer_declared(tiny_models, tmp_path):
    path = str(tmp_path / "m")
    shutil.copytree(tiny_models["deepseek_v3"], path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_nextn_predict_layers"] = 0
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="declares no multi-token-prediction layer"):
        LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 1})


def qwen_classes(text_cfg):
    """transformers' decoder layer and RMSNorm classes of a Qwen3-Next / Qwen3.5 text config."""
    import importlib

    family = text_cfg.model_type.removesuffix("_text")
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    layer = next(n for n in dir(module) if n.endswith("DecoderLayer"))
    return getattr(module, layer), getattr(module, layer.removesuffix("DecoderLayer") + "RMSNorm")


def with_qwen_mtp_layer(src: str, dst: str) -> str:
    """A Qwen3-Next or Qwen3.5 checkpoint with a random MTP layer under mtp.* (a full-attention decoder layer in
    transformers' layout, fc, the norms around it) and mtp_num_hidden_layers 1, as the hub's checkpoints ship it."""
    from transformers import AutoConfig

    shutil.copytree(src, dst)
    cfg = AutoConfig.from_pretrained(src)
    text = getattr(cfg, "text_config", cfg)
    text.layer_types = [*text.layer_types, "full_attention"]
    layer_cls, _ = qwen_classes(text)
    torch.manual_seed(6)
    layer = layer_cls(text, text.num_hidden_layers)
    hidden = text.hidden_size
    extra = {f"mtp.layers.0.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
    for k, v in extra.items():
        if k.endswith("norm.weight"):
            v.uniform_(-0.5, 0.5)  # Gemma-style: a scale of 1 + w
        elif v.dim() >= 2:
            v.normal_(0.0, 0.2)
    extra["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden) * 0.2
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        extra[f"mtp.{name}.weight"] = torch.rand(hidden) - 0.5
    path = os.path.join(dst, "model.safetensors")
    base = {k: v for k, v in load_file(path).items() if not k.startswith("mtp.")}
    save_file({**base, **extra}, path, metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.get("text_config", config)["mtp_num_hidden_layers"] = 1
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


class QwenReference:
    """Qwen3-Next / Qwen3.5 MTP proposals from transformers' modules: fc over the normalised embedding and hidden
    state, the decoder layer, the final norm (its output the next pass's hidden state), the model's LM head. For a
    multimodal checkpoint the model's hidden states come from the whole model with the prompt's image, and every
    entry turns by its position's multimodal rotary position."""

    def __init__(self, path: str) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        cfg = AutoConfig.from_pretrained(path)
        self.vlm = hasattr(cfg, "text_config")
        auto = AutoModelForImageTextToText if self.vlm else AutoModelForCausalLM
        self.hf = auto.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        self.lm = self.hf.model.language_model if self.vlm else self.hf.model
        text = getattr(self.hf.config, "text_config", self.hf.config)
        text.layer_types = [*text.layer_types, "full_attention"]
        layer_cls, norm_cls = qwen_classes(text)
        w = load_file(os.path.join(path, "model.safetensors"))
        self.layer = layer_cls(text, text.num_hidden_layers).eval()
        self.layer.load_state_dict({k[len("mtp.layers.0."):]: v for k, v in w.items()
                                    if k.startswith("mtp.layers.0.")})
        self.norms = {}
        for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            self.norms[name] = norm_cls(text.hidden_size, eps=text.rms_norm_eps)
            self.norms[name].weight.data.copy_(w[f"mtp.{name}.weight"])
        self.fc = w["mtp.fc.weight"]

    @torch.no_grad()
    def drafts(self, tokens: list[int], k: int, image=None) -> list[int]:
        """tokens: the computed ones and the last (x): the k drafts after x."""
        ids = torch.tensor([tokens[:-1]])
        kw, pos3 = {}, None
        if image is not None:
            from transformers import AutoImageProcessor

            x = AutoImageProcessor.from_pretrained(self.hf.name_or_path)(images=[image], return_tensors="pt")
            mm = (ids == self.hf.config.image_token_id).int()
            kw = {"pixel_values": x["pixel_values"], "image_grid_thw": x["image_grid_thw"], "mm_token_type_ids": mm}
            full = torch.tensor([tokens + [0] * k])
            pos3, _ = self.hf.model.get_rope_index(full, (full == self.hf.config.image_token_id).int(),
                                                   x["image_grid_thw"])
        h = self.hf.model(input_ids=ids, **kw).last_hidden_state[0]  # after the final norm
        feats = None
        if image is not None:  # the image positions' entries read the image's features (as the model does)
            feats = torch.cat(self.hf.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"]).pooler_output)
        entries, hid, out = list(tokens[1:]), h, []
        for _ in range(k):
            n = len(entries)
            pos = torch.arange(n)[None] if pos3 is None else pos3[:, :, :n]
            emb = self.lm.embed_tokens(torch.tensor(entries))
            if feats is not None:
                at = (torch.tensor(entries) == self.hf.config.image_token_id).nonzero().flatten()
                emb = emb.index_copy(0, at, feats[:len(at)])
            e = self.norms["pre_fc_norm_embedding"](emb)
            x = torch.cat((e, self.norms["pre_fc_norm_hidden"](hid)), -1) @ self.fc.t()
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            y = self.layer(x[None], attention_mask=mask, position_ids=pos,
                           position_embeddings=self.lm.rotary_emb(x[None], pos))
            y = self.norms["norm"](y[0] if isinstance(y, tuple) else y)[0]
            d = int(self.hf.lm_head(y[-1]).argmax())
            out.append(d)
            entries.append(d)
            hid = torch.cat((hid, y[-1:]))
        return out


@pytest.fixture(scope="module")
def qwen_mtp_paths(tiny_models, vlm_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_mtp")
    return {"qwen3_next": with_qwen_mtp_layer(tiny_models["qwen3_next"], str(root / "qwen3_next")),
            "qwen3_5": with_qwen_mtp_layer(vlm_models["qwen3_5"], str(root / "qwen3_5")),
            "qwen3_5_moe": with_qwen_mtp_layer(vlm_models["qwen3_5_moe"], str(root / "qwen3_5_moe"))}


# qwen3_next: experts with a shared one in the MTP layer, its state layers saved and rewound for rejected drafts;
# qwen3_5 / qwen3_5_moe: the multimodal checkpoints (mtp.* beside model.language_model.*), text prompts
@pytest.mark.parametrize("arch, batched, tp", [("qwen3_next", 5, 1), ("qwen3_next", 2048, 2), ("qwen3_5", 2048, 1),
                                              ("qwen3_5_moe", 13, 1)])
def test_qwen_proposals_equal_transformers_modules(qwen_mtp_paths, monkeypatch, arch, batched, tp):
    path = qwen_mtp_paths[arch]
    seen = spy_proposals(monkeypatch)
    ps = prompts(512, lengths=(1, 4, 13, 30))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    llm = LLM(path, block_size=4, num_gpu_blocks_override=256, max_num_batched_tokens=batched,
              tensor_parallel_size=tp, speculative_config={"method": "qwen3_next_mtp", "num_speculative_tokens": K})
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    if arch == "qwen3_next":
        assert_matches_hf(path, ps, outs, max_tokens=12)
    else:
        from tests.multimodal.conftest import hf_vlm_greedy

        for p, o in zip(ps, outs):
            assert list(o.outputs[0].token_ids) == hf_vlm_greedy(path, p, [], 12)[0]
    assert len(seen) >= 4 * 3
    ref = QwenReference(path)
    for tokens, d in [x for x in seen if len(x[0]) > 1][:24]:
        assert d == ref.drafts(tokens, len(d)), f"proposal after {len(tokens)} tokens"
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_draft_tokens > 0 and stats.num_free_blocks == stats.num_total_blocks


def test_qwen3_5_proposals_with_an_image_turn_by_multimodal_positions(qwen_mtp_paths, monkeypatch):
    """A prompt with an image: the MTP entries after it turn by the rotary positions index + delta (and the image's
    by its 3-D ones), and the image's entries read its features, as the model's; the output is transformers'."""
    from tests.multimodal import checks
    from tests.multimodal.conftest import hf_vlm_greedy

    path = qwen_mtp_paths["qwen3_5"]
    seen = spy_proposals(monkeypatch)
    prompt = {"prompt": "The quick <|vision_start|><|image_pad|><|vision_end|> brown fox",
              "multi_modal_data": {"image": checks.IMGS[1]}}
    llm = LLM(path, block_size=4, num_gpu_blocks_override=256, max_num_batched_tokens=7,
              speculative_config={"method": "mtp", "num_speculative_tokens": K})
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == hf_vlm_greedy(path, list(out.prompt_token_ids), [checks.IMGS[1]], 12)[0]
    ref = QwenReference(path)
    assert len(seen) >= 3
    for tokens, d in seen:
        assert d == ref.drafts(tokens, len(d), image=checks.IMGS[1]), f"proposal after {len(tokens)} tokens"
    assert llm.llm_engine.get_stats().num_free_blocks == llm.llm_engine.get_stats().num_total_blocks


def test_qwen_refusals(tiny_models, vlm_models):
    with pytest.raises(ValueError, match=r"mtp_num_hidden_layers is 0"):  # the fixtures declare none
        LLM(tiny_models["qwen3_next"], speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    with pytest.raises(ValueError, match=r"method 'mtp'.*mtp\.\*"):  # declared, weights missing
        path = vlm_models["qwen3_5"]
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            dst = os.path.join(d, "m")
            shutil.copytree(path, dst)
            with open(os.path.join(dst, "config.json")) as f:
                config = json.load(f)
            config["text_config"]["mtp_num_hidden_layers"] = 1
            with open(os.path.join(dst, "config.json"), "w") as f:
                json.dump(config, f)
            LLM(dst, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
