"""Agent chains in tool-calling mode: what the workload asks for, step by step."""

from __future__ import annotations

from splitserve.bench.workloads import AGENT_TOOLS, agent_chains, tool_round_trip


def test_tool_calling_chain_forces_calls_then_answers():
    specs = list(agent_chains(num_chains=2, steps=4, tool_tokens=8, answer_tokens=16, tool_calling=True))
    assert [s.tool_choice for s in specs] == ["required"] * 3 + ["none"] + ["required"] * 3 + ["none"]
    assert all(s.tools == AGENT_TOOLS for s in specs)
    plain = list(agent_chains(num_chains=1, steps=2))
    assert all(s.tools is None and s.tool_choice is None for s in plain)


def test_round_trip_answers_every_call():
    calls = [{"id": "a", "type": "function", "function": {"name": "search", "arguments": "{}"}},
             {"id": "b", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]
    msgs = tool_round_trip(calls, "RESULT")
    assert msgs[0] == {"role": "assistant", "content": None, "tool_calls": calls}
    assert [(m["role"], m["tool_call_id"], m["content"]) for m in msgs[1:]] == [("tool", "a", "RESULT"),
                                                                                ("tool", "b", "ok")]
