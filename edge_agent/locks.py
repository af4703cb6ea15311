"""Lock files that keep two processes on one host from sharing what one must own.

An edge agent's outbox and MQTT client id, and a re-scorer's default client id,
are each held by an exclusive ``flock`` on a small file that names the holder's
pid. The kernel drops the lock when the process ends, however it ends, so a
restarted process takes back what it held, and a second one gets a clear
"in use by pid N" instead of two processes fighting over one outbox or one
broker session. Where there is no ``flock`` (Windows) nothing is refused.

numpy-free and torch-free: the edge agent and ``teacher serve`` both import it.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from edge_agent import logger
from flows.errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

RUN_DIR_ENV = "GATEWATCH_RUN_DIR"  # where the locks of client ids in use live
# What flock raises on a file system that cannot lock (some network mounts).
NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})


def run_folder() -> Path:
    """Where the locks of client ids live: ``$GATEWATCH_RUN_DIR`` (an absolute
    path), else ``/tmp/gatewatch-<uid>``; the same for agents and re-scorers, so
    each sees the ids the other holds.

    One place whatever the session: a process started from a login shell
    (``$XDG_RUNTIME_DIR``, ``$TMPDIR`` set) and one started by cron must find
    each other's locks, so neither variable moves it; a relative
    ``$GATEWATCH_RUN_DIR`` would differ with the working folder and is refused.
    Units with ``PrivateTmp=`` each see a /tmp of their own: they need
    ``$GATEWATCH_RUN_DIR`` set to one folder they share.
    """
    given = os.environ.get(RUN_DIR_ENV)
    if given:
        if not os.path.isabs(given):
            raise UsageError(
                f"{RUN_DIR_ENV}={given!r} is a relative path; processes started "
                "from other folders would not see its locks: give an absolute one"
            )
        return Path(given)
    if not hasattr(os, "getuid"):  # no POSIX users: the platform's temp folder
        return Path(tempfile.gettempdir()) / "gatewatch"
    return Path("/tmp") / f"gatewatch-{os.getuid()}"


def own_folder(folder: Path, purpose: str, hint: str) -> None:
    """Make ``folder`` (mode 0700) if absent; UsageError, saying what it is for
    (``purpose``) and what to do (``hint``), unless it is then a real folder of
    this user that no one else can write in (others could hold or take the ids
    by putting lock files there)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError as exc:
        raise UsageError(
            f"cannot use {folder} for {purpose} ({exc.strerror or exc}); {hint}"
        ) from exc
    if not stat.S_ISDIR(info.st_mode) or (
        hasattr(os, "getuid") and info.st_uid != os.getuid()
    ):
        raise UsageError(
            f"{folder} (for {purpose}) is not a folder of this user; {hint}"
        )
    if hasattr(os, "getuid") and info.st_mode & 0o022:
        raise UsageError(
            f"{folder} (for {purpose}) is writable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); chmod 700 it or {hint}"
        )


def try_lock(
    path: Path, *, write_pid: bool = True, create: bool = True
) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``path`` (never
    through a symlink); None when another process holds it. OSError when the
    file cannot be made, opened or locked (``errno`` in :data:`NO_FLOCK` where
    the file system has no locks). Closing the descriptor lets the lock go.

    ``write_pid``: write this pid in the file, for the error line of a second
    process (:func:`holder`). Without it the file is opened read-only and never
    written: a lock whose file must stay as it was made (a gateway's flash
    lock). ``create``: make the file when it is absent (mode 0600); without it
    a missing file is an OSError (``FileNotFoundError``).
    """
    flags = (os.O_RDWR if write_pid else os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0)
    if create:
        flags |= os.O_CREAT
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise

    if not write_pid:
        return fd
    try:  # who holds it, for the error line of a second process
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        logger.debug("could not note the pid in %s: %s", path, exc)
    return fd


def holder(lock: Path) -> str:
    """Who holds ``lock``, from the pid its holder wrote there: ``pid 123``, or
    ``pid unknown`` when none can be read (written a moment later, say)."""
    try:
        text = lock.read_text(encoding="ascii", errors="replace")[:32].strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
