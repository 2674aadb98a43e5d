"""Tool-call parsers, forced-call grammars and the streaming splitter (no server, no model)."""

from __future__ import annotations

import json

import llguidance
import pytest

from splitserve.structured.tool_stream import ToolCallStream, chat_message
from splitserve.structured.grammar import GrammarError, to_llguidance
from splitserve.structured.tool_parsers import HermesParser, Llama3JsonParser, MistralParser, parser_for
from splitserve.structured.tools import plan_tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]

HERMES = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
         '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def test_hermes_parses_content_and_calls():
    content, calls = HermesParser().parse(HERMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("add", {"a": 1, "b": 2})]
    assert len({c.id for c in calls}) == 2
    assert HermesParser().parse("no calls here") == ("no calls here", [])
    assert HermesParser().parse("<tool_call>\nnot json\n</tool_call>")[1] == []  # malformed stays content
    cut = HERMES + '\n<tool_call>\n{"name": "add", "argu'  # max_tokens cut the last call short
    assert [c.name for c in HermesParser().parse(cut)[1]] == ["get_weather", "add"]
    assert HermesParser().parse('<tool_call>\n{"name": "add", "argu')[1] == []


def test_llama3_json_and_mistral():
    content, calls = Llama3JsonParser().parse('{"name": "add", "parameters": {"a": 1}}; {"name": "get_weather", '
                                              '"parameters": {"city": "Oslo"}}')
    assert content is None and [c.name for c in calls] == ["add", "get_weather"]
    assert Llama3JsonParser().parse("Hello {not a call")[1] == []
    content, calls = MistralParser().parse('[TOOL_CALLS][{"name": "add", "arguments": {"b": 2}}]')
    assert content is None and calls[0].name == "add" and json.loads(calls[0].arguments) == {"b": 2}
    assert isinstance(parser_for(None, "{{ '[TOOL_CALLS]' }}"), MistralParser)
    assert isinstance(parser_for(None, "<|python_tag|>"), Llama3JsonParser)
    with pytest.raises(ValueError):
        parser_for("nope", None)


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser(), MistralParser()])
def test_forced_grammar_admits_its_own_format_only(parser, demo_tok):
    tok, lltok = demo_tok
    plan = plan_tools(TOOLS, "required", True, parser)
    matcher = llguidance.LLMatcher(lltok, to_llguidance(plan.grammar))
    sample = {"hermes": '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
              "llama3_json": '{"name": "add", "parameters": {"a": 1, "b": 2}}',
              "mistral": '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'}[parser.name]
    ids = tok.encode(sample, add_special_tokens=False)
    assert matcher.consume_tokens(ids) and matcher.is_accepting()
    bad = llguidance.LLMatcher(lltok, to_llguidance(plan.grammar))
    bad_ids = tok.encode(sample.replace("add", "sub"), add_special_tokens=False)
    assert bad.try_consume_tokens(bad_ids) < len(bad_ids)


@pytest.fixture(scope="module")
def demo_tok():
    from splitserve.models.registry import demo_model_path
    from splitserve.models.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_model_path())
    return tok, llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_token_ids))


def test_plan_errors_name_the_field():
    with pytest.raises(GrammarError) as e:
        plan_tools(TOOLS, {"type": "function", "function": {"name": "nope"}}, None, HermesParser())
    assert e.value.param == "tool_choice.function.name"
    with pytest.raises(GrammarError) as e:
        plan_tools([{"type": "function", "function": {"name": "bad name"}}], "auto", None, HermesParser())
    assert e.value.param == "tools[0].function.name"
    with pytest.raises(GrammarError) as e:
        plan_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}], "auto",
                   None, HermesParser())
    assert "tools[0].function.parameters" in str(e.value)
    with pytest.raises(GrammarError):
        plan_tools(None, "required", None, HermesParser())
    assert plan_tools(TOOLS, {"type": "function", "function": {"name": "add"}}, True, HermesParser()).parallel is False


def test_stream_sends_name_then_argument_fragments_as_they_arrive():
    plan = plan_tools(TOOLS, "auto", True, HermesParser())
    stream = ToolCallStream(plan)
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    deltas, reason = stream.deltas(text, None)
    assert reason is None
    first, frag = deltas
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first["tool_calls"][0]["id"].startswith("call_") and first["tool_calls"][0]["index"] == 0
    assert frag["tool_calls"][0]["function"]["arguments"] == '{"city": "Par'
    deltas, reason = stream.deltas('is"}}\n</tool_call>', "stop")
    assert [d["tool_calls"][0]["function"]["arguments"] for d in deltas] == ['is"}']
    assert reason == "tool_calls"


LLAMA = '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"parameters": {"city": "Oslo"}, "name": "get_weather"}'
MISTRAL = 'Sure [TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {"city": "X"}}]'


@pytest.mark.parametrize("parser,text", [
    *[(HermesParser(), t) for t in (HERMES, HERMES.replace('"a": 1', '"a":1'), "Just words, no call.", "<tool",
                                    "Text then <tool_call>\n{broken")],
    (Llama3JsonParser(), LLAMA), (Llama3JsonParser(), "Plain answer {with a brace"), (MistralParser(), MISTRAL)])
def test_stream_reassembles_to_the_non_streamed_message(parser, text):
    plan = plan_tools(TOOLS, "auto", True, parser)
    stream = ToolCallStream(plan)
    content, calls = "", {}
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    for i, piece in enumerate(pieces):
        deltas, reason = stream.deltas(piece, "stop" if i == len(pieces) - 1 else None)
        for d in deltas:
            content += d.get("content", "")
            for tc in d.get("tool_calls", []):
                slot = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.get("id", slot["id"])
                slot["name"] += tc.get("function", {}).get("name", "")
                slot["arguments"] += tc["function"].get("arguments", "")
    message, final = chat_message(text, "stop", plan)
    assert reason == final
    assert content == (message["content"] or "")
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == expected
    if expected:
        assert final == "tool_calls" and all(calls[i]["id"].startswith("call_") for i in calls)
