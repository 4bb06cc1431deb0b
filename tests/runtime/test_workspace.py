from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from runtime import SANDBOX_ROOT, FileInfo, InvalidRequest, NotFound, PathOutsideWorkspace
from runtime._workspace import Workspace, split_path


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A workspace at ``tmp_path/ws``; the rest of ``tmp_path`` is outside it."""
    root = tmp_path / "ws"
    root.mkdir()
    return Workspace(str(root))


def _root(ws: Workspace) -> Path:
    return Path(ws.root)


# split_path


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("", ()),
        (".", ()),
        ("./", ()),
        ("a/b", ("a", "b")),
        ("a//b/./c", ("a", "b", "c")),
        ("a/b/", ("a", "b")),
        (SANDBOX_ROOT, ()),
        (SANDBOX_ROOT + "/", ()),
        (SANDBOX_ROOT + "/x", ("x",)),
        (SANDBOX_ROOT + "/x/./y", ("x", "y")),
        ("a\\..\\b", ("a\\..\\b",)),
        ("..x/y..", ("..x", "y..")),
    ],
)
def test_split_path_components(path: str, parts: tuple[str, ...]) -> None:
    """A path inside the workspace splits into its non-empty, non-"." components."""
    assert split_path(path) == parts


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "/",
        "//etc",
        "..",
        "../x",
        "a/../../x",
        "a/..",
        "a/../b",
        SANDBOX_ROOT + "/../x",
        SANDBOX_ROOT + "x",
        "/opt/sandbox",
        "a\0b",
        "\0",
    ],
)
def test_split_path_refuses_escapes(path: str) -> None:
    """Absolute paths outside SANDBOX_ROOT, any ".." and NUL bytes are refused."""
    with pytest.raises(PathOutsideWorkspace):
        split_path(path)


# write / read / list / delete


def test_workspace_write_creates_parents(ws: Workspace) -> None:
    """write creates missing parent directories and reports the file's size."""
    info = ws.write("a/b/c.txt", b"hello")
    assert isinstance(info, FileInfo)
    assert (info.name, info.type, info.size) == ("c.txt", "file", 5)
    assert (_root(ws) / "a" / "b" / "c.txt").read_bytes() == b"hello"


def test_workspace_write_read_round_trip(ws: Workspace) -> None:
    """read returns exactly the bytes write stored, also via SANDBOX_ROOT."""
    data = bytes(range(256)) * 3
    ws.write("blob.bin", data)
    assert ws.read("blob.bin") == data
    assert ws.read(SANDBOX_ROOT + "/blob.bin") == data


def test_workspace_write_replaces(ws: Workspace) -> None:
    """write truncates an existing file rather than overwriting its prefix."""
    ws.write("f.txt", b"a long first version")
    info = ws.write("f.txt", b"short")
    assert info.size == 5
    assert ws.read("f.txt") == b"short"


def test_workspace_read_limit(ws: Workspace) -> None:
    """read(limit=n) returns at most the first n bytes."""
    ws.write("digits.txt", b"0123456789")
    assert ws.read("digits.txt", limit=4) == b"0123"
    assert ws.read("digits.txt", limit=100) == b"0123456789"
    assert ws.read("digits.txt", limit=0) == b""


def test_workspace_list_one_level_sorted(ws: Workspace) -> None:
    """list returns one level, sorted by name, with file/directory types and sizes."""
    ws.write("b.txt", b"bb")
    ws.write("a/inner.txt", b"x")
    ws.write("c/deeper/d.txt", b"y")
    infos = ws.list()
    assert [(i.name, i.type) for i in infos] == [
        ("a", "directory"),
        ("b.txt", "file"),
        ("c", "directory"),
    ]
    assert infos[1].size == 2
    assert [i.name for i in ws.list("c")] == ["deeper"]
    assert ws.list(SANDBOX_ROOT) == infos


def test_workspace_list_empty(ws: Workspace) -> None:
    """An empty workspace lists as an empty list."""
    assert ws.list() == []
    assert ws.list(".") == []


def test_workspace_list_reports_special_files_as_other(ws: Workspace) -> None:
    """Symbolic links and FIFOs are listed (not followed) with type "other"."""
    os.symlink("/etc", _root(ws) / "link")
    os.mkfifo(_root(ws) / "fifo")
    assert [(i.name, i.type) for i in ws.list()] == [("fifo", "other"), ("link", "other")]


def test_workspace_delete_file_and_empty_dir(ws: Workspace) -> None:
    """delete removes a file and then the directory it leaves empty."""
    ws.write("d/f.txt", b"x")
    ws.delete("d/f.txt")
    assert ws.list("d") == []
    ws.delete("d")
    assert ws.list() == []


def test_workspace_delete_non_empty_dir_keeps_contents(ws: Workspace) -> None:
    """delete refuses a non-empty directory and leaves its contents in place."""
    ws.write("d/f.txt", b"x")
    # The runtime currently lets the raw OSError (ENOTEMPTY) through.
    with pytest.raises((InvalidRequest, OSError)):
        ws.delete("d")
    assert ws.read("d/f.txt") == b"x"


