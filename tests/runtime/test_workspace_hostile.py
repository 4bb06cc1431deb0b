"""Hostile paths against :class:`runtime.Workspace` directly: random mixtures of
escape tricks either resolve to something really inside the workspace or raise
one of the runtime's errors, and nothing outside is ever read, written or
removed. Also: length limits, names that are not UTF-8, and removing a tree
deeper than Python's recursion limit."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import example, given, settings, strategies as st

from runtime import SANDBOX_ROOT, InvalidRequest, NotFound, PathOutsideWorkspace, Workspace
from runtime._workspace import NAME_MAX, PATH_MAX, remove_tree, split_path

if TYPE_CHECKING:
    from collections.abc import Iterator

WORKSPACE = "sess_x"
SIBLING = "sess_x-evil"
SECRET = b"SIBLING-SECRET-7f3a"
PASSWD = b"root:OUTSIDE-PASSWD-91c2"
REFUSALS = (PathOutsideWorkspace, NotFound, InvalidRequest)
#: Trees are built and removed on tmpfs when there is one: on this VM's disk
#: (ext4 mounted with ``discard``) each rmdir costs about a millisecond.
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def build_tree(base: Path) -> Workspace:
    """``base/sess_x`` (the workspace, with links out of it), a sibling whose
    name starts with the workspace's, and an ``etc`` outside."""
    ws = base / WORKSPACE
    (ws / "a" / "b").mkdir(parents=True)
    (ws / "a" / "b" / "inner.txt").write_bytes(b"inner")
    (ws / "file.txt").write_bytes(b"inside")
    (base / SIBLING).mkdir()
    (base / SIBLING / "secret").write_bytes(SECRET)
    (base / "etc").mkdir()
    (base / "etc" / "passwd").write_bytes(PASSWD)
    os.symlink(base / "etc", ws / "etc")  # absolute, as `ln -s /etc etc` makes
    os.symlink(f"../{SIBLING}/secret", ws / "passwd")  # relative, to a file
    os.symlink(f"../{SIBLING}", ws / "a" / "sib")  # relative, to a directory
    os.symlink("../..", ws / "a" / "up")
    os.mkfifo(ws / "fifo")
    return Workspace(str(ws))


def snapshot(base: Path) -> dict[str, tuple[str, str]]:
    """Everything under ``base`` except the workspace: type and content/target."""
    seen: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if dirpath == str(base) and WORKSPACE in dirnames:
            dirnames.remove(WORKSPACE)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                seen[path] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                seen[path] = ("dir", "")
            else:
                seen[path] = ("file", hashlib.sha256(Path(path).read_bytes()).hexdigest())
    return seen


def inside(root: str, path: str) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


#: Names of the tree (some several times, so that walks through the links are
#: drawn often) and escape tricks.
COMPONENTS = [
    *["a", "b", "inner.txt", "file.txt", "etc", "passwd", "sib", "up", "new", "secret"] * 3,
    "..",
    ".",
    "%2e",
    "%2e%2e",
    "%252e%252e",
    "..\\..",
    "%00",
    "a\0b",
    SIBLING,
    WORKSPACE,
    "fifo",
    "opt",
    "sandbox",
    "workspace",
    "workspace-evil",
    "\udcff",  # a byte that is not UTF-8, as os.fsdecode gives it
    "\ud800",  # a lone surrogate: no file name encodes it
    "n" * (NAME_MAX + 1),
]
SEPARATORS = ["/", "/", "/", "/", "/", "//", "/./", "\\", "%2f", "%5c"]
PREFIXES = ["", "", "", "", "/", "./", "../", SANDBOX_ROOT + "/", "/opt/sandbox/", "/etc/"]


@st.composite
def hostile_paths(draw: st.DrawFn) -> str:
    """A prefix, then components from COMPONENTS joined by SEPARATORS."""
    parts = draw(st.lists(st.sampled_from(COMPONENTS), max_size=5))
    path = draw(st.sampled_from(PREFIXES))
    for index, part in enumerate(parts):
        path += (draw(st.sampled_from(SEPARATORS)) if index else "") + part
    return path


