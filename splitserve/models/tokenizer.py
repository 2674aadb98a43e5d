"""Tokenizers for GGUF files and Hugging Face directories, built on the `tokenizers` library.

A GGUF file carries no `tokenizer.json`: its vocabulary, merges, token types and special ids are
metadata under llama.cpp's key names. We rebuild the tokenizer they describe the way transformers'
GGUF integration and llama.cpp do:

- `tokenizer.ggml.model = gpt2`: byte-level BPE. The pre-tokenizer follows `tokenizer.ggml.pre`
  (llama.cpp's split regexes; `smollm`/`starcoder`/... split digits one by one before the GPT-2
  regex, exactly like SmolLM2's own tokenizer.json), ByteLevel decoder.
- `tokenizer.ggml.model = llama`: SentencePiece-style BPE with byte fallback (Metaspace), with
  merges from the file or rebuilt from the scores; gemma and phi3 variants as transformers has them.
- tokens typed CONTROL are added as special tokens, USER_DEFINED ones as plain added tokens.

The metadata is read by a small reader here rather than `gguf.GGUFReader`, which maps every
tensor and array and takes seconds on a 100 MB file; this one walks the key/value section only.
transformers is never imported here (tests use it as the reference).
"""

from __future__ import annotations

import codecs
import json
import mmap
import os
import re
import struct
from collections.abc import Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from splitserve.models.chat_template import ChatTemplateError, render_chat_template, select_chat_template

__all__ = ["IncrementalDecoder", "Tokenizer", "load_tokenizer", "read_gguf_metadata"]


# --------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9

# llama.cpp token types
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def read_gguf_metadata(path: str, prefixes: Sequence[str] = ("general.", "tokenizer.")) -> dict[str, Any]:
    """The key/value metadata of a GGUF file whose key starts with one of `prefixes`.

    Only the metadata section is read (through mmap); tensors are never touched. Arrays come back
    as lists; others keys are skipped without decoding their values.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        _tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        unpack = struct.unpack_from
        out: dict[str, Any] = {}

        def read_str(pos: int) -> tuple[str, int]:
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            return buf[pos : pos + n].decode("utf-8", errors="replace"), pos + n

        def skip_value(pos: int, vtype: int) -> int:
            if vtype in _GGUF_SCALARS:
                return pos + struct.calcsize(_GGUF_SCALARS[vtype])
            if vtype == _GGUF_STRING:
                (n,) = unpack("<Q", buf, pos)
                return pos + 8 + n
            if vtype == _GGUF_ARRAY:
                etype, count = unpack("<IQ", buf, pos)
                pos += 12
                if etype in _GGUF_SCALARS:
                    return pos + count * struct.calcsize(_GGUF_SCALARS[etype])
                for _ in range(count):
                    pos = skip_value(pos, etype)
                return pos
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        def read_value(pos: int, vtype: int) -> tuple[Any, int]:
            if vtype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[vtype]
                return unpack(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
            if vtype == _GGUF_STRING:
                return read_str(pos)
            if vtype == _GGUF_ARRAY:
                etype, count = unpack("<IQ", buf, pos)
                pos += 12
                if etype in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[etype]
                    size = struct.calcsize(fmt)
                    values = list(unpack(f"<{count}{fmt[1]}", buf, pos))
                    return values, pos + count * size
                if etype == _GGUF_STRING:
                    values = []
                    append = values.append
                    for _ in range(count):
                        (n,) = unpack("<Q", buf, pos)
                        pos += 8
                        append(buf[pos : pos + n].decode("utf-8", errors="replace"))
                        pos += n
                    return values, pos
                values = []
                for _ in range(count):
                    value, pos = read_value(pos, etype)
                    values.append(value)
                return values, pos
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        for _ in range(kv_count):
            key, pos = read_str(pos)
            (vtype,) = unpack("<I", buf, pos)
            pos += 4
            if key.startswith(tuple(prefixes)):
                out[key], pos = read_value(pos, vtype)
            else:
                pos = skip_value(pos, vtype)
        return out


# --------------------------------------------------------------------------------------------
# Building a tokenizer from GGUF metadata
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}

# The GPT-2 split; llama.cpp's "default"/"gpt2" pre-tokenizer.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` values whose split is one regex (then bytes), as transformers maps them.
_PRE_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# llama.cpp splits digits one at a time, then applies the GPT-2 regex, for these (SmolLM2's own
# tokenizer.json says the same: Digits(individual_digits=True) then ByteLevel).
_PRE_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def _byte_level_pre_tokenizer(pre: str | None):
    if pre in _PRE_DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    split = _PRE_SPLITS.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    # "default", "gpt2" and anything unknown: the GPT-2 regex built into ByteLevel.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _merges_from_file(merges: list[str]) -> list[tuple[str, str]]:
    out = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"malformed GGUF merge {merge!r}")
        out.append((left, right))
    return out


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: each token split into two vocabulary pieces,
    best score first (the same order transformers' `generate_merges` produces)."""
    merges = []
    for merge, score in scores.items():
        local = []
        for i in range(1, len(merge)):
            left, right = merge[:i], merge[i:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gguf_byte_level(meta: dict) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    tokens = meta["tokenizer.ggml.tokens"]
    alphabet = _CHAR_TO_BYTE.keys()
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not alphabet >= set(token):  # a token the file spells in plain text: respell its bytes
            token = "".join(_BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
        vocab[token] = index
    merges = _merges_from_file(meta.get("tokenizer.ggml.merges") or [])
    tok = tokenizers.Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )
    tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    return tok, vocab


def _gguf_sentencepiece(meta: dict, architecture: str) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores")
    gemma = architecture in ("gemma", "gemma2", "gemma3")
    if gemma:  # runs of spaces are stored as spaces; the vocabulary wants them as "▁"
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _merges_from_file(meta["tokenizer.ggml.merges"])
    else:
        if gemma:  # gemma's scores do not follow its merge order; the token order does
            rank = {token: -index for index, token in enumerate(tokens)}
        elif scores is not None:
            rank = dict(zip(tokens, scores))
        else:
            raise ValueError("a sentencepiece GGUF vocabulary without merges needs tokenizer.ggml.scores")
        merges = _generate_merges(vocab, rank)
    if gemma:
        tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>"
                                       if "<unk>" in vocab else None, dropout=None, byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        return tok, vocab
    tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    add_prefix_space = meta.get("tokenizer.ggml.add_space_prefix", True)
    if architecture == "phi3":  # the prefix space comes from a normalizer, not Metaspace
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend(prepend="\u2581"), normalizers.Replace(pattern=" ", content="\u2581")]
        )
        tok.pre_tokenizer = None
        add_prefix_space = True
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_prefix_space else "never", split=False
        )
    sequence = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        sequence.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(sequence)
    return tok, vocab


