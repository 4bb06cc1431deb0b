"""The workspace files API over HTTP: upload, download with Range, listing,
delete, body limits, and paths that must never leave the workspace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpcore
import httpx
import pytest
import trio

from ..fakes import FakeModel
from .conftest import KEY, OTHER_KEY, Harness, open_harness

TEN: bytes = b"0123456789"


class Chunks:
    """A request body sent in pieces; not an async generator, so a server that
    answers (413) before it is consumed leaves no unfinished generator behind."""

    def __init__(self, chunk: bytes, count: int) -> None:
        self.chunk = chunk
        self.left = count

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self.left == 0:
            raise StopAsyncIteration
        self.left -= 1
        await trio.lowlevel.checkpoint()
        return self.chunk


async def raw_request(
    harness: Harness,
    method: str,
    target: str,
    *,
    body: bytes | Chunks = b"",
    headers: dict[str, str] | None = None,
) -> httpcore.Response:
    """Send ``target`` byte for byte: httpx would remove ``..`` segments from it.
    (httpcore is what httpx sends with; it takes the request target as is.)"""
    base = httpx.URL(harness.base_url)
    assert base.port is not None
    url = httpcore.URL(scheme="http", host=base.host, port=base.port, target=target.encode())
    sent = [(b"Authorization", f"Bearer {KEY}".encode())]
    sent += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    async with httpcore.AsyncConnectionPool() as pool:
        return await pool.request(method, url, headers=sent, content=body)


def assert_refused(status: int, content: bytes, secret: bytes | None = None) -> None:
    """A hostile path is answered 403 or 404 (never 2xx, never a 500), without the bytes."""
    assert status in (403, 404), (status, content)
    if secret is not None:
        assert secret not in content


# -- upload, download, list, delete ---------------------------------------


async def test_files_put_creates_parents_and_get_returns_bytes(harness: Harness) -> None:
    """PUT a nested path -> 201 {path, size, modified}, parents created; GET gives the bytes."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        put = await harness.client.put(f"/v1/sessions/{sid}/files/a/b.txt", content=b"hello")
        assert put.status_code == 201
        body = put.json()
        assert set(body) == {"path", "size", "modified"}
        assert body["path"] == "a/b.txt"
        assert body["size"] == 5
        assert isinstance(body["modified"], float)
        assert (harness.workspace_of(sid) / "a" / "b.txt").read_bytes() == b"hello"

        get = await harness.client.get(f"/v1/sessions/{sid}/files/a/b.txt")
    assert get.status_code == 200
    assert get.content == b"hello"
    assert get.headers["Accept-Ranges"] == "bytes"


async def test_files_put_replaces_existing_file(harness: Harness) -> None:
    """A second PUT to the same path replaces (truncates) the file."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/f.txt", content=b"a long first body")
        put = await harness.client.put(f"/v1/sessions/{sid}/files/f.txt", content=b"short")
        get = await harness.client.get(f"/v1/sessions/{sid}/files/f.txt")
    assert put.status_code == 201
    assert put.json()["size"] == 5
    assert get.content == b"short"


async def test_files_list_is_one_level(harness: Harness) -> None:
    """GET /files lists one level as {name, type, size, modified}; ?path=a lists inside a."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/a/b.txt", content=b"hello")
        await harness.client.put(f"/v1/sessions/{sid}/files/a/c/d.txt", content=b"deep")
        await harness.client.put(f"/v1/sessions/{sid}/files/top.txt", content=TEN)
        root = await harness.client.get(f"/v1/sessions/{sid}/files")
        inside = await harness.client.get(f"/v1/sessions/{sid}/files", params={"path": "a"})
    assert root.status_code == 200
    assert inside.status_code == 200
    entries = root.json()
    assert isinstance(entries, list)
    assert [(e["name"], e["type"]) for e in entries] == [("a", "directory"), ("top.txt", "file")]
    for entry in entries:
        assert set(entry) == {"name", "type", "size", "modified"}
        assert isinstance(entry["modified"], float)
    assert entries[1]["size"] == 10
    assert inside.json()[0]["size"] == 5
    assert [(e["name"], e["type"]) for e in inside.json()] == [
        ("b.txt", "file"),
        ("c", "directory"),
    ]