operations = st.sampled_from(["list", "read", "write", "delete", "stat"])


@settings(max_examples=200, deadline=None, database=None)
@given(path=hostile_paths(), op=operations)
# The links themselves and paths through them, for every operation, always run.
@example(path="passwd", op="read")
@example(path="passwd", op="write")
@example(path="etc/passwd", op="read")
@example(path="etc/passwd", op="write")
@example(path="etc/passwd", op="delete")
@example(path="etc/new/x", op="write")
@example(path="etc", op="list")
@example(path="a/sib/secret", op="read")
@example(path="a/sib", op="list")
@example(path="a/up/sess_x-evil/secret", op="delete")
@example(path="a/up", op="stat")
@example(path=SANDBOX_ROOT + "/../sess_x-evil/secret", op="read")
@example(path="../sess_x-evil/secret", op="write")
def test_workspace_random_hostile_paths_stay_inside(path: str, op: str) -> None:
    """Any mixture of ``..``, encodings, NUL, backslashes, links and the sibling's
    name: the operation acts on something really inside the workspace, or raises
    PathOutsideWorkspace/NotFound/InvalidRequest; nothing outside changes."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        base = Path(tmp)
        ws = build_tree(base)
        before = snapshot(base)
        token = b"TOKEN-" + os.urandom(8).hex().encode()
        try:
            if op == "list":
                listed = ws.list(path)
            elif op == "read":
                data = ws.read(path)
            elif op == "write":
                ws.write(path, token)
            elif op == "delete":
                ws.delete(path)
            else:
                ws.stat(path)
        except REFUSALS:
            pass
        else:
            # It succeeded, so the path split; check where it really landed.
            parts = split_path(path)
            target = os.path.join(ws.root, *parts)
            parent = os.path.join(ws.root, *parts[:-1])
            assert inside(ws.root, parent), (op, path)
            if op == "list":
                assert inside(ws.root, target), (op, path)
                assert [i.name for i in listed] == sorted(os.listdir(target))
            elif op == "read":
                assert inside(ws.root, target), (op, path)
                assert data == Path(target).read_bytes()
                assert SECRET not in data
                assert PASSWD not in data
            elif op == "write":
                assert inside(ws.root, target), (op, path)
                assert not os.path.islink(target)
                assert Path(target).read_bytes() == token
            elif op == "delete":
                assert not os.path.lexists(target), (op, path)
        assert snapshot(base) == before, (op, path)


@pytest.fixture
def tree() -> Iterator[tuple[Path, Workspace]]:
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        base = Path(tmp)
        yield base, build_tree(base)


@pytest.mark.parametrize(
    "path",
    [
        "n" * (NAME_MAX + 1),
        "a/" + "n" * (NAME_MAX + 1) + "/x",
        "é" * (NAME_MAX // 2 + 1),  # 256 bytes once encoded
        "a/" * (PATH_MAX // 2),
        "x" * 20_000,
    ],
    ids=["long-name", "long-middle-name", "long-utf8-name", "over-path-max", "20k"],
)
def test_workspace_too_long_path_is_invalid_request(
    tree: tuple[Path, Workspace], path: str
) -> None:
    """A component over NAME_MAX or a path over PATH_MAX bytes -> InvalidRequest
    (400) for every operation, never a bare ENAMETOOLONG OSError (a 500)."""
    _, ws = tree
    for call in (ws.list, ws.read, ws.stat, ws.delete, lambda p: ws.write(p, b"x")):
        with pytest.raises(InvalidRequest, match="longer than"):
            call(path)


def test_workspace_longest_allowed_name_works(tree: tuple[Path, Workspace]) -> None:
    """A component of exactly NAME_MAX bytes is an ordinary name."""
    _, ws = tree
    name = "n" * NAME_MAX
    ws.write(f"a/{name}", b"ok")
    assert ws.read(f"a/{name}") == b"ok"


def test_workspace_list_names_that_are_not_utf8(tree: tuple[Path, Workspace]) -> None:
    """A name that is not UTF-8 (as a shell can make) lists with U+FFFD, so it
    can be sent as JSON or SSE; the listing still succeeds."""
    _, ws = tree
    Path(os.fsdecode(os.path.join(os.fsencode(ws.root), b"bad\xffname"))).write_bytes(b"x")
    names = [info.name for info in ws.list("")]
    assert "bad\ufffdname" in names
    for name in names:
        name.encode("utf-8")  # no lone surrogate left


def test_workspace_special_files_never_opened(tree: tuple[Path, Workspace]) -> None:
    """A FIFO (no writer), a unix socket and a device node are refused for
    read and write at once (an open of the FIFO would block)."""
    _, ws = tree
    root = Path(ws.root)
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(root / "sock"))
        os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
        for name in ("fifo", "sock", "null"):
            with pytest.raises(PathOutsideWorkspace, match="not a regular file"):
                ws.read(name)
            with pytest.raises(PathOutsideWorkspace, match="not a regular file"):
                ws.write(name, b"x")
            assert ws.kind(name) == "other"
    finally:
        listener.close()


def test_workspace_read_refuses_link_swapped_in_after_stat(tree: tuple[Path, Workspace]) -> None:
    """file.txt is stat'ed as a regular file, then replaced by a link to the
    sibling's secret before the open: O_NOFOLLOW refuses it (403), no byte read."""
    base, ws = tree
    root = Path(ws.root)

    def swap(name: str) -> None:
        if name == "file.txt":
            os.rename(root / "file.txt", root / "moved.txt")
            os.symlink(base / SIBLING / "secret", root / "file.txt")

    ws._for_testing_before_open = swap
    with pytest.raises(PathOutsideWorkspace):
        ws.read("file.txt")
    assert (base / SIBLING / "secret").read_bytes() == SECRET


