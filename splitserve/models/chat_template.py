"""Rendering chat templates the way Hugging Face transformers does, without importing it.

Chat templates come from model files, so they are untrusted code: they run in jinja2's
`ImmutableSandboxedEnvironment` with the same options, globals and filters transformers gives
them (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, a `{% generation %}` tag that renders its
body, `raise_exception`, `strftime_now`, a JSON `tojson` that does not escape HTML, and the
`dict`/`namespace` helpers that refuse dunder names).

Everything a template sees is first rebuilt from plain JSON types, so no object with methods the
sandbox does not know about ever reaches it. Rendering is bounded in work, size and time
(`template_limits`): a template, the model's own included, cannot exhaust memory or run forever.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils

from splitserve.models.template_limits import (
    BoundedSandbox,
    LimitKind,
    RenderLimitError,
    RenderLimits,
    bounded,
    render_bounded,
)

__all__ = [
    "ChatTemplateError",
    "compile_chat_template",
    "normalize_messages",
    "render_chat_template",
    "select_chat_template",
]

# Names a message's reasoning is passed under; templates read the first, gpt-oss ones `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """The template could not be rendered (including a template's own `raise_exception`).
    `limit` says which bound stopped it, if one did."""

    def __init__(self, message: str, limit: LimitKind | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mark assistant tokens.

    Here it only renders its body, so templates that use it parse and render the same text.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters (`<` as \u003c); transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace`, refusing underscore-prefixed attribute names."""

    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
            )


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a template once; the same source is served from a cache afterwards."""
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.install_filters()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        with bounded(RenderLimits()):  # constant folding runs filters at compile time
            return env.from_string(source)
    except (jinja2.exceptions.TemplateError, RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc


def _plain(value: Any) -> Any:
    """A copy of `value` built only of JSON types (str, int, float, bool, None, dict, list)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _flatten_content(content: Any, index: int) -> str:
    """OpenAI content parts -> one string. Only text parts are accepted; they join with newlines
    (as vLLM does for string-content templates)."""
    texts = []
    for part_index, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise ValueError(
                f"messages[{index}].content[{part_index}] must be an object with a `type`, "
                f"got {type(part).__name__}"
            )
        part_type = part.get("type")
        if part_type != "text":
            raise ValueError(
                f"messages[{index}].content[{part_index}] has type {part_type!r}: "
                "only 'text' content parts are supported by this model"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"messages[{index}].content[{part_index}] is a text part without a string `text`")
        texts.append(text)
    return "\n".join(texts)


def normalize_messages(messages: Any) -> list[dict]:
    """Messages as the template should see them.

    - each message must be a mapping; keys whose value is None are dropped (as transformers does:
      many templates print a literal `None` otherwise);
    - `content` given as a list of OpenAI parts is flattened to a string (non-text parts raise
      `ValueError`);
    - reasoning given as `reasoning`/`thinking` is also offered as `reasoning_content` (and vice versa).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise ValueError("messages must be a list of message objects")
    out = []
    for index, message in enumerate(messages):
        if callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}")
        message = {key: value for key, value in message.items() if value is not None}
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            if isinstance(content, (list, tuple)):
                message["content"] = _flatten_content(content, index)
            else:
                raise ValueError(
                    f"messages[{index}].content must be a string or a list of text parts, "
                    f"got {type(content).__name__}"
                )
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(_plain(message))
    return out


def select_chat_template(chat_template: Any, tools: Any = None) -> str | None:
    """The template source to use. A tokenizer config may hold a list of named templates:
    `tool_use` is chosen when tools are given and it exists, else `default`."""
    if chat_template is None or isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, Mapping):
        named = dict(chat_template)
    else:
        named = {item["name"]: item["template"] for item in chat_template}
    if tools and "tool_use" in named:
        return named["tool_use"]
    if "default" in named:
        return named["default"]
    if len(named) == 1:
        return next(iter(named.values()))
    raise ChatTemplateError(f"no default chat template among the named ones: {sorted(named)}")


def render_chat_template(
    source: str,
    messages: Any,
    *,
    add_generation_prompt: bool = True,
    tools: Any = None,
    documents: Any = None,
    special_tokens: Mapping[str, Any] | None = None,
    continue_final_message: bool = False,
    limits: RenderLimits | None = None,
    **kwargs: Any,
) -> str:
    """Render `source` for a conversation, within `limits` (default: `RenderLimits()`).

    `special_tokens` (bos_token, eos_token, ...) are passed as template variables; `kwargs`
    (e.g. `enable_thinking`) override them, as in transformers. `continue_final_message` renders
    the conversation so that the model continues the last message (no end-of-turn after it).
    """
    template = compile_chat_template(source)
    chat = normalize_messages(messages)
    if tools is not None:
        if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
            raise ValueError("tools must be a list of JSON-schema objects")
    final_message = None
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ValueError("continue_final_message needs a final message with text content")
        final_message = chat[-1]["content"]
        chat[-1]["content"] = final_message + _CONTINUE_TAG
    variables = {**(special_tokens or {}), **kwargs}
    variables = {**_plain(variables), "messages": chat, "tools": _plain(tools), "documents": _plain(documents),
                 "add_generation_prompt": bool(add_generation_prompt)}
    try:
        rendered = render_bounded(template, variables, limits or RenderLimits())
    except RenderLimitError as exc:
        raise ChatTemplateError(str(exc), exc.kind) from exc
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(str(exc)) from exc
    except (RecursionError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as exc:
        # the template's own failure on this input (e.g. a macro recursing without end)
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc
    if final_message is not None:
        # cut the render right after the final message, as transformers does
        tag = _CONTINUE_TAG.strip()
        if final_message.strip() not in rendered or tag not in rendered:
            raise ChatTemplateError("continue_final_message: the template does not render the final message as given")
        at = rendered.rindex(tag)
        if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:at]
        else:  # the template trimmed the message's trailing space
            rendered = rendered[:at].rstrip()
    return rendered
