"""``OpenAIModel``: any OpenAI-compatible ``/chat/completions`` server, streamed.

Works against OpenAI, vLLM, llama.cpp's server and Ollama's OpenAI endpoint:
plain chat-completions streaming with ``stream_options.include_usage``.

Cancellation is the point: the turn closes this generator (``aclosing``) or
cancels it mid-read, which leaves ``async with client.stream(...)`` with an
exception, and httpx then closes the TCP connection instead of returning it
to the pool, so vLLM-style servers see the disconnect and abort generation.

Failures become :class:`UpstreamError` (``upstream_error``): connect errors,
429 and 5xx are retried with backoff before any output (at most ``max_tries``
tries, honouring ``Retry-After``); nothing is retried once output has
streamed. The API key is only ever sent in the Authorization header: it is not
part of any error, log line or repr.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import httpx
import trio

from ._errors import UpstreamError
from ._model import (
    ModelChunk,
    ModelRequest,
    ReasoningChunk,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    UsageChunk,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from ._model import ChatMessage, ToolSpec

RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
#: Longest Retry-After we honour; longer ones fail the turn instead.
MAX_RETRY_AFTER: Final = 30.0


def _message_json(message: ChatMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    body: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        body["content"] = message.content or None
        body["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ]
    return body


def _tool_json(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


@attrs.define
class _PendingCall:
    call_id: str
    #: True while the id is ours (the upstream has not sent one yet).
    synthetic: bool = False
    name: str = ""
    started: bool = False
    buffered: list[str] = attrs.field(factory=list)


@final
@attrs.define(eq=False, kw_only=True)
class OpenAIModel:
    """A model served by an OpenAI-compatible chat-completions endpoint.

    Args:
      base_url: e.g. ``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``
        (vLLM), ``http://127.0.0.1:11434/v1`` (Ollama), ``http://127.0.0.1:8080/v1``
        (llama.cpp).
      model: the upstream model name (also this model's name for billing).
      api_key: sent as ``Authorization: Bearer``; None for local servers.
      connect_timeout: seconds to connect.
      read_timeout: seconds without a byte from the upstream before the turn fails.
      max_tries: tries before the first token (connect errors, 429, 5xx).
      backoff: first retry delay in seconds (doubling) when no Retry-After.

    Use as ``async with OpenAIModel(...) as model:`` (or call :meth:`aclose`):
    it owns one shared ``httpx.AsyncClient``.
    """

    base_url: str
    model: str
    api_key: str | None = attrs.field(default=None, repr=False)
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    max_tries: int = 3
    backoff: float = 0.5
    _client: httpx.AsyncClient = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, not {self.max_tries!r}")
        timeout = httpx.Timeout(
            connect=self.connect_timeout, read=self.read_timeout, write=30.0, pool=30.0
        )
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits)

    @property
    def name(self) -> str:
        return self.model

    async def aclose(self) -> None:
        """Close the shared HTTP client."""
        await self._client.aclose()

    async def __aenter__(self) -> OpenAIModel:
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _payload(self, request: ModelRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [_message_json(m) for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            payload["tools"] = [_tool_json(t) for t in request.tools]
        if request.max_output_tokens is not None:
            payload["max_tokens"] = request.max_output_tokens
        if request.tools and request.tool_choice is not None:
            if request.tool_choice in ("auto", "none", "required"):
                payload["tool_choice"] = request.tool_choice
            else:
                payload["tool_choice"] = {
                    "type": "function",
                    "function": {"name": request.tool_choice},
                }
        return payload

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        """Stream one chat-completions call as model chunks.

        Raises:
          UpstreamError: the upstream failed (after retries where allowed).

        Cancellation: closes the upstream connection at once.
        """
        url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        payload = self._payload(request)
        for attempt in range(1, self.max_tries + 1):
            delay = self.backoff * 2 ** (attempt - 1)
            try:
                async with self._client.stream("POST", url, json=payload, headers=headers) as resp:
                    if resp.status_code in RETRY_STATUSES and attempt < self.max_tries:
                        retry_after = _retry_after(resp)
                        if retry_after is not None:
                            delay = retry_after
                    if resp.status_code >= 300 and not (
                        resp.status_code in RETRY_STATUSES
                        and attempt < self.max_tries
                        and delay <= MAX_RETRY_AFTER
                    ):
                        detail = (await resp.aread())[:300].decode("utf-8", "replace")
                        if self.api_key:  # some upstreams echo the key they refuse
                            detail = detail.replace(self.api_key, "[redacted]")
                        raise UpstreamError(f"upstream answered HTTP {resp.status_code}: {detail}")
                    if resp.status_code < 300:
                        async with contextlib.aclosing(self._chunks(resp, request)) as chunks:
                            async for chunk in chunks:
                                yield chunk
                        return
                    # A retryable status: leaving the block closes this response.
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt == self.max_tries:
                    # Not the URL: it is internal, and may carry credentials.
                    raise UpstreamError(
                        f"could not connect to the upstream after {attempt} tries "
                        f"({type(exc).__name__})"
                    ) from None
            except httpx.ReadTimeout:
                raise UpstreamError(
                    f"the upstream sent nothing for {self.read_timeout:g} s"
                ) from None
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"the upstream connection failed: {type(exc).__name__}: {exc}"
                ) from None
            await trio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _chunks(
        self, resp: httpx.Response, request: ModelRequest
    ) -> AsyncGenerator[ModelChunk, None]:
        calls: dict[Any, _PendingCall] = {}
        usage: dict[str, Any] | None = None
        done = False
        produced = 0
        lines = resp.aiter_lines()
        try:
            async for line in lines:
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event:/id: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    # Stop here: an upstream (or proxy) may keep the body open
                    # after [DONE]; the finally below closes the connection.
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    raise UpstreamError(
                        f"malformed chunk from the upstream: {data[:100]!r}"
                    ) from None
                if not isinstance(obj, dict):
                    raise UpstreamError(f"malformed chunk from the upstream: {data[:100]!r}")
                if obj.get("error"):
                    raise UpstreamError(f"the upstream reported an error: {obj['error']!r:.300}")
                if isinstance(obj.get("usage"), dict):
                    usage = obj["usage"]
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") if isinstance(choice, dict) else "?"
                    if delta is None:
                        delta = {}
                    if not isinstance(delta, dict):
                        raise UpstreamError(f"malformed chunk from the upstream: {data[:100]!r}")
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                    if isinstance(reasoning, str) and reasoning:
                        yield ReasoningChunk(reasoning)
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        produced += len(content)
                        yield TextChunk(content)
                    for fragment in delta.get("tool_calls") or ():
                        for chunk in self._tool_fragment(calls, fragment):
                            produced += len(getattr(chunk, "arguments", ""))
                            yield chunk
        finally:
            # httpx reads through nine nested async generators. Leaving them
            # half-read (an error, an early close) lets them be garbage
            # collected unfinished; finishing them inside a cancelled scope
            # raises Cancelled at the innermost read and unwinds every layer.
            with trio.CancelScope() as scope:
                scope.cancel()
                async for _ in lines:
                    pass
        if not done:
            raise UpstreamError("the upstream stream ended without [DONE]")
        for pending in calls.values():
            if not pending.started:  # a call that never got a name
                yield ToolCallStart(pending.call_id, pending.name)
                for part in pending.buffered:
                    yield ToolCallDelta(pending.call_id, part)
        yield self._usage(usage, request, produced)

    @staticmethod
    def _tool_fragment(calls: dict[Any, _PendingCall], fragment: Any) -> list[ModelChunk]:
        """Assemble one streamed tool-call fragment.

        Servers differ: the name may come in pieces, the id may come late,
        and some send whole calls without ``index`` (a new ``id`` is then a
        new call). A call is announced (``ToolCallStart``) only once its
        arguments begin (or at the end of the stream), so its name is whole.
        """
        if not isinstance(fragment, dict):
            raise UpstreamError(f"malformed tool call fragment: {fragment!r:.100}")
        function = fragment.get("function") or {}
        if not isinstance(function, dict):
            raise UpstreamError(f"malformed tool call fragment: {fragment!r:.100}")
        call_id = fragment.get("id") if isinstance(fragment.get("id"), str) else None
        key: Any = fragment.get("index")
        last = next(reversed(calls.values()), None)
        if key is None:
            key = ("id", call_id) if call_id and (last is None or last.call_id != call_id) else None
            if key is None:
                key = next(reversed(calls), ("id", "call_0"))
        pending = calls.get(key)
        if pending is not None and call_id and pending.started and call_id != pending.call_id:
            key = ("id", call_id)  # another call reusing the index
            pending = calls.get(key)
        if pending is None:
            pending = calls[key] = _PendingCall(
                call_id or f"call_{len(calls)}", synthetic=not call_id
            )
        elif call_id and pending.synthetic and not pending.started:
            pending.call_id, pending.synthetic = call_id, False
        name = function.get("name")
        if isinstance(name, str) and name and not pending.started:
            pending.name += name
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            pending.buffered.append(arguments)
        out: list[ModelChunk] = []
        if pending.buffered and pending.name and not pending.started:
            pending.started = True
            out.append(ToolCallStart(pending.call_id, pending.name))
        if pending.started:
            out.extend(ToolCallDelta(pending.call_id, part) for part in pending.buffered)
            pending.buffered.clear()
        return out

    @staticmethod
    def _usage(usage: dict[str, Any] | None, request: ModelRequest, produced: int) -> UsageChunk:
        if usage is not None:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                return UsageChunk(prompt, completion)
        # No usage from the upstream: estimate (~4 characters a token).
        prompt_chars = sum(len(m.content) for m in request.messages)
        return UsageChunk(max(1, prompt_chars // 4), max(1, produced // 4), estimated=True)
