"""`tools` / `tool_choice` / `parallel_tool_calls` checked and turned into a plan: which format the
model writes calls in, and, for `required` or a named function, the grammar that forces them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from splitserve.structured import grammar as g
from splitserve.structured.spec import GrammarKind, GrammarSpec
from splitserve.structured.tool_parsers import ToolParser

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: tuple  # the tool dicts offered to the model
    parallel: bool
    parser: ToolParser
    grammar: GrammarSpec | None  # set for required / named

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none"


def check_tools(tools) -> list[dict]:
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise g.GrammarError(f"tools must be a list of 1 to {MAX_TOOLS} tools", "tools")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise g.GrammarError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise g.GrammarError(f"tools[{i}].function.name must match {_NAME.pattern}", f"tools[{i}].function.name")
        if name in names:
            raise g.GrammarError(f"tools[{i}].function.name {name!r} is given twice", f"tools[{i}].function.name")
        names.add(name)
        params = fn.get("parameters")
        if params is not None:
            g.json_schema_spec(params, f"tools[{i}].function.parameters")  # 400 naming the path / the features
    return tools


def plan_tools(tools, tool_choice, parallel_tool_calls: bool | None, parser: ToolParser) -> ToolPlan | None:
    """None when the request has no tools (and asks for no tool call)."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise g.GrammarError("tool_choice requires tools", "tool_choice")
        return None
    tools = check_tools(tools)
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("none", "auto"):
        return ToolPlan(choice, tuple(tools), parallel, parser, None)
    if choice == "required":
        forced = tools
        mode = "required"
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        forced = [t for t in tools if t["function"]["name"] == name]
        if not forced:
            raise g.GrammarError(f"tool_choice names {name!r}, which is not among the tools",
                                 "tool_choice.function.name")
        mode, parallel = "named", False
    else:
        raise g.GrammarError('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}', "tool_choice")
    spec = GrammarSpec(GrammarKind.LARK.value, parser.forced_grammar(forced, parallel))
    g.check(spec, "tools")
    return ToolPlan(mode, tuple(tools), parallel, parser, spec)
