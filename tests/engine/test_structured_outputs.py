"""Structured output: every constrained output is in its language (JSON schema, regex, choice, EBNF), with greedy
and sampled decoding, n > 1, beam search and preemption; a grammar that does not compile fails before any work."""

import json
import re

import jsonschema
import pytest

from pagellm import LLM, SamplingParams
from pagellm.sampling_params import BeamSearchParams, StructuredOutputsParams
from tests.conftest import DEMO_MODEL

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "mood": {"enum": ["merry", "sad", "wroth"]},
    "titles": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["name", "age", "mood", "titles"]}
ORDER = {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
    "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                     "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["sku", "qty"]}}, "rush": {"type": "boolean"}}, "required": ["items", "rush"]}
REGEX = r"(thou|thee) art (a|an) [a-z]{3,9}\."
CHOICES = ["ROMEO", "JULIET", "MERCUTIO", "TYBALT"]
GRAMMAR = 'root ::= greeting ", " name "!"\ngreeting ::= "Hail" | "Good morrow"\nname ::= [A-Z] [a-z]+'
PROMPTS = ["ROMEO. ", "KING LEAR.\nWhat", "Speak, "]


@pytest.fixture(scope="module")
def llm():
    return LLM(DEMO_MODEL, num_gpu_blocks_override=1024)


def check(kind: str, text: str) -> None:
    if kind == "person":
        jsonschema.validate(json.loads(text), PERSON)
    elif kind == "order":
        jsonschema.validate(json.loads(text), ORDER)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(r"(Hail|Good morrow), [A-Z][a-z]+!", text), text


SPECS = {"person": StructuredOutputsParams(json=PERSON), "order": StructuredOutputsParams(json=json.dumps(ORDER)),
         "regex": StructuredOutputsParams(regex=REGEX), "choice": StructuredOutputsParams(choice=CHOICES),
         "grammar": StructuredOutputsParams(grammar=GRAMMAR)}


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_is_in_its_language(llm, kind, temperature):
    params = SamplingParams(temperature=temperature, seed=3, n=3, max_tokens=300, structured_outputs=SPECS[kind])
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    texts = [c.text for o in outs for c in o.outputs]
    assert len(texts) == 9
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text  # the grammar completed, then only EOS was allowed
            check(kind, c.text)
    if temperature > 0:
        assert len(set(texts)) > 1  # sampling still samples within the language
    assert llm.llm_engine.core.structured.num_active == 0  # every matcher freed


def test_best_of_and_beam_search_stay_in_the_language(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=5, n=2, best_of=4, max_tokens=300,
                                                structured_outputs=SPECS["person"]), use_tqdm=False)
    for o in outs:
        assert len(o.outputs) == 2
        for c in o.outputs:
            check("person", c.text)
    beams = llm.beam_search(PROMPTS[:2], BeamSearchParams(beam_width=3, max_tokens=60,
                                                          structured_outputs=SPECS["regex"]), use_tqdm=False)
    tok = llm.get_tokenizer()
    for prompt, b in zip(PROMPTS[:2], beams):
        assert len(b.sequences) == 3
        for s in b.sequences:
            check("regex", tok.decode(s.tokens[len(tok.encode(prompt)):], skip_special_tokens=True))


