"""Output files that are never overwritten unasked, and never left half written.

A command that writes one file (``flows convert -o``, ``edge-agent pack-update
-o``) refuses a name that already exists unless ``--force`` is given, before any
work (:func:`refuse_existing`, a usage error, exit 2, in the words ``teacher
baselines --out`` uses). The file is then written under a temporary name in the
same folder and renamed into place (:func:`put_in_place`), so a write that fails
part way (a full disk) leaves the old file, or none, never a cut one. Without
``--force`` the rename does not replace a file that appeared meanwhile (another
run, say): :class:`FileExistsError`, for the caller to report.

Standard library only: the edge agent uses it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from flows.errors import UsageError

__all__ = ["put_in_place", "refuse_existing", "temporary_beside", "write_file"]


def refuse_existing(path: str | Path, flag: str, force: bool, shown=None) -> None:
    """UsageError when ``path`` exists (a dangling link counts) and not ``force``;
    ``flag`` and ``shown`` (default: ``path``) name it in the message."""
    if force:
        return
    path = Path(path)
    if path.exists() or path.is_symlink():
        name = path if shown is None else shown
        raise UsageError(f"{flag} {name} already exists; pass --force to "
                         "overwrite it, or name a new file")


def temporary_beside(path: Path) -> Path:
    """A name for the temporary file of ``path``, in its folder: hidden, and one
    per process, so two runs writing the same output do not share it."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


# Errors of a hard link that say the file system cannot make one (FAT, some
# network or FUSE mounts), not that something is in the way.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}


def put_in_place(tmp: Path, path: Path, force: bool) -> None:
    """Rename the finished ``tmp`` to ``path``. With ``force`` an existing file is
    replaced in one step; without it a file that appeared there since the check
    is kept and FileExistsError raised (``tmp`` is left for the caller to remove).
    """
    if force:
        os.replace(tmp, path)
        return
    try:
        # A hard link fails when the name is taken: no window in which another
        # file could be overwritten, as there is between a check and a rename.
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST),
                                  str(path)) from exc
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_file(path: str | Path, data: bytes, force: bool) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it (see the
    module doc). A symbolic link is followed: the file it names is written and
    the link stays. OSError as the write or the rename raised it; the temporary
    file is removed whatever happened."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    tmp = temporary_beside(path)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        put_in_place(tmp, path, force)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
