"""LoRA adapters on a vision-language model's decoder: PEFT's greedy tokens and logprobs for prompts with images,
for LLaVA, LLaVA-NeXT, Qwen2-VL, Gemma 3 and Mistral 3; an adapter on the vision tower is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from multimodal_models import images

from pagellm import LLM, SamplingParams
from pagellm.lora.request import LoRARequest

DECODER = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _adapter(path: str, out: str, targets) -> object:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    torch.manual_seed(0)
    peft = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)  # PEFT starts B at zero: give the adapter an effect
    peft.save_pretrained(out)
    return peft.eval()


@pytest.mark.parametrize("name", ["llava", "llava-next", "qwen2-vl", "gemma3", "mistral3"])
@torch.inference_mode()
def test_adapter_equals_peft(vlm_models, tmp_path, name):
    from transformers import AutoImageProcessor

    path = vlm_models[name]
    peft = _adapter(path, str(tmp_path / "a"), DECODER)
    ph = {"qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>", "gemma3": "<start_of_image>",
          "mistral3": "[IMG]"}.get(name, "<image>")
    imgs = images(2)
    prompts = [{"prompt": f"The quick {ph} brown fox", "multi_modal_data": {"image": imgs[0]}},
               {"prompt": f"{ph}To be, or not", "multi_modal_data": {"image": imgs[1]}}]
    llm = LLM(path, max_model_len=512, enable_lora=True, max_lora_rank=8)
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    lora = LoRARequest("a", 1, str(tmp_path / "a"))
    outs = llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)
    base = llm.generate(prompts, sp, use_tqdm=False)
    # Mistral 3: the merged patch size, as PixtralProcessor asks for it
    processor = AutoImageProcessor.from_pretrained(path, **({"patch_size": {"height": 14, "width": 14}}
                                                            if name == "mistral3" else {}))
    for p, out, b in zip(prompts, outs, base):
        ids = torch.tensor([out.prompt_token_ids])
        x = processor(images=[p["multi_modal_data"]["image"]], return_tensors="pt")
        kw = {"pixel_values": x["pixel_values"]}
        if "image_grid_thw" in x:
            kw.update(image_grid_thw=x["image_grid_thw"], mm_token_type_ids=(ids == peft.config.image_token_id).int())
        if "image_sizes" in x:
            kw["image_sizes"] = x["image_sizes"]
        if name == "gemma3":
            kw["token_type_ids"] = (ids == peft.config.image_token_index).long()
        g = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, output_logits=True, return_dict_in_generate=True, **kw)
        tokens = g.sequences[0, ids.shape[1]:].tolist()
        c = out.outputs[0]
        assert list(c.token_ids) == tokens and list(c.token_ids) != list(b.outputs[0].token_ids)
        ref = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.logits, tokens)]
        assert [e[t].logprob for e, t in zip(c.logprobs, c.token_ids)] == pytest.approx(ref, abs=2e-4)
    assert llm.llm_engine.scheduler.kv.num_free_blocks == llm.llm_engine.num_blocks


def test_vision_tower_adapter_is_refused(vlm_models, tmp_path):
    path = vlm_models["llava"]
    _adapter(path, str(tmp_path / "v"), ["q_proj"])  # matches the CLIP tower's attention too
    llm = LLM(path, max_model_len=512, enable_lora=True, max_lora_rank=8)
    with pytest.raises(ValueError, match="vision_tower.*not a linear layer of the decoder"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), lora_request=LoRARequest("v", 1, str(tmp_path / "v")),
                     use_tqdm=False)
    assert llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
