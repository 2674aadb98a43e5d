"""An agent framework unchanged against the server: LangChain's ChatOpenAI with `bind_tools` and
`with_structured_output` (both methods), and a tool round trip with a ToolMessage. Aggregated
mode only (the HTTP surface is the same in both; tests/structured/test_*_api.py cover both)."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests.server_utils import ServerProcess

langchain_openai = pytest.importorskip("langchain_openai")

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


class Pet(BaseModel):
    """A pet."""

    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", "demo", "--dtype", "float32", "--max-model-len", "1024", "--threads", "1") as s:
        yield s


def _llm(server, **kw):
    return langchain_openai.ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model=MODEL,
                                       temperature=0, max_tokens=80, max_retries=0, **kw)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(server, method):
    pet = _llm(server).with_structured_output(Pet, method=method).invoke("Describe a pet.")
    assert isinstance(pet, Pet)
    server.wait_idle()


def test_bind_tools_round_trip(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather in a city."""
        return json.dumps({"city": city, "temp": 21, "unit": unit})

    llm = _llm(server)
    question = HumanMessage("What's the weather in Paris?")
    call_msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    (call,) = call_msg.tool_calls
    assert call["name"] == "get_weather" and {"city", "unit"} <= set(call["args"])  # the schema allows more keys
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = llm.bind_tools([get_weather]).invoke([question, call_msg, result])
    assert answer.content or answer.tool_calls
    forced = llm.bind_tools([get_weather], tool_choice="any").invoke([question])  # LangChain's "required"
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "get_weather"
    server.wait_idle()
