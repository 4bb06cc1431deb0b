"""The official ``openai`` SDK against our ``/v1/responses`` (demo model).

The SDK's sync client runs in a worker thread while the server runs in the
test's trio loop (real sockets, real clock).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
import trio

from runtime import DemoModel

from .conftest import KEY, Harness, open_harness, parse_sse

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather by city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, DemoModel(tokens_per_second=None)) as h:  # type: ignore[arg-type]
        yield h


async def sdk(harness: Harness, call: Callable[[openai.OpenAI], Any]) -> Any:
    """Run ``call(client)`` with the SDK's sync client in a thread."""

    def run() -> Any:
        with openai.OpenAI(base_url=f"{harness.base_url}/v1", api_key=KEY, max_retries=0) as client:
            return call(client)

    with trio.fail_after(30):
        return await trio.to_thread.run_sync(run)


async def test_sdk_create_not_streamed(demo: Harness) -> None:
    """responses.create(stream=False) returns a Response whose output_text is the answer."""
    response = await sdk(
        demo,
        lambda c: c.responses.create(model="demo", input="Write a 20-word essay on trio"),
    )
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert len(response.output_text.split()) == 20
    assert response.usage.output_tokens == 20
    assert response.usage.total_tokens == response.usage.input_tokens + 20


async def test_sdk_create_streamed(demo: Harness) -> None:
    """stream=True yields typed events to response.completed; the deltas make the text."""

    def run(client: openai.OpenAI) -> tuple[list[str], str, str]:
        types: list[str] = []
        text, final = "", ""
        with client.responses.create(model="demo", input="a 12-word essay", stream=True) as s:
            for event in s:
                types.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
                if event.type == "response.completed":
                    final = event.response.output_text
        return types, text, final

    types, text, final = await sdk(demo, run)
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert "response.output_text.done" in types
    assert len(text.split()) == 12
    assert final == text


async def test_sdk_function_call_round_trip(demo: Harness) -> None:
    """function_call out, function_call_output in, then a final text answer."""
    question = 'call get_weather: {"city": "Paris"}'

    def run(client: openai.OpenAI) -> tuple[Any, Any]:
        first = client.responses.create(model="demo", input=question, tools=[WEATHER])
        [call] = [item for item in first.output if item.type == "function_call"]
        second = client.responses.create(
            model="demo",
            tools=[WEATHER],
            input=[
                {"role": "user", "content": question},
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
            ],
        )
        return call, second

    call, second = await sdk(demo, run)
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert second.status == "completed"
    assert "sunny" in second.output_text


async def test_sdk_retrieve(demo: Harness) -> None:
    """responses.retrieve(id) returns the same finished Response."""

    def run(client: openai.OpenAI) -> tuple[Any, Any]:
        created = client.responses.create(model="demo", input="a 5-word essay")
        return created, client.responses.retrieve(created.id)

    created, got = await sdk(demo, run)
    assert got.id == created.id
    assert got.status == "completed"
    assert got.output_text == created.output_text


async def test_sdk_malformed_input_is_400(demo: Harness) -> None:
    """A malformed input item is 400 with our {"error", "message"} body."""

    def run(client: openai.OpenAI) -> openai.BadRequestError:
        bad: Any = [{"type": "nonsense"}]
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="demo", input=bad)
        return info.value

    error = await sdk(demo, run)
    assert error.status_code == 400
    body = error.response.json()
    assert body["error"] == "invalid_request"
    assert "input[0]" in body["message"]


async def test_responses_cancel_resume_unbilled(tmp_path: Path) -> None:
    """Raw HTTP: cancel a streamed response mid-way -> response.cancelled; resuming with
    Last-Event-ID replays the tail; nothing is billed."""
    async with open_harness(tmp_path, DemoModel(tokens_per_second=200)) as h:  # type: ignore[arg-type]
        body = {"model": "demo", "input": "a 5000-word essay", "stream": True}
        with trio.fail_after(20):
            async with h.client.stream("POST", "/v1/responses", json=body) as r:
                rid = r.headers["X-Response-Id"]
                raw = ""
                cancel = None
                async for chunk in r.aiter_text():  # read to the end: the terminal
                    raw += chunk
                    if cancel is None and raw.count("response.output_text.delta") >= 10:
                        cancel = await h.client.post(f"/v1/responses/{rid}/cancel")
            assert cancel is not None
            assert (cancel.status_code, cancel.json()["status"]) == (202, "cancelling")
            live = parse_sse(raw)
            assert live[-1].event == "response.cancelled"
            resumed = await h.client.get(
                f"/v1/responses/{rid}/events", headers={"Last-Event-ID": "5"}
            )
        tail = parse_sse(resumed.text)
        assert tail == live[6:]
        assert tail[-1].event == "response.cancelled"
        assert tail[-1].data["response"]["status"] == "cancelled"
        assert await h.store.usage_records(h.account) == []
        got = (await h.client.get(f"/v1/responses/{rid}")).json()
        assert got["status"] == "cancelled"


async def test_responses_wrong_types_are_400(demo: Harness) -> None:
    """Wrong types and tool limits are 400 with our error shape."""
    bad_bodies: list[dict[str, Any]] = [
        {"input": 3},
        {"input": []},
        {"input": "hi", "stream": "yes"},
        {"input": "hi", "max_output_tokens": 0},
        {"input": "hi", "tools": [{"type": "function", "name": "x" * 65}]},
        {"input": "hi", "tools": [{"type": "function", "name": f"t{i}"} for i in range(129)]},
        {"input": "hi", "tools": [{"type": "function", "name": "t", "description": "d" * 16385}]},
        {"input": "hi", "tool_choice": {"type": "function", "name": "nope"}},
        {"input": [{"role": "robot", "content": "hi"}]},
        {"input": "hi", "model": "gpt-9"},
    ]
    with trio.fail_after(10):
        for body in bad_bodies:
            response = await demo.client.post("/v1/responses", json=body)
            assert response.status_code == 400, body
            assert response.json()["error"] == "invalid_request"
    assert await demo.store.usage_records(demo.account) == []


async def test_responses_unknown_fields_are_ignored(demo: Harness) -> None:
    """Fields we do not know (temperature, store, user, …) are ignored."""
    body = {"input": "a 3-word essay", "temperature": 0.2, "store": True, "user": "u", "x": [1]}
    with trio.fail_after(10):
        response = await demo.client.post("/v1/responses", json=body)
    assert response.status_code == 200
    assert response.json()["status"] == "completed"
    assert response.headers["X-Response-Id"] == response.json()["id"]
    _ = httpx  # the raw client used above is httpx
