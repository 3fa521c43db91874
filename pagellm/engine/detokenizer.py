"""Incremental detokenization: token ids arrive one at a time, text comes out without broken characters.

A token may end in the middle of a multi-byte UTF-8 character (byte-level BPE)
or change how the previous token renders (SentencePiece spaces). Text is only
released once it is stable: never a replacement character mid-stream, never a
doubled space. Fast tokenizers use `tokenizers.decoders.DecodeStream`; other
tokenizers use the prefix/read-offset method (decode a short window twice and
release the difference).

At the end, `finish()` releases whatever is still held back, so the full text
equals `tokenizer.decode(output_ids)`.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 6  # prompt tokens that prime the decoder (leading-space rules of SentencePiece)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.output_ids: list[int] = []
        self.text = ""  # everything released so far
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if context and self.decode(context).endswith("\ufffd"):
            context = []  # the prompt ends mid-character: its bytes would leak into the output text
        backend = getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            try:
                self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            except TypeError:  # tokenizers without prefill support
                self._stream = None
            self._backend = backend
        # Offset method state: ids = context + output; text of ids[prefix:read] was released already.
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def add(self, token_id: int) -> str:
        """Feed one token; return newly released text (possibly empty)."""
        self.output_ids.append(token_id)
        if self._stream is not None:
            piece = self._stream.step(self._backend, token_id) or ""
        else:
            piece = self._offset_step(token_id)
        self.text += piece
        return piece

    def finish(self) -> str:
        """Release any held-back text so that text == tokenizer.decode(output_ids)."""
        full = self.decode(self.output_ids)
        if full.startswith(self.text) and len(full) > len(self.text):
            rest = full[len(self.text):]
            self.text = full
            return rest
        return ""

    def decode(self, ids: list[int]) -> str:
        """The text of these ids as a whole (what finish() makes the incremental text equal)."""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     spaces_between_special_tokens=self.spaces_between_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _offset_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self.decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self.decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return new_text[len(prefix_text):]
        return ""
