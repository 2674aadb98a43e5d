"""Agent-facing request options at the HTTP boundary: structured outputs (`response_format`, vLLM's
`structured_outputs` and older `guided_*` fields) turned into one GrammarSpec, or a GrammarError
that names the offending field."""

from __future__ import annotations

from typing import Any

from splitserve.structured import grammar as g
from splitserve.structured.spec import GrammarSpec

_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def response_format_grammar(rf: dict[str, Any] | None) -> GrammarSpec | None:
    if not rf:
        return None
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return g.json_object_spec()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise g.GrammarError("response_format.json_schema.schema is required", "response_format.json_schema")
        return g.json_schema_spec(js["schema"], "response_format.json_schema.schema")
    raise g.GrammarError(f"response_format.type must be text, json_object or json_schema; got {kind!r}",
                         "response_format.type")


def structured_outputs_grammar(so: dict[str, Any] | None, guided: dict[str, Any]) -> GrammarSpec | None:
    """vLLM's `structured_outputs` object ({json|regex|choice|grammar|json_object: ...}) or its `guided_*` fields."""
    given = {}
    if so:
        unknown = sorted(set(so) - set(_STRUCTURED_KEYS) - {"disable_fallback", "disable_any_whitespace",
                                                              "disable_additional_properties", "whitespace_pattern",
                                                              "structural_tag"})
        if unknown:
            raise g.GrammarError(f"structured_outputs has unsupported keys: {', '.join(unknown)}",
                                 "structured_outputs")
        given.update({f"structured_outputs.{k}": (k, v) for k, v in so.items()
                      if k in _STRUCTURED_KEYS and v not in (None, False)})
    given.update({name: (_GUIDED[name], v) for name, v in guided.items() if v is not None})
    if not given:
        return None
    if len(given) > 1:
        raise g.GrammarError(f"give one structured output constraint, not {len(given)}: {', '.join(given)}",
                             next(iter(given)))
    param, (kind, value) = next(iter(given.items()))
    if kind == "json":
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError:
                raise g.GrammarError(f"{param} is not valid JSON", param) from None
        return g.json_schema_spec(value, param)
    if kind == "json_object":
        return g.json_object_spec()
    if kind == "regex":
        return g.regex_spec(value, param)
    if kind == "choice":
        return g.choice_spec(value, param)
    return g.grammar_spec(value, param)


def request_grammar(req) -> GrammarSpec | None:
    """The one grammar a chat or completion request asks for (GrammarError on conflicts or bad input)."""
    guided = {name: getattr(req, name, None) for name in _GUIDED}
    from_so = structured_outputs_grammar(req.structured_outputs, guided)
    from_rf = response_format_grammar(getattr(req, "response_format", None))
    if from_so is not None and from_rf is not None:
        raise g.GrammarError("give either response_format or structured_outputs, not both", "response_format")
    return from_so or from_rf


# ---- tools ---------------------------------------------------------------------------------------
GENERIC_TOOL_TEMPLATE = "chatml_tools.jinja"


def generic_tool_template() -> str:
    from importlib.resources import files

    return files("splitserve.structured").joinpath("templates", GENERIC_TOOL_TEMPLATE).read_text()


def chat_template_for(override: str | None, model_template, tools) -> str | None:
    """`--chat-template FILE` wins; else, when tools are given and the model's template never
    mentions them, the shipped generic tool template; else the model's own (None)."""
    if override is not None:
        return override
    if tools and "tools" not in str(model_template or ""):
        return generic_tool_template()
    return None


def plan_request_tools(req, parser_name: str | None, template: str | None):
    from splitserve.structured.tool_parsers import parser_for
    from splitserve.structured.tools import plan_tools

    return plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, parser_for(parser_name, template))


def request_grammar_or_400(req, tool_plan) -> GrammarSpec | None:
    """The grammar every choice obeys: the request's own, or its forced tool calls' (never both)."""
    from splitserve.api.errors import APIError

    try:
        grammar = request_grammar(req)
    except g.GrammarError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    forced = tool_plan.grammar if tool_plan is not None else None
    if forced is not None and grammar is not None:
        raise APIError(400, "a forced tool_choice cannot be combined with response_format or structured_outputs",
                       param="tool_choice")
    return forced or grammar


def tool_plan_or_400(req, parser_name: str | None, template: str | None):
    from splitserve.api.errors import APIError

    try:
        return plan_request_tools(req, parser_name, template)
    except (g.GrammarError, ValueError) as exc:
        raise APIError(400, str(exc), param=getattr(exc, "param", "tools")) from None
