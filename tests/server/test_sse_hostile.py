"""SSE framing under hostile content (issue 9, point 7).

Model text, tool arguments and tool output carrying SSE syntax (``\\n\\n``,
``\\r\\n``, a lone ``\\r``, ``data:``, ``event:``, ``id:``, ``:comment``),
Unicode line separators (U+2028, U+2029, U+0085), control characters (NUL,
ESC), grapheme clusters split across deltas and lone surrogates must reach
every client as exactly the string that was sent.

The clients read the server over a real socket through a transport that hands
their decoders the body in pieces of 1 to 7 bytes, so every multibyte UTF-8
sequence is split across reads somewhere: the ``openai`` SDK (its own bytes
decoder), ``httpx-sse`` (spec line splitting on text), and a naive client that
splits lines with ``str.splitlines`` (httpx's ``aiter_lines``: it also breaks
on U+2028, U+2029, U+0085 and the ASCII separators, which is why the encoder
escapes them).
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any, Final

import attrs
import httpx
import httpx2
import httpx_sse
import openai
import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from runtime import (
    ResponseFunctionCallArgumentsDelta,
    ResponseOutputTextDelta,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    UsageChunk,
)
from runtime._events import TextDelta
from server._codec import _FAST_FRAMES, _general_frame, sse_frame

from ..fakes import FakeModel
from .conftest import KEY, Harness, open_harness

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
    from pathlib import Path

    from runtime import ModelChunk, ModelRequest
    from runtime._events import Event

#: Pieces a hostile model streams, one delta each.
HOSTILE: Final = (
    "plain ",
    "\n\n",
    'data: {"type":"fake"}\n\n',
    "\r\n",
    "\r",
    "\r\n\r\n",
    "event: message.completed\n",
    "id: 5\n",
    ":comment\n",
    "\n:",
    "retry: 1\r",
    "\u2028",
    "\u2029",
    "\u0085",
    "\x00",
    "\x1b[31mred\x1b[0m",
    "\x0b\x0c\x1c\x1d\x1e\x7f",
    "é",
    "e\u0301",  # e + combining acute: one grapheme, two code points
    "👩",
    "\u200d",
    "💻",  # woman, ZWJ, laptop: one emoji split over three deltas
    "🇫",
    "🇷",  # a flag's two regional indicators in two deltas
    "𝄞\U0010fffd",
    "\ufeff",  # a BOM in the middle of the stream
    "\\u2028 \\n",  # already-escaped text stays text
    '"}',
    "end",
)
#: A lone surrogate: not Unicode text, but a broken upstream can produce one
#: (JSON's "\ud83d" escape without its pair), and JSON can carry it escaped.
#: Requests cannot (UTF-8 cannot encode it), so only a model emits it.
LONE_SURROGATE: Final = "\ud83d"
HOSTILE_TEXT: Final = "".join(HOSTILE)
#: What to send to a model that echoes: prefix + the pieces joined by SEP.
PREFIX: Final = "echo:"
SEP: Final = "\ue000"
#: Characters no line of an SSE body may contain raw (SSE line ends, and
#: what ``str.splitlines`` also splits on).
LINE_BREAKS: Final = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
CHUNK_SIZES: Final = (1, 2, 3, 5, 7)
TERMINAL: Final = frozenset(
    {
        "message.completed",
        "message.cancelled",
        "message.error",
        "response.completed",
        "response.cancelled",
        "response.failed",
    }
)


@attrs.define(eq=False)
class EchoModel:
    """Streams the last user message back (after :data:`PREFIX`), one delta per
    :data:`SEP`-separated piece, so each request chooses its own deltas."""

    name: str = "fake"

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        text = request.messages[-1].content.removeprefix(PREFIX)
        for piece in text.split(SEP):
            if piece:
                await trio.lowlevel.checkpoint()
                yield TextChunk(piece)
        yield UsageChunk(1, 1)


# -- a transport that splits the body into tiny reads ------------------------------


async def recut(
    stream: AsyncIterable[bytes], sizes: tuple[int, ...]
) -> AsyncGenerator[bytes, None]:
    """``stream``'s bytes again, in pieces of ``sizes[0]``, ``sizes[1]``, ...
    (cycling), whatever the reads from the socket were."""
    cycle = itertools.cycle(sizes)
    async for chunk in stream:
        view = memoryview(chunk)
        while view:
            size = next(cycle)
            yield bytes(view[:size])
            view = view[size:]


@attrs.define(eq=False)
class _Pieces(httpx.AsyncByteStream):
    inner: httpx.AsyncByteStream
    sizes: tuple[int, ...]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in recut(self.inner, self.sizes):
            yield piece

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define(eq=False)
class Rechunking(httpx.AsyncBaseTransport):
    """The real HTTP transport, with every response body re-cut into reads of
    1, 2, 3, 5, 7, 1, ... bytes (so every multibyte character is split)."""

    sizes: tuple[int, ...] = CHUNK_SIZES
    #: Plain HTTP only: no certificate store to load (a quarter second each).
    inner: httpx.AsyncHTTPTransport = attrs.field(
        factory=lambda: httpx.AsyncHTTPTransport(verify=False)
    )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Pieces(response.stream, self.sizes),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define(eq=False)
class _Pieces2(httpx2.AsyncByteStream):
    inner: httpx2.AsyncByteStream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in recut(self.inner, CHUNK_SIZES):
            yield piece

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define(eq=False)
class Rechunking2(httpx2.AsyncBaseTransport):
    """:class:`Rechunking` for ``httpx2``, the HTTP client the openai SDK uses."""

    inner: httpx2.AsyncHTTPTransport = attrs.field(
        factory=lambda: httpx2.AsyncHTTPTransport(verify=False)
    )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Pieces2(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def sdk_client(harness: Harness, http: httpx2.AsyncClient) -> openai.AsyncOpenAI:
    """The SDK's async client on ``http`` (no retries)."""
    return openai.AsyncOpenAI(
        base_url=f"{harness.base_url}/v1", api_key=KEY, max_retries=0, http_client=http
    )


