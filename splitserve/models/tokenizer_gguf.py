"""Building a tokenizer from a GGUF file's metadata, with the `tokenizers` library.

A GGUF file carries no `tokenizer.json`: its vocabulary, merges, token types and special ids are
metadata under llama.cpp's key names. We rebuild the tokenizer they describe the way transformers'
GGUF integration and llama.cpp do:

- `tokenizer.ggml.model = gpt2`: byte-level BPE. The pre-tokenizer follows `tokenizer.ggml.pre`
  (llama.cpp's split regexes; `smollm`/`starcoder`/... split digits one by one before the GPT-2
  regex, exactly like SmolLM2's own tokenizer.json), ByteLevel decoder.
- `tokenizer.ggml.model = llama`: SentencePiece-style BPE with byte fallback (Metaspace), with
  merges from the file or rebuilt from the scores; gemma and phi3 variants as transformers has them.
- tokens typed CONTROL are added as special tokens, USER_DEFINED ones as plain added tokens.

The metadata is read by `models.gguf_file.read_gguf_metadata` rather than `gguf.GGUFReader`,
which maps every tensor and array and takes seconds on a 100 MB file; it walks the header only.
transformers is never imported here (tests use it as the reference).
"""

from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from splitserve.models.byte_level import BYTE_TO_CHAR, CHAR_TO_BYTE
from splitserve.models.gguf_file import read_gguf_metadata
from splitserve.models.tokenizer import Tokenizer

__all__ = ["tokenizer_from_gguf"]

# llama.cpp token types
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6

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
    alphabet = CHAR_TO_BYTE.keys()
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not alphabet >= set(token):  # a token the file spells in plain text: respell its bytes
            token = "".join(BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
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


def tokenizer_from_gguf(path: str) -> Tokenizer:
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
    alphabet = CHAR_TO_BYTE.keys()
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
