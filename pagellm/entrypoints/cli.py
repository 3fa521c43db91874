"""The `pagellm` command: generate, chat, serve, bench.

    pagellm generate [MODEL] --prompt TEXT [--max-tokens N --temperature T ...]
    pagellm chat [MODEL]
    pagellm serve [MODEL] [--host --port --api-key ...]
    pagellm bench {throughput,latency,serve,kv} ...
    pagellm list-models                       (architectures and what each implementation covers)

MODEL defaults to the demo model shipped inside the package. Every engine flag
of `LLM(...)` is a flag here (EngineArgs). Errors print one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shakespeare-llama")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and subcommand parsers inherit this class)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


# `generate` and `chat` own --seed (the sampling seed); the engine keeps its default seed there.
SAMPLING_OWNED = frozenset({"seed"})


def _engine_args(ns: argparse.Namespace, skip: frozenset[str] = frozenset()):
    from pagellm.engine.arg_utils import EngineArgs

    ns.model = ns.model or DEMO_MODEL
    if not os.path.isdir(ns.model):
        raise CLIError(f"model directory {ns.model!r} does not exist")
    return EngineArgs.from_cli_args(ns, skip)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset: the model's generation config, as --generation-config says, "
                             "else the default shown)")
    g.add_argument("--max-tokens", type=int, default=None, help="Tokens to generate per completion (64).")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (1.0).")
    g.add_argument("--top-p", type=float, default=None, help="(1.0)")
    g.add_argument("--top-k", type=int, default=None, help="0 or -1 = off (off).")
    g.add_argument("--min-p", type=float, default=None, help="(0.0)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="(1.0)")
    g.add_argument("--seed", type=int, default=None, help="Sampling seed (reproducible output).")
    g.add_argument("--n", type=int, default=1, help="Completions per prompt.")
    g.add_argument("--stop", action="append", default=None, help="Stop string (repeatable).")


def _sampling_params(ns: argparse.Namespace, defaults: dict | None = None, **extra):
    """The flags given, over the model's generation-config defaults (none yet: a check before the model loads)."""
    from pagellm.sampling_params import SamplingParams

    kw = {"max_tokens": 64, **(defaults or {})}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(ns, name) is not None:
            kw[name] = getattr(ns, name)
    return SamplingParams(seed=ns.seed, n=ns.n, stop=ns.stop, **kw, **extra)


def cmd_generate(ns: argparse.Namespace) -> None:
    from pagellm.entrypoints.llm import LLM

    _sampling_params(ns)  # validate before loading the model
    llm = LLM(**vars(_engine_args(ns, SAMPLING_OWNED)))
    params = _sampling_params(ns, llm.llm_engine.config.model.default_sampling)
    prompts = ns.prompt or [sys.stdin.read()]
    outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for out in outs:
        for c in out.outputs:
            header = f"--- completion {c.index}" if len(out.outputs) > 1 else "---"
            print(f"{header} (prompt: {out.prompt!r}, {len(c.token_ids)} tokens, finish: {c.finish_reason})")
            print(out.prompt + c.text if ns.echo else c.text)


def cmd_chat(ns: argparse.Namespace) -> None:
    from pagellm.engine.llm_engine import LLMEngine
    from pagellm.entrypoints.llm import LLM
    from pagellm.sampling_params import RequestOutputKind

    ns.n = 1
    _sampling_params(ns)  # validate before loading the model
    llm = LLM(**vars(_engine_args(ns, SAMPLING_OWNED)))
    params = _sampling_params(ns, llm.llm_engine.config.model.default_sampling, output_kind=RequestOutputKind.DELTA)
    engine: LLMEngine = llm.llm_engine
    history: list[dict[str, str]] = []
    if ns.system:
        history.append({"role": "system", "content": ns.system})
    print("Chat with the model; an empty line or Ctrl-D ends the session.", file=sys.stderr)
    turn = 0
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if not user.strip():
            break
        history.append({"role": "user", "content": user})
        ids = llm.apply_chat_template(history, ns.chat_template)
        rid = f"chat-{turn}"
        turn += 1
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
        print("model> ", end="", flush=True)
        reply = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                piece = out.outputs[0].text if out.outputs else ""
                reply.append(piece)
                print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(ns: argparse.Namespace) -> None:
    from pagellm.entrypoints.openai.api_server import run_server

    run_server(ns, _engine_args(ns))


def cmd_list_models(ns: argparse.Namespace) -> None:
    from pagellm.models.registry import model_table

    rows = model_table()
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f"{'architecture':<{widths[0]}}  {'checkpoints':<{widths[1]}}  features")
    for arch, example, features in rows:
        print(f"{arch:<{widths[0]}}  {example:<{widths[1]}}  {features}")


def build_parser() -> argparse.ArgumentParser:
    from pagellm import __version__
    from pagellm.engine.arg_utils import EngineArgs

    parser = _Parser(prog="pagellm", description="High-throughput LLM inference with a paged KV cache.")
    parser.add_argument("--version", action="version", version=f"pagellm {__version__}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,serve,bench,list-models}")

    gen = sub.add_parser("generate", help="Generate completions for prompts.",
                         description="Generate completions (MODEL defaults to the shipped demo model).")
    gen.add_argument("--prompt", action="append", help="Prompt text (repeatable; default: read stdin).")
    gen.add_argument("--echo", action="store_true", help="Print the prompt before each completion.")
    _sampling_args(gen)
    EngineArgs.add_cli_args(gen, skip=SAMPLING_OWNED)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="Interactive chat in the terminal, streaming tokens.",
                          description="Chat using the tokenizer's chat template (MODEL defaults to the demo model).")
    chat.add_argument("--system", default=None, help="System message.")
    chat.add_argument("--chat-template", default=None, help="Jinja chat template overriding the tokenizer's.")
    _sampling_args(chat)
    EngineArgs.add_cli_args(chat, skip=SAMPLING_OWNED)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server.",
                           description="Serve MODEL over an OpenAI-compatible API (MODEL defaults to the demo model).")
    from pagellm.entrypoints.openai.cli_args import add_server_args

    add_server_args(serve)
    EngineArgs.add_cli_args(serve)
    serve.set_defaults(func=cmd_serve)

    from pagellm.benchmarks.cli import add_bench_parser

    add_bench_parser(sub)

    models = sub.add_parser("list-models", help="Architectures pagellm runs, with their features.",
                            description="Every natively implemented architecture, then the transformers fallback.")
    models.set_defaults(func=cmd_list_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, ns.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], None] = ns.func
    try:
        func(ns)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"pagellm {ns.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
