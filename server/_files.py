"""Workspace file routes: list, download (with Range), upload, delete.

Path resolution is the runtime's :class:`~runtime.Workspace` (component walk
with ``O_NOFOLLOW``, refusing ``..``, absolute paths, NUL and symlinks, 403).
The blocking file IO runs in worker threads.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

import trio
from quart import Blueprint, Response, g, request

from runtime import FileInfo, InvalidRequest

from ._codec import converter, json_response

if TYPE_CHECKING:
    from runtime import Runtime

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
        header = request.headers.get("Range")
        try:
            data, size, span = await trio.to_thread.run_sync(
                lambda: ws.read_range(path, lambda size: parse_range(header, size))
            )
        except RangeNotSatisfiable as exc:
            size = (await trio.to_thread.run_sync(ws.stat, path)).size
            response = json_response({"error": exc.error_type, "message": str(exc)}, 416)
            response.headers["Content-Range"] = f"bytes */{size}"
            return response
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if span is None:
            return Response(data, 200, headers)
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
        return Response(data, 206, headers)

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
