"""splitserve.models.tokenizer against transformers as the reference.

The demo GGUF says `tokenizer.ggml.pre = smollm`: llama.cpp and SmolLM2's own tokenizer.json split
digits one by one before the GPT-2 regex. transformers' GGUF loader knows no `smollm` split and
leaves the plain GPT-2 regex, which differs on digits next to whitespace (`"   4567"`, `"\\n\\n3"`).
So the reference here is transformers' GGUF tokenizer with SmolLM2's published pre-tokenizer put
back; on text without digits we also match the unmodified transformers tokenizer.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import time

import pytest

from splitserve.models.chat_template import ChatTemplateError
from splitserve.models.registry import demo_model_path
from splitserve.models.tokenizer import Tokenizer, load_tokenizer, read_gguf_metadata

transformers = pytest.importorskip("transformers")
from tokenizers import pre_tokenizers  # noqa: E402

# SmolLM2-135M-Instruct's tokenizer.json pre-tokenizer
SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

TEXTS = [
    "Hello world",
    "Hello, world! How's it going? I'll be there; we've seen it.",
    " leading space",
    "trailing space ",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "1234567890 3.14159 -42 1,000,000 2024-01-01T12:00:00Z",
    "   4567",
    "\n\n3 apples",
    "x²+y³=z⁴ ½ ① ١٢٣",
    "naïve café résumé Ångström façade",
    "Emoji: 😀 👍🏽 👨\u200d👩\u200d👧 🇫🇷",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم",
    "tabs\tand\nnewlines\r\nmixed   runs     of\n\n\n   whitespace\t\t",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name> and <|im_end|>",
    "<|im_start ",
    "",
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return demo_model_path()


@pytest.fixture(scope="module")
def ours(gguf_path) -> Tokenizer:
    return Tokenizer.from_pretrained(gguf_path)


@pytest.fixture(scope="module")
def hf_gguf(gguf_path):
    """transformers' own GGUF tokenizer, untouched."""
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


@pytest.fixture(scope="module")
def ref(hf_gguf):
    """transformers' GGUF tokenizer with SmolLM2's pre-tokenizer (digits split first)."""
    fixed = copy.deepcopy(hf_gguf)
    fixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return fixed


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = ["Hello", " world", "123", " 89", "x1y2", "   ", "\n\n", "\t", "é", "漢字", "😀", "👨\u200d👩\u200d👧",
              "<|im_start|>", "<|im_end|>", "'s", " don't", "\u00a0", "١٢٣", "①", "3.14", "-42", "ÿ", "ℕ"]
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))))
        else:
            out.append("".join(
                chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xD7FF),
                                rng.randint(0x10000, 0x1F9FF)]))
                for _ in range(rng.randint(1, 16))
            ))
    return out


# ---------------------------------------------------------------------------------------------
# GGUF loading
# ---------------------------------------------------------------------------------------------


def test_load_is_fast(gguf_path):
    start = time.perf_counter()
    tok = load_tokenizer(gguf_path)
    elapsed = time.perf_counter() - start
    assert tok.vocab_size == 49152
    assert elapsed < 1.0, f"loading the demo tokenizer took {elapsed:.2f}s"


def test_metadata_reader(gguf_path):
    meta = read_gguf_metadata(gguf_path)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][2] == "<|im_end|>"


def test_special_ids(ours, ref):
    assert ours.vocab_size == len(ref) == 49152
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.eos_token_ids == frozenset({2}) == frozenset({ref.eos_token_id})
    assert ours.add_bos_token is False and ref.add_bos_token is False
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.special_tokens == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"
    }
    # control tokens are special, whole, and skipped on decode
    assert ours.special_token_ids == frozenset(range(17))
    assert ours.encode("<|im_start|>") == [1]
    assert ours.decode([1, 19556, 2]) == "Hello"


def test_pre_tokenizer_is_smollm2s(ours):
    assert json.loads(ours.backend.pre_tokenizer.__getstate__()) == SMOLLM2_PRE_TOKENIZER


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, ref, text):
    for add_special in (True, False):
        expected = ref.encode(text, add_special_tokens=add_special)
        assert ours.encode(text, add_special_tokens=add_special) == expected
    ids = ours.encode(text)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == text


def test_encode_matches_transformers_on_random_text(ours, ref, hf_gguf):
    for text in _random_texts(600):
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        if not any(c.isnumeric() for c in text):  # the digit split is the only difference
            assert ids == hf_gguf.encode(text), text


def test_transformers_gguf_pre_tokenizer_differs_only_around_digits(ours, hf_gguf):
    # documented divergence: transformers' GGUF loader has no `smollm` split
    assert ours.encode("   4567") == [333, 36, 37, 38, 39]
    assert hf_gguf.encode("   4567") == [256, 216, 36, 37, 38, 39]
    assert ours.encode("\n\n3") != hf_gguf.encode("\n\n3")


