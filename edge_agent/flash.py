"""Install a verified bundle into a gateway root, and the A/B model slots it uses.

``root`` stands for the gateway's ``/``. After :func:`flash` it holds::

    opt/gatewatch/releases/<agent version>-<wheels digest>/venv   the agent's venv
    opt/gatewatch/venv -> releases/<...>/venv                      the active release
    opt/gatewatch/models/{A,B}/                                    model slots
    opt/gatewatch/models/current -> A | B                          the active slot
    opt/gatewatch/models/slots.json                                what each slot holds
    opt/gatewatch/flashed.json, opt/gatewatch/.flash.lock          last bundle; lock
    etc/gatewatch/gateway.toml, etc/gatewatch/update.pub           config, OTA key
    etc/systemd/system/gatewatch-agent.service                     the unit

A slot holds the artifact's files and, when the bundle carries one, the site's
``site_thresholds.json``, which the agent prefers to the artifact's thresholds. The
config is installed as it is, so its ``artifact`` must be
``/opt/gatewatch/models/current`` and its ``update_public_key`` (when set)
``/etc/gatewatch/update.pub``; flash refuses a bundle whose config says otherwise
(:func:`edge_agent.bundle.check_flashed_paths`).

Nothing under ``root`` changes until the whole bundle is verified (signature, every
hash, no links or escaping names), its config points at this layout, its model is
not older than the running one (unless ``allow_downgrade``), the venv is installed
from the bundled wheels with no index, and the bundled model passes its health check
inside that venv. Switches are symlink renames, so a reader sees the old target or
the new one, never a mix.

A bundle whose model is the one already active (same ``model_version`` and the
same model files, compared by sha256: the bundle's from its signed manifest, the
slot's hashed on disk) leaves the model slots as they are, so the other slot keeps
the model a rollback goes back to; the release, config, key and unit are installed
as ever. Same ``model_version`` but other files (new site thresholds, another
build) is another model: installed into the other slot, with a warning naming the
files that differ. Every Python that flash
runs gets an environment without the ``PYTHON*`` variables that change what it
imports (:func:`_clean_env`), and a release is used only once its venv has its own
``bin/edge-agent`` and imports ``edge_agent`` from itself (:func:`_release_problem`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent import bundle as bundle_mod
from edge_agent import logger, signing
from flows.errors import (
    BadInputError,
    GatewatchError,
    ModelError,
    UsageError,
    json_problem,
)

SLOTS = ("A", "B")
CURRENT = "current"
STATE_FILE = "slots.json"
COMPLETE = ".complete"
# slots.json's list of the models an operator rolled back from (see ModelSlots).
ROLLED_BACK = "rolled_back"
MAX_ROLLED_BACK = 16  # the newest marks kept; older ones name long-gone models
# A slot record's mark of a model installed and never yet made active (see install).
PENDING = "never_active"
# slots.json's record of the newest model ever made active: the downgrade floor.
NEWEST = "newest_active"
STAGING_PREFIX = ".incoming-"  # + pid + "-": a folder being filled next to the slots
# A staging folder with no pid in its name (``.incoming-XXXX``: agents of earlier
# versions name their model-update staging so) is removed only once it is this old.
UNNAMED_STAGING_AGE = 3600.0
UNPACK_PREFIX = "gatewatch-flash-"  # + pid + "-": a bundle unpacked in the temp folder
FLASHED_FILE = "flashed.json"  # in /opt/gatewatch: the last bundle flashed (flash)
LOCK_FILE = ".flash.lock"  # in /opt/gatewatch: held while a flash installs


class FlashError(GatewatchError):
    """Installing a verified bundle failed part way; the previous install is kept."""


# ------------------------------------------------------------------------ model slots


class ModelSlots:
    """Two model slots and the ``current`` symlink that picks one, in ``models_dir``.

    The active slot is never written; updates go to the other one and become active
    by an atomic rename of ``current``. ``slots.json`` records what each slot holds
    (``model_version``, ``sha256`` of what was installed, ``issued_at``, ``source``)
    and, under ``rolled_back``, the models an operator's rollback left (a list of
    ``{"model_version", "sha256", "slot", "rolled_back_at"}``, newest last): a
    model update of such a model (its version, or that very archive) is refused,
    so that a retained update does not undo the rollback at the agent's next
    start; flashing that model, or rolling back to it, clears its mark. A file
    without the list (written before it existed) holds nothing back.
    ``newest_active`` (``{"model_version", "issued_at"}``) records the newest
    model (by issue time) ever made active: the floor under which model updates
    are refused as downgrades (:meth:`floor`), which a rollback does not lower.
    """

    def __init__(self, models_dir: str | Path) -> None:
        self.dir = Path(models_dir)

    @property
    def current_path(self) -> Path:
        """The ``current`` symlink: the path an agent loads its model from."""
        return self.dir / CURRENT

    def path(self, slot: str) -> Path:
        """Folder of one slot."""
        if slot not in SLOTS:
            raise UsageError(f"model slot must be one of {SLOTS}, not {slot!r}")
        return self.dir / slot

    def active(self) -> str | None:
        """The slot ``current`` points at, or None before the first install."""
        link = self.current_path
        if not link.is_symlink():
            if link.exists():
                raise BadInputError(
                    f"not a symlink to a model slot ({' or '.join(SLOTS)})",
                    path=str(link),
                )
            return None
        target = os.readlink(link)
        if target not in SLOTS:
            raise BadInputError(
                f"points at {target!r}, not a model slot ({' or '.join(SLOTS)})",
                path=str(link),
            )
        return target

    def inactive(self) -> str:
        """The slot an update may overwrite."""
        active = self.active()
        return SLOTS[1] if active == SLOTS[0] else SLOTS[0]

    def state(self) -> dict[str, Any]:
        """The recorded contents of each slot (empty before the first install).

        A file that is not a JSON object whose ``A`` and ``B`` are objects (or null)
        with a numeric ``issued_at`` is a BadInputError (exit 3) naming it.
        """
        path = self.dir / STATE_FILE
        if not path.exists():
            return {}
        expected = (
            'expected a JSON object like {"A": {"model_version": ..., "issued_at": '
            '<seconds>, ...}, "B": null}, as flash and model updates write it'
        )
        try:
            data = json.loads(path.read_text())
        except (OSError, RecursionError, ValueError) as exc:
            raise BadInputError(
                f"slot state is unreadable ({json_problem(exc)}); {expected}",
                path=str(path),
            ) from exc
        if not isinstance(data, dict):
            raise BadInputError(
                f"slot state is a JSON {type(data).__name__}; {expected}",
                path=str(path),
            )

        for slot in SLOTS:
            info = data.get(slot)
            if info is not None and not isinstance(info, dict):
                raise BadInputError(
                    f"slot {slot} is recorded as a JSON {type(info).__name__}; "
                    f"{expected}",
                    path=str(path),
                )
            issued = (info or {}).get("issued_at")
            if issued is not None and not _is_finite_number(issued):
                raise BadInputError(
                    f"slot {slot} has issued_at {str(issued)[:40]!r}, not a time in "
                    f"seconds; {expected}",
                    path=str(path),
                )
        problem = _rolled_back_problem(data.get(ROLLED_BACK))
        if problem is not None:
            raise BadInputError(
                f"{problem}; expected {ROLLED_BACK} to be a list of objects like "
                '{"model_version": ..., "sha256": ..., "rolled_back_at": <seconds>}, '
                "as rollback writes it",
                path=str(path),
            )
        return data

    def info(self, slot: str | None) -> dict[str, Any]:
        """What the state file says about ``slot`` ({} when nothing)."""
        if slot is None:
            return {}
        return dict(self.state().get(slot) or {})

    def staging(self) -> Path:
        """A fresh folder next to the slots (same file system, so a rename moves it),
        named ``.incoming-<pid>-...`` so that :meth:`remove_stale_staging` knows
        whose it is."""
        self.dir.mkdir(parents=True, exist_ok=True)
        prefix = f"{STAGING_PREFIX}{os.getpid()}-"
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.dir))

    def remove_stale_staging(self) -> list[Path]:
        """Remove the staging folders that a killed flash or update left: those
        whose pid no longer runs, and those of the older unnamed kind
        (``.incoming-XXXX``, from before the pid was in the name) last changed
        more than :data:`UNNAMED_STAGING_AGE` seconds ago: an agent of an earlier
        version may be filling a younger one with a model update. Returns them."""
        return _remove_dead(
            self.dir, STAGING_PREFIX, unnamed_older_than=UNNAMED_STAGING_AGE
        )

    def install(self, slot: str, staged: Path, info: dict[str, Any]) -> Path:
        """Move ``staged`` into ``slot`` (which must not be active) and record it,
        marked as never active (``never_active``) until :meth:`switch` makes it
        active: a rollback refuses such a slot (a flash or update killed between
        the install and the switch leaves one).

        The record comes first, before the slot's folder is touched: a failure or
        a kill at any later step (the old model half removed, the new one not yet
        renamed in) leaves a slot marked never active, which rollback refuses,
        never the new model under the old model's record."""
        if slot == self.active():
            raise UsageError(f"model slot {slot} is active; refusing to overwrite it")
        target = self.path(slot)

        self._record(slot, {**info, "installed_at": time.time(), PENDING: True})
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
        return target

    def switch(self, slot: str) -> None:
        """Make ``slot`` the active one with one atomic rename of ``current``,
        then drop the never-active mark of it and of the slot it leaves (best
        effort: a mark left on the active slot is dropped at the next switch)."""
        self.path(slot)
        left = self.active()
        tmp = self.dir / f".{CURRENT}-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(slot, tmp)
        os.replace(tmp, self.current_path)
        _fsync_dir(self.dir)
        logger.info("model slot %s is active in %s", slot, self.dir)
        try:
            state = self.state()
            marked = [
                s for s in {slot, left} - {None} if (state.get(s) or {}).get(PENDING)
            ]
            for name in marked:
                state[name] = {
                    k: v for k, v in state[name].items() if k != PENDING
                }
            # The floor of later updates: a rollback never lowers it.
            newest = self._floor(state)
            moved = newest is not None and newest != state.get(NEWEST)
            if moved:
                state[NEWEST] = newest
            if marked or moved:
                _write_atomic(
                    self.dir / STATE_FILE, json.dumps(state, indent=1).encode()
                )
        except (OSError, GatewatchError) as exc:
            logger.warning(
                "model slot %s is active, but %s could not be updated (%s)",
                slot,
                self.dir / STATE_FILE,
                exc,
            )

    def floor(self) -> dict[str, Any] | None:
        """The newest model (by ``issued_at``) ever made active in these slots,
        as ``{"model_version", "issued_at"}``; None when no slot records an
        issue time. A model update issued before it is a downgrade, also after
        a rollback made an older model active: the updates published between
        the two stay refused. A ``slots.json`` written before the record existed
        gives the newest of the slots that were active (not ``never_active``)."""
        return self._floor(self.state())

    @staticmethod
    def _floor(state: dict[str, Any]) -> dict[str, Any] | None:
        """:meth:`floor` of a read ``state``."""
        newest = state.get(NEWEST)
        if not (
            isinstance(newest, dict) and _is_finite_number(newest.get("issued_at"))
        ):
            newest = None
        for slot in SLOTS:
            info = state.get(slot) or {}
            if not info.get(PENDING):
                newest = _newer_floor(newest, info)
        return newest

    def rolled_back(self) -> list[dict[str, Any]]:
        """The marks of the models an operator rolled back from, oldest first
        ([] for a state file written before marks existed)."""
        return [dict(mark) for mark in self.state().get(ROLLED_BACK) or []]

    def held_back(
        self, version: str, sha256: str | None, running: str | None = None
    ) -> dict[str, Any] | None:
        """The rollback mark that holds back an update of model ``version`` whose
        archive has ``sha256``, or None.

        An update is held back when it is the very archive a rollback left, or
        carries a rolled-back model version that is not the running one (a slot
        recorded as rolled back from and yet running is one a crash left between
        the mark and the switch).
        """
        digest = None if sha256 is None else sha256.lower()
        for mark in reversed(self.rolled_back()):
            if digest is not None and str(mark.get("sha256")).lower() == digest:
                return mark
            if mark.get("model_version") == version and version != running:
                return mark
        return None

    def mark_rolled_back(self, left: dict[str, Any], back_to: str | None) -> None:
        """Record that a rollback leaves the model ``left`` (a slot's record) for
        model ``back_to``, in one write: the operator chose ``back_to``, so a mark
        of it goes; the model left is held back from now on."""
        state = self.state()
        marks = [
            m
            for m in state.get(ROLLED_BACK) or []
            if m.get("model_version") not in (back_to, left.get("model_version"))
        ]
        version = left.get("model_version")
        if isinstance(version, str) and version != back_to:
            marks.append(
                {
                    "model_version": version,
                    "sha256": left.get("sha256"),
                    "slot": left.get("slot"),
                    "rolled_back_at": time.time(),
                }
            )
        state[ROLLED_BACK] = marks[-MAX_ROLLED_BACK:]
        _write_atomic(self.dir / STATE_FILE, json.dumps(state, indent=1).encode())

    def clear_rolled_back(self, version: str) -> bool:
        """Forget the rollback mark of model ``version`` (an operator flashed it);
        whether there was one. A state file without marks is left as it is."""
        state = self.state()
        marks = state.get(ROLLED_BACK) or []
        kept = [m for m in marks if m.get("model_version") != version]
        if len(kept) == len(marks):
            return False
        state[ROLLED_BACK] = kept
        _write_atomic(self.dir / STATE_FILE, json.dumps(state, indent=1).encode())
        logger.info(
            "model %s is no longer held back as rolled back (flashed again)", version
        )
        return True

    def _record(self, slot: str, info: dict[str, Any] | None) -> None:
        state = self.state()
        state[slot] = info
        _write_atomic(self.dir / STATE_FILE, json.dumps(state, indent=1).encode())