async def test_files_list_empty_workspace_is_empty_array(harness: Harness) -> None:
    """A new session's workspace lists as a bare empty array."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        response = await harness.client.get(f"/v1/sessions/{sid}/files")
    assert response.status_code == 200
    assert response.json() == []


async def test_files_get_directory_returns_listing(harness: Harness) -> None:
    """GET of a directory path returns the same listing as ?path=."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/a/b.txt", content=b"hello")
        direct = await harness.client.get(f"/v1/sessions/{sid}/files/a")
        listed = await harness.client.get(f"/v1/sessions/{sid}/files", params={"path": "a"})
    assert direct.status_code == 200
    assert direct.headers["Content-Type"].startswith("application/json")
    assert direct.json() == listed.json()
    assert [e["name"] for e in direct.json()] == ["b.txt"]


async def test_files_list_missing_directory_is_404(harness: Harness) -> None:
    """?path= naming nothing is a 404 JSON error."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        response = await harness.client.get(f"/v1/sessions/{sid}/files", params={"path": "nope"})
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


async def test_files_delete_then_404(harness: Harness) -> None:
    """DELETE a file -> 204 with no body; then GET and DELETE -> 404."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/a/b.txt", content=b"hello")
        deleted = await harness.client.delete(f"/v1/sessions/{sid}/files/a/b.txt")
        assert deleted.status_code == 204
        assert deleted.content == b""
        assert not (harness.workspace_of(sid) / "a" / "b.txt").exists()
        get = await harness.client.get(f"/v1/sessions/{sid}/files/a/b.txt")
        again = await harness.client.delete(f"/v1/sessions/{sid}/files/a/b.txt")
    assert get.status_code == 404
    assert get.json()["error"] == "not_found"
    assert again.status_code == 404
    assert again.json()["error"] == "not_found"


async def test_files_binary_roundtrip(harness: Harness) -> None:
    """Every byte value survives PUT then GET unchanged."""
    data = bytes(range(256)) * 4
    with trio.fail_after(10):
        sid = await harness.new_session()
        put = await harness.client.put(f"/v1/sessions/{sid}/files/blob.bin", content=data)
        get = await harness.client.get(f"/v1/sessions/{sid}/files/blob.bin")
    assert put.json()["size"] == len(data)
    assert get.content == data


async def test_files_put_or_delete_on_directory_is_400(harness: Harness) -> None:
    """PUT onto a directory or DELETE of a non-empty one -> 400 JSON, the tree intact."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/a/b.txt", content=b"x")
        put = await harness.client.put(f"/v1/sessions/{sid}/files/a", content=b"y")
        delete = await harness.client.delete(f"/v1/sessions/{sid}/files/a")
        await harness.client.delete(f"/v1/sessions/{sid}/files/a/b.txt")
        empty_dir = await harness.client.delete(f"/v1/sessions/{sid}/files/a")
    for response in (put, delete):
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_request"
    assert empty_dir.status_code == 204
    assert os.listdir(harness.workspace_of(sid)) == []


async def test_files_fifo_is_refused_without_blocking(harness: Harness) -> None:
    """A FIFO in the workspace (as run_shell could make) is refused at once, never opened."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        os.mkfifo(harness.workspace_of(sid) / "pipe")
        get = await harness.client.get(f"/v1/sessions/{sid}/files/pipe")
        put = await harness.client.put(f"/v1/sessions/{sid}/files/pipe", content=b"x")
    for response in (get, put):
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "path_outside_workspace"


