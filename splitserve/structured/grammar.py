"""Request fields -> GrammarSpec -> llguidance grammar, with every check the gateway answers 400 for.

An invalid JSON schema is reported with the JSON path of the offending keyword (checked against
its meta-schema); keywords llguidance cannot enforce are listed, never silently ignored (its JSON
compiler runs with `lenient` off). No torch, no tokenizer: the gateway calls this.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from splitserve.structured.spec import GrammarKind, GrammarSpec

MAX_CHOICES = 1024

# Compact JSON, as hosted APIs emit it. Flexible whitespace lets a small model pad with newlines
# until max_tokens; fixed separators leave it only the content to choose.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


class GrammarError(ValueError):
    """A constraint the server cannot enforce; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def json_schema_spec(schema: Any, param: str) -> GrammarSpec:
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GrammarError(f"{param} must be a JSON object (a JSON schema)", param)
    _check_meta_schema(schema, param)
    # Keys keep their order: property order is generation order.
    spec = GrammarSpec(GrammarKind.JSON_SCHEMA.value, json.dumps(schema, separators=(",", ":")))
    check(spec, param)
    return spec


def json_object_spec() -> GrammarSpec:
    return GrammarSpec(GrammarKind.JSON_SCHEMA.value, '{"type":"object"}')


def regex_spec(regex: Any, param: str) -> GrammarSpec:
    if not isinstance(regex, str) or not regex:
        raise GrammarError(f"{param} must be a non-empty string", param)
    spec = GrammarSpec(GrammarKind.REGEX.value, regex)
    check(spec, param)
    return spec


def choice_spec(choices: Any, param: str) -> GrammarSpec:
    if (not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES
            or not all(isinstance(c, str) and c for c in choices)):
        raise GrammarError(f"{param} must be a list of 1 to {MAX_CHOICES} non-empty strings", param)
    alternatives = " | ".join(json.dumps(c) for c in dict.fromkeys(choices))
    return GrammarSpec(GrammarKind.LARK.value, f"start: {alternatives}\n")


def grammar_spec(text: Any, param: str) -> GrammarSpec:
    """A Lark grammar or a GBNF/EBNF one (llama.cpp's syntax, which vLLM clients send)."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError(f"{param} must be a non-empty grammar string", param)
    try:
        lark = any_to_lark(text)
    except Exception as exc:
        raise GrammarError(f"{param} is not a valid grammar: {exc}", param) from None
    spec = GrammarSpec(GrammarKind.LARK.value, lark)
    check(spec, param)
    return spec


def to_llguidance(spec: GrammarSpec) -> str:
    """The grammar in llguidance's own serialized form (what LLMatcher takes)."""
    if spec.kind == GrammarKind.JSON_SCHEMA.value:
        return llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
    if spec.kind == GrammarKind.REGEX.value:
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    return llguidance.LLMatcher.grammar_from_lark(spec.source)


def check(spec: GrammarSpec, param: str | None = None) -> None:
    """Raise GrammarError unless llguidance can build this grammar (tokenizer-independent checks)."""
    try:
        grammar = to_llguidance(spec)
    except ValueError as exc:
        raise GrammarError(f"{param}: {exc}", param) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if not is_error:
        return
    message = messages[0] if messages else "invalid grammar"
    if "Unimplemented keys" in message or "not supported" in message.lower():
        raise GrammarError(f"{param} uses JSON schema features the grammar backend does not support "
                           f"({message}); remove them", param)
    raise GrammarError(f"{param} is invalid: {message.strip()}", param)


def _check_meta_schema(schema: dict, param: str) -> None:
    from jsonschema import exceptions, validators

    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as exc:
        where = exc.json_path.replace("$", param, 1) if hasattr(exc, "json_path") else param
        raise GrammarError(f"invalid JSON schema at {where}: {exc.message}", param) from None
