"""Tool calling over real HTTP with the official openai client, aggregated AND disaggregated: required,
named and auto calls, a two-turn round trip with a tool result, streamed deltas that reassemble to
the non-streamed answer, identical seeded output in both modes, bad input, leak checks."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest


pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"], "additionalProperties": False}}}]


def _history_call(i: int, city: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call_{i}", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}]}


# Two earlier turns in which the assistant answered with a call: the 135M demo model then calls by itself.
FEW_SHOT = [{"role": "user", "content": "What's the weather in Rome?"}, _history_call(1, "Rome"),
            {"role": "user", "content": "What's the weather in Oslo?"}, _history_call(2, "Oslo"),
            {"role": "user", "content": "What's the weather in Paris?"}]


SEEN: dict[str, dict[str, list]] = {}


def _record(server, name: str, value) -> None:
    SEEN.setdefault(server.mode, {})[name] = value
    for mode, seen in SEEN.items():
        if mode != server.mode and name in seen:
            assert seen[name] == value, f"{name}: {server.mode} differs from {mode}"


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_required_and_named_calls_obey_the_schemas(server):
    c = server.client
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris, please."}],
                                  tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                  temperature=1.0, seed=3, max_tokens=80, n=3)
    got = []
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        calls = _calls(ch.message)
        assert len(calls) == 1 and calls[0][0] in ("get_weather", "add")
        jsonschema.validate(calls[0][1], TOOLS[0 if calls[0][0] == "get_weather" else 1]["function"]["parameters"])
        assert ch.message.tool_calls[0].id.startswith("call_") and ch.message.tool_calls[0].type == "function"
        got.append(calls)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                                  tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                                  temperature=0, max_tokens=60)
    calls = _calls(r.choices[0].message)
    assert r.choices[0].finish_reason == "tool_calls" and [n for n, _ in calls] == ["add"]
    jsonschema.validate(calls[0][1], TOOLS[1]["function"]["parameters"])
    _record(server, "forced", got + [calls])
    server.wait_idle()


def test_auto_parses_the_models_own_call_and_two_turn_round_trip(server):
    c = server.client
    r = c.chat.completions.create(model=MODEL, messages=FEW_SHOT, tools=TOOLS, temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (name, args), = _calls(choice.message)
    assert name == "get_weather" and args["city"] == "Paris"
    # Turn two: the assistant's call and the tool's result go back; the answer is text.
    history = FEW_SHOT + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                           "content": json.dumps({"temp_c": 21, "sky": "clear"})}]
    r2 = c.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                   temperature=0, max_tokens=30)
    assert r2.choices[0].message.tool_calls is None and r2.choices[0].message.content
    assert r2.choices[0].finish_reason in ("stop", "length")
    _record(server, "auto", [args, r2.choices[0].message.content])
    server.wait_idle()


@pytest.mark.parametrize("tool_choice,messages", [("auto", FEW_SHOT), ("required", FEW_SHOT[-1:])])
def test_streamed_tool_call_deltas_reassemble(server, tool_choice, messages):
    body = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=7,
                max_tokens=80, parallel_tool_calls=False)
    full = server.client.chat.completions.create(**body).choices[0]
    content, calls, finish, first_chunks = "", {}, None, []
    for chunk in server.client.chat.completions.create(**body, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:  # the first delta of a call carries id, type and name
                slot["id"] = tc.id
                first_chunks.append(tc.function.name)
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == full.finish_reason
    assert content == (full.message.content or "")
    want = [(t.function.name, t.function.arguments) for t in full.message.tool_calls or []]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == want
    assert first_chunks == [n for n, _ in want]
    server.wait_idle()


@pytest.mark.parametrize("extra,needle", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tool_choice": "required"}, "tool_choice requires tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_input_is_400(server, extra, needle):
    with pytest.raises(openai.BadRequestError) as err:
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, **extra)
    assert needle in err.value.body["message"] or needle == err.value.body.get("param"), err.value.body
    server.wait_idle()


def test_bench_agent_chains_make_real_tool_round_trips(server):
    """`splitserve bench --workload agent --tool-calls`: every step but the last is a forced call whose
    result goes back as a `tool` message; the server accepts each history and every step succeeds."""
    import asyncio

    from splitserve.bench.client import OpenAIClient
    from splitserve.bench.runner import run_load
    from splitserve.bench.workloads import agent_chains

    sent = []

    class Recording(OpenAIClient):
        def build_body(self, prompt, max_tokens, fields=None):
            sent.append((prompt if isinstance(prompt, str) else [dict(m) for m in prompt], dict(fields or {})))
            return super().build_body(prompt, max_tokens, fields)

    async def scenario():
        async with Recording(server.base_url, model=MODEL, ignore_eos=False, min_tokens=False) as client:
            specs = agent_chains(num_chains=2, steps=3, tool_tokens=16, answer_tokens=100, tool_calling=True)
            return await run_load(client, specs, concurrency=2)

    out = asyncio.run(scenario())
    assert len(out.records) == 6 and all(r.ok for r in out.records), [r.error_detail for r in out.records]
    assert [f.get("tool_choice") for _, f in sent].count("required") == 4
    finals = [p for p, f in sent if f.get("tool_choice") == "none"]
    assert len(finals) == 2
    for history in finals:  # step 2 carries both earlier round trips: call, then its result
        roles = [m["role"] for m in history]
        assert roles == ["user", "assistant", "tool", "assistant", "tool"], roles
        calls = [m for m in history if m["role"] == "assistant"]
        assert all(c["tool_calls"][0]["function"]["name"] in ("search", "read_file") for c in calls)
        assert all(json.loads(c["tool_calls"][0]["function"]["arguments"]) for c in calls)
        assert history[2]["tool_call_id"] == calls[0]["tool_calls"][0]["id"]
    server.wait_idle()