async def test_files_sandbox_prefix_maps_to_workspace(harness: Harness) -> None:
    """``?path=/opt/sandbox/workspace/a`` (the path the agent is told) lists the workspace's a."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/a/b.txt", content=b"x")
        response = await harness.client.get(
            f"/v1/sessions/{sid}/files", params={"path": "/opt/sandbox/workspace/a"}
        )
        outside = await harness.client.get(
            f"/v1/sessions/{sid}/files", params={"path": "/opt/sandbox/workspace/../.."}
        )
    assert [e["name"] for e in response.json()] == ["b.txt"]
    assert outside.status_code == 403


# -- Range ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "content_range", "expected"),
    [
        ("bytes=0-3", "bytes 0-3/10", b"0123"),
        ("bytes=4-", "bytes 4-9/10", b"456789"),
        ("bytes=-3", "bytes 7-9/10", b"789"),
        ("bytes=8-100", "bytes 8-9/10", b"89"),
        ("bytes=-100", "bytes 0-9/10", TEN),
        ("bytes=9-9", "bytes 9-9/10", b"9"),
    ],
)
async def test_files_range_partial_content(
    harness: Harness, header: str, content_range: str, expected: bytes
) -> None:
    """A satisfiable single Range -> 206 with Content-Range and exactly those bytes."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/ten.txt", content=TEN)
        response = await harness.client.get(
            f"/v1/sessions/{sid}/files/ten.txt", headers={"Range": header}
        )
    assert response.status_code == 206
    assert response.headers["Content-Range"] == content_range
    assert response.content == expected


@pytest.mark.parametrize(
    "header", ["bytes=100-200", "bytes=10-", "bytes=5-2", "bytes=-0", "garbage", "bytes=-"]
)
async def test_files_range_unsatisfiable_is_416(harness: Harness, header: str) -> None:
    """A Range naming no byte of a 10-byte file -> 416 with Content-Range: bytes */10."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/ten.txt", content=TEN)
        response = await harness.client.get(
            f"/v1/sessions/{sid}/files/ten.txt", headers={"Range": header}
        )
    assert response.status_code == 416
    assert response.headers["Content-Range"] == "bytes */10"
    assert response.json()["error"] == "range_not_satisfiable"
    assert TEN not in response.content


async def test_files_suffix_range_on_empty_file(harness: Harness) -> None:
    """``bytes=-5`` on an empty file -> 416 ``bytes */0`` (or 200), never a bogus 206."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/empty", content=b"")
        response = await harness.client.get(
            f"/v1/sessions/{sid}/files/empty", headers={"Range": "bytes=-5"}
        )
    assert response.status_code in (200, 416), response.headers.get("Content-Range")
    if response.status_code == 416:
        assert response.headers["Content-Range"] == "bytes */0"


# -- hostile paths ----------------------------------------------------------


async def test_files_raw_dotdot_reaches_server_and_is_refused(harness: Harness) -> None:
    """A literal ``..`` segment sent on the wire reaches the route and gets 403 (not followed)."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        (harness.rt.data_dir / "workspaces" / "x").write_bytes(b"OUTSIDE")
        for target in (f"/v1/sessions/{sid}/files/../x", f"/v1/sessions/{sid}/files/a/../../x"):
            response = await raw_request(harness, "GET", target)
            # The message quotes the path the route saw: the ``..`` was not normalized away.
            assert response.status == 403, (target, response.content)
            assert b"'..'" in response.content
            assert b"OUTSIDE" not in response.content
            put = await raw_request(harness, "PUT", target, body=b"pwned")
            assert put.status == 403, (target, put.content)
    assert (harness.rt.data_dir / "workspaces" / "x").read_bytes() == b"OUTSIDE"


@pytest.mark.parametrize(
    "suffix",
    [
        "%2e%2e/x",
        "%2e%2e%2fx",
        "%2e%2e%2fetc%2fpasswd",
        "a/%2e%2e/%2e%2e/x",
        "%00",
        "a%00b",
        "%2e%2e",
        "a/%2e%2e/..%2f..%2fx",
    ],
)
async def test_files_encoded_traversal_is_refused(harness: Harness, suffix: str) -> None:
    """Percent-encoded ``..``/``/`` and NUL reach the route decoded and are refused with 403."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        secret = b"OUTSIDE-SECRET"
        (harness.rt.data_dir / "workspaces" / "x").write_bytes(secret)
        target = f"/v1/sessions/{sid}/files/{suffix}"
        get = await raw_request(harness, "GET", target)
        assert_refused(get.status, get.content, secret)
        assert_refused(get.status, get.content, b"root:")
        put = await raw_request(harness, "PUT", target, body=b"pwned")
        assert_refused(put.status, put.content)
        delete = await raw_request(harness, "DELETE", target)
        assert_refused(delete.status, delete.content)
        # The route saw the decoded path (``..`` or NUL) and refused it as outside.
        for response in (get, put, delete):
            assert response.status == 403, response.content
            assert json.loads(response.content)["error"] == "path_outside_workspace"
        listing = await harness.client.get(f"/v1/sessions/{sid}/files")
    assert listing.json() == []
    assert (harness.rt.data_dir / "workspaces" / "x").read_bytes() == secret
    assert b"pwned" not in Path("/etc/passwd").read_bytes()


