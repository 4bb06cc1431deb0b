"""The scripted demo model (``runtime/_demo.py``)."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from runtime import (
    BUILTIN_TOOLS,
    ChatMessage,
    DemoModel,
    ModelRequest,
    TextChunk,
    ToolCallDelta,
    ToolCallRequest,
    ToolCallStart,
    ToolSpec,
    UsageChunk,
)
from runtime._demo import INTRO, essay_words

if TYPE_CHECKING:
    from runtime import ModelChunk

ESSAY: Final = "Write a 5000-word essay on cryptography"
WEATHER: Final = ToolSpec(name="get_weather", description="The weather in a city.")


def _request(
    content: str,
    *,
    tools: tuple[ToolSpec, ...] = (),
    max_output_tokens: int | None = None,
) -> ModelRequest:
    return ModelRequest(
        messages=(ChatMessage(role="user", content=content),),
        tools=tools,
        max_output_tokens=max_output_tokens,
    )


async def _collect(model: DemoModel, request: ModelRequest) -> list[ModelChunk]:
    async with contextlib.aclosing(model.stream(request)) as stream:
        return [chunk async for chunk in stream]


def _text(chunks: list[ModelChunk]) -> str:
    return "".join(c.text for c in chunks if isinstance(c, TextChunk))


def _usage(chunks: list[ModelChunk]) -> UsageChunk:
    """The one usage chunk, which must come last."""
    usages = [c for c in chunks if isinstance(c, UsageChunk)]
    assert len(usages) == 1
    assert chunks[-1] is usages[0]
    return usages[0]


def _calls(chunks: list[ModelChunk]) -> list[tuple[str, str, str]]:
    """(call_id, name, joined arguments) of every tool call, in order."""
    calls: list[tuple[str, str, str]] = []
    for chunk in chunks:
        if isinstance(chunk, ToolCallStart):
            calls.append((chunk.call_id, chunk.name, ""))
        elif isinstance(chunk, ToolCallDelta):
            call_id, name, arguments = calls[-1]
            assert chunk.call_id == call_id  # fragments follow their start
            calls[-1] = (call_id, name, arguments + chunk.arguments)
    return calls


FAST: Final = DemoModel(tokens_per_second=None)


# --- essays -----------------------------------------------------------------


async def test_demo_essay_streams_exact_word_count() -> None:
    """A 5000-word essay request streams exactly 5000 words, one chunk each, billed as such."""
    chunks = await _collect(FAST, _request(ESSAY))
    text_chunks = [c for c in chunks if isinstance(c, TextChunk)]
    assert len(text_chunks) == 5000
    assert all(len(c.text.split()) == 1 for c in text_chunks)
    words = _text(chunks).split()
    assert len(words) == 5000
    assert words == essay_words("cryptography", 5000)
    assert not _text(chunks).endswith(" ")  # no trailing space after the last word
    assert _usage(chunks) == UsageChunk(input_tokens=len(ESSAY.split()), output_tokens=5000)
    assert _calls(chunks) == []


@pytest.mark.parametrize(
    ("prompt", "count"),
    [
        ("a 300 word essay", 300),
        ("Write a 300-word essay about trio", 300),
        ("Please write 42 words on structured concurrency.", 42),
        ("A 1,200-word article on parking lots", 1200),
        ("a 1 word essay", 1),
        ("a 0-word essay", 0),
    ],
)
async def test_demo_essay_word_count_phrasings(prompt: str, count: int) -> None:
    """Each phrasing of an n-word request streams exactly n words and bills n output tokens."""
    chunks = await _collect(FAST, _request(prompt))
    assert len(_text(chunks).split()) == count
    assert _usage(chunks) == UsageChunk(input_tokens=len(prompt.split()), output_tokens=count)


async def test_demo_essay_opens_with_intro_and_topic() -> None:
    """An essay opens by saying it is the demo model, then names its topic."""
    chunks = await _collect(FAST, _request(ESSAY))
    text = _text(chunks)
    assert text.startswith(INTRO + " Topic: cryptography. ")


async def test_demo_stream_is_deterministic() -> None:
    """Two runs on the same request, even on different instances, stream the same chunks."""
    request = _request("Write a 300-word essay on trio")
    first = await _collect(FAST, request)
    second = await _collect(FAST, request)
    third = await _collect(DemoModel(tokens_per_second=None), request)
    assert first == second == third


def test_demo_essay_words_exact_and_deterministic() -> None:
    """essay_words gives exactly count words, the same every time, intro first."""
    for count in (0, 1, 5, 10, 11, 12, 100, 1234):
        words = essay_words("the trio library", count)
        assert len(words) == count
        assert words == essay_words("the trio library", count)
    head = essay_words("the trio library", 100)
    intro = INTRO.split()
    assert head[: len(intro)] == intro
    assert head[len(intro) : len(intro) + 4] == ["Topic:", "the", "trio", "library."]
    assert essay_words("", 20)[len(intro) : len(intro) + 2] == ["Topic:", "anything."]


@pytest.mark.parametrize(("cap", "words"), [(0, 0), (1, 1), (10, 10), (5000, 5000), (9999, 5000)])
async def test_demo_max_output_tokens_caps_words(cap: int, words: int) -> None:
    """max_output_tokens caps the words streamed and billed, and never adds any."""
    chunks = await _collect(FAST, _request(ESSAY, max_output_tokens=cap))
    assert len(_text(chunks).split()) == words
    assert _text(chunks).split() == essay_words("cryptography", 5000)[:words]
    assert _usage(chunks).output_tokens == words


async def test_demo_plain_message_says_it_is_a_demo() -> None:
    """Anything else gets a short reply that says it is the demo model and echoes the input."""
    chunks = await _collect(FAST, _request("hello there"))
    text = _text(chunks)
    assert text.startswith(INTRO)
    assert "You said: 'hello there'." in text
    assert _calls(chunks) == []
    assert _usage(chunks) == UsageChunk(input_tokens=2, output_tokens=len(text.split()))


@pytest.mark.parametrize(
    ("prompt", "topic"),
    [
        ("Write a 30-word essay on onions", "onions"),
        ("Write a 30-word story about trio", "trio"),
        ("a 30-word article on the history of on/off switches", "the history of on/off switches"),
        ("Write 30 words about cats!", "cats"),
        ("a 30-word essay", "anything"),
    ],
)
async def test_demo_essay_topic_drops_leading_filler(prompt: str, topic: str) -> None:
    """The topic line drops a leading 'essay/story/… on/about' and keeps the rest."""
    chunks = await _collect(FAST, _request(prompt))
    assert _text(chunks).startswith(f"{INTRO} Topic: {topic}. ")


@pytest.mark.parametrize(
    ("prompt", "topic"),
    [
        ("Write a 30-word textbook review", "textbook review"),
        ("Write a 30-word storytelling guide", "storytelling guide"),
        ("Write 30 words online", "online"),
    ],
)
async def test_demo_essay_topic_keeps_words_that_start_like_filler(prompt: str, topic: str) -> None:
    """A topic word that merely starts with 'text', 'story', 'on', … is kept whole."""
    chunks = await _collect(FAST, _request(prompt))
    assert _text(chunks).startswith(f"{INTRO} Topic: {topic}. ")


# --- pacing and cancellation -----------------------------------------------


async def test_demo_pacing_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    """At 50 tokens/s, 100 words take 2.0 virtual seconds, word k arriving at k/50."""
    model = DemoModel(tokens_per_second=50.0)
    start = trio.current_time()
    arrivals: list[float] = []
    chunks: list[ModelChunk] = []
    async with contextlib.aclosing(model.stream(_request("a 100-word essay on time"))) as stream:
        async for chunk in stream:
            chunks.append(chunk)
            arrivals.append(trio.current_time() - start)
    assert len(_text(chunks).split()) == 100
    assert trio.current_time() - start == pytest.approx(2.0, abs=1e-9)
    # One word per 1/50 s, the first after one interval; usage right after the last word.
    assert arrivals[:100] == pytest.approx([(k + 1) / 50 for k in range(100)], abs=1e-9)
    assert arrivals[-1] == pytest.approx(2.0, abs=1e-9)


@pytest.mark.parametrize("tps", [None, 0.0])
async def test_demo_unpaced_takes_no_time(
    autojump_clock: trio.testing.MockClock, tps: float | None
) -> None:
    """With tokens_per_second None or 0 the stream takes no virtual time at all."""
    start = trio.current_time()
    chunks = await _collect(DemoModel(tokens_per_second=tps), _request("a 500-word essay"))
    assert len(_text(chunks).split()) == 500
    assert trio.current_time() - start == 0


async def test_demo_cancel_mid_stream_stops_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cancel mid-stream stops the stream at the cancel time; the closed stream yields no more."""
    model = DemoModel(tokens_per_second=50.0)
    chunks: list[ModelChunk] = []
    start = trio.current_time()
    stream = model.stream(_request(ESSAY))
    with trio.move_on_after(0.51) as scope:
        async with contextlib.aclosing(stream) as s:
            async for chunk in s:
                chunks.append(chunk)
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(0.51, abs=1e-9)
    assert len(chunks) == 25  # words at 0.02, 0.04, …, 0.50
    assert all(isinstance(c, TextChunk) for c in chunks)  # no usage for a cancelled stream
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_demo_cancel_from_consumer_after_some_chunks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A consumer cancelling after its tenth chunk gets exactly ten and spends 10/50 s."""
    model = DemoModel(tokens_per_second=50.0)
    chunks: list[ModelChunk] = []
    start = trio.current_time()
    with trio.CancelScope() as scope:
        async with contextlib.aclosing(model.stream(_request(ESSAY))) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 10:
                    scope.cancel()
    assert scope.cancelled_caught
    assert len(chunks) == 10
    assert trio.current_time() - start == pytest.approx(10 / 50, abs=1e-9)


@pytest.mark.parametrize("tps", [-1, -0.5, -1e-9])
def test_demo_negative_rate_raises(tps: float) -> None:
    """A negative tokens_per_second raises ValueError naming the value."""
    with pytest.raises(ValueError, match=rf"tokens_per_second must be >= 0, not {tps!r}"):
        DemoModel(tokens_per_second=tps)


def test_demo_nan_rate_raises() -> None:
    """A NaN tokens_per_second is rejected by the constructor, not mid-stream."""
    with pytest.raises(ValueError, match="tokens_per_second must be >= 0, not nan"):
        DemoModel(tokens_per_second=float("nan"))


# --- tool calls -------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "name", "arguments"),
    [
        ("run: echo hi", "run_shell", {"command": "echo hi"}),
        ("write a.txt: hello", "write_file", {"path": "a.txt", "content": "hello"}),
    ],
)
async def test_demo_builtin_tool_line_calls_tool(
    line: str, name: str, arguments: dict[str, str]
) -> None:
    """A run:/write line calls the built-in tool with JSON arguments when it is offered."""
    chunks = await _collect(FAST, _request(line, tools=BUILTIN_TOOLS))
    calls = _calls(chunks)
    assert [(call_id, n) for call_id, n, _ in calls] == [("call_0", name)]
    assert json.loads(calls[0][2]) == arguments
    assert _text(chunks) == "Calling 1 tool(s)."
    # Tool calls come after the text, and usage counts each call as one token.
    first_call = next(i for i, c in enumerate(chunks) if isinstance(c, ToolCallStart))
    assert not any(isinstance(c, TextChunk) for c in chunks[first_call:])
    assert _usage(chunks) == UsageChunk(input_tokens=len(line.split()), output_tokens=3 + 1)


async def test_demo_tool_arguments_stream_in_fragments() -> None:
    """Tool call arguments arrive as several fragments of the same call that join to the JSON."""
    chunks = await _collect(FAST, _request("run: echo hi", tools=BUILTIN_TOOLS))
    deltas = [c for c in chunks if isinstance(c, ToolCallDelta)]
    assert len(deltas) > 1
    assert {d.call_id for d in deltas} == {"call_0"}
    assert "".join(d.arguments for d in deltas) == json.dumps({"command": "echo hi"})


async def test_demo_several_tool_lines_call_in_order() -> None:
    """Several tool lines give one call each, in order, with ids call_0, call_1, …."""
    prompt = "run: echo hi\nwrite a.txt: hello\nrun: ls -l"
    chunks = await _collect(FAST, _request(prompt, tools=BUILTIN_TOOLS))
    calls = _calls(chunks)
    assert [(call_id, name, json.loads(args)) for call_id, name, args in calls] == [
        ("call_0", "run_shell", {"command": "echo hi"}),
        ("call_1", "write_file", {"path": "a.txt", "content": "hello"}),
        ("call_2", "run_shell", {"command": "ls -l"}),
    ]
    assert _text(chunks) == "Calling 3 tool(s)."
    assert _usage(chunks).output_tokens == 3 + 3


async def test_demo_only_offered_tools_are_called() -> None:
    """A tool line for a tool the request does not offer is not called."""
    prompt = "run: echo hi\nwrite a.txt: hello"
    only_write = (ToolSpec(name="write_file"),)
    calls = _calls(await _collect(FAST, _request(prompt, tools=only_write)))
    assert [name for _, name, _ in calls] == ["write_file"]
    only_run = (ToolSpec(name="run_shell"),)
    calls = _calls(await _collect(FAST, _request(prompt, tools=only_run)))
    assert [name for _, name, _ in calls] == ["run_shell"]


@pytest.mark.parametrize("tools", [(), (WEATHER,)], ids=["no-tools", "other-tool"])
async def test_demo_tool_lines_without_tools_give_plain_answer(tools: tuple[ToolSpec, ...]) -> None:
    """Without run_shell / write_file offered, tool lines get the plain demo answer."""
    chunks = await _collect(FAST, _request("run: echo hi\nwrite a.txt: hello", tools=tools))
    assert _calls(chunks) == []
    assert not any(isinstance(c, ToolCallStart | ToolCallDelta) for c in chunks)
    assert _text(chunks).startswith(INTRO)


async def test_demo_client_function_call() -> None:
    """A `call NAME: {json}` line calls an offered client tool with exactly that JSON."""
    prompt = 'call get_weather: {"city": "Paris"}'
    chunks = await _collect(FAST, _request(prompt, tools=(*BUILTIN_TOOLS, WEATHER)))
    calls = _calls(chunks)
    assert [(call_id, name) for call_id, name, _ in calls] == [("call_0", "get_weather")]
    assert json.loads(calls[0][2]) == {"city": "Paris"}
    assert calls[0][2] == '{"city": "Paris"}'


@pytest.mark.parametrize("tools", [(), BUILTIN_TOOLS], ids=["no-tools", "builtins"])
async def test_demo_client_function_not_offered_is_not_called(
    tools: tuple[ToolSpec, ...],
) -> None:
    """A `call NAME:` line for a tool that is not offered gives a plain answer, no call."""
    chunks = await _collect(FAST, _request('call get_weather: {"city": "Paris"}', tools=tools))
    assert _calls(chunks) == []
    assert _text(chunks).startswith(INTRO)


async def test_demo_answers_tool_results_with_text() -> None:
    """After a tool message the model reports the results as text and calls nothing."""
    request = ModelRequest(
        messages=(
            ChatMessage(role="user", content="run: echo hi"),
            ChatMessage(
                role="assistant",
                content="Calling 1 tool(s).",
                tool_calls=(
                    ToolCallRequest("call_0", "run_shell", json.dumps({"command": "echo hi"})),
                ),
            ),
            ChatMessage(role="tool", content="hi\n", tool_call_id="call_0"),
        ),
        tools=BUILTIN_TOOLS,
    )
    chunks = await _collect(FAST, request)
    assert _text(chunks) == "Tool results: [call_0] hi"
    assert _calls(chunks) == []
    # Input: every message's words (3 user + 3 assistant + 1 tool); output: 4 words.
    assert _usage(chunks) == UsageChunk(input_tokens=3 + 3 + 1, output_tokens=4)


async def test_demo_call_ids_continue_after_earlier_results() -> None:
    """Call ids of a later step continue after the tool results already in the conversation."""
    request = ModelRequest(
        messages=(
            ChatMessage(role="user", content="run: echo hi"),
            ChatMessage(
                role="assistant",
                tool_calls=(ToolCallRequest("call_0", "run_shell", '{"command": "echo hi"}'),),
            ),
            ChatMessage(role="tool", content="hi", tool_call_id="call_0"),
            ChatMessage(role="assistant", content="Tool results: [call_0] hi"),
            ChatMessage(role="user", content="run: echo again"),
        ),
        tools=BUILTIN_TOOLS,
    )
    calls = _calls(await _collect(FAST, request))
    assert [(call_id, name) for call_id, name, _ in calls] == [("call_1", "run_shell")]


async def test_demo_reports_every_trailing_tool_result() -> None:
    """The report lists each trailing tool result's first line, in order; empty is '(no output)'."""
    request = ModelRequest(
        messages=(
            ChatMessage(role="user", content="run: true\nrun: printf 'a\\nb'"),
            ChatMessage(
                role="assistant",
                tool_calls=(
                    ToolCallRequest("call_0", "run_shell", '{"command": "true"}'),
                    ToolCallRequest("call_1", "run_shell", '{"command": "printf"}'),
                ),
            ),
            ChatMessage(role="tool", content="", tool_call_id="call_0"),
            ChatMessage(role="tool", content="a\nb", tool_call_id="call_1"),
        ),
        tools=BUILTIN_TOOLS,
    )
    chunks = await _collect(FAST, request)
    assert _text(chunks) == "Tool results: [call_0] (no output) [call_1] a"
    assert _calls(chunks) == []
