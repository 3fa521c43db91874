"""The `pagellm` command, run as a user runs it: a subprocess."""

import subprocess
import sys

import pytest

from tests.conftest import DEMO_MODEL


def run(*args, input=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pagellm.entrypoints.cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout)


@pytest.mark.parametrize("cmd", [[], ["generate"], ["chat"], ["serve"], ["bench"], ["bench", "throughput"]])
def test_help(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "usage: pagellm" in r.stdout


def test_generate_with_the_demo_model_prints_text():
    r = run("generate", "--prompt", "ROMEO.", "--max-tokens", "20", "--seed", "0", "--echo")
    assert r.returncode == 0, r.stderr
    assert "ROMEO." in r.stdout and "finish: " in r.stdout
    body = r.stdout.split("\n", 1)[1]
    assert len(body.strip()) > len("ROMEO.")


def test_generate_seed_is_reproducible_and_n_gives_n_completions():
    a = run("generate", "--prompt", "KING.", "--max-tokens", "12", "--seed", "7", "--n", "2")
    b = run("generate", "--prompt", "KING.", "--max-tokens", "12", "--seed", "7", "--n", "2")
    assert a.returncode == 0 and a.stdout == b.stdout
    assert "completion 0" in a.stdout and "completion 1" in a.stdout


def test_generate_on_another_checkpoint(gpt2_path):
    r = run("generate", gpt2_path, "--prompt", "The quick", "--max-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "5 tokens" in r.stdout


def one_line_error(r):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode != 0
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_bad_flag_value_is_one_line():
    assert "invalid int value: 'abc'" in one_line_error(run("generate", "--max-tokens", "abc"))


def test_bad_sampling_value_is_one_line():
    assert "temperature must be >= 0" in one_line_error(run("generate", "--prompt", "x", "--temperature", "-1"))


def test_missing_model_is_one_line(tmp_path):
    assert "does not exist" in one_line_error(run("generate", str(tmp_path / "missing"), "--prompt", "x"))


def test_chat_streams_a_reply_and_ends_on_empty_line():
    r = run("chat", "--max-tokens", "16", "--seed", "1", input="What say you, my lord?\n\n")
    assert r.returncode == 0, r.stderr
    assert "model> " in r.stdout
    reply = r.stdout.split("model> ", 1)[1].strip()
    assert reply


def test_demo_model_files_load_with_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