ABSOLUTE_SUFFIXES = ["//etc/passwd", "%2fetc%2fpasswd", "/%2e%2e/x"]


@pytest.mark.parametrize("suffix", ABSOLUTE_SUFFIXES)
async def test_files_absolute_path_never_leaves_workspace(harness: Harness, suffix: str) -> None:
    """``files//etc/passwd`` and the like: whatever the answer, nothing outside is read or
    written, and any redirect points back into this session's files."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        prefix = f"{harness.base_url}/v1/sessions/{sid}/files/"
        for method in ("GET", "PUT", "DELETE"):
            target = f"/v1/sessions/{sid}/files/{suffix}"
            response = await raw_request(harness, method, target, body=b"pwned")
            assert response.status in (308, 403, 404), (method, response.status)
            assert b"root:" not in response.content
            if response.status == 308:
                location = dict(response.headers)[b"location"].decode()
                assert location.startswith(prefix), location
        listing = await harness.client.get(f"/v1/sessions/{sid}/files")
    assert listing.json() == []
    assert b"pwned" not in Path("/etc/passwd").read_bytes()


@pytest.mark.parametrize("suffix", ABSOLUTE_SUFFIXES)
async def test_files_absolute_path_is_refused_with_json(harness: Harness, suffix: str) -> None:
    """An absolute path after ``files/`` is refused (403/404 JSON), not redirected."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        responses = [
            await raw_request(harness, method, f"/v1/sessions/{sid}/files/{suffix}", body=b"x")
            for method in ("GET", "PUT", "DELETE")
        ]
    for response in responses:
        assert response.status in (403, 404), response.status
        assert json.loads(response.content)["error"] in ("path_outside_workspace", "not_found")


async def test_files_double_encoded_dotdot_is_a_plain_name(harness: Harness) -> None:
    """``%252e%252e`` is decoded once only: a name literally ``%2e%2e``, inside the workspace."""
    secret = b"OUTSIDE-SECRET"
    outside = harness.rt.data_dir / "workspaces" / "x"
    outside.write_bytes(secret)
    with trio.fail_after(10):
        sid = await harness.new_session()
        for suffix in ("%252e%252e/x", "%252e%252e%252fx"):
            get = await raw_request(harness, "GET", f"/v1/sessions/{sid}/files/{suffix}")
            assert get.status == 404, (suffix, get.content)
            assert secret not in get.content
        put = await raw_request(harness, "PUT", f"/v1/sessions/{sid}/files/%252e%252e/x", body=b"a")
        flat = await raw_request(
            harness, "PUT", f"/v1/sessions/{sid}/files/%252e%252e%252fx", body=b"b"
        )
        listing = await harness.client.get(f"/v1/sessions/{sid}/files")
    assert put.status == 201
    assert flat.status == 201
    assert [e["name"] for e in listing.json()] == ["%2e%2e", "%2e%2e%2fx"]
    assert (harness.workspace_of(sid) / "%2e%2e" / "x").read_bytes() == b"a"
    assert (harness.workspace_of(sid) / "%2e%2e%2fx").read_bytes() == b"b"
    assert outside.read_bytes() == secret