def rechunking_client(harness: Harness, sizes: tuple[int, ...] = CHUNK_SIZES) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=harness.base_url,
        headers={"Authorization": f"Bearer {KEY}"},
        transport=Rechunking(sizes),
        timeout=30,
    )


# -- readers -----------------------------------------------------------------------


@attrs.frozen
class Read:
    """What a client reconstructed from one stream."""

    events: list[tuple[str, str, dict[str, Any]]]  # (id, event, data)

    def types(self) -> list[str]:
        return [data["type"] for _, _, data in self.events]

    def joined(self, event_type: str, key: str) -> str:
        return "".join(data[key] for _, kind, data in self.events if kind == event_type)

    def check_framing(self) -> None:
        """ids contiguous from 0, ``event:`` equals the data's type, one terminal, last."""
        assert [int(i) for i, _, _ in self.events] == list(range(len(self.events)))
        for i, kind, data in self.events:
            assert (kind, data["sequence_number"]) == (data["type"], int(i))
        terminal = [k for _, k, _ in self.events if k in TERMINAL]
        assert terminal == [self.events[-1][1]]


async def read_httpx_sse(client: httpx.AsyncClient, method: str, url: str, body: Any) -> Read:
    """Read a stream with ``httpx_sse.aconnect_sse`` and parse every data as JSON."""
    events = []
    async with httpx_sse.aconnect_sse(client, method, url, json=body) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for sse in source.aiter_sse():
            events.append((sse.id, sse.event, json.loads(sse.data)))
    return Read(events)