def _template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
    single = ([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else [])
    pair = single + ([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos else [])
    special = [t for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def _tokenizer_from_gguf(path: str) -> Tokenizer:
    meta = read_gguf_metadata(path)
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens)")
    architecture = meta.get("general.architecture", "")
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    if model == "gpt2":
        tok, vocab = _gguf_byte_level(meta)
    elif model in ("llama", "gemma4"):
        tok, vocab = _gguf_sentencepiece(meta, "gemma3" if model == "gemma4" else architecture)
    else:
        raise ValueError(
            f"{path}: cannot build a tokenizer for tokenizer.ggml.model={model!r} (gpt2 and llama are supported)"
        )

    byte_level = model == "gpt2"
    alphabet = _CHAR_TO_BYTE.keys()
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, ttype in zip(tokens, types)
        if ttype == _TOKEN_CONTROL and (not byte_level or alphabet >= set(token))
    ]
    if control:
        tok.add_special_tokens(control)
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, ttype in zip(tokens, types)
        if ttype == _TOKEN_USER_DEFINED and token in vocab
    ]
    if user_defined:
        tok.add_tokens(user_defined)

    def token_of(key: str) -> tuple[str, int] | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is None or not 0 <= token_id < len(tokens):
            return None
        return tokens[token_id], int(token_id)

    named = {name: token_of(key) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"),
    )}
    # Named special tokens are special even when the file typed them otherwise (e.g. <unk>).
    extra = [AddedToken(t[0], normalized=False, special=True) for t in named.values() if t is not None]
    if extra:
        tok.add_special_tokens(extra)

    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    bos, eos = named["bos_token"], named["eos_token"]
    tok.post_processor = _template_processor(bos if add_bos else None, eos if add_eos else None)

    eos_ids = {eos[1]} if eos else set()
    for key in ("eot_token_id", "eom_token_id"):
        extra_eos = token_of(key)
        if extra_eos is not None:
            eos_ids.add(extra_eos[1])
    return Tokenizer(
        tok,
        bos_token=bos[0] if bos else None,
        eos_token=eos[0] if eos else None,
        eos_token_ids=eos_ids,
        add_bos_token=bool(add_bos and bos),
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens={name: t[0] for name, t in named.items() if t is not None},
        byte_level=byte_level,
        name_or_path=path,
    )


