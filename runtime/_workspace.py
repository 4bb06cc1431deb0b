"""A session's workspace directory and path resolution that cannot escape it.

Paths come from models and clients, so they are hostile. Resolution never
builds a string and hands it to ``open``: it splits the path into components,
refuses ``..``, NUL bytes and absolute paths (other than the sandbox prefix
the agent is told about), then walks the components one ``openat`` at a time
from a descriptor of the workspace root with ``O_NOFOLLOW``, so a symbolic link
anywhere on the way (including one swapped in by a tool meanwhile) is refused,
never followed. Non-regular files (FIFOs, devices) are refused before they can
block a read: their type is checked with ``fstatat`` before anything opens
them, and again with ``fstat`` on the descriptor (a swap in between is caught
there, and ``O_NONBLOCK`` keeps a FIFO swapped in from blocking the open).
Writes go to a new file renamed over the old one, so a reader holding the old
file keeps all of it. Paths longer than the kernel's limits are refused (400)
before any system call.

Why a walk and not ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``: Python
3.11 has no binding (it would be a raw ``syscall(437)`` with a per-architecture
number and a hand-laid ``struct open_how``), kernels before 5.6 and some
seccomp profiles answer ``ENOSYS``/``EPERM`` so the walk is needed as a
fallback anyway, writes need the walk to create parents, and ``..`` is refused
before any system call, so ``RESOLVE_BENEATH`` would add nothing the walk
lacks. The walk costs one ``openat`` per component.

All functions here are blocking and run in worker threads
(``trio.to_thread.run_sync``); they never touch the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from typing import TYPE_CHECKING, Final, final

import attrs

from ._errors import InvalidRequest, NotFound, PathOutsideWorkspace, StorageFull

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The workspace path the agent is told about; file tools map it to the real one.
SANDBOX_ROOT: Final = "/opt/sandbox/workspace"

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Linux's limits, in bytes of the encoded name: longer paths are refused (400)
#: before the kernel says ``ENAMETOOLONG``.
NAME_MAX: Final = 255
PATH_MAX: Final = 4096


def _short(path: str) -> str:
    """``path`` quoted for a message, cut to a readable length."""
    return repr(path) if len(path) <= 80 else repr(path[:60]) + f"... ({len(path)} characters)"


def split_path(path: str) -> tuple[str, ...]:
    """Split ``path`` into components inside the workspace.

    ``""``, ``"."`` and :data:`SANDBOX_ROOT` name the workspace itself.

    Raises:
      PathOutsideWorkspace: for NUL bytes, ``..`` components and absolute
        paths outside :data:`SANDBOX_ROOT`.
      InvalidRequest: for a path that is not encodable as a file name, longer
        than :data:`PATH_MAX` or with a component longer than :data:`NAME_MAX`.
    """
    if "\0" in path:
        raise PathOutsideWorkspace(f"path {_short(path)} contains a NUL byte")
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidRequest(f"path {_short(path)} cannot be encoded as a file name") from None
    if path == SANDBOX_ROOT or path.startswith(SANDBOX_ROOT + "/"):
        path = path[len(SANDBOX_ROOT) :]
    elif path.startswith("/"):
        raise PathOutsideWorkspace(f"path {_short(path)} is absolute and outside the workspace")
    parts = tuple(part for part in path.split("/") if part not in ("", "."))
    if ".." in parts:
        raise PathOutsideWorkspace(f"path {_short(path)} contains '..'")
    if len(encoded) >= PATH_MAX:
        raise InvalidRequest(f"path {_short(path)} is longer than {PATH_MAX - 1} bytes")
    for part in parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InvalidRequest(f"path component {_short(part)} is longer than {NAME_MAX} bytes")
    return parts


@attrs.frozen
class FileInfo:
    """One entry of a directory listing."""

    name: str
    type: str  # "file" | "directory" | "other"
    size: int
    modified: float


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    return "file" if stat.S_ISREG(mode) else "other"


def _display_name(name: str) -> str:
    """A directory entry's name as text: bytes that are not UTF-8 (``os.listdir``
    gives them as lone surrogates, which no JSON encoder or SSE frame can
    carry) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _refuse(path: str, exc: OSError) -> Exception:
    """The runtime error for an ``OSError`` met while resolving ``path``.

    Errors about the path itself are translated, and a full disk (``ENOSPC``,
    ``EDQUOT``, ``EFBIG``: 507); others (``EMFILE``, ``EIO``...) are the
    server's trouble and propagate as they are.
    """
    quoted = _short(path)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return PathOutsideWorkspace(f"path {quoted} goes through a symbolic link or a file")
    if exc.errno == errno.ENOENT:
        return NotFound(f"no such file or directory in the workspace: {quoted}")
    if exc.errno == errno.EISDIR:
        return InvalidRequest(f"{quoted} is a directory")
    if exc.errno == errno.ENOTEMPTY:
        return InvalidRequest(f"directory {quoted} is not empty")
    if exc.errno in (errno.ENXIO, errno.ENODEV):
        return PathOutsideWorkspace(f"{quoted} is not a regular file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PathOutsideWorkspace(f"{quoted}: permission denied")
    if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
        return InvalidRequest(f"{quoted} is not a valid file name here ({exc.strerror})")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageFull(f"cannot write {quoted}: {exc.strerror}")
    return exc


def _check_regular(path: str, mode: int) -> None:
    """Refuse a directory (400) and anything but a regular file (403)."""
    if stat.S_ISDIR(mode):
        raise InvalidRequest(f"{_short(path)} is a directory")
    if stat.S_ISLNK(mode):
        raise PathOutsideWorkspace(f"{_short(path)} is a symbolic link")
    if not stat.S_ISREG(mode):
        raise PathOutsideWorkspace(f"{_short(path)} is not a regular file")


@final
@attrs.define(eq=False)
class Workspace:
    """The directory a session owns; every path is resolved beneath it."""

    root: str
    #: Test hook, called (in the worker thread) with each name just before the
    #: walk opens it (for a write's last name: just before the rename onto it),
    #: so that a test can swap a symbolic link in at that very point.
    _for_testing_before_open: Callable[[str], object] | None = attrs.field(
        default=None, init=False, repr=False
    )

    def _before_open(self, name: str) -> None:
        if self._for_testing_before_open is not None:
            self._for_testing_before_open(name)

    @contextlib.contextmanager
    def _open_dir(self, parts: tuple[str, ...], *, create: bool = False) -> Iterator[int]:
        """Yield a descriptor of the directory ``parts`` (walked, never followed)."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                self._before_open(part)
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    # O_NOFOLLOW|O_DIRECTORY says ENOTDIR for a symlink too:
                    # tell a link (refused, 403) from a plain file (404). A
                    # directory here was a link a moment ago (swapped back).
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
                        raise PathOutsideWorkspace(
                            f"path component {_short(part)} is a symbolic link"
                        ) from None
                    raise NotFound(f"{_short(part)} is a file, not a directory") from None
                os.close(fd)
                fd = next_fd
            yield fd
        finally:
            os.close(fd)

    def list(self, path: str = "") -> list[FileInfo]:
        """List one level of the directory ``path``, sorted by name.

        Names that are not UTF-8 are shown with U+FFFD in place of the bad bytes.
        """
        parts = split_path(path)
        try:
            with self._open_dir(parts) as fd:
                infos = []
                for name in sorted(os.listdir(fd)):
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since listdir
                    infos.append(
                        FileInfo(_display_name(name), _kind(st.st_mode), st.st_size, st.st_mtime)
                    )
                return infos
        except OSError as exc:
            raise _refuse(path, exc) from None

    def read(self, path: str, *, limit: int | None = None) -> bytes:
        """Return the bytes of the regular file ``path`` (at most ``limit``)."""

        def first(size: int) -> tuple[int, int] | None:
            return None if limit is None else (0, min(limit, size) - 1)

        return self.read_range(path, first)[0]

    def stat(self, path: str) -> FileInfo:
        """The entry ``path`` (not followed if it is a symbolic link)."""
        parts = split_path(path)
        try:
            with self._open_dir(parts[:-1]) as dir_fd:
                name = parts[-1] if parts else "."
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise _refuse(path, exc) from None
        return FileInfo(parts[-1] if parts else "", _kind(st.st_mode), st.st_size, st.st_mtime)

    def kind(self, path: str) -> str:
        """``"file"``, ``"directory"`` or ``"other"``."""
        return self.stat(path).type

    def open_regular(self, path: str) -> tuple[int, int]:
        """Open the regular file ``path`` for reading; return (fd, size).

        The caller owns the descriptor, which stays on this very file whatever
        is renamed or swapped in at ``path`` afterwards. FIFOs, sockets,
        devices, directories and symbolic links are refused without being
        opened (a device's open can have effects; a FIFO's can block).
        """
        parts = split_path(path)
        if not parts:
            raise InvalidRequest(f"{_short(path)} is a directory")
        try:
            with self._open_dir(parts[:-1]) as dir_fd:
                _check_regular(
                    path, os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False).st_mode
                )
                self._before_open(parts[-1])
                # Swapped since the stat? O_NOFOLLOW refuses a link (ELOOP),
                # O_NONBLOCK keeps a FIFO from blocking, fstat below refuses it.
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(parts[-1], flags, dir_fd=dir_fd)
        except OSError as exc:
            raise _refuse(path, exc) from None
        try:
            st = os.fstat(fd)
            _check_regular(path, st.st_mode)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def read_range(
        self, path: str, choose: Callable[[int], tuple[int, int] | None]
    ) -> tuple[bytes, int, tuple[int, int] | None]:
        """Read the inclusive byte range that ``choose(size)`` picks (None: all).

        Returns:
          (bytes, size of the file, the range read or None). ``choose`` sees
          the size of the very file that is read, so a range cannot be computed
          for one file and served from another swapped in meanwhile.
        """
        fd, size = self.open_regular(path)
        with os.fdopen(fd, "rb") as f:
            span = choose(size)
            if span is None:
                return f.read(), size, None
            f.seek(span[0])
            return f.read(span[1] - span[0] + 1), size, span

    def write(self, path: str, data: bytes) -> FileInfo:
        """Create or replace the regular file ``path``, creating its parents.

        The bytes go to a new file that is then renamed over ``path``: a
        download (or ``read_file``) that has the old file open keeps reading
        all of it, and a failed write leaves the old file as it was. A link,
        FIFO, socket or device at ``path`` is refused (403), never opened; a
        link swapped in just before the rename is replaced, never followed.
        """
        parts = split_path(path)
        if not parts:
            raise InvalidRequest("cannot write to the workspace directory itself")
        name = parts[-1]
        try:
            with self._open_dir(parts[:-1], create=True) as dir_fd:
                with contextlib.suppress(FileNotFoundError):
                    _check_regular(
                        path, os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
                    )
                temp = f".upload-{secrets.token_hex(8)}.tmp"
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(temp, flags, 0o644, dir_fd=dir_fd)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                        f.flush()
                        st = os.fstat(f.fileno())
                    self._before_open(name)
                    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temp, dir_fd=dir_fd)
                    raise
                return FileInfo(name, "file", st.st_size, st.st_mtime)
        except OSError as exc:
            raise _refuse(path, exc) from None

    def delete(self, path: str) -> None:
        """Remove the file (or empty directory) ``path``; a symbolic link is
        removed itself, never what it points to."""
        parts = split_path(path)
        if not parts:
            raise InvalidRequest("cannot delete the workspace directory itself")
        try:
            with self._open_dir(parts[:-1]) as dir_fd:
                st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(parts[-1], dir_fd=dir_fd)
                else:
                    os.unlink(parts[-1], dir_fd=dir_fd)
        except OSError as exc:
            raise _refuse(path, exc) from None


def remove_tree(path: str) -> None:
    """Remove the directory tree ``path``, however deep, never following a link.

    ``shutil.rmtree`` recurses once per level and raises ``RecursionError``
    (not an ``OSError``: ``ignore_errors`` does not catch it) on a tree about
    1,000 levels deep, which one upload or one shell command can make. This
    walks down and back up with one descriptor open at a time, checking on the
    way up through ``..`` that it is back in the directory it came from.

    Raises:
      OSError: when an entry cannot be removed, or the tree was moved while
        being removed (``ESTALE``); what could be removed is gone.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(path)  # a link or a file where the tree was: remove it, not its target
        return
    # (st_dev, st_ino) of each directory above the open one, with the name we went into.
    above: list[tuple[int, int, str]] = []
    try:
        while True:
            with os.scandir(fd) as entries:
                listed = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
            child = next((name for name, is_dir in listed if is_dir), None)
            for name, is_dir in listed:
                if not is_dir:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=fd)
            if child is not None:
                st = os.fstat(fd)
                next_fd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                above.append((st.st_dev, st.st_ino, child))
                os.close(fd)
                fd = next_fd
                continue
            if not above:
                break
            dev, ino, name = above.pop()
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise OSError(errno.ESTALE, f"{path!r} was moved while being removed")
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)
