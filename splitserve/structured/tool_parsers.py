"""Tool-call formats, by vLLM's `--tool-call-parser` names: how a model writes calls (parsed from its
output for tool_choice=auto) and the grammar that forces that same format (required / named).

hermes (Hermes, Qwen2.5/Qwen3, and the generic template shipped for the demo model):
    <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>   (one block per call)
llama3_json (Llama 3.1+ JSON tool calling): {"name": "f", "parameters": {...}}, calls joined by "; "
mistral: [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from splitserve.structured.grammar import JSON_OPTIONS


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as a string (what OpenAI sends)
    id: str

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# The canonical start of a call object, as templates and the forced grammars write it: name first,
# then the arguments. Streaming sends the arguments' raw text from here on.
CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


def json_value_end(text: str, start: int) -> int | None:
    """Where the JSON object starting at text[start] ends (one past its '}'), None while incomplete."""
    if start >= len(text) or text[start] != "{":
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _raw_arguments(source: str, args) -> str | None:
    """The arguments exactly as written, when the call is in canonical form (what was streamed)."""
    m = CALL_HEAD.match(source)
    end = json_value_end(source, m.end()) if m else None
    if end is None:
        return None
    raw = source[m.end() : end]
    try:
        return raw if json.loads(raw) == args else None
    except ValueError:
        return None


def _call_from_json(obj, args_key: str, source: str = "") -> ToolCall | None:
    """`source`: the object's text, so canonical calls keep their arguments' raw text."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    raw = _raw_arguments(source, args) if source else None
    return ToolCall(obj["name"], raw if raw is not None else json.dumps(args, ensure_ascii=False), new_call_id())


def _json_objects(text: str) -> list[tuple[object, str]]:
    """Every top-level JSON value in `text` with its source text, in order (decoding greedily from
    each '{' or '[')."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                obj, end = dec.raw_decode(text, i)
                out.append((obj, text[i:end]))
                i = end
                continue
            except ValueError:
                pass
        i += 1
    return out


def _content_before(text: str, marker: str) -> str | None:
    """Text before the first call, trailing whitespace dropped; None when there is none."""
    head = text[: text.index(marker)]
    return head.rstrip() if head.strip() else None


class ToolParser:
    """One format. `start_marker`: text that opens tool calls in free output ('' = output starts with JSON)."""

    name = ""
    args_key = "arguments"
    start_marker = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Complete output -> (content, tool calls). Output that is not a well-formed call stays content."""
        raise NotImplementedError

    def _all_calls(self, items: list[tuple[object, str]]) -> list[ToolCall]:
        """Every item as a call, or none at all when one is not a well-formed call."""
        calls = [_call_from_json(o, self.args_key, src) for o, src in items]
        return calls if calls and all(c is not None for c in calls) else []

    def call_schema(self, tool: dict) -> dict:
        fn = tool["function"]
        return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                 self.args_key: fn.get("parameters") or {"type": "object"}},
                "required": ["name", self.args_key], "additionalProperties": False,
                "x-guidance": {k: v for k, v in JSON_OPTIONS.items() if k != "lenient"}}

    # The format in Lark (llguidance's dialect): one call, any number of calls, helper rules.
    forced_one = "call"
    forced_many = "call"
    forced_rules = ""

    def forced_grammar(self, tools: list[dict], parallel: bool) -> str:
        """A grammar admitting exactly calls of these tools, written in this format."""
        return f"start: {self.forced_many if parallel else self.forced_one}\n{self.forced_rules}" + self._one_of(tools)

    def _one_of(self, tools: list[dict]) -> str:
        return "\n".join(f"call{i}: %json {json.dumps(self.call_schema(t))}" for i, t in enumerate(tools)) + \
            "\ncall: " + " | ".join(f"call{i}" for i in range(len(tools))) + "\n"


class HermesParser(ToolParser):
    name = "hermes"
    start_marker = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Complete <tool_call> blocks; an unclosed last block (cut by max_tokens) is dropped."""
        if self.start_marker not in text:
            return text, []
        calls = []
        for body in self._block.findall(text):
            objs = _json_objects(body)
            call = _call_from_json(objs[0][0], self.args_key, objs[0][1]) if objs else None
            if call is None:
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        return _content_before(text, self.start_marker), calls

    forced_one = "block"
    forced_many = 'block ("\\n" block)*'
    forced_rules = 'block: "<tool_call>\\n" call "\\n</tool_call>"\n'


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    args_key = "parameters"
    start_marker = "{"
    _python_tag = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(self._python_tag):
            body = body[len(self._python_tag):].lstrip()
        if not body.startswith("{"):
            return text, []
        calls = self._all_calls(_json_objects(body))
        return (None, calls) if calls else (text, [])

    forced_many = 'call ("; " call)*'


class MistralParser(ToolParser):
    name = "mistral"
    start_marker = "[TOOL_CALLS]"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start_marker not in text:
            return text, []
        rest = text.partition(self.start_marker)[2].lstrip()
        calls = self._all_calls(_json_objects(rest[1:] if rest.startswith("[") else rest))  # the list's objects
        return (_content_before(text, self.start_marker), calls) if calls else (text, [])

    forced_one = '"[TOOL_CALLS]" "[" call "]"'
    forced_many = '"[TOOL_CALLS]" "[" call (", " call)* "]"'


class Qwen3Parser(HermesParser):
    """Qwen2.5 / Qwen3 chat templates write Hermes-style <tool_call> JSON blocks."""

    name = "qwen3"


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, Qwen3Parser)}


def parser_for(name: str | None, chat_template: str | None) -> ToolParser:
    """The named parser, or the one the chat template's own tool format implies (hermes by default)."""
    if name:
        if name not in PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(sorted(PARSERS))}")
        return PARSERS[name]()
    src = chat_template or ""
    if "[TOOL_CALLS]" in src:
        return MistralParser()
    if "<|python_tag|>" in src or "<|eom_id|>" in src:
        return Llama3JsonParser()
    return HermesParser()