def test_preemption_keeps_each_grammar_state(llm):
    params = SamplingParams(temperature=0.0, max_tokens=300, structured_outputs=SPECS["order"])
    prompts = [p * k for p in PROMPTS for k in (1, 3)]
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    tight = LLM(DEMO_MODEL, block_size=4, num_gpu_blocks_override=100)
    got = [o.outputs[0].text for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert got == expected
    for text in got:
        check("order", text)


def test_unconstrained_requests_in_the_same_batch_are_untouched(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    alone = llm.generate(PROMPTS, plain, use_tqdm=False)
    mixed = llm.generate(PROMPTS + PROMPTS, [plain] * 3 + [SamplingParams(
        temperature=0.0, max_tokens=60, structured_outputs=SPECS["choice"])] * 3, use_tqdm=False)
    assert [o.outputs[0].text for o in mixed[:3]] == [o.outputs[0].text for o in alone]
    assert all(o.outputs[0].text in CHOICES for o in mixed[3:])


@pytest.mark.parametrize("spec, message", [
    (StructuredOutputsParams(regex="[a-"), "structured_outputs.regex does not compile: Regex parsing error"),
    (StructuredOutputsParams(json={"type": "objekt"}), 'structured_outputs.json does not compile: Unsupported type'),
    (StructuredOutputsParams(grammar="root ::= "), "structured_outputs.grammar does not compile: EBNF parser error"),
])
def test_a_grammar_that_does_not_compile_fails_before_any_work(llm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(PROMPTS, SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_structured_outputs_params_need_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar, json_object"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])


@pytest.mark.parametrize("schema", [{"type": "string", "maxLength": 6}, {"type": "string", "minLength": 2},
                                    {"type": "object", "properties": {"name": PERSON["properties"]["name"]},
                                     "required": ["name"]}])
def test_bounded_strings_refuse_control_characters_and_take_escapes(schema):
    """xgrammar writes the characters of a string with minLength / maxLength as [^"\\\\\\r\\n]: raw control
    characters (invalid JSON) get in and escapes do not. pagellm rewrites that rule into a JSON string character."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from pagellm.structured_output.manager import GrammarCompiler

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(DEMO_MODEL), 4096, [0])
    grammar = compiler.compile(StructuredOutputsParams(json=schema))
    wrap = (lambda s: s) if schema["type"] == "string" else (lambda s: '{"name": ' + s + "}")

    def accepts(text: str) -> bool:
        m = xgr.GrammarMatcher(grammar)
        return m.accept_string(text) and m.accept_token(0) and m.is_terminated()  # 0: the stop token

    assert accepts(wrap('"abc"'))
    assert accepts(wrap('"a\\"b"')) and accepts(wrap('"\\u00e9t\\n"'))  # escapes, each one character
    assert not accepts(wrap('"a\x17b"')) and not accepts(wrap('"a\tb"'))  # raw control characters
    if schema.get("maxLength") == 6:
        assert accepts('"abcdef"') and not accepts('"abcdefg"') and accepts('"\\"\\"\\"\\"\\"\\""')
    if schema.get("minLength") == 2:
        assert not accepts('"a"') and accepts('"ab"')


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
        "additionalProperties": False}


def test_structural_tags_hold_the_text_after_a_trigger_to_its_tag(tiny_models):
    """structural_tag (vLLM's field): xgrammar's format with at_least_one and stop_after_first is exactly one tag,
    its JSON valid; the older structures + triggers leave the text free, but wherever the trigger appears (pushed
    by logit_bias) the tag's begin follows it and its JSON after."""
    from transformers import AutoTokenizer

    path = tiny_models["llama"]
    llm = LLM(path, num_gpu_blocks_override=64)
    tag = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<f="], "at_least_one": True, "stop_after_first": True,
        "tags": [{"type": "tag", "begin": "<f=w>", "content": {"type": "json_schema", "json_schema": CITY},
                  "end": "</f>"}]}}
    params = [SamplingParams(max_tokens=80, temperature=1.0, seed=s, structured_outputs=StructuredOutputsParams(
        structural_tag=json.dumps(tag))) for s in range(4)]
    for o in llm.generate(["hi"] * 4, params, use_tqdm=False):
        m = re.fullmatch(r"<f=w>(.*)</f>", o.outputs[0].text, re.S)
        assert m and o.outputs[0].finish_reason == "stop", o.outputs[0].text
        jsonschema.validate(json.loads(m.group(1)), CITY)
    legacy = {"structures": [{"begin": "<f=w>", "schema": CITY, "end": "</f>"}], "triggers": ["<f="]}
    bias = {t: 8.0 for t in AutoTokenizer.from_pretrained(path).encode("<f=", add_special_tokens=False)}
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, logit_bias=bias,
                             structured_outputs=StructuredOutputsParams(structural_tag=json.dumps(legacy)))
              for s in range(8)]
    texts = [o.outputs[0].text for o in llm.generate(["hi"] * 8, params, use_tqdm=False)]
    hits = [t[i:] for t in texts for i in range(len(t)) if t.startswith("<f=", i)]
    assert hits and all(h.startswith("<f=w>{") or "<f=w>".startswith(h) or h.startswith("<f=w>") for h in hits)
    assert any(not t.startswith("<f=") for t in texts)  # free text before a trigger
    with pytest.raises(ValueError, match="structured_outputs.structural_tag does not compile"):
        llm.generate("hi", SamplingParams(structured_outputs=StructuredOutputsParams(
            structural_tag=json.dumps({"structures": []}))), use_tqdm=False)


def test_structural_tag_response_format_and_field_map_to_the_same_params():
    """The API's response_format {"type": "structural_tag", ...} (both forms) and structured_outputs.structural_tag
    become StructuredOutputsParams(structural_tag=...)."""
    from pagellm.entrypoints.openai.protocol import CompletionRequest

    fmt = {"type": "const_string", "value": "yes"}
    spec = CompletionRequest(prompt="x", response_format={"type": "structural_tag", "format": fmt}).structured_spec()
    assert json.loads(spec.structural_tag) == {"type": "structural_tag", "format": fmt}
    old = CompletionRequest(prompt="x", response_format={"type": "structural_tag", "triggers": ["<f="], "structures": [
        {"begin": "<f=w>", "schema": CITY, "end": "</f>"}]}).structured_spec()
    assert json.loads(old.structural_tag)["triggers"] == ["<f="]
    field = CompletionRequest(prompt="x", structured_outputs={"structural_tag": json.dumps(fmt)}).structured_spec()
    assert field.structural_tag == json.dumps(fmt)