def test_decode_random_ids_matches_transformers(ours, ref):
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 24))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


# ---------------------------------------------------------------------------------------------
# single tokens and streaming
# ---------------------------------------------------------------------------------------------


def test_token_text_and_bytes(ours, ref):
    world = ours.encode(" world")
    assert len(world) == 1
    assert ours.token_text(world[0]) == " world" == ref.decode(world)
    assert ours.token_bytes(world[0]) == list(b" world")
    assert ours.token_text(2) == "<|im_end|>"
    assert ours.token_bytes(2) == list(b"<|im_end|>")
    # an emoji takes several byte tokens: each alone is shown the OpenAI way
    ids = ours.encode("😀")
    assert len(ids) > 1
    raw = b"".join(bytes(ours.token_bytes(i)) for i in ids)
    assert raw == "😀".encode()
    first = ours.token_text(ids[0])
    assert first.startswith("bytes:\\x")
    assert bytes(ours.token_bytes(ids[0])).hex() == first[len("bytes:"):].replace("\\x", "")
    # every valid token's text is what transformers decodes for it alone
    rng = random.Random(2)
    for token_id in rng.sample(range(ours.vocab_size), 300):
        raw = bytes(ours.token_bytes(token_id))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            assert ours.token_text(token_id).startswith("bytes:")
        else:
            assert ours.token_text(token_id) == ref.decode([token_id]), token_id
    assert ours.token_bytes(10**9) is None


def _stream(tok: Tokenizer, ids, skip=True) -> tuple[list[str], str]:
    decoder = tok.incremental_decoder(skip_special_tokens=skip)
    deltas = [decoder.step(i) for i in ids]
    deltas.append(decoder.flush())
    assert decoder.text == "".join(deltas)
    return deltas, decoder.text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_matches_decode(ours, text):
    ids = ours.encode(text)
    for skip in (True, False):
        deltas, full = _stream(ours, ids, skip)
        assert full == ours.decode(ids, skip_special_tokens=skip)
        assert "\ufffd" not in full


def test_incremental_decoder_holds_split_emoji(ours):
    ids = ours.encode("Hi 🦜!")
    assert [ours.token_text(i) for i in ids] == ["Hi", "bytes:\\x20\\xf0\\x9f", "bytes:\\xa6", "bytes:\\x9c", "!"]
    deltas, full = _stream(ours, ids)
    assert deltas == ["Hi", " ", "", "🦜", "!", ""]  # the emoji waits for its last byte
    assert full == "Hi 🦜!" == ours.decode(ids)
    # a stream cut inside a character: flush() shows the dangling bytes as decode() does
    deltas, full = _stream(ours, ids[:3])
    assert deltas[-1] == "\ufffd" and full == ours.decode(ids[:3])


def test_incremental_decoder_random_ids(ours):
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            _, full = _stream(ours, ids, skip)
            assert full == ours.decode(ids, skip_special_tokens=skip)


# ---------------------------------------------------------------------------------------------
# chat templates
# ---------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello <b>&amp;</b> 😀"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "  spaces  \n and newlines\n"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, ref, conversation, add_generation_prompt):
    expected = ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_continue_final_message_matches_transformers(ours, ref):
    conversation = CONVERSATIONS[1] + [{"role": "assistant", "content": "The answer is "}]
    expected = ref.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
    got = ours.apply_chat_template(conversation, add_generation_prompt=False, continue_final_message=True)
    assert got == expected
    assert got.endswith("<|im_start|>assistant\nThe answer is ")
    with pytest.raises(ValueError):
        ours.apply_chat_template(conversation, add_generation_prompt=True, continue_final_message=True)


