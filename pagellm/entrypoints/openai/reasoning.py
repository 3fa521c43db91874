"""Reasoning outputs (`pagellm serve --reasoning-parser NAME`): a chat reply's thinking apart from its answer.

Reasoning models write their thinking between tags (`<think> ... </think>`) before the answer. With a parser
the chat API returns the thinking in `message.reasoning` (and `reasoning_content`, the name older clients and
DeepSeek's API use) and only the answer in `content`; streamed deltas carry the same split.

Where the reasoning starts is read from the rendered prompt: a prompt whose last tag is an open `<think>` (the
chat templates of DeepSeek-R1 and Qwen3.5 open it; Qwen3's template with enable_thinking=False closes it with an
empty block) tells whether the output begins inside the thinking. An output that itself begins with `<think>`
opens it. With neither, `deepseek_r1` still takes the output as thinking until `</think>` (R1 models may skip
the opening tag), `qwen3` takes it as the answer. An output that never closes its thinking (cut by max_tokens)
is all reasoning, with no content.

The split works on text, so tags that are one added token or several ordinary ones both work; a streamed piece
that could be the beginning of a tag is held back until the next piece shows what it is.

GPT-OSS (`openai_gptoss`, vLLM's name) writes OpenAI's harmony format, its tags special tokens (kept in the text
for this parser: the request detokenizes with skip_special_tokens=False):

    <|channel|>analysis<|message|>THINKING<|end|><|start|>assistant<|channel|>final<|message|>ANSWER

The thinking is the analysis message; the answer is the final message, its header (with or without the
`<|start|>assistant` that the prompt may already hold) dropped. The other harmony messages (commentary: tool calls
and preambles) stay in the content, for the `openai` tool-call parser (tool_calls.py) to read.

Structured outputs: where both tags are single tokens (Qwen3, DeepSeek-R1), a constrained reply may think first:
the grammar waits for `</think>` when the output begins inside the thinking, and otherwise allows `<think>` as
the first token beside its own (StructuredOutputsParams.think_tokens). Elsewhere the grammar applies from the
first token and the reply is not split.
"""

from __future__ import annotations

from dataclasses import dataclass


def safe_end(text: str, tag: str) -> int:
    """How much of text can be sent without sending a prefix of tag that the next piece might complete."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return len(text) - k
    return len(text)


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    start: str = "<think>"
    end: str = "</think>"
    implicit_start: bool = False  # an output after a prompt without tags begins inside the thinking
    content_headers: tuple[str, ...] = ()  # text that opens the answer, dropped where the answer begins with it
    keep_special_tokens: bool = False  # the tags are special tokens the detokenizer must keep (harmony)

    def begins_in_reasoning(self, prompt_text: str) -> bool:
        """Whether the output after this rendered prompt starts inside the thinking."""
        s, e = prompt_text.rfind(self.start), prompt_text.rfind(self.end)
        if s == -1 and e == -1:
            return self.implicit_start
        return s > e

    def token_ids(self, tokenizer) -> tuple[int, int] | None:
        """(start, end) token ids when each tag is one token (then a grammar can wait for the thinking to end)."""
        ids = [tokenizer.encode(tag, add_special_tokens=False) for tag in (self.start, self.end)]
        return (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None

    def stream(self, prompt_text: str) -> ReasoningStream:
        return ReasoningStream(self, self.begins_in_reasoning(prompt_text))

    def split(self, prompt_text: str, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for an empty part."""
        reasoning, content = self.stream(prompt_text).feed(text, final=True)
        return reasoning or None, content or None


PARSERS = {
    "deepseek_r1": ReasoningParser("deepseek_r1", implicit_start=True),
    "qwen3": ReasoningParser("qwen3"),
    # vLLM's other names for <think> ... </think>: where the output starts is read from the prompt (DeepSeek-V3.1's
    # and GLM-4.5's templates open the thinking, or close an empty block when it is off)
    "deepseek_v3": ReasoningParser("deepseek_v3"),
    "glm45": ReasoningParser("glm45"),
    # MiniMax-M2 thinks first without writing the opening tag
    "minimax_m2": ReasoningParser("minimax_m2", implicit_start=True),
    # Magistral (Mistral): [THINK] ... [/THINK], special tokens of its tokenizer
    "mistral": ReasoningParser("mistral", "[THINK]", "[/THINK]", keep_special_tokens=True),
    # ByteDance Seed-OSS
    "seed_oss": ReasoningParser("seed_oss", "<seed:think>", "</seed:think>"),
    # Granite 3.x with thinking on: plain-text markers
    "granite": ReasoningParser("granite", "Here is my thought process:", "Here is my response:"),
    "openai_gptoss": ReasoningParser("openai_gptoss", "<|channel|>analysis<|message|>", "<|end|>",
                                     content_headers=("<|start|>assistant<|channel|>final<|message|>",
                                                      "<|channel|>final<|message|>"),
                                     keep_special_tokens=True),
}


class ReasoningStream:
    """One choice's output, piece by piece: each feed returns (reasoning, content) text to send now."""

    def __init__(self, parser: ReasoningParser, in_reasoning: bool) -> None:
        self.parser = parser
        self.state = "start"  # start (nothing but whitespace yet) -> reasoning -> content
        self.after_start = "reasoning" if in_reasoning else "content"
        self.pending = ""  # text held back: it may be the beginning of a tag
        self.header_checked = not parser.content_headers  # the answer's opening was looked at (and dropped)

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        """`final`: this is the output's last piece; nothing is held back."""
        p = self.parser
        text, self.pending = self.pending + piece, ""
        reasoning = ""
        if self.state == "start":
            lead = text.lstrip()
            if lead.startswith(p.start):
                text, self.state = lead[len(p.start):], "reasoning"
            elif not final and p.start.startswith(lead):  # still only whitespace or part of the opening tag
                self.pending = text
                return "", ""
            else:
                self.state = self.after_start
        if self.state == "reasoning":
            i = text.find(p.end)
            if i == -1:
                keep = len(text) if final else safe_end(text, p.end)
                self.pending = text[keep:]
                return text[:keep], ""
            reasoning, text, self.state = text[:i], text[i + len(p.end):], "content"
        if not self.header_checked:  # the answer's header (harmony), dropped once it is whole
            header = next((h for h in p.content_headers if text.startswith(h)), None)
            if header is not None:
                text, self.header_checked = text[len(header):], True
            elif not final and any(h.startswith(text) for h in p.content_headers):
                self.pending = text  # (possibly) part of a header: wait for more
                return reasoning, ""
            else:
                self.header_checked = True
        return reasoning, text
