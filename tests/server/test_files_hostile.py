"""Hostile paths over HTTP on a real socket, on every files route and through
the model's file tools: nothing outside the workspace is ever read, written or
removed, refusals are 4xx JSON (never a 500), and no byte of an outside secret
appears in any response. Also links made by ``run_shell``, links swapped in
while a download or an upload runs, and FIFOs, sockets and device nodes.

Status codes: a path that leaves (or would leave) the workspace is 403; a path
naming nothing is 404, and so is ``files//etc/passwd``, which the router never
matches (decoded, it has an empty segment). A path the file system cannot name
(a component over 255 bytes, the whole over 4,095) is 400: it is malformed, and
it is not the URL's length that is refused (``?path=`` or a tool's argument
carries it too), so 414 would be wrong. Percent-escapes are decoded once, by
the HTTP layer: ``%252e%252e`` and backslashes are then ordinary characters of
one file name, so PUT creates exactly that name inside the workspace (201).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpcore
import httpx
import pytest
import trio

from runtime import TextChunk, ToolCallDelta, ToolCallStart, UsageChunk
from server._files import CHUNK

from .conftest import KEY, Harness, parse_sse

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from runtime import ModelChunk, Workspace

SECRET = b"OUTSIDE-SECRET-5d1e"
BIG = 4 * 1024 * 1024  # 16 chunks: far more than the ~200 KB hypercorn buffers ahead


@asynccontextmanager
async def open_raw(harness: Harness) -> AsyncIterator[Callable[..., Awaitable[httpcore.Response]]]:
    """A function sending a request target byte for byte (httpx would remove
    ``..`` segments; httpcore, which httpx sends with, takes it as is), on one
    connection pool."""
    base = httpx.URL(harness.base_url)
    assert base.port is not None
    auth = [(b"Authorization", f"Bearer {KEY}".encode())]
    async with httpcore.AsyncConnectionPool() as pool:

        async def send(method: str, target: str, body: bytes = b"") -> httpcore.Response:
            url = httpcore.URL(
                scheme="http", host=base.host, port=base.port, target=target.encode()
            )
            return await pool.request(method, url, headers=auth, content=body)

        yield send


def assert_no_secret(content: bytes) -> None:
    assert SECRET not in content
    assert b"root:" not in content  # the host's /etc/passwd


def assert_json_error(status: int, content: bytes, allowed: set[int]) -> str:
    """``status`` is one of ``allowed`` with a JSON ``{"error", "message"}`` body."""
    assert status in allowed, (status, content[:300])
    body = json.loads(content)
    assert set(body) >= {"error", "message"}, body
    assert_no_secret(content)
    error: str = body["error"]
    return error


def plant_secrets(harness: Harness, sid: str, tmp_path: Path) -> Path:
    """A sibling ``<sid>-evil`` (its name starts with the workspace's) and a
    directory elsewhere, each holding SECRET; returns the sibling."""
    sibling = harness.rt.data_dir / "workspaces" / f"{sid}-evil"
    sibling.mkdir()
    (sibling / "secret").write_bytes(SECRET)
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret").write_bytes(SECRET)
    return sibling


def outside_state(harness: Harness, sid: str, tmp_path: Path) -> dict[str, bytes | str]:
    """What is outside the workspace that a request could touch."""
    state: dict[str, bytes | str] = {}
    for top in (harness.rt.data_dir / "workspaces", tmp_path / "outside"):
        for dirpath, dirnames, filenames in os.walk(top):
            if dirpath == str(top) and sid in dirnames:
                dirnames.remove(sid)
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                if path.is_symlink():
                    state[str(path)] = "link to " + os.readlink(path)
                else:
                    state[str(path)] = path.read_bytes() if path.is_file() else "dir"
    for name in ("/etc/passwd", "/etc/hostname"):  # written through etc links, were they followed
        state[name] = Path(name).read_bytes()
    return state


# -- every hostile form on every route ----------------------------------------

#: Sent byte for byte after ``files/`` and as ``?path=``, with the status each
#: must get there: ``{sib}`` is the sibling's name, ``{abs}`` its absolute path.
#: Escapes are 403. An absolute path in the URL's path is the router's 404:
#: ``files//etc`` matches no route (``<path:...>`` cannot start with "/"); as
#: ``?path=`` it reaches the workspace and is 403. Through a file: 404.
REFUSED = [
    ("../{sib}/secret", 403, 403),
    ("%2e%2e%2f{sib}%2fsecret", 403, 403),
    ("%2e%2e/{sib}/secret", 403, 403),
    ("..%2f{sib}%2fsecret", 403, 403),
    ("a/../../{sib}/secret", 403, 403),
    ("..", 403, 403),
    ("%2e%2e", 403, 403),
    ("%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", 403, 403),
    ("opt/sandbox/workspace/../../../{sib}/secret", 403, 403),
    ("file.txt/..%2f..%2f{sib}", 403, 403),
    ("%00", 403, 403),
    ("secret%00.txt", 403, 403),
    ("file.txt%00/../../{sib}/secret", 403, 403),
    ("/etc/passwd", 404, 403),
    ("%2fetc%2fpasswd", 404, 403),
    ("{abs}/secret", 404, 403),
    ("%2f{abs_encoded}%2fsecret", 404, 403),
    ("/opt/sandbox/workspace/../..", 404, 403),
    ("%2fopt%2fsandbox%2fworkspace%2f..%2f..%2f{sib}%2fsecret", 404, 403),
    ("/opt/sandbox/workspace-evil/secret", 404, 403),
    ("file.txt/x", 404, 404),
]
#: Decoded once, these are a single (odd but legal) name inside the workspace.
LITERAL = [
    "%252e%252e%252f{sib}%252fsecret",
    "%252e%252e",
    "..%5c..%5c{sib}%5csecret",
    "..\\..\\etc\\passwd",
    "%5c%5c..%5c",
    "%ff",
    "a%ffb%fe",
]
TOO_LONG = [
    "n" * 256,
    "a/" + "%c3%a9" * 128 + "/x",  # 256 bytes once decoded and encoded
    "a/" * 2050 + "f",
]


ERROR_TYPES = {400: "invalid_request", 403: "path_outside_workspace", 404: "not_found"}


def fill(form: str, sid: str, sibling: Path) -> str:
    return form.format(
        sib=f"{sid}-evil", abs=str(sibling), abs_encoded=str(sibling).strip("/").replace("/", "%2f")
    )


async def test_files_hostile_paths_on_every_route(harness: Harness, tmp_path: Path) -> None:
    """Every hostile form on GET, ?path= listing, PUT and DELETE gets its 403/404
    JSON error (400 when too long), literal names are created inside the
    workspace only; no 500, no byte of the secrets, nothing outside changed."""
    with trio.fail_after(30):
        sid = await harness.new_session()
        sibling = plant_secrets(harness, sid, tmp_path)
        ws = harness.workspace_of(sid)
        (ws / "file.txt").write_bytes(b"inside")
        before = outside_state(harness, sid, tmp_path)
        files = f"/v1/sessions/{sid}/files"
        async with open_raw(harness) as raw:
            cases = [*REFUSED, *((form, 400, 400) for form in TOO_LONG)]
            for form, in_path, in_query in cases:
                suffix = fill(form, sid, sibling)
                for method, target, status in [
                    ("GET", f"{files}/{suffix}", in_path),
                    ("GET", f"{files}?path={suffix}", in_query),
                    ("PUT", f"{files}/{suffix}", in_path),
                    ("DELETE", f"{files}/{suffix}", in_path),
                ]:
                    response = await raw(method, target, SECRET)
                    error = assert_json_error(response.status, response.content, {status})
                    assert error == ERROR_TYPES[status], (method, target, error)

            for form in LITERAL:
                suffix = fill(form, sid, sibling)
                get = await raw("GET", f"{files}/{suffix}")
                assert_json_error(get.status, get.content, {404})
                listing = await raw("GET", f"{files}?path={suffix}")
                assert_json_error(listing.status, listing.content, {404})
                put = await raw("PUT", f"{files}/{suffix}", b"literal")
                assert put.status == 201, (form, put.content)
                name = json.loads(put.content)["path"]
                assert "/" not in name
                assert (ws / name).read_bytes() == b"literal"  # one name, right in the workspace
                assert os.path.realpath(ws / name) == str(ws / name)
                delete = await raw("DELETE", f"{files}/{suffix}")
                assert delete.status == 204, (form, delete.content)

            assert sorted(os.listdir(ws)) == ["file.txt"]
    assert outside_state(harness, sid, tmp_path) == before
    assert (ws / "file.txt").read_bytes() == b"inside"


async def test_files_long_url_is_refused_without_500(harness: Harness) -> None:
    """A 20,000-character path reaches the route and is a 400 JSON error."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        files = f"/v1/sessions/{sid}/files"
        async with open_raw(harness) as raw:
            for method, target in [
                ("GET", f"{files}/{'x' * 20_000}"),
                ("GET", f"{files}?path={'x' * 20_000}"),
                ("PUT", f"{files}/{'x' * 20_000}"),
                ("DELETE", f"{files}/{'x' * 20_000}"),
            ]:
                response = await raw(method, target)
                assert_json_error(response.status, response.content, {400})


# -- the model's file tools ---------------------------------------------------


def tool_call(call_id: str, name: str, **arguments: str) -> list[ModelChunk]:
    return [ToolCallStart(call_id, name), ToolCallDelta(call_id, json.dumps(arguments))]


async def run_turn(harness: Harness, sid: str, step: list[ModelChunk]) -> dict[str, dict[str, Any]]:
    """One turn whose model makes the calls of ``step`` then answers; returns the
    tool results by call id (read from the SSE stream of the POST)."""
    harness.model.steps = [[*step, UsageChunk(1, 1)], [TextChunk("done"), UsageChunk(1, 1)]]
    harness.model.requests.clear()
    response = await harness.client.post(f"/v1/sessions/{sid}/messages", json={"message": "go"})
    assert response.status_code == 200, response.text
    events = parse_sse(response.text)
    assert events[-1].event == "message.completed", events[-1]
    return {e.data["id"]: e.data for e in events if e.event == "tool_result"}


async def test_file_tools_refuse_hostile_paths(harness: Harness, tmp_path: Path) -> None:
    """read_file/write_file/list_files called by the model with escaping paths:
    every result is an error the model sees, none holds a secret, nothing
    outside changes; literal odd names land inside the workspace."""
    with trio.fail_after(30):
        sid = await harness.new_session()
        sibling = plant_secrets(harness, sid, tmp_path)
        ws = harness.workspace_of(sid)
        (ws / "file.txt").write_bytes(b"inside")
        before = outside_state(harness, sid, tmp_path)
        sib = f"{sid}-evil"
        refused = [
            f"../{sib}/secret",
            f"a/../../{sib}/secret",
            f"/opt/sandbox/workspace/../{sib}/secret",
            f"/opt/sandbox/workspace/../../../{sibling}/secret",
            "/opt/sandbox/workspace-evil/secret",
            "/opt/sandbox/workspace/../..",
            str(sibling / "secret"),
            str(tmp_path / "outside" / "secret"),
            "/etc/passwd",
            "secret\0.txt",
            "\0",
            "file.txt/x",
            "n" * 256,
            "a/" * 2050 + "f",
            "\ud800",
        ]
        step: list[ModelChunk] = []
        for index, path in enumerate(refused):
            step += tool_call(f"r{index}", "read_file", path=path)
            step += tool_call(f"w{index}", "write_file", path=path, content=SECRET.decode())
            step += tool_call(f"l{index}", "list_files", path=path)
        # Not decoded by anyone: these are plain names inside the workspace.
        literal = [f"%2e%2e%2f{sib}%2fsecret", "..\\..\\etc\\passwd", "%00"]
        for index, path in enumerate(literal):
            step += tool_call(f"lit{index}", "write_file", path=path, content="literal")
        results = await run_turn(harness, sid, step)

    for index, path in enumerate(refused):
        for kind in "rwl":
            result = results[f"{kind}{index}"]
            assert result["is_error"], (kind, path, result)
            assert SECRET.decode() not in result["content"]
            assert "root:" not in result["content"]
    for index, path in enumerate(literal):
        assert not results[f"lit{index}"]["is_error"], results[f"lit{index}"]
        assert (ws / path).read_bytes() == b"literal"
    assert sorted(os.listdir(ws)) == sorted(["file.txt", *literal])
    assert outside_state(harness, sid, tmp_path) == before


# -- links made by run_shell --------------------------------------------------


async def test_files_links_made_by_run_shell_are_refused(harness: Harness, tmp_path: Path) -> None:
    """run_shell makes links to /etc, /etc/passwd, the sibling's secret (relative)
    and an outside directory: GET/PUT/DELETE/list through them over HTTP and the
    model's file tools are refused; nothing outside is read, written or removed."""
    with trio.fail_after(30):
        sid = await harness.new_session()
        sibling = plant_secrets(harness, sid, tmp_path)
        outside = tmp_path / "outside"
        before = outside_state(harness, sid, tmp_path)
        # Relative links and absolute link texts: the same on the host and in
        # a sandbox where the workspace is mounted elsewhere.
        command = (
            f"ln -s /etc etc_link && ln -s /etc/passwd passwd_link"
            f" && ln -s ../{sibling.name}/secret secret_link && ln -s ../{sibling.name} sib_link"
            f" && ln -s {outside} out_link && mkdir d && ln -s ../../{sibling.name} d/up"
            " && ls -l"
        )
        made = await run_turn(harness, sid, tool_call("sh", "run_shell", command=command))
        assert not made["sh"]["is_error"], made["sh"]
        ws = harness.workspace_of(sid)
        assert os.readlink(ws / "etc_link") == "/etc"

        files = f"/v1/sessions/{sid}/files"
        reads = [
            "etc_link/passwd",
            "etc_link",
            "passwd_link",
            "secret_link",
            "sib_link/secret",
            "out_link/secret",
            "d/up/secret",
        ]
        for path in reads:
            get = await harness.client.get(f"{files}/{path}")
            assert (
                assert_json_error(get.status_code, get.content, {403}) == "path_outside_workspace"
            )
            ranged = await harness.client.get(f"{files}/{path}", headers={"Range": "bytes=0-5"})
            assert_json_error(ranged.status_code, ranged.content, {403})
        for path in ["etc_link", "sib_link", "out_link", "d/up", "etc_link/ssh"]:
            listing = await harness.client.get(files, params={"path": path})
            assert_json_error(listing.status_code, listing.content, {403})
        writes = [
            f"etc_link/agent-runtime-test-{sid}",
            "passwd_link",
            "secret_link",
            "sib_link/secret",
            "sib_link/new",
            "out_link/new/deeper",
            "d/up/new",
        ]
        for path in writes:
            put = await harness.client.put(f"{files}/{path}", content=b"pwned")
            assert_json_error(put.status_code, put.content, {403})
        for path in ["etc_link/hostname", "sib_link/secret", "out_link/secret", "d/up/secret"]:
            delete = await harness.client.delete(f"{files}/{path}")
            assert_json_error(delete.status_code, delete.content, {403})

        step: list[ModelChunk] = []
        for index, path in enumerate(reads):
            step += tool_call(f"r{index}", "read_file", path=path)
        for index, path in enumerate(writes):
            step += tool_call(f"w{index}", "write_file", path=path, content="pwned")
        for index, path in enumerate(["etc_link", "sib_link", "out_link", "d/up"]):
            step += tool_call(f"l{index}", "list_files", path=path)
        results = await run_turn(harness, sid, step)
        for call_id, result in results.items():
            assert result["is_error"], (call_id, result)
            assert SECRET.decode() not in result["content"]
            assert "root:" not in result["content"]

        # The links are the workspace's own entries: listed as "other", and
        # DELETE removes the link itself, never its target.
        entries = {e["name"]: e["type"] for e in (await harness.client.get(files)).json()}
        assert entries["etc_link"] == entries["secret_link"] == "other"
        for link in ["etc_link", "passwd_link", "secret_link", "sib_link", "out_link", "d/up"]:
            assert (await harness.client.delete(f"{files}/{link}")).status_code == 204
        assert sorted(os.listdir(ws)) == ["d"]
    assert outside_state(harness, sid, tmp_path) == before
    assert not os.path.lexists(f"/etc/agent-runtime-test-{sid}")


async def test_files_listing_of_names_that_are_not_utf8(harness: Harness) -> None:
    """A name that is not UTF-8, made by run_shell, lists (HTTP and list_files)
    with U+FFFD instead of a 500 or a broken SSE stream."""
    with trio.fail_after(30):
        sid = await harness.new_session()
        command = "printf x > \"$(printf 'bad\\377name')\" && ls"
        results = await run_turn(harness, sid, tool_call("sh", "run_shell", command=command))
        assert not results["sh"]["is_error"], results["sh"]
        listing = await harness.client.get(f"/v1/sessions/{sid}/files")
        assert listing.status_code == 200, listing.text
        assert [e["name"] for e in listing.json()] == ["bad\ufffdname"]
        results = await run_turn(harness, sid, tool_call("ls", "list_files", path=""))
        assert "bad\ufffdname" in results["ls"]["content"]


# -- FIFOs, sockets, device nodes ---------------------------------------------


async def test_files_special_files_refused_promptly(harness: Harness) -> None:
    """A FIFO (no writer), a unix socket and a device node in the workspace: GET,
    Range GET, PUT and ?path= are 4xx at once (a FIFO's open would block);
    they list as "other"; DELETE removes them (they are inside)."""
    sid = await harness.new_session()
    ws = harness.workspace_of(sid)
    os.mkfifo(ws / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    dir_fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        listener.bind(f"/proc/self/fd/{dir_fd}/sock")  # the full path is too long for bind
        os.mknod(ws / "null", 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
        with trio.fail_after(10):
            files = f"/v1/sessions/{sid}/files"
            for name in ("fifo", "sock", "null"):
                for response in [
                    await harness.client.get(f"{files}/{name}"),
                    await harness.client.get(f"{files}/{name}", headers={"Range": "bytes=0-1"}),
                    await harness.client.put(f"{files}/{name}", content=b"x"),
                ]:
                    error = assert_json_error(response.status_code, response.content, {403})
                    assert error == "path_outside_workspace"
                for response in [
                    await harness.client.get(files, params={"path": name}),
                    await harness.client.put(f"{files}/{name}/x", content=b"x"),
                ]:
                    assert_json_error(response.status_code, response.content, {404})
            listing = (await harness.client.get(files)).json()
            assert {e["name"]: e["type"] for e in listing} == {
                "fifo": "other",
                "sock": "other",
                "null": "other",
            }
            for name in ("fifo", "sock", "null"):
                assert (await harness.client.delete(f"{files}/{name}")).status_code == 204
            assert os.listdir(ws) == []
    finally:
        listener.close()
        # Were a server thread stuck opening the FIFO, opening its other end
        # lets it go: the test then fails on its deadline instead of hanging.
        with contextlib.suppress(FileNotFoundError):
            os.close(os.open("fifo", os.O_RDWR | os.O_NONBLOCK, dir_fd=dir_fd))
        os.close(dir_fd)


# -- links swapped in while requests run --------------------------------------


def open_fds_on(path: Path) -> int:
    """How many descriptors of this process are open on ``path``'s inode."""
    st = os.stat(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            other = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
    return count


async def test_files_download_keeps_its_file_when_a_link_is_swapped_in(
    harness: Harness, tmp_path: Path
) -> None:
    """While a large download is in flight, its file and then its parent directory
    are replaced by links to an outside secret: the download delivers exactly
    the original bytes (its descriptor is pinned); new requests are refused. An
    upload to the same path meanwhile does not change what the download sends."""
    with trio.fail_after(30):
        sid = await harness.new_session()
        plant_secrets(harness, sid, tmp_path)
        outside = tmp_path / "outside"
        (outside / "big.bin").write_bytes(SECRET * (BIG // len(SECRET)))
        ws = harness.workspace_of(sid)
        (ws / "d").mkdir()
        original = os.urandom(BIG)
        (ws / "d" / "big.bin").write_bytes(original)
        url = f"/v1/sessions/{sid}/files/d/big.bin"

        # The file itself becomes a link.
        async with harness.client.stream("GET", url) as download:
            assert download.status_code == 200
            chunks = download.aiter_raw()
            received = await chunks.__anext__()
            os.rename(ws / "d" / "big.bin", ws / "d" / "moved.bin")
            os.symlink(outside / "big.bin", ws / "d" / "big.bin")
            assert open_fds_on(ws / "d" / "moved.bin") == 1  # the server is still reading it
            again = await harness.client.get(url)
            assert_json_error(again.status_code, again.content, {403})
            async for chunk in chunks:
                received += chunk
        assert received == original

        # The parent directory becomes a link (the file is back in place first).
        os.unlink(ws / "d" / "big.bin")
        os.rename(ws / "d" / "moved.bin", ws / "d" / "big.bin")
        async with harness.client.stream("GET", url, headers={"Range": f"bytes={CHUNK}-"}) as part:
            assert part.status_code == 206
            chunks = part.aiter_raw()
            received = await chunks.__anext__()
            os.rename(ws / "d", ws / "d-moved")
            os.symlink(outside, ws / "d")
            assert open_fds_on(ws / "d-moved" / "big.bin") == 1
            again = await harness.client.get(url)
            assert_json_error(again.status_code, again.content, {403})
            async for chunk in chunks:
                received += chunk
        assert received == original[CHUNK:]

        # An upload replaces the file meanwhile: the download still gets the old one.
        os.unlink(ws / "d")
        os.rename(ws / "d-moved", ws / "d")
        async with harness.client.stream("GET", url) as download:
            chunks = download.aiter_raw()
            received = await chunks.__anext__()
            put = await harness.client.put(url, content=b"new content")
            assert put.status_code == 201
            async for chunk in chunks:
                received += chunk
        assert received == original
        assert (await harness.client.get(url)).content == b"new content"
    assert (outside / "big.bin").read_bytes() == SECRET * (BIG // len(SECRET))


async def test_files_download_of_file_truncated_meanwhile_is_cut_short(
    harness: Harness,
) -> None:
    """A tool truncates a file while it downloads: the connection closes before
    Content-Length is reached (the client knows the body is incomplete, nothing
    is padded), what came is a prefix of the file, and the server keeps serving."""
    with trio.fail_after(30):
        sid = await harness.new_session()
        ws = harness.workspace_of(sid)
        original = os.urandom(BIG)
        (ws / "big.bin").write_bytes(original)
        url = f"/v1/sessions/{sid}/files/big.bin"
        received = bytearray()

        async def download_while_truncated() -> None:
            async with harness.client.stream("GET", url) as download:
                chunks = download.aiter_raw()
                received.extend(await chunks.__anext__())
                os.truncate(ws / "big.bin", CHUNK)  # as `truncate -s 256K big.bin` would
                async for chunk in chunks:
                    received.extend(chunk)

        with pytest.raises(httpx.RemoteProtocolError, match="without sending complete message"):
            await download_while_truncated()
        assert CHUNK <= len(received) < BIG
        assert original.startswith(received)
        again = await harness.client.get(url)
    assert again.status_code == 200
    assert again.content == original[:CHUNK]


def session_workspace(harness: Harness, sid: str) -> Workspace:
    return harness.rt.get_session(sid, account_id=harness.account).workspace


async def test_files_link_swapped_in_between_components_is_refused(
    harness: Harness, tmp_path: Path
) -> None:
    """Pinned: just before the walk opens ``b`` of ``a/b/new`` (``a`` already
    open), ``b`` becomes a link to the sibling; likewise for the file of a
    download after its type was checked: 403, nothing written or read outside."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        sibling = plant_secrets(harness, sid, tmp_path)
        ws = harness.workspace_of(sid)
        (ws / "a" / "b").mkdir(parents=True)
        (ws / "file.txt").write_bytes(b"inside")
        before = outside_state(harness, sid, tmp_path)
        swapped: list[str] = []

        def swap(name: str) -> None:
            if name == "b" and not swapped:
                os.rename(ws / "a" / "b", ws / "a" / "b.real")
                os.symlink(sibling, ws / "a" / "b")
                swapped.append(name)
            elif name == "file.txt" and not swapped:
                os.rename(ws / "file.txt", ws / "file.real")
                os.symlink(sibling / "secret", ws / "file.txt")
                swapped.append(name)

        session_workspace(harness, sid)._for_testing_before_open = swap
        put = await harness.client.put(f"/v1/sessions/{sid}/files/a/b/new", content=b"pwned")
        assert_json_error(put.status_code, put.content, {403})
        assert swapped == ["b"]
        swapped.clear()
        get = await harness.client.get(f"/v1/sessions/{sid}/files/file.txt")
        assert_json_error(get.status_code, get.content, {403})
        assert swapped == ["file.txt"]
    assert outside_state(harness, sid, tmp_path) == before


LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def exchange(directory: Path, first: str, second: str) -> None:
    """Swap two names atomically (``renameat2(RENAME_EXCHANGE)``), so the swapped
    name never goes missing (an upload would create it afresh)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rename_exchange = 2
        if LIBC.renameat2(fd, first.encode(), fd, second.encode(), rename_exchange) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
    finally:
        os.close(fd)


async def test_files_racing_link_swaps_never_leak(harness: Harness, tmp_path: Path) -> None:
    """A thread swaps ``d`` with a link to an outside directory (atomically, until
    the requests end, at most a million times) while uploads and downloads of
    ``d/f`` run: each answer is 200/201 with inside bytes or a 403, never a 500
    or a byte of the outside file, and the outside file is never written."""
    with trio.fail_after(30):
        sid = await harness.new_session()
        plant_secrets(harness, sid, tmp_path)
        outside = tmp_path / "outside"
        (outside / "f").write_bytes(SECRET)
        ws = harness.workspace_of(sid)
        (ws / "d").mkdir()
        inside = b"INSIDE-" * 100
        (ws / "d" / "f").write_bytes(inside)
        os.symlink(outside, ws / "link")
        try:
            exchange(ws, "d", "link")
            exchange(ws, "d", "link")
        except OSError as exc:
            pytest.skip(f"renameat2(RENAME_EXCHANGE) unavailable here: {exc}")
        before = outside_state(harness, sid, tmp_path)
        stop = threading.Event()
        swaps = 0

        def swapper() -> None:
            nonlocal swaps
            while not stop.is_set() and swaps < 1_000_000:
                exchange(ws, "d", "link")
                swaps += 1
                time.sleep(0.0002)  # pacing: leave the server (same process) the CPU

        statuses: list[int] = []

        async def client(method: str) -> None:
            for _ in range(15):
                if method == "PUT":
                    response = await harness.client.put(
                        f"/v1/sessions/{sid}/files/d/f", content=inside
                    )
                else:
                    response = await harness.client.get(f"/v1/sessions/{sid}/files/d/f")
                statuses.append(response.status_code)
                if response.status_code == 403:
                    assert_json_error(response.status_code, response.content, {403})
                else:
                    assert response.status_code == (201 if method == "PUT" else 200), response.text
                    assert_no_secret(response.content)
                    if method == "GET":  # uploads replace the file whole (rename)
                        assert response.content == inside

        async def run_clients() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    for method in ("PUT", "PUT", "GET", "GET"):
                        nursery.start_soon(client, method)
            finally:
                stop.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, swapper)
            nursery.start_soon(run_clients)
    assert swaps > 0
    assert len(statuses) == 60
    assert 500 not in statuses
    assert outside_state(harness, sid, tmp_path) == before
    assert (outside / "f").read_bytes() == SECRET
