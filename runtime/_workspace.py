"""A session's workspace directory and path resolution that cannot escape it.

Paths come from models and clients, so they are hostile. Resolution never
builds a string and hands it to ``open``: it splits the path into components,
refuses ``..``, NUL bytes and absolute paths (other than the sandbox prefix
the agent is told about), then walks the components one ``openat`` at a time
from a descriptor of the workspace root with ``O_NOFOLLOW``, so a symbolic link
anywhere on the way (including one swapped in by a tool meanwhile) is refused,
never followed. Non-regular files (FIFOs, devices) are refused before they can
block a read.

All functions here are blocking and run in worker threads
(``trio.to_thread.run_sync``); they never touch the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import TYPE_CHECKING, Final, final

import attrs

from ._errors import InvalidRequest, NotFound, PathOutsideWorkspace

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The workspace path the agent is told about; file tools map it to the real one.
SANDBOX_ROOT: Final = "/opt/sandbox/workspace"

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_path(path: str) -> tuple[str, ...]:
    """Split ``path`` into components inside the workspace.

    ``""``, ``"."`` and :data:`SANDBOX_ROOT` name the workspace itself.

    Raises:
      PathOutsideWorkspace: for NUL bytes, ``..`` components and absolute
        paths outside :data:`SANDBOX_ROOT`.
    """
    if "\0" in path:
        raise PathOutsideWorkspace(f"path {path!r} contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidRequest(f"path {path!r} cannot be encoded as a file name") from None
    if path == SANDBOX_ROOT or path.startswith(SANDBOX_ROOT + "/"):
        path = path[len(SANDBOX_ROOT) :]
    elif path.startswith("/"):
        raise PathOutsideWorkspace(f"path {path!r} is absolute and outside the workspace")
    parts = tuple(part for part in path.split("/") if part not in ("", "."))
    if ".." in parts:
        raise PathOutsideWorkspace(f"path {path!r} contains '..'")
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


def _refuse(path: str, exc: OSError) -> Exception:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return PathOutsideWorkspace(f"path {path!r} goes through a symbolic link or a file")
    if exc.errno == errno.ENOENT:
        return NotFound(f"no such file or directory in the workspace: {path!r}")
    if exc.errno == errno.EISDIR:
        return InvalidRequest(f"{path!r} is a directory")
    if exc.errno == errno.ENOTEMPTY:
        return InvalidRequest(f"directory {path!r} is not empty")
    if exc.errno in (errno.ENXIO, errno.ENODEV):
        return PathOutsideWorkspace(f"{path!r} is not a regular file")
    return exc


@final
@attrs.define(eq=False)
class Workspace:
    """The directory a session owns; every path is resolved beneath it."""

    root: str

    @contextlib.contextmanager
    def _open_dir(self, parts: tuple[str, ...], *, create: bool = False) -> Iterator[int]:
        """Yield a descriptor of the directory ``parts`` (walked, never followed)."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    # O_NOFOLLOW|O_DIRECTORY says ENOTDIR for a symlink too:
                    # tell a link (refused, 403) from a plain file (404).
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise PathOutsideWorkspace(
                            f"path component {part!r} is a symbolic link"
                        ) from None
                    raise NotFound(f"{part!r} is a file, not a directory") from None
                os.close(fd)
                fd = next_fd
            yield fd
        finally:
            os.close(fd)

    def list(self, path: str = "") -> list[FileInfo]:
        """List one level of the directory ``path``, sorted by name."""
        parts = split_path(path)
        try:
            with self._open_dir(parts) as fd:
                infos = []
                for name in sorted(os.listdir(fd)):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    infos.append(FileInfo(name, _kind(st.st_mode), st.st_size, st.st_mtime))
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

        The caller owns the descriptor. FIFOs, devices, directories and
        symbolic links are refused before anything is read.
        """
        parts = split_path(path)
        if not parts:
            raise InvalidRequest(f"{path!r} is a directory")
        try:
            with self._open_dir(parts[:-1]) as dir_fd:
                # O_NONBLOCK: opening a FIFO must not wait for a writer.
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(parts[-1], flags, dir_fd=dir_fd)
        except OSError as exc:
            raise _refuse(path, exc) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise InvalidRequest(f"{path!r} is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise PathOutsideWorkspace(f"{path!r} is not a regular file")
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
        """Create or replace the regular file ``path``, creating its parents."""
        parts = split_path(path)
        if not parts:
            raise InvalidRequest("cannot write to the workspace directory itself")
        try:
            with self._open_dir(parts[:-1], create=True) as dir_fd:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(parts[-1], flags | os.O_NONBLOCK, 0o644, dir_fd=dir_fd)
                with os.fdopen(fd, "wb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        raise PathOutsideWorkspace(f"{path!r} is not a regular file")
                    f.write(data)
                st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                return FileInfo(parts[-1], "file", st.st_size, st.st_mtime)
        except OSError as exc:
            raise _refuse(path, exc) from None

    def delete(self, path: str) -> None:
        """Remove the file (or empty directory) ``path``."""
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
