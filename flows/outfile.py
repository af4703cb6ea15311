"""Output files that are never overwritten unasked, and never left half written.

A command that writes one file (``flows convert -o``, ``edge-agent pack-update
-o``) checks its name before any work (:func:`check_output`, a usage error, exit
2): an empty name, ``-``, a folder, anything there that is not a regular file (a
device, FIFO or socket: the rename would put a regular file in its place; refused
with ``--force`` too) and a folder that does not exist or cannot be written in.
It refuses a name that already exists unless ``--force`` is given
(:func:`refuse_existing`, in the words ``teacher baselines --out`` uses). The
file is then written under a temporary name in the same folder and renamed into
place (:func:`put_in_place`), so a write that fails part way (a full disk) leaves
the old file, or none, never a cut one. Without ``--force`` the rename does not
replace a file that appeared meanwhile (another run, say):
:class:`FileExistsError`, for the caller to report.

Standard library only: the edge agent uses it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from flows.argtypes import check_writable_above, nearest_existing
from flows.errors import UsageError

__all__ = [
    "check_output", "not_regular", "put_in_place", "refuse_existing",
    "temporary_beside", "write_file",
]

NOT_REGULAR = "exists and is not a regular file (a device, FIFO or socket)"


def not_regular(shown: object, flag: str) -> str:
    """The message for an output that is a device, FIFO or socket."""
    return f"{shown} {NOT_REGULAR}; {flag} needs a regular file name"


def check_output(name: str | os.PathLike, flag: str, example: str = "out") -> Path:
    """Refuse (UsageError, exit 2) an output file name nothing can be written to,
    before any work; return the file to write: a link's target, else the name
    in its resolved folder. Refused, with or without ``--force``: an empty name;
    ``-`` (the output is a file renamed into place, not standard output); a name
    ending in a slash; a folder; a device, FIFO or socket (directly or through a
    link); a folder (the link target's, for a link) that does not exist, is a
    file or cannot be written in. ``flag`` names the option in the message,
    ``example`` is a file name to suggest. Whether the name may be replaced is
    :func:`refuse_existing`'s (a dangling link counts as existing)."""
    name = os.fspath(name)
    if not name.strip():
        raise UsageError(f"{flag} is an empty output path; give a file name")
    if name == "-":
        raise UsageError(
            f"{flag} - (standard output) is not supported: the output is written "
            "to a file, replaced only once complete; give a file name"
        )
    if name.endswith(("/", os.sep)) and not Path(name).is_dir():
        raise UsageError(
            f"{flag} {name} ends in a slash, which names a folder, and there is no "
            f"such folder; {flag} needs a file name (such as "
            f"{name.rstrip('/' + os.sep) or '.'}/{example})"
        )
    out = Path(name)
    try:
        if out.is_symlink():
            out = out.resolve(strict=False)
        else:
            out = out.parent.resolve() / out.name
        exists = out.exists()
        if exists and out.is_dir():
            raise UsageError(f"{name} is a folder; {flag} needs a file name")
        if exists and not out.is_file():
            raise UsageError(not_regular(name, flag))
        folder = out.parent
        above = nearest_existing(folder)
        if above != folder and above.is_dir():
            raise UsageError(
                f"{flag} {name}: the folder {folder} does not exist; make it first"
            )
        # A file at or above the folder, or a folder that cannot be written in.
        check_writable_above(folder, f"{flag} {name}")
    except (RuntimeError, OSError) as exc:
        raise UsageError(
            f"{name}: cannot be used as {flag} (a symbolic link loop or a bad path)"
        ) from exc
    return out


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
    A device, FIFO or socket at ``path`` is never replaced, with ``force`` too
    (UsageError: one made since :func:`check_output` looked).
    """
    if force:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UsageError(f"{path} {NOT_REGULAR}; it is not replaced")
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