def test_chat_content_parts_are_flattened(ours):
    as_string = [{"role": "user", "content": "one\ntwo"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert ours.apply_chat_template(as_parts) == ours.apply_chat_template(as_string)
    with pytest.raises(ValueError, match="image_url"):
        ours.apply_chat_template(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
        )
    with pytest.raises(ValueError):
        ours.apply_chat_template([{"role": "user", "content": 42}])


RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='') %}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
  {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
  {%- generation %}{{ m.role | upper }}: {{ m.content | trim }}{% endgeneration %}
{% endfor %}
{% if ns.system %}SYSTEM={{ ns.system }}{% endif %}
{% if tools %}{{ tools | tojson(indent=2) }}{{ dict(a=1) | tojson }}{% endif %}
{{ (strftime_now('%Y') | length) }}{{ eos_token }}
{% if add_generation_prompt %}ASSISTANT:{% endif %}{% if enable_thinking is defined %}think={{ enable_thinking }}{% endif %}"""

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "<weather> & \"stuff\" é",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}]


def test_rich_template_matches_transformers(ours, ref):
    conversation = CONVERSATIONS[2]
    for kwargs in ({}, {"tools": TOOLS}, {"tools": TOOLS, "enable_thinking": False}):
        for agp in (True, False):
            expected = ref.apply_chat_template(
                conversation, chat_template=RICH_TEMPLATE, tokenize=False, add_generation_prompt=agp, **kwargs
            )
            got = ours.apply_chat_template(
                conversation, add_generation_prompt=agp, chat_template=RICH_TEMPLATE, **kwargs
            )
            assert got == expected


def test_template_errors_and_sandbox(ours):
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=RICH_TEMPLATE)
    assert isinstance(ChatTemplateError("x"), ValueError)
    for evil in (
        "{{ messages.__class__.__mro__ }}",
        "{% set _ = messages.append({'role': 'x'}) %}",
        "{{ ''.__class__.__subclasses__() }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
    ):
        with pytest.raises(ChatTemplateError):
            ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template=evil)


def test_named_templates_pick_tool_use(ours):
    named = [{"name": "default", "template": "D{{ messages | length }}"},
             {"name": "tool_use", "template": "T{{ tools | length }}"}]
    assert ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template=named) == "D1"
    assert ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template=named, tools=TOOLS) == "T1"


# ---------------------------------------------------------------------------------------------
# Hugging Face directories
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tokenizer")
    ref.save_pretrained(path)
    with open(path / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 0]}, f)
    return path


def test_hf_dir_matches_transformers(hf_dir):
    ours = Tokenizer.from_pretrained(str(hf_dir))
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == 1
    assert ours.eos_token_ids == frozenset({2, 0})
    assert ours.add_bos_token is False
    assert ours.backend.pre_tokenizer.__getstate__() == ref.backend_tokenizer.pre_tokenizer.__getstate__()
    for text in TEXTS + _random_texts(100, seed=4):
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        _, streamed = _stream(ours, ids)
        assert streamed == ours.decode(ids)
    for conversation in CONVERSATIONS:
        for agp in (True, False):
            assert ours.apply_chat_template(conversation, add_generation_prompt=agp) == ref.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=agp
            )


def test_hf_dir_config_variants(hf_dir, tmp_path):
    # the template inside tokenizer_config.json instead of chat_template.jinja; a post-processor
    # that adds BOS; an eos_token in the older serialized form; no generation_config.json
    tokenizer_json = json.loads((hf_dir / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (hf_dir / "chat_template.jinja").read_text()
    config["add_bos_token"] = False  # ignored: tokenizer.json's post-processor decides, as in transformers
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.add_bos_token is True
    assert ours.eos_token_ids == frozenset({2})
    for text in ("Hello world", "", "a 1 2"):
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode(text)[:1] == [1]
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.apply_chat_template(CONVERSATIONS[1]) == ref.apply_chat_template(
        CONVERSATIONS[1], tokenize=False, add_generation_prompt=True
    )


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(str(tmp_path))  # a directory without tokenizer.json
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError):
        Tokenizer.from_pretrained(str(bogus))


# ---------------------------------------------------------------------------------------------
# SentencePiece (`llama`) GGUF vocabularies
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    gguf = pytest.importorskip("gguf")
    text = ["The quick brown fox jumps over the lazy dog.", "Hello world! 12345 naïve café",
            "def f(x):\n    return x * 2", "漢字 かな カナ", "lorem ipsum dolor sit amet"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, minloglevel=2, user_defined_symbols=["<think>"], hard_vocab_limit=False,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = []
    for i, token in enumerate(tokens):
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif token == "<think>":
            types.append(4)
        else:
            types.append(1)
    folder = tmp_path_factory.mktemp("sp_gguf")
    writer = gguf.GGUFWriter(str(folder / "sp.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(
        "{% for m in messages %}{{ bos_token }}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder / "sp.gguf"


def test_sentencepiece_gguf_matches_transformers(sentencepiece_gguf):
    ours = Tokenizer.from_pretrained(str(sentencepiece_gguf))
    ref = transformers.AutoTokenizer.from_pretrained(
        str(sentencepiece_gguf.parent), gguf_file=sentencepiece_gguf.name
    )
    assert ours.vocab_size == len(ref)
    assert ours.add_bos_token is True and ours.bos_token_id == 1 and ours.eos_token_ids == frozenset({2})
    texts = ["Hello world", " leading", "  two  spaces", "naïve 😀 unseen Ω", "<think>x</think>", "<s>a</s>",
             "\n\nx", "12345 quick", "fox  jumps\tover"] + _random_texts(100, seed=5)
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
            _, streamed = _stream(ours, ids, skip)
            assert streamed == ours.decode(ids, skip_special_tokens=skip)
    byte_piece = ours.token_to_id("<0xE2>")
    assert ours.token_bytes(byte_piece) == [0xE2]
    assert ours.token_text(byte_piece) == "bytes:\\xe2"
    conversation = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(conversation) == ref.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
