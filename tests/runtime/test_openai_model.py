"""OpenAIModel's parsing against the fake upstream, without the HTTP server:
fragment assembly variants, [DONE] then a held-open body, malformed data."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio

from bench.fake_upstream import Response, Status, Stream, raw, text, usage
from runtime import (
    ChatMessage,
    ModelChunk,
    ModelRequest,
    OpenAIModel,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    UpstreamError,
    UsageChunk,
)

REQUEST = ModelRequest(messages=(ChatMessage(role="user", content="hi"),))


def call(fragment: dict[str, Any]) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]}


async def collect(script: list[Response], **kwargs: Any) -> list[ModelChunk]:
    from bench.fake_upstream import open_fake_upstream

    with trio.fail_after(10):
        async with (
            open_fake_upstream(script) as up,
            OpenAIModel(base_url=up.base_url, model="m", **kwargs) as model,
            contextlib.aclosing(model.stream(REQUEST)) as stream,
        ):
            return [chunk async for chunk in stream]


def calls(chunks: list[ModelChunk]) -> list[tuple[str, str, str]]:
    """(id, name, joined arguments) per started call, in order."""
    started = [(c.call_id, c.name) for c in chunks if isinstance(c, ToolCallStart)]
    args = {cid: "" for cid, _ in started}
    for c in chunks:
        if isinstance(c, ToolCallDelta):
            args[c.call_id] += c.arguments
    return [(cid, name, args[cid]) for cid, name in started]


async def test_openai_tool_name_split_across_fragments() -> None:
    """A name sent in pieces is announced whole."""
    chunks = await collect(
        [
            Stream(
                chunks=[
                    call({"index": 0, "id": "c1", "function": {"name": "get_", "arguments": ""}}),
                    call({"index": 0, "function": {"name": "weather", "arguments": '{"a":'}}),
                    call({"index": 0, "function": {"arguments": "1}"}}),
                    usage(1, 1),
                ]
            )
        ]
    )
    assert calls(chunks) == [("c1", "get_weather", '{"a":1}')]


async def test_openai_tool_calls_without_index_are_separate() -> None:
    """Whole calls sent without 'index' but with distinct ids stay two calls."""
    chunks = await collect(
        [
            Stream(
                chunks=[
                    call({"id": "a", "function": {"name": "f", "arguments": "{}"}}),
                    call({"id": "b", "function": {"name": "g", "arguments": '{"x":1}'}}),
                    usage(1, 1),
                ]
            )
        ]
    )
    assert calls(chunks) == [("a", "f", "{}"), ("b", "g", '{"x":1}')]


async def test_openai_tool_call_id_arriving_late_is_used() -> None:
    """An id that arrives after the first fragment (before arguments) is adopted."""
    chunks = await collect(
        [
            Stream(
                chunks=[
                    call({"index": 0, "function": {"name": "f"}}),
                    call({"index": 0, "id": "call_real", "function": {"arguments": "{}"}}),
                    usage(1, 1),
                ]
            )
        ]
    )
    assert calls(chunks) == [("call_real", "f", "{}")]


async def test_openai_done_then_held_open_still_completes() -> None:
    """[DONE] ends the answer even if the upstream keeps the body open afterwards."""
    held = Stream(
        chunks=[text("hello"), usage(3, 1), raw(b"data: [DONE]\n\n")], done=False, stall_after=3
    )
    start = trio.current_time()
    chunks = await collect([held], read_timeout=5.0)
    assert trio.current_time() - start < 2
    assert chunks == [TextChunk("hello"), UsageChunk(3, 1)]


@pytest.mark.parametrize(
    "script",
    [
        [Stream(chunks=[raw(b'data: {"choices": ["oops"]}\n\n')])],
        [Stream(chunks=[raw(b'data: {"choices": [{"delta": 3}]}\n\n')])],
        [Status(code=307, headers={"Location": "https://elsewhere/v1"})],
    ],
    ids=["choice-not-object", "delta-not-object", "redirect"],
)
async def test_openai_malformed_or_redirected_is_upstream_error(script: list[Response]) -> None:
    """Malformed chunks and 3xx answers are UpstreamError, not a crash or a silent stop."""
    with pytest.RaisesGroup(UpstreamError, flatten_subgroups=True, allow_unwrapped=True):
        await collect(script)


async def test_openai_connect_error_hides_the_url() -> None:
    """A connect failure does not repeat the (internal, maybe credentialed) URL."""
    model = OpenAIModel(
        base_url="http://user:s3cret@127.0.0.1:1/v1", model="m", max_tries=1, backoff=0
    )

    async def drain() -> None:
        async with contextlib.aclosing(model.stream(REQUEST)) as stream:
            async for _ in stream:
                pass

    async with model:
        with pytest.raises(UpstreamError) as info:
            await drain()
    assert "s3cret" not in str(info.value)
    assert "127.0.0.1" not in str(info.value)
