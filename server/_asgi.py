"""An ASGI wrapper for what the framework does not do (STACK-NOTES 1, 12).

* Body limits: hypercorn has none, and Quart would keep reading an oversized
  upload. The guard reads the request body itself, up to the route's limit,
  and answers 413 (closing the connection) the moment it is exceeded; the app
  then gets the body from memory.
* Authentication first: a ``/v1`` request whose key is missing or unknown is
  answered 401 before its body is read, so nobody without a key can make the
  server buffer an upload. There is one 401, byte for byte: whatever was
  wrong with the key (missing, another scheme, malformed, unknown, or two
  ``Authorization`` headers, which a proxy might read differently), and
  whichever layer refused it (a 401 the app sends is replaced by this one),
  so a refusal tells nothing about why.
* Finished connections: quart-trio cancels the request's nursery right after
  the last ``send``, which cancels hypercorn's own close of the response.
  Sending the final body chunk shielded (and bounded) lets it complete, so a
  finished request does not keep its socket open.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from runtime import Unauthorized

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from hypercorn.typing import ASGIFramework, ASGIReceiveEvent, ASGISendEvent

#: Bound on the shielded final send. Only partly effective: hypercorn shields
#: its own socket write too, so a client that stopped reading can still hold
#: that write (STACK-NOTES 4); shutdown handles that by exiting.
FINAL_SEND_TIMEOUT: Final = 10.0
_UPLOAD_RE: Final = re.compile(r"^/v1/sessions/[^/]+/files/.")
#: The message of the one 401.
UNAUTHORIZED: Final = "missing or unknown API key; send 'Authorization: Bearer KEY'"


@final
@attrs.define
class Guard:
    """Wraps an ASGI app with body limits and the shielded final send."""

    app: ASGIFramework
    json_limit: int
    file_limit: int
    #: Returns the account of an API key or raises (``Store.authenticate``).
    authenticate: Callable[[str], Awaitable[str]] | None = None
    #: True once the runtime is shutting down (then /v1 answers 503 at once).
    closing: Callable[[], bool] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.closing is not None and self.closing() and scope["path"].startswith("/v1"):
            await _refuse(send, 503, "shutting_down", "the server is shutting down")
            return
        if self.authenticate is not None and scope["path"].startswith("/v1"):
            key = bearer_key(scope["headers"])
            try:
                if key is None:
                    raise Unauthorized(UNAUTHORIZED)
                await self.authenticate(key)
            except Unauthorized:
                await _unauthorized(send)
                return
        path = scope["path"]
        if not path.startswith("/v1"):
            limit = 0  # no route outside /v1 takes a body
        elif scope["method"] == "PUT" and _UPLOAD_RE.match(path):
            limit = self.file_limit
        else:
            limit = self.json_limit
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _refuse(send, 400, "invalid_request", "bad Content-Length header")
                    return
                if declared > limit:
                    await _too_large(send, limit)
                    return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _too_large(send, limit)
                return
            more = message.get("more_body", False)
        replay: list[ASGIReceiveEvent] = [
            {"type": "http.request", "body": bytes(body), "more_body": False}
        ]

        async def receive_replayed() -> ASGIReceiveEvent:
            if replay:
                return replay.pop()
            return await receive()  # type: ignore[no-any-return]

        replaced = False

        async def send_final_shielded(message: ASGISendEvent) -> None:
            nonlocal replaced
            if replaced:
                return  # the body of the app's own 401
            if message["type"] == "http.response.start" and message["status"] == 401:
                replaced = True
                await _unauthorized(send)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True), trio.move_on_after(FINAL_SEND_TIMEOUT):
                    await send(message)
            else:
                await send(message)

        await self.app(scope, receive_replayed, send_final_shielded)


def bearer_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key of the request's one ``Authorization: Bearer KEY`` header
    (scheme in any case, RFC 9110 11.1), or None: no such header, another
    scheme, an empty key, or more than one ``Authorization`` header."""
    values = [value for name, value in headers if name == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, key = values[0].decode("latin-1").partition(" ")
    key = key.strip(" \t")  # HTTP's whitespace only: '\xa0KEY' is not KEY
    return key if scheme.lower() == "bearer" and key else None


async def _unauthorized(send: Any) -> None:
    await _refuse(send, 401, "unauthorized", UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])


async def _too_large(send: Any, limit: int) -> None:
    await _refuse(send, 413, "too_large", f"request body over the limit of {limit} bytes")


async def _refuse(
    send: Any,
    status: int,
    error: str,
    message: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": error, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(extra_headers or []),
            ],
        }
    )
    with trio.CancelScope(shield=True), trio.move_on_after(FINAL_SEND_TIMEOUT):
        await send({"type": "http.response.body", "body": body, "more_body": False})
