"""Building a tokenizer from a Hugging Face directory: `tokenizer.json`, with the special tokens,
end-of-sequence ids and chat template its config files add (as transformers reads them)."""

from __future__ import annotations

import json
import os
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders

from splitserve.models.tokenizer import Tokenizer

__all__ = ["tokenizer_from_hf_dir"]


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


def tokenizer_from_hf_dir(path: str) -> Tokenizer:
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
