"""Five client libraries (openai, openai-agents, pydantic-ai, langchain-openai, instructor) drive
a live server on a random model through what agent frameworks do; replies are checked for
validity, not text: the grammar makes calls and JSON valid even from random weights."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from pydantic import BaseModel

from live_server import LiveServer
from mlx_mistral.server import create_app

pytestmark = pytest.mark.slow  # each library starts its own clients and several turns: ~1 min

MODEL = "tiny"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class Answer(BaseModel):
    ok: bool
    city: str


@pytest.fixture(scope="module")
def live(tiny):
    with LiveServer(create_app(*tiny, model_id=MODEL, default_max_tokens=300)) as server:
        yield server


def user(text):
    return [{"role": "user", "content": text}]


# -- the official client ----------------------------------------------------------------------------

def test_openai_parse_and_streamed_forced_call(live):
    client = live.client()
    parsed = client.chat.completions.parse(model=MODEL, messages=user("Paris?"), response_format=Answer,
                                           max_tokens=200)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    stream = client.chat.completions.create(model=MODEL, messages=user("Weather?"), tools=[WEATHER],
                                            tool_choice="required", stream=True, max_tokens=200)
    args = "".join(tc.function.arguments or "" for c in stream if c.choices
                   for tc in c.choices[0].delta.tool_calls or [])
    assert isinstance(json.loads(args)["city"], str)


def test_openai_logprobs_and_cut_call(live):
    r = live.client().chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=5, logprobs=True,
                                              top_logprobs=2)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    long = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 60}}, "required": ["s"]}}}
    with pytest.raises(openai.BadRequestError, match="cannot hold one complete call"):
        live.client().chat.completions.create(model=MODEL, messages=user("Go"), tools=[long],
                                              tool_choice="required", max_tokens=10)
    r = live.client().chat.completions.create(model=MODEL, messages=user("Go"), tools=[long],
                                              tool_choice="required", max_tokens=90, temperature=1.0)
    choice = r.choices[0]
    if choice.finish_reason == "length":  # cut: no raw call text, no half call
        assert not choice.message.content and not choice.message.tool_calls
    else:
        assert len(json.loads(choice.message.tool_calls[0].function.arguments)["s"]) >= 60


# -- openai-agents ----------------------------------------------------------------------------------

def agents_run(live, agent, prompt, responses: bool):
    from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)

    async def go():
        client = AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused")  # one per event loop
        kind = OpenAIResponsesModel if responses else OpenAIChatCompletionsModel
        agent.model = kind(model=MODEL, openai_client=client)
        return await Runner.run(agent, prompt, max_turns=4)

    return asyncio.run(go())


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
def test_agents_output_type_with_a_forced_tool(live, responses):
    from agents import Agent, ModelSettings, StopAtTools, function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    # a forced tool plus an output_type: the JSON response_format comes on every turn
    agent = Agent(name="a", instructions="Use the tool.", tools=[get_weather], output_type=Answer,
                  model_settings=ModelSettings(tool_choice="get_weather", max_tokens=200),
                  tool_use_behavior=StopAtTools(stop_at_tool_names=["get_weather"]))
    result = agents_run(live, agent, "Weather in Paris?", responses)
    assert result.final_output == "sunny"  # the forced call ran the tool and ended the run
    free = Agent(name="b", instructions="Answer.", output_type=Answer,
                 model_settings=ModelSettings(max_tokens=200))
    assert isinstance(agents_run(live, free, "Paris?", responses).final_output, Answer)


# -- pydantic-ai ------------------------------------------------------------------------------------

def test_pydantic_ai_structured_output_and_tools(live):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=f"{live.url}/v1", api_key="unused"))
    # a structured output_type sends tool_choice "required" with a final_result tool
    agent = Agent(model, output_type=Answer, model_settings=ModelSettings(max_tokens=200))
    assert isinstance(agent.run_sync("Paris?").output, Answer)


# -- langchain-openai -------------------------------------------------------------------------------

@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
def test_langchain_tools_structured_output_and_round_trip(live, responses):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    # greedy: sampled, the random tiny model's free string can run past max_tokens now and then
    llm = ChatOpenAI(model=MODEL, base_url=f"{live.url}/v1", api_key="unused", max_tokens=200, temperature=0,
                     use_responses_api=responses)
    structured = llm.with_structured_output(Answer, method="json_schema")
    assert isinstance(structured.invoke("Paris?"), Answer)
    bound = llm.bind_tools([WEATHER], tool_choice="get_weather")
    ai = bound.invoke([HumanMessage("Weather in Paris?")])
    assert [c["name"] for c in ai.tool_calls] == ["get_weather"]
    chunks = list(bound.stream([HumanMessage("Weather in Paris?")]))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.tool_calls and isinstance(merged.tool_calls[0]["args"]["city"], str)
    final = llm.invoke([HumanMessage("Weather in Paris?"), ai,
                        ToolMessage("sunny", tool_call_id=ai.tool_calls[0]["id"])], max_tokens=5)
    assert isinstance(final.content, (str, list))


# -- instructor -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_models(live, mode):
    import instructor

    client = instructor.from_openai(live.client(), mode=getattr(instructor.Mode, mode))
    answer = client.chat.completions.create(model=MODEL, messages=user("Paris?"), response_model=Answer,
                                            max_tokens=200, max_retries=0)
    assert isinstance(answer, Answer)