def _newer_floor(
    floor: dict[str, Any] | None, info: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The newer of a downgrade ``floor`` and a slot record ``info`` (by their
    ``issued_at``), as a floor record; ``floor`` when ``info`` has no time."""
    issued = (info or {}).get("issued_at")
    if not _is_finite_number(issued):
        return floor
    if floor is not None and float(floor["issued_at"]) >= float(issued):
        return floor
    return {"model_version": info.get("model_version"), "issued_at": float(issued)}


def _rolled_back_problem(marks: Any) -> str | None:
    """What is wrong with a state file's ``rolled_back`` list, or None (absent is
    fine: nothing is held back)."""
    if marks is None:
        return None
    if not isinstance(marks, list):
        return f"{ROLLED_BACK} is a JSON {type(marks).__name__}"
    for n, mark in enumerate(marks, start=1):
        if not isinstance(mark, dict):
            return f"{ROLLED_BACK} entry {n} is a JSON {type(mark).__name__}"
        version = mark.get("model_version")
        if not isinstance(version, str):
            return (
                f"{ROLLED_BACK} entry {n} has model_version {str(version)[:40]!r}, "
                "not a string"
            )
        digest = mark.get("sha256")
        if digest is not None and not isinstance(digest, str):
            return (
                f"{ROLLED_BACK} entry {n} has sha256 {str(digest)[:40]!r}, not a "
                "string"
            )
        when = mark.get("rolled_back_at")
        if when is not None and not _is_finite_number(when):
            return (
                f"{ROLLED_BACK} entry {n} has rolled_back_at {str(when)[:40]!r}, not "
                "a time in seconds"
            )
    return None


def _pid_runs(pid: int) -> bool:
    """Whether a process ``pid`` runs (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as someone else
        return True
    return True


def _dead_entries(
    folder: Path, prefix: str, unnamed_older_than: float | None
) -> list[tuple[Path, os.stat_result]]:
    """The entries ``<prefix><pid>-...`` of ``folder`` whose pid no longer runs
    (and, with ``unnamed_older_than``, those with no pid after the prefix that
    were last changed more than that many seconds ago), this user's only, each
    with its ``lstat`` (links are not followed)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    uid = os.getuid() if hasattr(os, "getuid") else None
    found = []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix) :].partition("-")
        named = pid_text[1] == "-" and pid_text[0].isdigit()
        if named and _pid_runs(int(pid_text[0])):
            continue
        if not named and unnamed_older_than is None:
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        if uid is not None and st.st_uid != uid:
            continue
        if not named and time.time() - st.st_mtime <= unnamed_older_than:
            continue
        found.append((entry, st))
    return found


def _remove_dead(
    folder: Path, prefix: str, *, unnamed_older_than: float | None = None
) -> list[Path]:
    """Remove the folders of :func:`_dead_entries` (never through a link, only
    this user's); returns those removed."""
    removed: list[Path] = []
    for entry, st in _dead_entries(folder, prefix, unnamed_older_than):
        if not stat.S_ISDIR(st.st_mode):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            logger.info("removed %s, left by a flash or update that was killed", entry)
    return removed


def _remove_dead_files(path: Path) -> list[Path]:
    """Remove the temporary files :func:`_write_beside` made for ``path``
    (``.<name>-<pid>-...`` beside it) whose pid no longer runs: plain files of
    this user only, never a link or a folder; returns those removed."""
    removed: list[Path] = []
    for entry, st in _dead_entries(path.parent, f".{path.name}-", None):
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            entry.unlink()
        except OSError:
            continue
        removed.append(entry)
        logger.info("removed %s, left by a flash or update that was killed", entry)
    return removed


def _is_finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) that is finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float64
        return False


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry change to disk (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file (:func:`_write_beside`)
    and a rename."""
    tmp = _write_beside(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _symlink_atomic(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative) with one rename."""
    tmp = link.with_name(f".{link.name}-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class GatewayLayout:
    """Where a flashed gateway keeps things, under ``root``."""

    root: Path

    @property
    def opt(self) -> Path:
        """``/opt/gatewatch``."""
        return self.root / bundle_mod.OPT_DIR

    @property
    def releases(self) -> Path:
        """Installed agent releases, one venv each."""
        return self.opt / "releases"

    @property
    def venv(self) -> Path:
        """The symlink to the active release's venv."""
        return self.opt / "venv"

    @property
    def models(self) -> Path:
        """The model slots folder."""
        return self.root / bundle_mod.MODELS_DIR

    @property
    def etc(self) -> Path:
        """``/etc/gatewatch``."""
        return self.root / bundle_mod.ETC_DIR

    @property
    def config(self) -> Path:
        """The agent's config file."""
        return self.root / bundle_mod.CONFIG_FILE

    @property
    def pubkey(self) -> Path:
        """The public key that model updates must be signed with."""
        return self.root / bundle_mod.UPDATE_KEY_FILE

    @property
    def unit(self) -> Path:
        """The systemd unit."""
        return self.root / bundle_mod.UNIT_FILE

    @property
    def state(self) -> Path:
        """``/var/lib/gatewatch``: the outbox, the alerts file (the unit's
        ``StateDirectory=`` makes it under systemd; flash makes it too, so an agent
        run from the flashed folder by hand finds it)."""
        return self.root / bundle_mod.STATE_DIR


@dataclass(frozen=True)
class FlashResult:
    """What :func:`flash` installed."""

    root: Path
    release: Path
    slot: str
    agent_version: str
    model_version: str
    python: Path
    # The model was already active, so the model slots were left as they were.
    model_kept: bool = False


# ------------------------------------------------------------------------------ flash


def flash(
    bundle: str | Path,
    root: str | Path,
    pubkey: str | Path,
    *,
    python: str | None = None,
    tolerance: float | None = None,
    allow_downgrade: bool = False,
    replace_key: bool = False,
) -> FlashResult:
    """Verify ``bundle`` and install it into the gateway root ``root``.

    ``python`` is the interpreter the gateway venv is made from (default: the base
    interpreter of this one); it must be the Python version the bundle was built
    for. A bundle built before the running model was issued, or before the last
    bundle flashed on this root (``/opt/gatewatch/flashed.json``), is refused
    (UsageError) unless ``allow_downgrade``. ``root`` must be an existing folder
    (UsageError otherwise: a mistyped root is not made). A root whose update key
    is another key than ``pubkey`` (or cannot be read as one) is refused
    (UsageError) unless ``replace_key``: the key decides which model updates the
    gateway takes, so it is not swapped as a side effect of a re-flash.

    Everything that takes room is written first (release, model copy, config,
    key and unit beside their names); only then are they renamed into place. A
    failure before that, a full disk or a read-only root included (FlashError
    naming the path and the reason), leaves the previous install, its rollback
    target included, as it was.
    """
    bundle, root = Path(bundle), Path(root)
    layout = GatewayLayout(root)
    public_key = signing.load_public_key(pubkey)
    if not root.exists():
        # A typo in --root must not flash a whole gateway into a fresh folder.
        raise UsageError(
            f"--root {root} does not exist; flash installs into an existing "
            "gateway root (make the folder first if a new one is meant)"
        )
    if not root.is_dir():
        raise UsageError(f"--root {root} is not a folder")
    interpreter = python or _base_python()

    # Bundles unpacked by flashes that were killed: their pid no longer runs.
    temp = Path(tempfile.gettempdir())
    _remove_dead(temp, UNPACK_PREFIX)
    tmp = tempfile.mkdtemp(prefix=f"{UNPACK_PREFIX}{os.getpid()}-", dir=temp)
    try:
        # 1. Verify and unpack outside the root: nothing there has changed yet.
        staged = Path(tmp) / "bundle"
        manifest = bundle_mod.verify_bundle(bundle, public_key, extract_to=staged)
        _check_staged(staged, manifest, interpreter, root)
        _check_not_older(layout, manifest, bundle, allow_downgrade)
        if not replace_key:  # a verified bundle, before anything is installed
            _check_same_update_key(layout, public_key, pubkey)

        lock = _take_flash_lock(layout)
        try:
            if not allow_downgrade:  # again, now that no other flash runs
                _check_not_older(layout, manifest, bundle, allow_downgrade)
            ModelSlots(layout.models).remove_stale_staging()
            for path in _written_by_flash(layout):
                _remove_dead_files(path)
            return _install(
                layout, staged, manifest, bundle, pubkey, interpreter, tolerance
            )
        finally:
            if lock is not None:
                os.close(lock)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _written_by_flash(layout: GatewayLayout) -> list[Path]:
    """The files that flash (or a model update) writes through a temporary file
    beside them: a killed one may leave such a file (see :func:`_write_beside`)."""
    return [
        layout.config,
        layout.pubkey,
        layout.unit,
        layout.models / STATE_FILE,
        layout.opt / FLASHED_FILE,
    ]


def _take_flash_lock(layout: GatewayLayout) -> int | None:
    """Hold ``/opt/gatewatch/.flash.lock`` (a descriptor to close): one flash of a
    root at a time, and no model update of the agent meanwhile
    (:func:`hold_flash_lock`). The file is made once and never written
    (:func:`edge_agent.locks.try_lock` without its pid), so a refused flash
    changes nothing under the root. None where nothing can be locked (no flock:
    Windows, or a file system without locks): the flash runs unlocked.
    UsageError when another flash (or a model update) holds it; FlashError when
    it cannot be made (a read-only root)."""
    from edge_agent import locks

    path = layout.opt / LOCK_FILE
    try:
        layout.opt.mkdir(parents=True, exist_ok=True)
        if locks.fcntl is None:  # no flock (Windows): made, and nothing is refused
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
            return None
        fd = locks.try_lock(path, write_pid=False)
    except OSError as exc:
        if exc.errno in locks.NO_FLOCK:
            return None
        raise _cannot_write(exc, path) from exc

    if fd is None:
        raise UsageError(
            f"another flash of {layout.root} (or a model update of its agent) is "
            f"running (it holds {path}); wait for it to end"
        )
    return fd


def hold_flash_lock(models_dir: str | Path) -> int | None:
    """For a model update of the agent: take the flash lock of the root whose
    model slots are ``models_dir`` (``.flash.lock`` in the folder above) without
    waiting, so that a flash and an update never write the inactive slot at once.

    Returns a descriptor to close, or None when there is nothing to hold: no lock
    file (no flash of this version made one there; the unit may not create it,
    as it may write only in the slots) or one that cannot be opened or locked.
    BlockingIOError when a flash holds it. Opened read-only, never through a
    link, and never written (:func:`edge_agent.locks.try_lock` without its pid
    and without making the file)."""
    from edge_agent import locks

    if locks.fcntl is None:
        return None
    path = Path(models_dir).parent / LOCK_FILE
    try:
        fd = locks.try_lock(path, write_pid=False, create=False)
    except OSError:
        return None

    if fd is None:
        raise BlockingIOError(f"{path} is held by a flash")
    return fd


def write_problem(exc: OSError, path: Path | None = None) -> str:
    """An OSError met while writing ``path`` as one phrase: ``cannot write WHERE:
    REASON``, WHERE the file the error names (a ``shutil.Error``'s first failed
    file), else ``path``; the OS's reason alone when neither is known."""
    where: Any = exc.filename or path
    reason = exc.strerror
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        first = exc.args[0][0] if exc.args[0] else None
        if isinstance(first, tuple) and len(first) == 3:
            where, reason = first[1], first[2]
    return f"cannot write {where}: {reason or exc}" if where else str(reason or exc)


def _cannot_write(exc: OSError, path: Path, committing: bool = False) -> FlashError:
    """A FlashError for an OSError met while writing ``path`` (or the file the
    error names), with the OS's reason: one ``error:`` line, exit 1.
    ``committing``: some renames were done already (the message says so)."""
    kept = (
        "the model and agent that ran are still active; flash it again"
        if committing
        else "nothing was switched, the previous install is kept"
    )
    return FlashError(f"{write_problem(exc, path)}; {kept}")


def _install(
    layout: GatewayLayout,
    staged: Path,
    manifest: bundle_mod.BundleManifest,
    bundle: Path,
    pubkey: str | Path,
    interpreter: str,
    tolerance: float | None,
) -> FlashResult:
    """Install a verified, unpacked bundle (``staged``) into ``layout``, holding
    the flash lock: first everything that takes room, then the renames."""
    slots = ModelSlots(layout.models)
    active_release = _release_name(
        os.readlink(layout.venv) if layout.venv.is_symlink() else None
    )
    release: Path | None = None
    incoming: Path | None = None
    written: list[tuple[Path, Path]] = []  # (temporary file, its final name)
    step = layout.releases
    step_done: list[str] = []  # what is switched already, for the error line
    try:
        # 2. The release venv, built beside the active one from the bundled wheels;
        # 3. the model, checked by that venv, copied next to the slots (no slot
        # is touched yet, so the rollback target stays as it is).
        release = _install_release(layout, staged, manifest, interpreter)
        venv_python = release / "venv" / "bin" / "python"
        slot, kept = _pick_slot(layout, staged, manifest, bundle, venv_python,
                                tolerance)
        if not kept:
            step = layout.models
            incoming = slots.staging()
            os.rmdir(incoming)
            shutil.copytree(staged / bundle_mod.MODEL_DIR, incoming)

        # 4. Config, update key and unit, each beside its name.
        for path, data in (
            (layout.config, (staged / bundle_mod.CONFIG_PATH).read_bytes()),
            (layout.pubkey, Path(pubkey).read_bytes()),
            (layout.unit, (staged / bundle_mod.UNIT_PATH).read_bytes()),
        ):
            step = path
            written.append((_write_beside(path, data), path))
        step = layout.state
        layout.state.mkdir(mode=0o750, parents=True, exist_ok=True)

        # 5. The switches: the model into its slot (marked never active until it
        # is), the files renamed, the release and the model slot switched.
        if incoming is not None:
            step = layout.models
            slots.install(slot, incoming, _slot_record(manifest, bundle))
            step_done.append(f"model {manifest.model_version} into slot {slot}")
        for tmp, path in written:
            step = path
            os.replace(tmp, path)
            step_done.append(str(path))
        written = []
        step = layout.venv
        previous = os.readlink(layout.venv) if layout.venv.is_symlink() else None
        _symlink_atomic(layout.venv, f"releases/{release.name}/venv")
    except BaseException as exc:
        if release is not None and release.name != active_release:
            shutil.rmtree(release, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _cannot_write(exc, step, committing=bool(step_done)) from exc
        raise
    finally:
        if incoming is not None:
            shutil.rmtree(incoming, ignore_errors=True)
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)

    try:
        # The operator installs this model on purpose: a rollback mark no longer
        # holds its updates back.
        slots.clear_rolled_back(manifest.model_version)
        if not kept:
            slots.switch(slot)
        _record_flashed(layout, manifest, bundle)
    except OSError as exc:
        raise FlashError(
            f"flash of {layout.root} stopped after the release, config, key and "
            f"unit were switched: {exc.filename or layout.models}: "
            f"{exc.strerror or exc}; flash it again"
        ) from exc
    _prune_releases(layout, keep={release.name, _release_name(previous)})

    logger.info(
        "flashed %s: agent %s (%s), model %s in slot %s%s",
        layout.root,
        manifest.agent_version,
        release.name,
        manifest.model_version,
        slot,
        " (already active; kept)" if kept else "",
    )
    return FlashResult(
        root=layout.root,
        release=release,
        slot=slot,
        agent_version=manifest.agent_version,
        model_version=manifest.model_version,
        python=layout.venv / "bin" / "python",
        model_kept=kept,
    )


def _write_beside(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to a fresh temporary file next to ``path``, flushed to disk,
    for a later rename onto ``path``; returns it (removed again on failure). Its
    name, ``.<name>-<pid>-...``, tells a later flash whose it is: one left by a
    process killed before its rename is removed then (:func:`_remove_dead_files`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _slot_record(
    manifest: bundle_mod.BundleManifest, bundle: Path
) -> dict[str, Any]:
    """What ``slots.json`` records of a model flashed from ``bundle``."""
    return {
        "model_version": manifest.model_version,
        "sha256": manifest.digest,
        "issued_at": _issued_at(manifest),
        "source": f"bundle {bundle.name}",
    }


# What a refusal for a damaged flashed.json says to do.
_RECORD_HINT = (
    "; pass --allow-downgrade to flash anyway (the flash writes a new record), or "
    "remove the file"
)


def flashed(layout: GatewayLayout, hint: str = "") -> dict[str, Any] | None:
    """The record of the last bundle flashed on ``layout``'s root
    (``/opt/gatewatch/flashed.json``: ``created_ts``, ``sha256``, ``bundle``,
    ``model_version``, ``flashed_at``), or None for a root flashed before the
    record existed. A record that is not such an object is a BadInputError,
    whose message ends with ``hint``."""
    path = layout.opt / FLASHED_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, RecursionError, ValueError) as exc:
        raise BadInputError(
            f"the record of the last flash is unreadable ({json_problem(exc)})"
            f"{hint}",
            path=str(path),
        ) from exc
    built = data.get("created_ts") if isinstance(data, dict) else None
    if built is not None and not _is_finite_number(built):
        built = None
    if built is None:
        raise BadInputError(
            "the record of the last flash has no created_ts (the build time in "
            "seconds of the bundle flashed); expected a JSON object as flash "
            f"writes it{hint}",
            path=str(path),
        )
    return data


def _record_flashed(
    layout: GatewayLayout, manifest: bundle_mod.BundleManifest, bundle: Path
) -> None:
    """Record ``bundle`` as the last one flashed on the root (see :func:`flashed`),
    so that a bundle built before it is refused as a downgrade."""
    built = manifest.data.get("created_ts")
    if built is None:  # nothing to compare a later bundle with
        try:
            flashed(layout)
        except BadInputError as exc:  # let through by --allow-downgrade
            (layout.opt / FLASHED_FILE).unlink(missing_ok=True)
            logger.warning("removed %s: %s", layout.opt / FLASHED_FILE, exc)
        return
    record = {
        "created_ts": float(built),
        "sha256": manifest.digest,
        "bundle": bundle.name,
        "agent_version": manifest.agent_version,
        "model_version": manifest.model_version,
        "flashed_at": time.time(),
    }
    _write_atomic(layout.opt / FLASHED_FILE, json.dumps(record, indent=1).encode())


def _check_same_update_key(layout: GatewayLayout, public_key: Any,
                           pubkey: str | Path) -> None:
    """UsageError when the root already trusts another update key than the one
    being flashed (or a key file that cannot be read): the caller asks for
    ``--replace-key`` before the gateway's trust changes."""
    installed = layout.pubkey
    if not (installed.exists() or installed.is_symlink()):
        return

    try:
        current = signing.load_public_key(installed)
    except (BadInputError, OSError) as exc:
        raise UsageError(
            f"{installed} cannot be read as the gateway's update key ({exc}); "
            "give --replace-key to install --pubkey in its place"
        ) from exc
    if signing.key_id(current) != signing.key_id(public_key):
        raise UsageError(
            f"{installed} holds update key {signing.key_id(current)} and --pubkey "
            f"{pubkey} is another key ({signing.key_id(public_key)}): after this "
            "flash, updates signed with the old key would be refused; give "
            "--replace-key to change the gateway's key"
        )


def _base_python() -> str:
    """The interpreter a venv should be made from: this one's base, not a venv."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if Path(base).exists() else sys.executable


def _check_staged(
    staged: Path, manifest: bundle_mod.BundleManifest, python: str, root: Path
) -> None:
    """Checks on the unpacked bundle that need no install: Python, config, artifact.

    The config's paths must be the layout under ``root`` (see the module docstring).
    """
    try:
        proc = subprocess.run(
            [python, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            env=_clean_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"cannot run the gateway Python {python!r}: {exc}") from exc
    got = proc.stdout.strip()
    if proc.returncode != 0 or got != manifest.python:
        raise UsageError(
            f"the bundle's wheels are for Python {manifest.python}; {python} is "
            f"{got or 'not runnable'}"
        )
    try:
        settings = tomllib.loads((staged / bundle_mod.CONFIG_PATH).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadInputError(f"bundled config is not valid TOML: {exc}") from exc
    bundle_mod.check_flashed_paths(
        settings, f"{bundle_mod.CONFIG_PATH} of the bundle", root=root
    )
    bundle_mod.artifact_files(staged / bundle_mod.MODEL_DIR)


def _check_not_older(
    layout: GatewayLayout,
    manifest: bundle_mod.BundleManifest,
    bundle: Path,
    allow_downgrade: bool,
) -> None:
    """UsageError when the bundle was built before the newest model ever active on
    this root was issued (the running one, or a newer one a rollback left), or
    before the last bundle flashed on this root was built.

    The first is the rule of a model update (:class:`edge_agent.ota.ModelUpdater`,
    the floor of :meth:`ModelSlots.floor`), so an old bundle cannot quietly undo a
    newer model, also after a rollback; the second catches an old
    bundle with the running model, whose config, agent and unit would otherwise
    undo newer ones (a root flashed before :func:`flashed` records existed has
    only the first). ``allow_downgrade`` lets a deliberate one through with a
    warning; it also lets a damaged ``flashed.json`` be ignored with a warning
    (the flash writes a new one), which is otherwise a BadInputError (exit 3)
    saying so: flash is what repairs a damaged install.
    """
    slots = ModelSlots(layout.models)
    running = slots.info(slots.active())
    floor = _newer_floor(slots.floor(), running) or {}
    floor_issued = floor.get("issued_at")
    try:
        last = flashed(layout, hint="" if allow_downgrade else _RECORD_HINT)
    except BadInputError as exc:
        if not allow_downgrade:
            raise
        logger.warning(
            "%s; ignoring it (--allow-downgrade): this flash writes a new one", exc
        )
        last = None
    built = manifest.data.get("created_ts")
    problem = None
    if floor_issued is not None and (
        built is None or float(built) < float(floor_issued)
    ):
        fine = _same_second(built, floor_issued)
        newest = floor.get("model_version")
        if float(floor_issued) == float(running.get("issued_at") or "nan"):
            which = f"the running model {newest}"
        else:  # a rollback made an older model active; the floor stays
            which = (f"model {newest}, the newest ever active here (running "
                     f"{running.get('model_version')} after a rollback),")
        problem = (
            f"bundle {bundle} (model {manifest.model_version}) "
            f"{_built_when(built, fine)}, before {which} was issued "
            f"{_utc(float(floor_issued), fine)}"
        )
    elif last is not None and (built is None or float(built) < last["created_ts"]):
        fine = _same_second(built, last["created_ts"])
        problem = (
            f"bundle {bundle} (model {manifest.model_version}) "
            f"{_built_when(built, fine)}, before bundle {last.get('bundle')} (model "
            f"{last.get('model_version')}), flashed on this root, was built "
            f"{_utc(float(last['created_ts']), fine)}"
        )
    if problem is None:
        return
    if allow_downgrade:
        logger.warning("%s; installing it anyway (--allow-downgrade)", problem)
        return
    raise UsageError(
        f"{problem}; refusing a downgrade (pass --allow-downgrade to install it "
        "anyway, or use rollback to go back to the previous slot)"
    )


def _same_second(one: Any, other: Any) -> bool:
    """Whether two build or issue times (None: unknown) fall in one second: a
    refusal then gives them to the millisecond, or both would read the same."""
    return one is not None and int(float(one)) == int(float(other))


def _built_when(built: Any, fine: bool) -> str:
    """``was built <time>``, or that the bundle has no build time."""
    if built is None:
        return "has no build time (created_ts)"
    return f"was built {_utc(float(built), fine)}"


def _utc(ts: float, fine: bool = False) -> str:
    """A time in seconds as ``2024-05-01T12:00:00Z`` (``fine``: with its
    milliseconds, ``2024-05-01T12:00:00.250Z``)."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    if not fine:
        return f"{whole}Z"
    return f"{whole}.{int((ts % 1) * 1000):03d}Z"


def _release_name(venv_target: str | None) -> str | None:
    """``releases/<name>/venv`` -> ``<name>``."""
    if not venv_target:
        return None
    parts = Path(venv_target).parts
    return parts[1] if len(parts) == 3 and parts[0] == "releases" else None


def _install_release(
    layout: GatewayLayout,
    staged: Path,
    manifest: bundle_mod.BundleManifest,
    python: str,
) -> Path:
    """A release folder with a venv holding the bundled agent, installed offline."""
    # Named by the wheels, so a bundle that changes only the model reuses the venv.
    name = f"{manifest.agent_version}-{manifest.wheels_digest[:12]}"
    release = layout.releases / name
    if (release / COMPLETE).is_file():
        problem = _release_problem(release)
        if problem is None:
            logger.info("release %s is already installed; reusing it", name)
            return release
        # An install that cannot run is never reused, or a re-flash would not fix it.
        logger.warning(
            "release %s is installed but cannot run the agent (%s); rebuilding it",
            name,
            problem,
        )

    # The venv's scripts name their interpreter by absolute path, so it is built at
    # its final place; the name is new (or its release cannot run), so a working
    # active release is never touched.
    if release.exists():
        shutil.rmtree(release)
    release.mkdir(parents=True)
    # Absolute paths: the steps run from "/".
    venv = release.absolute() / "venv"
    if os.sep in python:
        python = str(Path(python).absolute())
    try:
        _run([python, "-I", "-m", "venv", str(venv)], "creating the gateway venv")
        _run(
            [
                str(venv / "bin" / "python"),
                "-I",
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--quiet",
                "--find-links",
                str(staged.absolute() / bundle_mod.WHEEL_DIR),
                manifest.requirement,
            ],
            "installing the bundled wheels (offline)",
            env=_offline_pip_env(),
        )

        # pip may skip a package it sees elsewhere; the venv must hold the agent.
        problem = _release_problem(release)
        if problem is not None:
            raise FlashError(
                f"the agent release installed from the bundled wheels cannot run: "
                f"{problem}; removed {release}"
            )
        (release / COMPLETE).write_text(manifest.digest + "\n")
    except BaseException:
        shutil.rmtree(release, ignore_errors=True)
        raise
    return release


def _release_problem(release: Path) -> str | None:
    """Why ``release`` cannot run the agent, or None when it can.

    Its venv must have ``bin/edge-agent`` and its python must import ``edge_agent``
    from inside the venv: pip skips a package that it sees through an inherited
    PYTHONPATH, and such a release runs only while that path is set.
    """
    venv = release.absolute() / "venv"
    script = venv / "bin" / "edge-agent"
    if not script.is_file():
        return f"{script} is missing"

    python = venv / "bin" / "python"
    code = "import edge_agent; print(edge_agent.__file__)"
    try:
        proc = subprocess.run(
            [str(python), "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env=_clean_env(),
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} cannot be run ({exc})"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return f"{python} cannot import edge_agent ({' '.join(tail)})"
    found = Path(proc.stdout.strip()).resolve()
    if not found.is_relative_to(venv.resolve()):
        return f"{python} imports edge_agent from {found}, not from its venv"
    return None


def _pick_slot(
    layout: GatewayLayout,
    staged: Path,
    manifest: bundle_mod.BundleManifest,
    bundle: Path,
    venv_python: Path,
    tolerance: float | None,
) -> tuple[str, bool]:
    """Health-check the bundled model in the new venv, then say where it goes.

    Returns the slot and whether the model is kept: a model already active (same
    ``model_version`` and the same files, by their sha256) is not installed again,
    so the other slot keeps the model a rollback goes back to. One of the same
    ``model_version`` whose files differ (new site thresholds, another build) goes
    to the inactive slot as any other model, with a warning naming the files that
    differ. The same model in the inactive slot is installed there again, as any
    other model, and becomes active. Nothing is written here.
    """
    _health_check_in(venv_python, staged / bundle_mod.MODEL_DIR, tolerance)
    slots = ModelSlots(layout.models)
    active = slots.active()
    running = slots.info(active).get("model_version")
    differs = None
    if running == manifest.model_version and slots.path(active).is_dir():
        differs = _model_difference(manifest, slots.path(active))
    if running == manifest.model_version and differs is not None:
        # Same name, other content (new thresholds, another build): installed as
        # any other model, and said, since escalations will not tell them apart.
        logger.warning(
            "model %s of bundle %s has the model_version of the model active in "
            "slot %s of %s, but other content (%s): it is installed into slot %s "
            "and made active; slot %s keeps the earlier %s for rollback",
            manifest.model_version,
            bundle.name,
            active,
            layout.models,
            differs,
            slots.inactive(),
            active,
            running,
        )
    elif running == manifest.model_version and slots.path(active).is_dir():
        other = slots.inactive()
        logger.info(
            "model %s is already active in slot %s of %s; the model slots are left "
            "as they are (slot %s keeps model %s for rollback)",
            running,
            active,
            layout.models,
            other,
            slots.info(other).get("model_version") or "none",
        )
        return active, True
    return slots.inactive(), False


def _model_difference(
    manifest: bundle_mod.BundleManifest, slot: Path, shown: int = 4
) -> str | None:
    """What differs between the bundle's model files (their sha256 in the signed
    manifest) and those of the model ``slot`` (hashed on disk), or None when the
    two hold the same files with the same content: ``site_thresholds.json
    differs``, ``only in the bundle: ...``, ``only in the slot: ...``.

    Files the gateway writes into a slot itself (see :func:`_written_on_gateway`)
    count only when the bundle brings its own: a ``site_thresholds.json`` that
    ``edge-agent calibrate`` wrote into the active slot does not make the running
    model another one, as it does not for model updates."""
    prefix = f"{bundle_mod.MODEL_DIR}/"
    bundled = {
        name[len(prefix) :]: entry.sha256.lower()
        for name, entry in manifest.files.items()
        if name.startswith(prefix)
    }
    installed = {
        path.relative_to(slot).as_posix(): bundle_mod.sha256_path(path)
        for path in sorted(slot.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }

    def names(found: list[str]) -> str:
        more = f" and {len(found) - shown} more" if len(found) > shown else ""
        return ", ".join(found[:shown]) + more

    changed = sorted(n for n in bundled if installed.get(n, bundled[n]) != bundled[n])
    added = sorted(n for n in bundled if n not in installed)
    gone = sorted(
        n for n in installed if n not in bundled and not _written_on_gateway(n)
    )
    parts = []
    if changed:
        parts.append(f"{names(changed)} differ{'s' if len(changed) == 1 else ''}")
    if added:
        parts.append(f"only in the bundle: {names(added)}")
    if gone:
        parts.append(f"only in the slot: {names(gone)}")
    return "; ".join(parts) or None


def _written_on_gateway(name: str) -> bool:
    """True for a file of a model slot that the gateway writes itself, not a
    bundle: the site thresholds of ``edge-agent calibrate`` (which writes
    ``site_thresholds.json`` into the artifact folder, the active slot on a
    flashed gateway) and the hidden part file such a write leaves behind when it
    is cut short (``.site_thresholds.json.PID.part``)."""
    site = bundle_mod.SITE_THRESHOLDS
    if name == site:
        return True
    if name.startswith(f".{site}.") and name.endswith(".part"):
        return name[len(site) + 2 : -len(".part")].isdigit()
    return False


def _issued_at(manifest: bundle_mod.BundleManifest) -> float | None:
    """When the bundle's model was issued: its build time (None when unknown)."""
    built = manifest.data.get("created_ts")
    return None if built is None else float(built)


# PYTHON* variables a subprocess keeps: they change its output, not its imports.
_HARMLESS_PYTHON_VARS = frozenset(
    {"PYTHONIOENCODING", "PYTHONUTF8", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
)


def _clean_env() -> dict[str, str]:
    """This environment for a Python that flash runs, without what would make it
    import from elsewhere than its own install: PYTHONPATH, PYTHONHOME,
    PYTHONUSERBASE, PYTHONSTARTUP and every other ``PYTHON*`` variable but
    :data:`_HARMLESS_PYTHON_VARS`, and the marks of the venv flash runs in."""
    return {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("PYTHON") and k not in _HARMLESS_PYTHON_VARS)
        and k not in ("VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
    }


def _offline_pip_env() -> dict[str, str]:
    """The environment for pip on the gateway: :func:`_clean_env` with no pip
    config files and no index settings."""
    env = {k: v for k, v in _clean_env().items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run an install step in ``env`` (default :func:`_offline_pip_env`), from the root
    folder so that the working folder adds nothing to its imports; FlashError with
    the tail of its output on failure."""
    logger.debug("running %s", " ".join(cmd))
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env or _offline_pip_env(), cwd="/"
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise FlashError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))


def _health_check_in(python: Path, artifact: Path, tolerance: float | None) -> None:
    """Load ``artifact`` and score its probe windows with the gateway's own venv."""
    python, artifact = python.absolute(), artifact.absolute()  # run from "/"
    cmd = [str(python), "-I", "-m", "edge_agent.ota", "check", str(artifact)]
    if tolerance is not None:
        cmd += ["--tolerance", repr(tolerance)]
    # Isolated (-I) and from "/": the check sees the venv's agent, not this tree's.
    env = _offline_pip_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelError(
            "the bundled model failed its health check in the gateway venv: "
            + " | ".join(tail)
        )


def _prune_releases(layout: GatewayLayout, keep: set[str | None]) -> None:
    """Remove releases other than the active and the previous one."""
    if not layout.releases.is_dir():
        return
    for entry in layout.releases.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


# --------------------------------------------------------------------------- rollback


def rollback(root: str | Path, *, tolerance: float | None = None) -> tuple[str, str]:
    """Make the other model slot active again, after checking it still loads.

    Returns (slot, model_version). The running agent picks the change up when it
    reloads (SIGHUP: ``systemctl reload gatewatch-agent``) or restarts. The model
    left is marked in ``slots.json`` as rolled back (:class:`ModelSlots`): model
    updates of it are refused from then on, also a retained one handled again at
    the agent's next start, until it is flashed again; a newer model's update is
    installed as ever. A slot whose model was never active (``never_active``: a
    flash or update killed between its install and its switch) is refused
    (UsageError): rollback never activates a model that never ran. A damaged
    install (``slots.json`` or the ``current`` link missing or unreadable while
    the other says a model was flashed) is a BadInputError naming the file and
    its repair, found before anything is written (:func:`_rollback_from`).
    """
    from edge_agent import ota

    if not Path(root).is_dir():
        raise UsageError(f"--root {root} does not exist or is not a folder")
    slots = ModelSlots(GatewayLayout(Path(root)).models)
    active, state = _rollback_from(slots, root)
    other = SLOTS[1] if active == SLOTS[0] else SLOTS[0]
    info = dict(state.get(other) or {})
    if not info:
        raise UsageError(f"model slot {other} holds no model to roll back to")
    if info.get(PENDING):
        running = slots.info(active).get("model_version") or "its model"
        raise UsageError(
            f"rollback refused, slot {active} ({running}) stays active: slot "
            f"{other} holds model {info.get('model_version')}, which was never "
            "active (installed by a flash or model update that did not finish); "
            "flash the bundle to install it"
        )

    if not slots.path(other).is_dir():
        raise UsageError(
            f"model slot {other} holds no model to roll back to: "
            f"{slots.path(other)} is missing, although {STATE_FILE} records model "
            f"{info.get('model_version')} in it"
        )

    # The previous model must still be intact and healthy before it is trusted.
    try:
        scorer = ota.load_checked(slots.path(other), tolerance=tolerance)
    except ModelError as exc:
        running = slots.info(active).get("model_version") or "its model"
        raise ModelError(
            f"rollback refused, slot {active} ({running}) stays active: {exc}"
        ) from exc
    # The mark before the switch: a crash between the two leaves the model running
    # with a mark that does not hold back its own updates (ModelSlots.held_back).
    left = {**slots.info(active), "slot": active}
    try:
        slots.mark_rolled_back(left, info.get("model_version") or scorer.model_version)
    except OSError as exc:  # nothing was switched: the mark comes first
        running = left.get("model_version") or "its model"
        raise FlashError(
            f"rollback refused, slot {active} ({running}) stays active: "
            f"{write_problem(exc, slots.dir)}"
        ) from None
    try:
        slots.switch(other)
    except OSError as exc:
        running = left.get("model_version") or "its model"
        raise FlashError(
            f"rollback not done, slot {active} ({running}) stays active: cannot "
            f"switch {slots.current_path}: {exc.strerror or exc}"
        ) from None
    logger.info(
        "rolled back %s to slot %s (model %s); updates of model %s are refused "
        "until a newer model is published or it is flashed again",
        root,
        other,
        scorer.model_version,
        left.get("model_version"),
    )
    return other, scorer.model_version


# What a rollback error says of a damaged install, and how to repair it.
_DAMAGED = "a damaged install, nothing was switched"
_FLASH_AGAIN = "flash the bundle again"
_MOVE_ASIDE = "move it aside and flash the bundle again"


def _rollback_from(slots: ModelSlots, root: str | Path) -> tuple[str, dict[str, Any]]:
    """The active slot of ``slots`` and their state (``slots.json``), once the
    install is whole enough to roll back; nothing is written.

    A root never flashed (no ``current`` link, no ``slots.json`` and no slot
    holding files), or whose first flash did not finish (``slots.json`` records
    only a model never active), is a UsageError (exit 2). A damaged install is a
    BadInputError (exit 3) naming the damaged file and the repair: ``slots.json``
    unreadable, or missing while ``current`` points at a slot; ``current`` not a
    link to a slot, a link to a slot folder that is gone, or missing while
    ``slots.json`` records a model that was active (or slots hold files that no
    ``slots.json`` records). A flash writes a missing ``current`` or
    ``slots.json`` anew; one that is there but damaged stops a flash as well, so
    it must be moved aside first.
    """
    state_path = slots.dir / STATE_FILE
    try:
        state = slots.state()
        active = slots.active()
    except BadInputError as exc:
        raise BadInputError(f"{exc}; {_DAMAGED}; {_MOVE_ASIDE}") from None
    current = str(slots.current_path)
    if active is None:
        ran = [
            f"{info.get('model_version')} in slot {slot}"
            for slot in SLOTS
            if (info := state.get(slot)) and not info.get(PENDING)
        ]
        if ran:
            raise BadInputError(
                f"missing, although {state_path} records models made active "
                f"({', '.join(ran)}); {_DAMAGED}; {_FLASH_AGAIN}",
                path=current,
            )
        filled = [s for s in SLOTS if _holds_files(slots.path(s))]
        if filled and not state_path.exists():
            held = (
                f"model slots {' and '.join(filled)} hold" if len(filled) > 1
                else f"model slot {filled[0]} holds"
            )
            raise BadInputError(
                f"missing, and so is {state_path}, although {held} files; "
                f"{_DAMAGED}; {_FLASH_AGAIN}",
                path=current,
            )
        raise UsageError(f"{root} has no flashed model to roll back from")
    if not slots.path(active).is_dir():
        raise BadInputError(
            f"points at model slot {active}, but {slots.path(active)} is missing "
            f"or not a folder; {_DAMAGED}; {_FLASH_AGAIN}",
            path=current,
        )
    if not state_path.exists():
        raise BadInputError(
            f"missing, although {current} points at model slot {active}: what the "
            "slots hold, and so which model to go back to, is not known; "
            f"{_DAMAGED}; {_FLASH_AGAIN}",
            path=str(state_path),
        )
    return active, state


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` is there and not empty (one that cannot be listed is
    taken to hold files: something was put there)."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except FileNotFoundError:
        return False
    except OSError:
        return folder.is_dir()
