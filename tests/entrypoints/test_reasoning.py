"""Reasoning outputs (--reasoning-parser): the thinking apart from the answer, whole and streamed."""

import random
from types import SimpleNamespace

import openai
import pytest

from pagellm.entrypoints.openai.protocol import ChatCompletionRequest
from pagellm.entrypoints.openai.reasoning import PARSERS
from pagellm.entrypoints.openai.serving_chat import choice_message
from tests.conftest import DEMO_MODEL
from tests.entrypoints.server_utils import RemoteServer

R1, QWEN3, GPTOSS = PARSERS["deepseek_r1"], PARSERS["qwen3"], PARSERS["openai_gptoss"]
HARMONY = "<|start|>user<|message|>Hi<|end|><|start|>assistant"  # the end of a rendered GPT-OSS prompt

# (parser, end of the rendered prompt, output) -> (reasoning, content)
CASES = [
    # DeepSeek-R1: the template opens the thinking; the answer follows </think>
    (R1, "<|Assistant|><think>\n", "Nine is more.\n</think>\n\n9.8 is greater.",
     ("Nine is more.\n", "\n\n9.8 is greater.")),
    (R1, "<|Assistant|>", "Hmm.</think>Yes.", ("Hmm.", "Yes.")),  # R1 may skip the opening tag
    (R1, "<|Assistant|>", "<think>Hmm.</think>Yes.", ("Hmm.", "Yes.")),
    (R1, "<|Assistant|><think>\n", "cut short by max_tokens", ("cut short by max_tokens", None)),
    (R1, "<|Assistant|><think>\n", "</think>\n\nStraight to it.", (None, "\n\nStraight to it.")),
    # Qwen3: the model opens the thinking itself (up to 2507), or the template does (3.5), or thinking is off
    (QWEN3, "<|im_start|>assistant\n", "<think>\nsum it</think>\n\n4", ("\nsum it", "\n\n4")),
    (QWEN3, "<|im_start|>assistant\n<think>\n", "sum it</think>\n\n4", ("sum it", "\n\n4")),
    (QWEN3, "<|im_start|>assistant\n<think>\n\n</think>\n\n", "4, and <think> here is just text",
     (None, "4, and <think> here is just text")),
    (QWEN3, "<|im_start|>assistant\n", "no tags at all", (None, "no tags at all")),
    (QWEN3, "earlier <think>old</think> then <|im_start|>assistant\n", "Hi", (None, "Hi")),
    # tags that never complete stay text
    (QWEN3, "<think>", "a </thin", ("a </thin", None)),
    (QWEN3, "", "  <thi", (None, "  <thi")),
    # GPT-OSS (harmony): the analysis message is the thinking, the final message the answer (its header dropped)
    (GPTOSS, HARMONY, "<|channel|>analysis<|message|>User greets.<|end|><|start|>assistant<|channel|>final"
                      "<|message|>Hello!", ("User greets.", "Hello!")),
    (GPTOSS, HARMONY, "<|channel|>final<|message|>Hello!", (None, "Hello!")),  # no analysis at all
    (GPTOSS, HARMONY, "<|channel|>analysis<|message|>cut short", ("cut short", None)),
    (GPTOSS, HARMONY, "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>commentary to=f",
     ("x", "<|start|>assistant<|channel|>commentary to=f")),  # another channel: left as text
    (GPTOSS, HARMONY, "plain text", (None, "plain text")),
    # vLLM's other names: DeepSeek-V3.1 and GLM-4.5 read the prompt; MiniMax-M2 thinks first without the tag;
    # Magistral's [THINK] tokens; Seed-OSS's tags; Granite's plain-text markers
    (PARSERS["deepseek_v3"], "<｜Assistant｜><think>", "a</think>b", ("a", "b")),
    (PARSERS["deepseek_v3"], "<｜Assistant｜></think>", "b", (None, "b")),
    (PARSERS["glm45"], "<|assistant|>", "<think>a</think>b", ("a", "b")),
    (PARSERS["minimax_m2"], "]~b]ai\n", "plan</think>answer", ("plan", "answer")),
    (PARSERS["mistral"], "[/INST]", "[THINK]hm[/THINK]Yes.", ("hm", "Yes.")),
    (PARSERS["mistral"], "[/INST]", "Yes.", (None, "Yes.")),
    (PARSERS["seed_oss"], "", "<seed:think>x</seed:think>y", ("x", "y")),
    (PARSERS["granite"], "<|start_of_role|>assistant<|end_of_role|>",
     "Here is my thought process: think. Here is my response: done.", (" think. ", " done.")),
]


