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


def chat_message(text: str, finish_reason: str | None, plan) -> tuple[dict, str | None]:
    """The assistant message of a finished choice, tool calls parsed out when the plan asks."""
    if plan is None or not plan.parses_calls:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = plan.parser.parse(text)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    if not plan.parallel:
        calls = calls[:1]
    content = content.rstrip() if content and content.strip() else None
    message = {"role": "assistant", "content": content, "tool_calls": [c.as_openai() for c in calls]}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


class ToolCallStream:
    """Streaming for one choice: content passes through until a tool call may be starting; calls
    go out as OpenAI sends them (a first delta with index, id, type and name, then the arguments)."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.text = ""
        self.emitted = 0  # characters of text already sent as content
        self.in_calls = plan.mode in ("required", "named")

    def deltas(self, piece: str, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The chunk deltas this piece of text makes (maybe none), and the choice's finish reason."""
        self.text += piece
        safe = None if self.in_calls else self._safe_content_end(self.plan.parser.start_marker)
        self.in_calls = safe is None
        content = ""
        if safe is not None and safe > self.emitted:
            content, self.emitted = self.text[self.emitted : safe], safe
        if finish_reason is None:
            return ([{"content": content}] if content else []), None
        message, reason = chat_message(self.text, finish_reason, self.plan)
        if "tool_calls" not in message:  # no call after all: what was held back is content
            content += self.text[self.emitted :]
            return ([{"content": content}] if content else []), reason
        content += (message["content"] or "")[self.emitted :]
        out = [{"content": content}] if content else []
        for i, call in enumerate(message["tool_calls"]):
            fn = call["function"]
            out.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                        "function": {"name": fn["name"], "arguments": ""}}]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})
        return out, reason

    def _safe_content_end(self, marker: str) -> int | None:
        """How much of the text is surely content (None: a tool call has begun). Trailing
        whitespace and any suffix that could open the marker are held back."""
        text = self.text
        if marker == "{":  # llama3_json: the whole output is calls when it opens with JSON
            head = text.lstrip()
            if not head or "<|python_tag|>".startswith(head[:14]) or head.startswith(("{", "<|python_tag|>")):
                return None if head.startswith(("{", "<|python_tag|>")) else self.emitted
            return len(text.rstrip())
        i = text.find(marker)
        if i >= 0:
            return None
        end = len(text)
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-k:]):
                end = len(text) - k
                break
        return max(self.emitted, len(text[:end].rstrip()))