@pytest.mark.parametrize("op", ["read", "list", "delete"])
def test_workspace_missing_path_not_found(ws: Workspace, op: str) -> None:
    """Operations on a path that does not exist raise NotFound."""
    with pytest.raises(NotFound):
        getattr(ws, op)("no/such/thing")


def test_workspace_read_directory_invalid(ws: Workspace) -> None:
    """Reading a directory (or the workspace itself) is an InvalidRequest."""
    ws.write("d/f.txt", b"x")
    with pytest.raises(InvalidRequest):
        ws.read("d")
    with pytest.raises(InvalidRequest):
        ws.read("")


@pytest.mark.parametrize("path", ["", ".", SANDBOX_ROOT])
def test_workspace_write_root_invalid(ws: Workspace, path: str) -> None:
    """Writing to the workspace directory itself is an InvalidRequest."""
    with pytest.raises(InvalidRequest):
        ws.write(path, b"x")


def test_workspace_write_over_directory_invalid(ws: Workspace) -> None:
    """Writing to a path that is a directory is an InvalidRequest and keeps it."""
    ws.write("d/f.txt", b"x")
    with pytest.raises(InvalidRequest):
        ws.write("d", b"y")
    assert ws.read("d/f.txt") == b"x"


# Escapes


def test_workspace_symlink_dir_read_refused(ws: Workspace) -> None:
    """A symlink to /etc inside the workspace is never followed by read."""
    os.symlink("/etc", _root(ws) / "etc")
    with pytest.raises(PathOutsideWorkspace):
        ws.read("etc/passwd")
    with pytest.raises(PathOutsideWorkspace):
        ws.read("etc")


@pytest.mark.parametrize("path", ["etc", "etc/", "etc/ssl"])
def test_workspace_symlink_dir_list_refused(ws: Workspace, path: str) -> None:
    """Listing through a symlink to /etc inside the workspace is refused."""
    os.symlink("/etc", _root(ws) / "etc")
    with pytest.raises(PathOutsideWorkspace):
        ws.list(path)


@pytest.mark.parametrize("path", ["link/x.txt", "link/new/deep.txt"])
def test_workspace_symlink_dir_write_refused(ws: Workspace, tmp_path: Path, path: str) -> None:
    """Writing through a directory symlink is refused and creates nothing outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, _root(ws) / "link")
    with pytest.raises(PathOutsideWorkspace):
        ws.write(path, b"pwned")
    assert list(outside.iterdir()) == []


def test_workspace_symlink_file_refused(ws: Workspace, tmp_path: Path) -> None:
    """A symlink to a file outside never yields or overwrites the target's bytes."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    os.symlink(secret, _root(ws) / "leak")
    with pytest.raises(PathOutsideWorkspace) as excinfo:
        ws.read("leak")
    assert "secret" not in str(excinfo.value)
    with pytest.raises(PathOutsideWorkspace):
        ws.write("leak", b"overwritten")
    assert secret.read_bytes() == b"secret"


def test_workspace_delete_symlink_removes_link_only(ws: Workspace, tmp_path: Path) -> None:
    """delete of a symlink to an outside file removes the link, not the target."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    os.symlink(secret, _root(ws) / "leak")
    ws.delete("leak")
    assert not os.path.lexists(_root(ws) / "leak")
    assert secret.read_bytes() == b"secret"


@pytest.mark.parametrize("path", ["../ws-evil/x", SANDBOX_ROOT + "/../ws-evil/x"])
def test_workspace_prefix_sibling_unreachable(ws: Workspace, tmp_path: Path, path: str) -> None:
    """A sibling directory whose name extends the workspace's name is unreachable."""
    evil = tmp_path / "ws-evil"
    evil.mkdir()
    (evil / "x").write_bytes(b"evil")
    with pytest.raises(PathOutsideWorkspace):
        ws.read(path)
    with pytest.raises(PathOutsideWorkspace):
        ws.write(path, b"overwritten")
    with pytest.raises(PathOutsideWorkspace):
        ws.list(path.removesuffix("/x"))
    assert (evil / "x").read_bytes() == b"evil"


def test_workspace_fifo_read_refused_without_blocking(ws: Workspace) -> None:
    """Reading a FIFO is refused at once instead of waiting for a writer."""
    os.mkfifo(_root(ws) / "fifo")
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(ws.read("fifo"))
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "read of a FIFO blocked"
    assert len(outcome) == 1
    assert isinstance(outcome[0], PathOutsideWorkspace)


def test_workspace_fifo_write_refused(ws: Workspace) -> None:
    """Writing to a FIFO is refused with PathOutsideWorkspace, like reading it."""
    os.mkfifo(_root(ws) / "fifo")
    with pytest.raises(PathOutsideWorkspace):
        ws.write("fifo", b"x")


@pytest.mark.parametrize("op", ["read", "list", "write"])
def test_workspace_unencodable_path_refused(ws: Workspace, op: str) -> None:
    """A path that cannot be encoded as a file name raises a runtime error."""
    bad = "\ud800"
    call = (lambda: ws.write(bad, b"x")) if op == "write" else (lambda: getattr(ws, op)(bad))
    with pytest.raises((PathOutsideWorkspace, InvalidRequest)):
        call()