@pytest.mark.parametrize("query", ["..", "../x", "a/../..", "/etc", "//etc", "x\0y"])
async def test_files_list_hostile_query_path_is_refused(harness: Harness, query: str) -> None:
    """?path= with ``..``, an absolute path or a NUL -> 403, never a listing of outside."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        response = await harness.client.get(f"/v1/sessions/{sid}/files", params={"path": query})
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "path_outside_workspace"


async def test_files_sibling_workspace_prefix_is_refused(harness: Harness) -> None:
    """``../<ws>-evil/secret`` (a sibling sharing the name prefix) -> 403/404, never its bytes."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        evil = harness.rt.data_dir / "workspaces" / f"{sid}-evil"
        evil.mkdir()
        (evil / "secret").write_bytes(b"SIBLING-SECRET")
        for target in (
            f"/v1/sessions/{sid}/files/../{sid}-evil/secret",
            f"/v1/sessions/{sid}/files/%2e%2e%2f{sid}-evil%2fsecret",
        ):
            get = await raw_request(harness, "GET", target)
            assert_refused(get.status, get.content, b"SIBLING-SECRET")
            put = await raw_request(harness, "PUT", target, body=b"pwned")
            assert_refused(put.status, put.content)
        listing = await harness.client.get(
            f"/v1/sessions/{sid}/files", params={"path": f"../{sid}-evil"}
        )
        assert_refused(listing.status_code, listing.content, b"secret")
    assert (evil / "secret").read_bytes() == b"SIBLING-SECRET"


async def test_files_symlink_to_etc_is_not_followed(harness: Harness) -> None:
    """A symlink in the workspace to /etc (as run_shell could make) -> GET/list through it 403."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        os.symlink("/etc", harness.workspace_of(sid) / "etc")
        os.symlink("/etc/passwd", harness.workspace_of(sid) / "pw")
        through = await harness.client.get(f"/v1/sessions/{sid}/files/etc/passwd")
        link_itself = await harness.client.get(f"/v1/sessions/{sid}/files/etc")
        file_link = await harness.client.get(f"/v1/sessions/{sid}/files/pw")
        listing = await harness.client.get(f"/v1/sessions/{sid}/files", params={"path": "etc"})
        ranged = await harness.client.get(
            f"/v1/sessions/{sid}/files/pw", headers={"Range": "bytes=0-3"}
        )
    for response in (through, link_itself, file_link, listing, ranged):
        assert response.status_code == 403, (response.request.url, response.text)
        assert response.json()["error"] == "path_outside_workspace"
        assert b"root:" not in response.content


async def test_files_put_through_symlink_writes_nothing_outside(
    harness: Harness, tmp_path: Path
) -> None:
    """PUT through a directory symlink or onto a file symlink -> 403, the target untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "existing").write_bytes(b"KEEP")
    with trio.fail_after(10):
        sid = await harness.new_session()
        ws = harness.workspace_of(sid)
        os.symlink(outside, ws / "out")
        os.symlink(outside / "existing", ws / "file-link")
        os.symlink("/etc", ws / "etc")
        new_file = await harness.client.put(f"/v1/sessions/{sid}/files/out/new", content=b"x")
        nested = await harness.client.put(f"/v1/sessions/{sid}/files/out/d/new", content=b"x")
        onto = await harness.client.put(f"/v1/sessions/{sid}/files/file-link", content=b"x")
        into_etc = await harness.client.put(
            f"/v1/sessions/{sid}/files/etc/agent-runtime-test-{sid}", content=b"x"
        )
        delete = await harness.client.delete(f"/v1/sessions/{sid}/files/out/existing")
    for response in (new_file, nested, onto, into_etc, delete):
        assert response.status_code == 403, (response.request.url, response.text)
    assert sorted(os.listdir(outside)) == ["existing"]
    assert (outside / "existing").read_bytes() == b"KEEP"
    assert not os.path.lexists(f"/etc/agent-runtime-test-{sid}")
    # The symlinks themselves are still there (the API did not replace them).
    assert os.path.islink(ws / "file-link")
    assert os.path.islink(ws / "out")