def test_workspace_write_refuses_parent_swapped_between_components(
    tree: tuple[Path, Workspace],
) -> None:
    """Writing a/b/new: once a is open, b becomes a link to the sibling: the walk
    refuses it (403) and nothing is created in the sibling."""
    base, ws = tree
    root = Path(ws.root)
    before = snapshot(base)

    def swap(name: str) -> None:
        if name == "b":
            os.rename(root / "a" / "b", root / "a" / "b.real")
            os.symlink(base / SIBLING, root / "a" / "b")

    ws._for_testing_before_open = swap
    with pytest.raises(PathOutsideWorkspace, match="symbolic link"):
        ws.write("a/b/new", b"pwned")
    assert snapshot(base) == before
    assert not (base / SIBLING / "new").exists()


# remove_tree


def test_remove_tree_deeper_than_recursion_limit() -> None:
    """A tree 1,500 levels deep (as one PUT of a PATH_MAX path makes), with a link
    to /etc at the bottom: shutil.rmtree raises RecursionError on it (not an
    OSError: ``ignore_errors`` does not help); remove_tree removes it all."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        root = Path(tmp) / "ws"
        root.mkdir()
        ws = Workspace(str(root))
        deep = "/".join(["d"] * 1500)
        ws.write(deep + "/f", b"x")
        os.symlink("/etc", root / deep / "etc")
        with pytest.raises(RecursionError):
            shutil.rmtree(root, ignore_errors=True)
        remove_tree(str(root))
        assert not root.exists()
        assert os.path.exists("/etc/passwd")
        remove_tree(str(root))  # already gone: nothing to do


def test_remove_tree_never_follows_links() -> None:
    """Links inside the tree (and the tree's own path being a link) are removed
    as links: their targets outside are untouched."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        base = Path(tmp)
        ws = build_tree(base)
        before = snapshot(base)
        remove_tree(ws.root)
        assert not os.path.lexists(ws.root)
        assert snapshot(base) == before
        os.symlink(base / SIBLING, base / WORKSPACE)
        remove_tree(str(base / WORKSPACE))
        assert not os.path.lexists(base / WORKSPACE)
        assert (base / SIBLING / "secret").read_bytes() == SECRET