# --------------------------------------------------------------------------------------------
# Hugging Face directories
# --------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):  # the older serialized AddedToken form
        return value.get("content")
    return str(value)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _tokenizer_from_hf_dir(path: str) -> Tokenizer:
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"{path} has no tokenizer.json (slow-only tokenizers are not supported)")
    tok = tokenizers.Tokenizer.from_file(tokenizer_file)
    # padding/truncation saved in tokenizer.json would apply to every encode() call
    tok.no_padding()
    tok.no_truncation()
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    generation = _read_json(os.path.join(path, "generation_config.json"))
    model_config = _read_json(os.path.join(path, "config.json"))

    # added tokens the config knows and tokenizer.json does not (rare, but transformers adds them)
    present = {t.content for t in tok.get_added_tokens_decoder().values()}
    decoder_entries = config.get("added_tokens_decoder") or {}
    extra = []
    for _, entry in sorted(decoder_entries.items(), key=lambda kv: int(kv[0])):
        if entry.get("content") and entry["content"] not in present:
            extra.append(AddedToken(entry["content"], single_word=entry.get("single_word", False),
                                    lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                                    normalized=entry.get("normalized", True), special=entry.get("special", False)))
    if extra:
        tok.add_tokens(extra)

    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content = _token_content(config.get(name))
        if content is not None:
            special[name] = content
    named_missing = [AddedToken(c, special=True) for c in special.values()
                     if c not in {t.content for t in tok.get_added_tokens_decoder().values()}]
    if named_missing:
        tok.add_special_tokens(named_missing)

    bos_token, eos_token = special.get("bos_token"), special.get("eos_token")
    bos_id = tok.token_to_id(bos_token) if bos_token is not None else None

    # tokenizer.json's post-processor decides whether BOS/EOS are added; like transformers (v5),
    # `add_bos_token`/`add_eos_token` in tokenizer_config.json do not override it.
    with_special = tok.encode("a", add_special_tokens=True).ids
    without = tok.encode("a", add_special_tokens=False).ids
    add_bos = bos_id is not None and len(with_special) > len(without) and with_special[0] == bos_id

    eos_ids = set()
    if eos_token is not None and tok.token_to_id(eos_token) is not None:
        eos_ids.add(tok.token_to_id(eos_token))
    # generate() stops on generation_config's eos ids, which default to config.json's
    if "eos_token_id" in generation:
        eos_ids.update(_as_id_list(generation["eos_token_id"]))
    else:
        eos_ids.update(_as_id_list(model_config.get("eos_token_id")))

    chat_template = config.get("chat_template")
    jinja_file = os.path.join(path, "chat_template.jinja")
    json_file = os.path.join(path, "chat_template.json")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            chat_template = f.read()
    elif chat_template is None and os.path.isfile(json_file):
        chat_template = _read_json(json_file).get("chat_template")

    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    return Tokenizer(
        tok,
        bos_token=bos_token,
        eos_token=eos_token,
        eos_token_ids=eos_ids,
        add_bos_token=add_bos,
        chat_template=chat_template,
        special_tokens=special,
        byte_level=byte_level,
        name_or_path=path,
    )


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------

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
        path = os.path.expanduser(str(path))
        if os.path.isfile(path):
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file")
            return _tokenizer_from_gguf(path)
        if os.path.isdir(path):
            return _tokenizer_from_hf_dir(path)
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
                raw = bytes(_CHAR_TO_BYTE[c] for c in piece)
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


def load_tokenizer(path: str) -> Tokenizer:
    """`Tokenizer.from_pretrained(path)`."""
    return Tokenizer.from_pretrained(path)