@pytest.mark.parametrize("parser,prompt,output,expected", CASES)
def test_split(parser, prompt, output, expected):
    assert parser.split(prompt, output) == expected


@pytest.mark.parametrize("parser,prompt,output,expected", CASES)
def test_streamed_pieces_split_the_same(parser, prompt, output, expected):
    rng = random.Random(0)
    for _ in range(100):  # any cut into pieces (a tag may arrive a character at a time)
        s = parser.stream(prompt)
        reasoning = content = ""
        i = 0
        while i < len(output):
            j = i + rng.randint(1, 5)
            r, c = s.feed(output[i:j])
            reasoning, content, i = reasoning + r, content + c, j
        r, c = s.feed("", final=True)  # the end of the output releases what was held back
        assert ((reasoning + r) or None, (content + c) or None) == expected


def test_choice_message_carries_both_fields_and_tool_calls_come_from_the_answer():
    from pagellm.entrypoints.openai.tool_calls import make_parser

    state = SimpleNamespace(tool_parser=make_parser("hermes"), reasoning_parser=QWEN3)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "weather?"}],
                                tools=[{"type": "function", "function": {"name": "get_weather"}}], tool_choice="auto")
    text = '<think>I should call the tool. <tool_call> is how.</think>Calling.<tool_call>{"name": "get_weather", ' \
           '"arguments": {"city": "Paris"}}</tool_call>'
    msg, reason = choice_message(state, req, "auto", text, "stop", QWEN3.stream(""))
    assert msg.reasoning == msg.reasoning_content == "I should call the tool. <tool_call> is how."
    assert msg.content == "Calling." and [c.function.name for c in msg.tool_calls] == ["get_weather"]
    assert reason == "tool_calls"
    req.include_reasoning = False
    msg, _ = choice_message(state, req, None, "<think>x</think>y", "stop", QWEN3.stream(""))
    assert msg.reasoning is None and msg.reasoning_content is None and msg.content == "y"


TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
THINKING_ON = TEMPLATE.replace("'<|assistant|>\\n'", "'<|assistant|>\\n<think>\\n'")
THINKING_OFF = TEMPLATE.replace("'<|assistant|>\\n'", "'<|assistant|>\\n<think>\\n\\n</think>\\n\\n'")
MESSAGES = [{"role": "user", "content": "Speak, what thinkest thou?"}]


@pytest.fixture(scope="module")
def server():
    s = RemoteServer(["--served-model-name", "demo", "--num-gpu-blocks-override", "256", "--reasoning-parser", "qwen3",
                      "--trust-request-chat-template"])
    yield s
    s.stop()


def _raw(client, template: str, max_tokens: int) -> str:
    """The same prompt through /v1/completions: the model's text before any split."""
    from transformers import AutoTokenizer

    from pagellm.engine.chat_utils import apply_chat_template

    ids = apply_chat_template(AutoTokenizer.from_pretrained(DEMO_MODEL), MESSAGES, template)
    return client.completions.create(model="demo", prompt=ids, max_tokens=max_tokens, temperature=0).choices[0].text


@pytest.mark.parametrize("template,thinks", [(THINKING_ON, True), (THINKING_OFF, False), (TEMPLATE, False)],
                         ids=["thinking_on", "thinking_off", "no_tags"])
def test_server_splits_by_what_the_prompt_opened(server, template, thinks):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    raw = _raw(client, template, 12)
    kw = dict(model="demo", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"chat_template": template})
    msg = client.chat.completions.create(**kw).choices[0].message
    extra = msg.model_extra or {}
    if thinks:  # no </think> in 12 tokens of this model: all of it is thinking
        assert "</think>" not in raw
        assert extra["reasoning"] == extra["reasoning_content"] == raw and msg.content is None
    else:
        assert msg.content == raw and extra.get("reasoning") is None
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas)
    assert streamed_reasoning == (raw if thinks else "")
    assert "".join(d.content or "" for d in deltas) == ("" if thinks else raw)
    hidden = client.chat.completions.create(
        **{**kw, "extra_body": {"chat_template": template, "include_reasoning": False}})
    assert (hidden.choices[0].message.model_extra or {}).get("reasoning") is None


def test_server_leaves_constrained_output_alone(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    msg = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=8, temperature=0,
        extra_body={"chat_template": THINKING_ON, "structured_outputs": {"choice": ["aye", "nay"]}}).choices[0].message
    assert msg.content in ("aye", "nay") and (msg.model_extra or {}).get("reasoning") is None


SWITCHABLE = TEMPLATE.replace(
    "'<|assistant|>\\n'", "'<|assistant|>\\n' + ('<think>\\n' if enable_thinking | default(true) else '')")


