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
    seen = []
    propose = drafter_mod.Drafter.propose

    def spy(self, batch, spec, scratch):
        drafts = propose(self, batch, spec, scratch)
        for s, d in drafts.items():
            row = batch.row_of[s]
            seen.append((batch.token_ids[row, :batch.num_computed[row] + 1].tolist(), d))
        return drafts

    monkeypatch.setattr(drafter_mod.Drafter, "propose", spy)
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
