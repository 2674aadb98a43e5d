"""Tool calling in agent chains: the tools a chain offers and the messages one tool step adds."""

from __future__ import annotations

from typing import Any

__all__ = ["AGENT_TOOLS", "tool_round_trip"]

# The tools an agent chain offers in tool-calling mode: a search and a file read, the two calls
# coding and research agents make most.
AGENT_TOOLS: tuple[dict[str, Any], ...] = (
    {"type": "function", "function": {
        "name": "search", "description": "Search the knowledge base and return the best passages",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 40},
                                                        "top_k": {"type": "integer", "minimum": 1, "maximum": 10}},
                       "required": ["query", "top_k"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the project",
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 40}},
                       "required": ["path"], "additionalProperties": False}}},
)


def tool_round_trip(calls: list[dict[str, Any]], result: str) -> list[dict[str, Any]]:
    """The messages one tool step adds to a conversation: the assistant's calls, then one `tool`
    result per call (the step's chunk answers the first; the others get a short acknowledgement)."""
    msgs: list[dict[str, Any]] = [{"role": "assistant", "content": None, "tool_calls": calls}]
    for i, call in enumerate(calls):
        msgs.append({"role": "tool", "tool_call_id": call["id"], "content": result if i == 0 else "ok"})
    return msgs