def test_chat_template_kwargs_switch_the_thinking(server):
    import httpx

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    kw = dict(model="demo", messages=MESSAGES, max_tokens=6, temperature=0)
    on = client.chat.completions.create(**kw, extra_body={"chat_template": SWITCHABLE}).choices[0].message
    off = client.chat.completions.create(**kw, extra_body={
        "chat_template": SWITCHABLE, "chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
    assert on.content is None and (on.model_extra or {}).get("reasoning")
    assert off.content and (off.model_extra or {}).get("reasoning") is None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert e.value.body["param"] == "chat_template_kwargs"
    r = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES, "chat_template_kwargs": {"tools": []}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_offline_chat_passes_template_kwargs(tmp_path):
    from pagellm import LLM, SamplingParams

    llm = LLM(DEMO_MODEL, num_gpu_blocks_override=64)
    on = llm.apply_chat_template(MESSAGES, SWITCHABLE)
    off = llm.apply_chat_template(MESSAGES, SWITCHABLE, chat_template_kwargs={"enable_thinking": False})
    tok = llm.get_tokenizer()
    assert tok.decode(on).endswith("<think>\n") and not tok.decode(off).endswith("<think>\n")
    out = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False, chat_template=SWITCHABLE,
                   chat_template_kwargs={"enable_thinking": False})
    assert out[0].prompt_token_ids == off


# ---- structured outputs after the thinking: a model whose <think> and </think> are single tokens ----

@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    import torch
    from make_models import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    out = str(tmp_path_factory.mktemp("thinking"))
    tok = make_tokenizer(510)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = THINKING_ON
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                      architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok


def test_grammar_waits_for_the_thinking(thinking_model):
    from pagellm.sampling_params import StructuredOutputsParams
    from pagellm.structured_output.manager import GrammarCompiler, StructuredOutputManager

    _, tok = thinking_model
    start, end = QWEN3.token_ids(tok)
    manager = StructuredOutputManager(lambda: GrammarCompiler(tok, len(tok), [0]))

    def allowed(seq_id):
        row = manager.bitmask([seq_id]).view("uint32")[0]
        return {t for t in range(len(tok)) if row[t // 32] >> (t % 32) & 1}

    choice = dict(choice=["aye", "nay"])
    manager.add(1, StructuredOutputsParams(**choice))
    plain = allowed(1)
    assert start not in plain and end not in plain and len(plain) < 10
    manager.add(2, StructuredOutputsParams(**choice, think_tokens=(start, end)))  # the first token may open it
    assert allowed(2) == plain | {start}
    manager.sync(2, [start])
    assert len(allowed(2)) == len(tok)  # thinking: unconstrained
    manager.fork(2, 3)
    manager.sync(2, [start, 5, 77, end])
    assert allowed(2) == plain and len(allowed(3)) == len(tok)  # the fork is still thinking
    manager.add(4, StructuredOutputsParams(**choice, think_tokens=(start, end), thinking=True))
    assert len(allowed(4)) == len(tok)
    manager.sync(4, [9, end, *tok.encode("aye", add_special_tokens=False)])
    assert allowed(4) == {0}  # the answer is complete: only the end-of-sequence token
    manager.add(5, StructuredOutputsParams(**choice, think_tokens=(start, end)))
    manager.sync(5, tok.encode("nay", add_special_tokens=False))  # no thinking: the grammar from the first token
    assert start not in allowed(5)


def test_server_constrains_the_answer_after_the_thinking(thinking_model):
    path, tok = thinking_model
    start, end = QWEN3.token_ids(tok)
    s = RemoteServer([path, "--served-model-name", "t", "--num-gpu-blocks-override", "128", "--reasoning-parser",
                      "qwen3", "--trust-request-chat-template"])
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
        kw = dict(model="t", messages=MESSAGES, max_tokens=12, temperature=0)
        so = {"structured_outputs": {"choice": ["aye", "nay"]}}
        # the template opened the thinking: free text until </think> (here forced at once), then the choice
        msg = client.chat.completions.create(**kw, logit_bias={str(end): 100}, extra_body=so).choices[0].message
        assert msg.content in ("aye", "nay") and (msg.model_extra or {}).get("reasoning") is None
        msg = client.chat.completions.create(**kw, logit_bias={str(start): -100, str(end): -100},
                                             extra_body=so).choices[0].message
        thought = (msg.model_extra or {}).get("reasoning")
        assert msg.content is None and thought and thought not in ("aye", "nay")  # never closed: all thinking
        # no tag in the prompt: </think> cannot come first, so the choice starts at once
        msg = client.chat.completions.create(**kw, logit_bias={str(end): 100},
                                             extra_body={**so, "chat_template": TEMPLATE}).choices[0].message
        assert msg.content in ("aye", "nay") and (msg.model_extra or {}).get("reasoning") is None
    finally:
        s.stop()


def test_think_tokens_are_checked(llama_path):
    from pagellm import LLM, SamplingParams
    from pagellm.sampling_params import StructuredOutputsParams

    with pytest.raises(ValueError, match="think_tokens must be two token ids"):
        StructuredOutputsParams(choice=["a"], think_tokens=(1,))
    llm = LLM(llama_path, num_gpu_blocks_override=32)
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"], think_tokens=(1, 10**6)))
    with pytest.raises(ValueError, match="structured_outputs must hold token ids in"):
        llm.generate("hi", bad, use_tqdm=False)


def test_offline_chat_passes_tools_to_the_template():
    from pagellm import LLM

    template = ("{% for t in tools or [] %}[tool {{ t['function']['name'] }}]{% endfor %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    llm = LLM(DEMO_MODEL, num_gpu_blocks_override=64)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    ids = llm.apply_chat_template(MESSAGES, template, tools=tools)
    assert llm.get_tokenizer().decode(ids).startswith("[tool get_weather]")
    out = llm.chat(MESSAGES, use_tqdm=False, chat_template=template, tools=tools)
    assert out[0].prompt_token_ids == ids


@pytest.fixture(scope="module")
def harmony_model(tmp_path_factory):
    """A tiny model whose tokenizer has harmony's tags as special tokens."""
    import torch
    from make_models import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|channel|>", "<|message|>", "<|start|>", "<|end|>"]})
    tok.chat_template = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>"
                         "{% endfor %}<|start|>assistant")
    path = str(tmp_path_factory.mktemp("harmony"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 initializer_range=0.2, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                                 architectures=["LlamaForCausalLM"])).save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


@pytest.fixture(scope="module")
def harmony_server(harmony_model):
    """The harmony model served with --reasoning-parser openai_gptoss."""
    path, tok = harmony_model
    s = RemoteServer([path, "--served-model-name", "harmony", "--num-gpu-blocks-override", "128",
                      "--reasoning-parser", "openai_gptoss"])
    yield s, tok
    s.stop()


def test_harmony_tags_reach_the_parser(harmony_server):
    """The chat reply keeps the special tokens the parser reads: what it returns is the parser's split of its own
    output tokens decoded with the special tokens kept, harmony tags among them (a logit bias puts them there)."""
    server, tok = harmony_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    bias = {str(tok.convert_tokens_to_ids(t)): 3 for t in ("<|channel|>", "<|message|>", "<|end|>")}
    kw = dict(model="harmony", messages=MESSAGES, max_tokens=24, temperature=0, logit_bias=bias)
    resp = client.chat.completions.create(**kw, extra_body={"return_token_ids": True})
    raw = tok.decode(resp.choices[0].model_extra["token_ids"], skip_special_tokens=False)
    assert "<|channel|>" in raw
    want = GPTOSS.split(tok.decode(resp.model_extra["prompt_token_ids"]), raw)
    msg = resp.choices[0].message
    assert ((msg.model_extra or {}).get("reasoning"), msg.content) == want
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    streamed = ("".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) or None,
                "".join(d.content or "" for d in deltas) or None)
    assert streamed == want


def test_harmony_tool_calls_parse_the_replys_own_tokens(harmony_model):
    """--tool-call-parser openai alone (no reasoning parser): the reply keeps harmony's special tokens for the parser
    (a logit bias puts them in a random model's text); content and calls are the parser's reading of the reply's
    own tokens, streamed or not."""
    from pagellm.entrypoints.openai.tool_calls import make_parser

    path, tok = harmony_model
    server = RemoteServer([path, "--served-model-name", "harmony", "--num-gpu-blocks-override", "128",
                           "--enable-auto-tool-choice", "--tool-call-parser", "openai"])
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        bias = {str(tok.convert_tokens_to_ids(t)): 3 for t in ("<|channel|>", "<|message|>", "<|end|>")}
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        kw = dict(model="harmony", messages=MESSAGES, max_tokens=24, temperature=0, logit_bias=bias, tools=tools)
        resp = client.chat.completions.create(**kw, extra_body={"return_token_ids": True})
        raw = tok.decode(resp.choices[0].model_extra["token_ids"], skip_special_tokens=False)
        assert "<|channel|>" in raw
        content, calls = make_parser("openai").parse(raw)
        msg = resp.choices[0].message
        assert msg.content == content and [c.function.name for c in msg.tool_calls or []] == [
            c.function.name for c in calls]
        deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        assert ("".join(d.content or "" for d in deltas) or None) == content
    finally:
        server.stop()
