"""The tokenizer for one model: encode, decode, per-token bytes and chat templates, over a
`tokenizers.Tokenizer` backend.

`Tokenizer.from_pretrained` builds it from a GGUF file (`models.tokenizer_gguf`, which rebuilds the
tokenizer from llama.cpp's metadata) or a Hugging Face directory (`models.tokenizer_hf`); streaming
detokenization is `models.detokenizer.IncrementalDecoder`. transformers is never imported here
(tests use it as the reference).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import tokenizers

from splitserve.models.byte_level import CHAR_TO_BYTE
from splitserve.models.chat_template import ChatTemplateError, render_chat_template, select_chat_template
from splitserve.models.detokenizer import IncrementalDecoder
from splitserve.models.gguf_file import read_gguf_metadata

__all__ = ["IncrementalDecoder", "Tokenizer", "load_tokenizer", "read_gguf_metadata"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
    """Encode, decode and chat-template rendering for one model.

    Build with `Tokenizer.from_pretrained(path)` (a `.gguf` file or a Hugging Face directory).
    `backend` is the underlying `tokenizers.Tokenizer`.
    """

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    add_bos_token: bool

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: set[int] | frozenset[int],
        add_bos_token: bool,
        chat_template: Any = None,
        special_tokens: dict[str, str] | None = None,
        byte_level: bool = False,
        name_or_path: str = "",
    ):
        self.backend = backend
        self.name_or_path = name_or_path
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.pad_token_id = (
            backend.token_to_id(self.special_tokens["pad_token"]) if "pad_token" in self.special_tokens else None
        )
        self.byte_level = byte_level
        added = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        self._token_bytes: dict[int, bytes] = {}
        self._plain_backend: tokenizers.Tokenizer | None = None
        self._max_token_bytes: int | None = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str) -> Tokenizer:
        # the builders construct a Tokenizer, so they are imported here rather than at the top
        from splitserve.models.tokenizer_gguf import tokenizer_from_gguf
        from splitserve.models.tokenizer_hf import tokenizer_from_hf_dir

        path = os.path.expanduser(str(path))
        if os.path.isfile(path):
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file")
            return tokenizer_from_gguf(path)
        if os.path.isdir(path):
            return tokenizer_from_hf_dir(path)
        raise FileNotFoundError(f"no tokenizer at {path!r}: expected a .gguf file or a Hugging Face directory")

    # -- text <-> ids ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_plain(self, text: str) -> list[int]:
        """`text` as plain text: control-token spellings in it (`<|im_end|>`) become ordinary
        tokens, never the control token itself. No BOS/EOS is added."""
        if self._plain_backend is None:
            # a copy, so the shared backend's setting never flips under a concurrent encode
            plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain_backend = plain
        return self._plain_backend.encode(text, add_special_tokens=False).ids

    @property
    def max_token_bytes(self) -> int:
        """The most bytes of text any one token stands for: a text of N bytes needs at least
        N / max_token_bytes tokens, which bounds a prompt's length before tokenizing it."""
        if self._max_token_bytes is None:
            self._max_token_bytes = max(1, max(len(self._raw_bytes(i) or b"") for i in range(self.vocab_size)))
        return self._max_token_bytes

    @property
    def may_shrink_text(self) -> bool:
        """Whether a normalizer may make the text shorter before tokenizing (NFKC, ...)."""
        return self.backend.normalizer is not None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size

    # -- single tokens, for logprobs ---------------------------------------------------------

    def _raw_bytes(self, token_id: int) -> bytes | None:
        """The bytes one token stands for when decoded in context (special tokens included)."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return None
        if self.byte_level:
            # ByteLevel decoder: map every char back to its byte; a token with any other char
            # (an added token spelled in plain text) stands for its own UTF-8.
            try:
                raw = bytes(CHAR_TO_BYTE[c] for c in piece)
            except KeyError:
                raw = piece.encode("utf-8")
        else:
            match = _BYTE_PIECE.match(piece)
            if match and token_id not in self.special_token_ids:
                raw = bytes([int(match.group(1), 16)])
            else:
                raw = piece.replace("\u2581", " ").encode("utf-8")
        self._token_bytes[token_id] = raw
        return raw

    def token_bytes(self, token_id: int) -> list[int] | None:
        """The raw UTF-8 bytes of one token (OpenAI's `bytes`), or None for an unknown id."""
        raw = self._raw_bytes(token_id)
        return None if raw is None else list(raw)

    def token_text(self, token_id: int) -> str:
        """One token's text for logprobs: the token decoded alone (special tokens included).

        A token that is not valid UTF-8 by itself (part of a multi-byte character) is shown as
        OpenAI shows it, `bytes:` and its bytes escaped: e.g. "bytes:\\xe2\\x80".
        """
        raw = self._raw_bytes(token_id)
        if raw is None:
            return ""
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return self.backend.decode([token_id], skip_special_tokens=False)

    # -- chat --------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        *,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render the conversation as the model's template does (transformers' output with
        `tokenize=False`). `kwargs` become template variables (e.g. `enable_thinking=False`)."""
        source = select_chat_template(chat_template if chat_template is not None else self.chat_template, tools)
        if source is None:
            raise ChatTemplateError(f"{self.name_or_path or 'this tokenizer'} has no chat template")
        return render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=kwargs.pop("documents", None),
            special_tokens=self.special_tokens,
            **kwargs,
        )

    # -- streaming ---------------------------------------------------------------------------

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={sorted(self.eos_token_ids)}, add_bos_token={self.add_bos_token})"
        )


def load_tokenizer(path: str) -> Tokenizer:
    """`Tokenizer.from_pretrained(path)`."""
    return Tokenizer.from_pretrained(path)