# -- limits -------------------------------------------------------------------


async def test_files_put_over_limit_is_413(tmp_path: Path) -> None:
    """A PUT over ``file_limit`` -> 413 JSON and no file created."""
    with trio.fail_after(10):
        async with open_harness(tmp_path, FakeModel(), file_limit=1000) as harness:
            sid = await harness.new_session()
            too_big = await harness.client.put(
                f"/v1/sessions/{sid}/files/big.bin", content=b"x" * 2000
            )
            exact = await harness.client.put(
                f"/v1/sessions/{sid}/files/ok.bin", content=b"x" * 1000
            )
            listing = await harness.client.get(f"/v1/sessions/{sid}/files")
    assert too_big.status_code == 413
    assert too_big.json()["error"] == "too_large"
    assert exact.status_code == 201
    assert [e["name"] for e in listing.json()] == ["ok.bin"]


async def test_files_chunked_put_over_limit_is_413(tmp_path: Path) -> None:
    """A chunked PUT (no Content-Length) that grows over ``file_limit`` -> 413, no file."""
    with trio.fail_after(10):
        async with open_harness(tmp_path, FakeModel(), file_limit=1000) as harness:
            sid = await harness.new_session()
            response = await raw_request(
                harness, "PUT", f"/v1/sessions/{sid}/files/big.bin", body=Chunks(b"y" * 500, 4)
            )
            listing = await harness.client.get(f"/v1/sessions/{sid}/files")
    assert response.status == 413
    assert json.loads(response.content)["error"] == "too_large"
    assert listing.json() == []


async def test_files_json_body_over_limit_is_413(harness: Harness) -> None:
    """A JSON body over 1 MiB on POST /v1/sessions -> 413 (declared or streamed), no session."""
    pad = 1024 * 1024
    body = b'{"metadata": {"pad": "' + b"x" * pad + b'"}}'
    with trio.fail_after(10):
        declared = await raw_request(
            harness,
            "POST",
            "/v1/sessions",
            body=Chunks(body, 1),
            headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
        )
        streamed = await raw_request(
            harness,
            "POST",
            "/v1/sessions",
            body=Chunks(b" " * (64 * 1024), 17),
            headers={"Content-Type": "application/json"},
        )
        just_under = await harness.client.post(
            "/v1/sessions", content=b'{"metadata": {}}' + b" " * (pad - 100)
        )
    for response in (declared, streamed):
        assert response.status == 413
        assert json.loads(response.content)["error"] == "too_large"
    assert just_under.status_code == 201
    assert [s.id for s in harness.rt.sessions()] == [just_under.json()["id"]]


async def test_files_put_is_allowed_beyond_json_limit(tmp_path: Path) -> None:
    """Uploads use ``file_limit``, not ``json_limit``."""
    with trio.fail_after(10):
        async with open_harness(tmp_path, FakeModel(), json_limit=100) as harness:
            sid = await harness.new_session()
            response = await harness.client.put(
                f"/v1/sessions/{sid}/files/f.bin", content=b"z" * 5000
            )
    assert response.status_code == 201
    assert response.json()["size"] == 5000


# -- ownership ----------------------------------------------------------------