async def read_splitlines(client: httpx.AsyncClient, method: str, url: str, body: Any) -> Read:
    """A naive client: httpx's ``aiter_lines`` (``str.splitlines`` semantics), then
    ``id: ``/``event: ``/``data: `` prefixes, a blank line ending each event."""
    events = []
    fields: dict[str, str] = {}
    async with client.stream(method, url, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line:
                if "data" in fields:
                    events.append((fields["id"], fields["event"], json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                name, sep, value = line.partition(": ")
                assert sep, repr(line)
                assert name in ("id", "event", "data"), repr(line)
                fields[name] = value
    return Read(events)


async def send_message(client: httpx.AsyncClient, reader: Any, sid: str, text: str) -> Read:
    read: Read = await reader(client, "POST", f"/v1/sessions/{sid}/messages", {"message": text})
    read.check_framing()
    return read


async def send_response(client: httpx.AsyncClient, reader: Any, text: str) -> Read:
    body = {"model": "fake", "input": text, "stream": True}
    read: Read = await reader(client, "POST", "/v1/responses", body)
    read.check_framing()
    return read


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, EchoModel()) as h:  # type: ignore[arg-type]
        yield h


# -- the encoder itself --------------------------------------------------------------


def test_sse_frame_data_line_holds_no_line_break() -> None:
    """sse_frame of hostile text: three lines, none with a raw line break, data
    that json.loads back to the exact text."""
    text = HOSTILE_TEXT + LONE_SURROGATE
    event: Event = TextDelta(sequence_number=7, response_id="msg_x", content=text)
    frame = sse_frame(event)
    assert frame.endswith(b"\n\n")
    lines = frame[:-2].decode("utf-8").split("\n")
    assert [line.split(": ", 1)[0] for line in lines] == ["id", "event", "data"]
    for line in lines:
        assert not any(c in LINE_BREAKS for c in line), repr(line)
    assert json.loads(lines[2].removeprefix("data: "))["content"] == text
    # Non-hostile text keeps its characters (no escaping beyond what is needed).
    plain = TextDelta(sequence_number=0, response_id="msg_x", content="héllo 😀 \u00a0")
    assert "héllo 😀 \u00a0".encode() in sse_frame(plain)


_ANY_TEXT: Final = st.text(st.characters(exclude_categories=()), max_size=40)


@settings(max_examples=300, deadline=None)
@given(text=_ANY_TEXT, rid=_ANY_TEXT, item=_ANY_TEXT, n=st.integers(0, 2**40))
def test_sse_frame_fast_path_writes_the_general_bytes(
    text: str, rid: str, item: str, n: int
) -> None:
    """Deltas take a fast path in sse_frame; for any text (surrogates, line
    separators, quotes, controls) and ids it writes the bytes the general
    encoder (event -> dict -> dumps) writes."""
    events: list[Event] = [
        TextDelta(sequence_number=n, response_id=rid, content=text),
        ResponseOutputTextDelta(
            sequence_number=n,
            response_id=rid,
            item_id=item,
            output_index=n % 7,
            content_index=n % 3,
            delta=text,
        ),
        ResponseFunctionCallArgumentsDelta(
            sequence_number=n, response_id=rid, item_id=item, output_index=n % 5, delta=text
        ),
    ]
    for event in events:
        assert type(event) in _FAST_FRAMES
        assert sse_frame(event) == _general_frame(event)


# -- over the socket ------------------------------------------------------------------


@pytest.mark.parametrize("reader", [read_httpx_sse, read_splitlines], ids=["httpx-sse", "lines"])
async def test_sse_hostile_text_session_stream(echo: Harness, reader: Any) -> None:
    """Every hostile delta of a session turn arrives exactly, in order, through
    the client's decoder; the history (JSON) has the same text."""
    with trio.fail_after(20):
        sid = (await echo.client.post("/v1/sessions", json={})).json()["id"]
        async with rechunking_client(echo) as client:
            read = await send_message(client, reader, sid, PREFIX + SEP.join(HOSTILE))
            history = (await client.get(f"/v1/sessions/{sid}/messages")).json()
    deltas = [data["content"] for _, kind, data in read.events if kind == "text.delta"]
    assert deltas == [p for p in HOSTILE if p]
    assert read.types()[-1] == "message.completed"
    assert history[-1]["output_text"] == HOSTILE_TEXT


@pytest.mark.parametrize("reader", [read_httpx_sse, read_splitlines], ids=["httpx-sse", "lines"])
async def test_sse_hostile_text_responses_stream(echo: Harness, reader: Any) -> None:
    """/v1/responses: the output_text deltas, the done text and the final
    response's output_text all equal what the model sent."""
    with trio.fail_after(20):
        async with rechunking_client(echo) as client:
            read = await send_response(client, reader, PREFIX + SEP.join(HOSTILE))
    text = HOSTILE_TEXT
    assert read.joined("response.output_text.delta", "delta") == text
    [done] = [d for _, k, d in read.events if k == "response.output_text.done"]
    assert done["text"] == text
    assert read.types()[-1] == "response.completed"
    assert read.events[-1][2]["response"]["output_text"] == text


async def test_sse_hostile_text_through_the_openai_sdk(echo: Harness) -> None:
    """openai's AsyncOpenAI (its own SSE decoder), 1-7 byte reads: the deltas,
    the done event and the completed response carry the exact text."""
    text = HOSTILE_TEXT
    with trio.fail_after(20):
        async with (
            httpx2.AsyncClient(transport=Rechunking2(), timeout=30) as http,
            sdk_client(echo, http) as client,
        ):
            deltas: list[str] = []
            done, final, types = "", "", []
            stream = await client.responses.create(
                model="fake", input=PREFIX + SEP.join(HOSTILE), stream=True
            )
            async for event in stream:
                types.append(event.type)
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                elif event.type == "response.output_text.done":
                    done = event.text
                elif event.type == "response.completed":
                    final = event.response.output_text
    assert deltas == [p for p in HOSTILE if p]
    assert done == text
    assert final == text
    assert types[-1] == "response.completed"


async def test_sse_hostile_function_call_arguments_through_the_openai_sdk(
    tmp_path: Path,
) -> None:
    """A client tool's arguments, streamed in hostile pieces, arrive exactly
    through the SDK (delta events, done event and the final item)."""
    arguments = json.dumps({"q": HOSTILE_TEXT}, ensure_ascii=False)
    # Five-character pieces: they cut JSON escapes and character runs apart.
    pieces = [arguments[i : i + 5] for i in range(0, len(arguments), 5)]
    model = FakeModel(
        steps=[
            [
                ToolCallStart("call_1", "lookup"),
                *(ToolCallDelta("call_1", p) for p in pieces),
                UsageChunk(1, 1),
            ]
        ]
    )
    tool: Any = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
    async with open_harness(tmp_path, model) as h:
        with trio.fail_after(20):
            async with (
                httpx2.AsyncClient(transport=Rechunking2(), timeout=30) as http,
                sdk_client(h, http) as client,
            ):
                deltas, done, final_args = [], "", ""
                stream = await client.responses.create(
                    model="fake", input="go", tools=[tool], stream=True
                )
                async for event in stream:
                    if event.type == "response.function_call_arguments.delta":
                        deltas.append(event.delta)
                    elif event.type == "response.function_call_arguments.done":
                        done = event.arguments
                    elif event.type == "response.completed":
                        [item] = [o for o in event.response.output if o.type == "function_call"]
                        final_args = item.arguments
    assert deltas == pieces
    assert done == arguments
    assert final_args == arguments
    assert json.loads(final_args) == {"q": HOSTILE_TEXT}


async def test_sse_lone_surrogate_from_the_model_arrives_escaped(tmp_path: Path) -> None:
    """A model delta holding a lone surrogate does not kill the stream (UTF-8
    cannot encode it): it arrives as JSON's escape, which decodes to the same
    string; the stream ends completed and the history (JSON) answers 200."""
    pieces = ["a", LONE_SURROGATE, "\u2028", "b"]
    model = FakeModel(steps=[[*(TextChunk(p) for p in pieces), UsageChunk(1, 1)]])
    async with open_harness(tmp_path, model) as h:
        with trio.fail_after(20):
            sid = (await h.client.post("/v1/sessions", json={})).json()["id"]
            async with rechunking_client(h) as client:
                read = await send_message(client, read_httpx_sse, sid, "hi")
                history = await client.get(f"/v1/sessions/{sid}/messages")
                response = await send_response(client, read_splitlines, "hi")
    assert read.joined("text.delta", "content") == "".join(pieces)
    assert read.types()[-1] == "message.completed"
    assert history.status_code == 200
    assert history.json()[-1]["output_text"] == "".join(pieces)
    assert response.joined("response.output_text.delta", "delta") == "".join(pieces)


#: Bytes a tool prints: SSE syntax, separators, NUL, ESC, multibyte and
#: invalid UTF-8 (which the tool result carries as U+FFFD).
TOOL_BYTES: Final = (
    b"a\n\nb\r\nc\rd\r\n\r\ndata: {}\n\nevent: x\nid: 5\n:comment\n"
    b"\xe2\x80\xa8|\xe2\x80\xa9|\xc2\x85|\x00|\x1b[1m|\xf0\x9f\x98\x80|\xff\xfe|\xe2\x82"
)


@pytest.mark.parametrize("reader", [read_httpx_sse, read_splitlines], ids=["httpx-sse", "lines"])
async def test_sse_hostile_tool_output_in_tool_result(tmp_path: Path, reader: Any) -> None:
    """run_shell printing hostile bytes (printf): the tool_result event's content
    is exactly their UTF-8 decoding (invalid bytes as U+FFFD), and the
    model's input delta (the command) arrives exactly too."""
    command = "printf '" + "".join(f"\\{b:03o}" for b in TOOL_BYTES) + "'"
    arguments = json.dumps({"command": command})
    model = FakeModel(
        steps=[
            [
                ToolCallStart("call_1", "run_shell"),
                ToolCallDelta("call_1", arguments[:7]),
                ToolCallDelta("call_1", arguments[7:]),
                UsageChunk(1, 1),
            ],
            [TextChunk("done"), UsageChunk(1, 1)],
        ]
    )
    async with open_harness(tmp_path, model) as h:
        with trio.fail_after(20):
            sid = (await h.client.post("/v1/sessions", json={})).json()["id"]
            async with rechunking_client(h) as client:
                read = await send_message(client, reader, sid, "run it")
    [result] = [data for _, kind, data in read.events if kind == "tool_result"]
    assert result["is_error"] is False
    assert result["content"] == TOOL_BYTES.decode("utf-8", errors="replace")
    assert read.joined("tool_use.input_delta", "content") == arguments
    assert read.types()[-1] == "message.completed"
    # What the model was given back is the same string.
    [tool_message] = [m for m in model.requests[1].messages if m.role == "tool"]
    assert tool_message.content == result["content"]


# -- random text ----------------------------------------------------------------------

#: An alphabet rich in what breaks SSE framing, plus ordinary and astral text.
_HOSTILE_CHARS: Final = (
    "\n\r\x00\x1b\x0b\x0c\x1c\x1d\x1e\x7f\x85\u2028\u2029\ufeff:data event id retry"
)
_ALPHABET: Final = st.one_of(
    st.sampled_from(list(_HOSTILE_CHARS)),
    st.sampled_from(["data: ", "event: ", "id: ", ":", "\r\n", "\n\n", "😀", "👩\u200d💻", "é"]),
    st.characters(exclude_categories=["Cs"], exclude_characters=SEP),
)
_PIECES: Final = st.lists(
    st.lists(_ALPHABET, min_size=1, max_size=8).map("".join), min_size=1, max_size=12
)


async def test_sse_random_hostile_text_arrives_exactly(echo: Harness) -> None:
    """Hypothesis, 100 examples of deltas from a hostile alphabet, each through
    httpx-sse (reads of 1 to 64 bytes) on the session stream or /v1/responses: the
    client reconstructs exactly the text sent, deltas and final text alike."""
    sid = (await echo.client.post("/v1/sessions", json={})).json()["id"]
    # Some larger reads among the small ones: a fifth of the reads per byte.
    async with rechunking_client(echo, sizes=(*CHUNK_SIZES, 64)) as client:

        async def check(pieces: list[str], stateless: bool) -> None:
            text = "".join(pieces)
            wire = PREFIX + SEP.join(pieces)
            with trio.fail_after(20):
                if stateless:
                    read = await send_response(client, read_httpx_sse, wire)
                    assert read.joined("response.output_text.delta", "delta") == text
                    assert read.events[-1][2]["response"]["output_text"] == text
                else:
                    read = await send_message(client, read_httpx_sse, sid, wire)
                    assert read.joined("text.delta", "content") == text
                    assert read.types()[-1] == "message.completed"

        @settings(
            max_examples=100,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(_PIECES, st.booleans())
        def run(pieces: list[str], stateless: bool) -> None:
            trio.from_thread.run(check, pieces, stateless)

        # Hypothesis drives the examples from a worker thread; each one hops
        # back into this trio run, where the server lives.
        await trio.to_thread.run_sync(run)
