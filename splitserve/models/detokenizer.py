"""Streaming detokenization: token ids in, text deltas out, never splitting a character."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitserve.models.tokenizer import Tokenizer

__all__ = ["IncrementalDecoder"]


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas.

    `step(id)` returns the new text (possibly '' while a multi-byte character is incomplete);
    once the stream is over, `flush()` returns whatever is still held back (an incomplete
    character decodes to U+FFFD, as `decode` shows it). The concatenation of all deltas and the
    final `flush()` equals `tokenizer.decode(ids)`; `text` is the text emitted so far.

    Byte-level vocabularies decode exactly, token by token, through an incremental UTF-8 decoder.
    Others (SentencePiece) use the windowed re-decode vLLM and TGI use, which is exact as long as
    the decoder's output for a window does not depend on what came before it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.ids: list[int] = []
        self._exact = tokenizer.byte_level
        if self._exact:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._prefix_offset = 0
        self._read_offset = 0

    def step(self, token_id: int) -> str:
        token_id = int(token_id)
        self.ids.append(token_id)
        if self._exact:
            if self.skip_special_tokens and token_id in self.tokenizer.special_token_ids:
                return ""
            raw = self.tokenizer._raw_bytes(token_id)
            if raw is None:
                return ""
            delta = self._utf8.decode(raw)
        else:
            delta = self._window_step(final=False)
        self.text += delta
        return delta

    def flush(self) -> str:
        """End of stream: the text still held back ('' when there is none)."""
        if self._exact:
            delta = self._utf8.decode(b"", final=True)
        else:
            delta = self._window_step(final=True)
        self.text += delta
        return delta

    def _window_step(self, final: bool) -> str:
        decode = self.tokenizer.backend.decode
        skip = self.skip_special_tokens
        prefix_text = decode(self.ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        new_text = decode(self.ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return delta
        return ""