async def test_files_of_other_account_are_404(harness: Harness) -> None:
    """Another account's session files are 404 for list, GET, PUT and DELETE (never 403)."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        await harness.client.put(f"/v1/sessions/{sid}/files/mine.txt", content=b"MINE")
        async with harness.client_for(OTHER_KEY) as other:
            responses = [
                await other.get(f"/v1/sessions/{sid}/files"),
                await other.get(f"/v1/sessions/{sid}/files/mine.txt"),
                await other.put(f"/v1/sessions/{sid}/files/mine.txt", content=b"THEIRS"),
                await other.put(f"/v1/sessions/{sid}/files/new.txt", content=b"THEIRS"),
                await other.delete(f"/v1/sessions/{sid}/files/mine.txt"),
            ]
    for response in responses:
        assert response.status_code == 404, (response.request.method, response.text)
        assert response.json()["error"] == "not_found"
        assert b"MINE" not in response.content
    assert sorted(os.listdir(harness.workspace_of(sid))) == ["mine.txt"]
    assert (harness.workspace_of(sid) / "mine.txt").read_bytes() == b"MINE"


async def test_files_of_unknown_session_are_404(harness: Harness) -> None:
    """Files routes of a session that does not exist (or was deleted) are 404."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        assert (await harness.client.delete(f"/v1/sessions/{sid}")).status_code == 204
        responses = []
        for session in ("sess_" + "0" * 32, sid):
            responses += [
                await harness.client.get(f"/v1/sessions/{session}/files"),
                await harness.client.get(f"/v1/sessions/{session}/files/a.txt"),
                await harness.client.put(f"/v1/sessions/{session}/files/a.txt", content=b"x"),
                await harness.client.delete(f"/v1/sessions/{session}/files/a.txt"),
            ]
    for response in responses:
        assert response.status_code == 404, (response.request.url, response.text)
        assert response.json()["error"] == "not_found"
    assert not harness.workspace_of(sid).exists()


async def test_files_need_a_key(harness: Harness) -> None:
    """Files routes without a key are 401, and the upload is not written."""
    with trio.fail_after(10):
        sid = await harness.new_session()
        async with harness.client_for(None) as anonymous:
            put = await anonymous.put(f"/v1/sessions/{sid}/files/a.txt", content=b"x")
            listing = await anonymous.get(f"/v1/sessions/{sid}/files")
    assert put.status_code == 401
    assert listing.status_code == 401
    assert os.listdir(harness.workspace_of(sid)) == []


async def test_files_unauthenticated_upload_refused_before_its_body(harness: Harness) -> None:
    """A PUT with no valid key gets 401 at once: the server never waits for the body."""
    host, port = harness.base_url.removeprefix("http://").split(":")
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                b"PUT /v1/sessions/sess_x/files/big.bin HTTP/1.1\r\nHost: t\r\n"
                b"Authorization: Bearer nope\r\nContent-Length: 50000000\r\n\r\n"
            )
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = await stream.receive_some()
                assert chunk
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 401")


async def test_files_upload_over_quarts_default_limit(harness: Harness) -> None:
    """Uploads are bounded by file_limit (64 MiB), not Quart's 16 MiB default."""
    sid = (await harness.client.post("/v1/sessions")).json()["id"]
    data = b"z" * (17 * 1024 * 1024)
    with trio.fail_after(30):
        put = await harness.client.put(f"/v1/sessions/{sid}/files/big.bin", content=data)
    assert put.status_code == 201, put.text[:200]
    assert put.json()["size"] == len(data)


async def test_files_range_with_huge_numbers_is_416(harness: Harness) -> None:
    """A Range with absurdly long numbers is 416, never a 500."""
    sid = (await harness.client.post("/v1/sessions")).json()["id"]
    await harness.client.put(f"/v1/sessions/{sid}/files/f.txt", content=b"0123456789")
    with trio.fail_after(10):
        for header in (
            "bytes=0-" + "9" * 5000,
            "bytes=-" + "9" * 5000,
            "bytes=" + "1" * 5000 + "-",
        ):
            response = await harness.client.get(
                f"/v1/sessions/{sid}/files/f.txt", headers={"Range": header}
            )
            assert response.status_code == 416, header[:20]
