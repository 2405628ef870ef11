"""The server batches concurrent requests: 8 streams at once give each the text it gets alone."""

from __future__ import annotations

import asyncio

import openai
import pytest

from live_server import WAIT_S, LiveServer
from mlx_mistral.server import create_app

TOPICS = ["rivers", "bridges", "violins", "glaciers", "lighthouses", "comets", "bees", "clocks"]


@pytest.fixture(scope="module")
def live(tiny):
    model, tok = tiny
    with LiveServer(create_app(model, tok, model_id="tiny", max_batch=8)) as server:
        server.model = tiny
        yield server


def question(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {i}: a few words about {TOPICS[i]}" + "!" * i}]


async def stream_all(url: str, budgets: list[int]) -> list[tuple[str, str]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S * 4)

    async def one(i: int) -> tuple[str, str]:
        await asyncio.sleep(0.005 * i)  # staggered arrivals: later ones join a batch already decoding
        stream = await client.chat.completions.create(model="tiny", messages=question(i), max_tokens=budgets[i],
                                                      temperature=0, stream=True)
        text, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(text), finish

    try:
        return await asyncio.gather(*(one(i) for i in range(len(budgets))))
    finally:
        await client.close()


def test_eight_concurrent_streams_equal_each_alone(live):
    budgets = [12, 5, 20, 9, 16, 7, 24, 10]
    alone = [live.direct(question(i), budgets[i]) for i in range(len(budgets))]
    engine = live.app.state.worker.engine
    steps = engine.steps
    together = asyncio.run(stream_all(live.url, budgets))
    for i, (text, finish) in enumerate(together):
        assert text == alone[i], f"stream {i}"
        assert finish in ("stop", "length")
    # they shared steps: one at a time would take a step per token, sum(budgets) in all
    assert engine.steps - steps < sum(budgets)
