"""Workspace file routes: list, download (with Range), upload, delete.

Path resolution is the runtime's :class:`~runtime.Workspace` (component walk
with ``O_NOFOLLOW``, refusing ``..``, absolute paths, NUL and symlinks, 403).
The blocking file IO runs in worker threads.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Final

import trio
from quart import Blueprint, Response, g, request

from runtime import FileInfo, InvalidRequest

from ._codec import converter, json_response

if TYPE_CHECKING:
    from runtime import Runtime

#: Bytes per read when streaming a download.
CHUNK: Final = 256 * 1024
_RANGE_RE: Final = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


class RangeNotSatisfiable(InvalidRequest):
    """A Range header that names no byte of the file (416)."""

    error_type = "range_not_satisfiable"
    status_hint = 416


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``header`` asks of a ``size``-byte file, or None
    for the whole file. Only single ranges are served."""
    if header is None:
        return None
    match = _RANGE_RE.match(header.strip())
    if match is None:
        raise RangeNotSatisfiable(f"unsupported Range {header!r}; use bytes=START-END")
    first, last = match.groups()
    if first == "" and last == "":
        raise RangeNotSatisfiable(f"empty Range {header!r}")
    if size == 0:
        raise RangeNotSatisfiable(f"Range {header!r} asks for bytes of an empty file")
    if first == "":
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable(f"Range {header!r} asks for no bytes")
        return max(0, size - length), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise RangeNotSatisfiable(f"Range {header!r} is outside the file's {size} bytes")
    return start, end


class FileShrank(Exception):
    """Raised by a download whose file got shorter while it was sent (a tool
    truncated it): the bytes promised by Content-Length no longer exist, so the
    response cannot be finished and the connection is closed; the client sees
    an incomplete body. (Uploads replace files by renaming, so they never cause
    this; the descriptor is pinned, so a swapped-in link never can.)"""


class _FileChunks:
    """An async iterator over ``length`` bytes of ``fd`` from ``offset``, read in
    worker threads; it owns the descriptor and closes it when done or closed
    (even if never iterated, unlike an async generator's ``finally``)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd: int | None = fd
        self._offset = offset
        self._remaining = length

    def __aiter__(self) -> _FileChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._fd is None or self._remaining <= 0:
            await self.aclose()
            raise StopAsyncIteration
        fd = self._fd
        size = min(CHUNK, self._remaining)
        chunk = await trio.to_thread.run_sync(os.pread, fd, size, self._offset)
        if not chunk:
            await self.aclose()
            raise FileShrank(f"the file ended {self._remaining} bytes short of Content-Length")
        self._offset += len(chunk)
        self._remaining -= len(chunk)
        return chunk

    async def aclose(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        await trio.lowlevel.checkpoint()


def _info_json(info: FileInfo) -> dict[str, Any]:
    return converter.unstructure(info)  # type: ignore[no-any-return]


def files_blueprint(rt: Runtime) -> Blueprint:
    bp = Blueprint("files", __name__)

    def workspace(sid: str) -> Any:
        return rt.get_session(sid, account_id=g.account_id).workspace

    @bp.get("/v1/sessions/<sid>/files")
    async def list_root(sid: str) -> Response:
        ws = workspace(sid)
        infos = await trio.to_thread.run_sync(ws.list, request.args.get("path", ""))
        return json_response([_info_json(i) for i in infos])

    @bp.get("/v1/sessions/<sid>/files/<path:path>")
    async def download(sid: str, path: str) -> Response:
        ws = workspace(sid)
        kind = await trio.to_thread.run_sync(ws.kind, path)
        if kind == "directory":
            infos = await trio.to_thread.run_sync(ws.list, path)
            return json_response([_info_json(i) for i in infos])
        fd, size = await trio.to_thread.run_sync(ws.open_regular, path)
        try:
            span = parse_range(request.headers.get("Range"), size)
        except RangeNotSatisfiable as exc:
            os.close(fd)
            response = json_response({"error": exc.error_type, "message": str(exc)}, 416)
            response.headers["Content-Range"] = f"bytes */{size}"
            return response
        first, last = span if span is not None else (0, size - 1)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Length": str(last - first + 1),
        }
        if span is not None:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        # Streamed from the descriptor in chunks: a large file never sits in memory.
        response = Response(_FileChunks(fd, first, last - first + 1), 206 if span else 200, headers)
        response.timeout = None
        return response

    @bp.put("/v1/sessions/<sid>/files/<path:path>")
    async def upload(sid: str, path: str) -> tuple[Response, int]:
        ws = workspace(sid)
        data = await request.get_data(as_text=False)
        info = await trio.to_thread.run_sync(ws.write, path, data)
        return json_response({"path": path, "size": info.size, "modified": info.modified}), 201

    @bp.delete("/v1/sessions/<sid>/files/<path:path>")
    async def delete(sid: str, path: str) -> tuple[str, int]:
        ws = workspace(sid)
        await trio.to_thread.run_sync(ws.delete, path)
        return "", 204

    return bp
