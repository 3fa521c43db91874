"""Flags of `pagellm serve` beyond the engine's (EngineArgs)."""

from __future__ import annotations

import argparse
import json

from pagellm.entrypoints.openai.middleware import DEFAULT_MAX_BODY_SIZE
from pagellm.entrypoints.openai.reasoning import PARSERS
from pagellm.entrypoints.openai.tool_calls import TOOL_PARSERS


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="Address to bind.")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1 and /tokenize routes.")
    g.add_argument("--max-n", type=int, default=16, help="Largest n / best_of a request may ask for.")
    g.add_argument("--chat-template", default=None, help="Jinja chat template overriding the tokenizer's.")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="Accept a chat_template field in requests (refused by default: a template is code).")
    g.add_argument("--dashboard-public", action="store_true",
                   help="Serve /dashboard without the API key (by default it needs the key, like the API).")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='Let the model decide to call tools (tool_choice "auto"), parsing calls from its text.')
    g.add_argument("--tool-call-parser", default=None, choices=list(TOOL_PARSERS),
                   help="How tool calls are written in the model's text (hermes: <tool_call>{json}</tool_call>; "
                        "openai: GPT-OSS's harmony messages to functions.NAME; qwen3_coder: Qwen3-Coder's and "
                        "Qwen3.5's <function=NAME><parameter=P>; llama3_json: Llama 3's {\"name\", \"parameters\"} "
                        "objects; mistral: [TOOL_CALLS]; pythonic: [f(x=1), g()], Llama 3.2 / 4).")
    g.add_argument("--reasoning-parser", default=None, choices=sorted(PARSERS),
                   help="Return a reasoning model's thinking (<think>...</think>) apart from its answer: "
                        "message.reasoning (and reasoning_content) in chat replies and stream deltas.")
    g.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="Add usage.prompt_tokens_details.cached_tokens (OpenAI's field: prompt tokens whose KV came "
                        "from the prefix cache) to every reply's usage.")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="Write each logprobs token as 'token_id:N' (vLLM's flag): tokens whose text is not valid "
                        "UTF-8 on their own stay identifiable. A request's return_tokens_as_token_ids overrides it.")
    g.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="With --enable-lora: POST /v1/load_lora_adapter {lora_name, lora_path} and "
                        "/v1/unload_lora_adapter {lora_name} load and drop adapters while the server runs (vLLM's "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING); without it those routes do not exist.")
    g.add_argument("--server-dev-mode", action="store_true",
                   help="Add the routes RL post-training drives between rollouts (vLLM's VLLM_SERVER_DEV_MODE): POST "
                        "/sleep?level=1|2 and /wake_up[?tags=weights&tags=kv_cache] (with --enable-sleep-mode), GET "
                        "/is_sleeping, POST /reset_prefix_cache, POST /collective_rpc {method, args, kwargs} (a "
                        "worker method, e.g. of --worker-extension-cls; JSON results). Not for a server open to "
                        "clients: they change and call into the running engine.")
    g.add_argument("--allowed-origins", type=_json_list, default=["*"],
                   help='CORS: origins a browser may call from, a JSON list (default ["*"], as vLLM; [] turns '
                        "CORS off).")
    g.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS: allowed methods (JSON list).")
    g.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS: allowed headers (JSON list).")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies).")
    g.add_argument("--max-request-body-size", type=int, default=DEFAULT_MAX_BODY_SIZE,
                   help="Largest request body in bytes; larger bodies get 413.")
    g.add_argument("--uvicorn-log-level", default="warning")


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value
