"""Over-the-air model updates: signed, health-checked, switched atomically, or refused.

An update is one JSON message on the gateway's model topic (retained)::

    {"schema": "gatewatch/v1", "kind": "model_update", "id": ..., "sent_at": ...,
     "model_version": ..., "statement": <base64>, "signature": <base64>,
     "payload": <base64 tar.gz of the artifact>}          # or no payload: by reference

``statement`` is the exact signed JSON (``gatewatch-update/1``): ``model_version``,
``sha256`` and ``size`` of the artifact archive, ``issued_at``, ``key_id``,
``targets`` and, for an update by reference, the ``url`` the archive is fetched
from. Only the signed statement is trusted; the outer fields are for people
reading the topic.

``targets`` names the gateways the update is for: ``{"site": S, "gateways": [...]}``
or ``{"site": S, "all_gateways": true}`` (``pack-update --site S --gateway ID`` or
``--all-gateways``). A gateway refuses an update for another site, one that does
not list it, and one whose statement has no ``targets`` (signed before updates
named them: "sign it again with --site"), whatever topic it came on: the broker's
ACL is not the only thing that keeps an update off the other gateways.

:class:`ModelUpdater` checks the signature, fetches and checks the archive, unpacks
it (plain files only) next to the slots, loads it with
:func:`edge_agent.runtime.load_artifact`, runs the health check (the encoder matches
the model's input, and the manifest's probe windows score as recorded), moves it into
the inactive slot, loads it again from there and switches. Any failure leaves the
active slot and the running model untouched and returns the reason. The archive
holds the artifact's manifest, its listed files and, when the artifact folder has
one, the site's ``site_thresholds.json`` (checked like the rest before the switch).

An update issued before the newest model this gateway ever ran is refused as a
downgrade (the floor is kept in ``slots.json``:
:meth:`~edge_agent.flash.ModelSlots.floor`): after a rollback to an older model,
the updates issued between the two stay refused, and a newer one installs. An update
of a model an operator rolled back from (``edge-agent rollback`` marks it in
``slots.json``: :class:`~edge_agent.flash.ModelSlots`) is refused too ("model X was
rolled back by the operator; ..."), at the agent's next start as well, until a
newer model comes or it is flashed again. An update of the running model itself
(the same archive, or the same files packed again or flashed from a bundle)
installs nothing and is no refusal: the retained message comes again after every
reconnect. A message byte for byte the same as the last one handled (its sha256) is
not verified or unpacked again: its result stands, and it is logged at DEBUG only.
Failing to fetch an update by reference is not remembered so: the next copy of the
message tries again, also when the file fetched is not the signed archive (its
size or sha256 differ: a stale file at the URL, or one not uploaded yet). Nor is
an update that came while a flash of the gateway held its flash lock
(:func:`edge_agent.flash.hold_flash_lock`, taken from the install to the switch):
a flash and an update never write the inactive slot at once. An inline archive
that does not match its signed digest is refused and remembered.

The last refusal stays in :attr:`ModelUpdater.last_refusal` (why, when, which
model version and message) while the refused update stays retained, for every
status the agent publishes: it is cleared when an update is installed (or names
the running model) and when the retained update is withdrawn (an empty message).

Run as ``python -m edge_agent.ota check DIR`` it health-checks one artifact folder
(flash uses this inside a freshly installed venv).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import bundle as bundle_mod
from edge_agent import logger, signing
from edge_agent.flash import (
    CURRENT,
    LOCK_FILE,
    SLOTS,
    ModelSlots,
    hold_flash_lock,
    write_problem,
)
from edge_agent.protocol import validate_id
from flows.errors import BadInputError, GatewatchError, ModelError, UsageError

MESSAGE_SCHEMA = "gatewatch/v1"
STATEMENT_SCHEMA = "gatewatch-update/1"
KIND = "model_update"

# An artifact is a few files; a student model is kilobytes to a few megabytes.
MAX_ARCHIVE_BYTES = 64 << 20
MAX_ARCHIVE_MEMBERS = 64
URL_SCHEMES = ("https", "http", "file")


@dataclass(frozen=True)
class UpdatePackage:
    """A signed update ready to publish: ``message`` bytes and the ``archive``."""

    message: bytes
    archive: bytes
    model_version: str
    sha256: str


@dataclass
class UpdateResult:
    """The outcome of one update message.

    ``ok``: the model in ``scorer`` (version ``version``) is now the active one.
    ``changed`` is False when the message named the model already running.
    ``reason`` says why an update was refused (empty when ok). ``withdrawn``: the
    message was empty, the way a retained update is cleared: nothing to install
    and nothing refused. ``repeated``: the message was the one handled last (the
    retained update again, after a reconnect), so nothing was done and the rest
    is the earlier result (``scorer`` None, ``changed`` False).
    """

    ok: bool
    version: str | None = None
    reason: str = ""
    scorer: Any = None
    slot: str | None = None
    changed: bool = False
    update_id: str | None = None
    withdrawn: bool = False
    repeated: bool = False


# -------------------------------------------------------------------- health check


def health_check(scorer: Any, *, tolerance: float | None = None) -> float:
    """ModelError unless a loaded artifact is fit to score; returns the probe error.

    Checks that the encoder reads the conn records every source of the agent gives
    (an NSL-KDD or UNSW artifact would refuse every flow), that the encoder's window
    and feature count are the model's input, that the probe windows have that
    shape, that the thresholds are usable, and that the probe windows score within
    ``tolerance`` of the manifest's expected scores.
    """
    from edge_agent.runtime import check_encoder_fits
    from edge_agent.sources import artifact_problem

    problem = artifact_problem(scorer.encoder, None)
    if problem is not None:
        raise ModelError(f"the artifact {problem}")
    check_encoder_fits(scorer)  # load_artifact checked it too; kept for any scorer
    probe = scorer.manifest.get("probe") or {}
    try:
        windows = np.asarray(probe.get("windows", []), dtype=np.float32)
        expected = np.asarray(probe.get("expected", []), dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"the manifest's probe is malformed: {exc}") from exc
    if windows.ndim != 3 or windows.shape[0] == 0:
        raise ModelError("the manifest has no probe windows to health-check with")
    if windows.shape[1:] != (scorer.window, scorer.n_features):
        raise ModelError(
            f"probe windows are {list(windows.shape)}, the model takes "
            f"[B, {scorer.window}, {scorer.n_features}]"
        )
    if expected.shape != (windows.shape[0],):
        raise ModelError(
            f"the probe has {windows.shape[0]} windows but {expected.size} expected "
            "scores"
        )
    lo, hi = scorer.thresholds["escalate_low"], scorer.thresholds["alert"]
    if not (0.0 <= lo <= hi <= 1.0):
        raise ModelError(f"thresholds {scorer.thresholds} are not within 0..1")
    diff = scorer.check_probe(atol=tolerance)
    scores = scorer.score(windows)
    if not np.all(np.isfinite(scores)):
        raise ModelError("the model scores the probe windows as NaN or infinite")
    return diff


def load_checked(folder: str | Path, *, tolerance: float | None = None) -> Any:
    """Load an artifact folder (hashes checked) and health-check it; the Scorer.

    The folder's ``site_thresholds.json``, when there is one, must be thresholds
    the agent accepts, calibrated for this model
    (:func:`edge_agent.bundle.check_site_thresholds`, BadInputError).
    """
    from edge_agent.runtime import load_artifact

    scorer = load_artifact(folder, probe=False)
    diff = health_check(scorer, tolerance=tolerance)
    bundle_mod.check_site_thresholds(folder, str(scorer.model_version))
    logger.info(
        "health check of %s (model %s): probe within %.3g",
        folder,
        scorer.model_version,
        diff,
    )
    return scorer


# ------------------------------------------------------------------------- packing


def pack_artifact(artifact: str | Path) -> tuple[bytes, str]:
    """A gzip tar of an artifact's manifest and listed files; (bytes, model_version)."""
    artifact = Path(artifact)
    manifest, names = bundle_mod.artifact_files(artifact)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            data = (artifact / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), str(manifest["model_version"])


def pack_update(
    artifact: str | Path,
    key: str | Path | signing.Ed25519PrivateKey,
    *,
    site: str | None = None,
    gateways: list[str] | tuple[str, ...] = (),
    all_gateways: bool = False,
    url: str | None = None,
    issued_at: float | None = None,
) -> UpdatePackage:
    """Sign an artifact folder as an update message (see :func:`sign_archive`)
    for ``gateways`` of ``site`` (or every gateway of it: ``all_gateways``).

    The folder's files must match its manifest (BadInputError, exit 3, as
    :func:`pack_artifact` checks them) and it must pass the health check every
    gateway runs before it switches (:func:`load_checked`; ModelError, exit 1): an
    update that fails it would be refused everywhere, so it is not signed.
    :func:`sign_archive` alone does no such check.
    """
    targets = update_targets(site, gateways, all_gateways)
    archive, model_version = pack_artifact(artifact)
    try:
        load_checked(artifact)
    except ModelError as exc:
        raise ModelError(
            f"{exc}; not signed: every gateway's health check would refuse this "
            "update"
        ) from exc
    return sign_archive(
        archive,
        model_version,
        key,
        site=targets["site"],
        gateways=targets.get("gateways", ()),
        all_gateways=bool(targets.get("all_gateways")),
        url=url,
        issued_at=issued_at,
    )


def update_targets(
    site: str | None,
    gateways: list[str] | tuple[str, ...] = (),
    all_gateways: bool = False,
) -> dict[str, Any]:
    """The ``targets`` of a signed statement: ``{"site": S, "gateways": [...]}``,
    or ``{"site": S, "all_gateways": true}``; UsageError (exit 2) unless the site
    and either some gateways or ``all_gateways`` are given, as topic-safe ids
    (:func:`edge_agent.protocol.validate_id`)."""
    if site is None:
        raise UsageError(
            "an update must name the site it is for (--site SITE) and its "
            "gateways (--gateway ID, or --all-gateways)"
        )
    validate_id(site, "--site")
    if isinstance(gateways, str):
        gateways = [gateways]
    if all_gateways and gateways:
        raise UsageError("give --gateway or --all-gateways, not both")
    if all_gateways:
        return {"site": site, "all_gateways": True}

    if not gateways:
        raise UsageError(
            f"an update for site {site} must name its gateways (--gateway ID, "
            "repeated) or be for all of them (--all-gateways)"
        )
    for gateway in gateways:
        validate_id(gateway, "--gateway")
    return {"site": site, "gateways": sorted(set(gateways))}


def sign_archive(
    archive: bytes,
    model_version: str,
    key: str | Path | signing.Ed25519PrivateKey,
    *,
    site: str | None = None,
    gateways: list[str] | tuple[str, ...] = (),
    all_gateways: bool = False,
    url: str | None = None,
    issued_at: float | None = None,
) -> UpdatePackage:
    """Sign an artifact archive as an update message for ``gateways`` of
    ``site`` (or all of its gateways: ``all_gateways``); the targets are part of
    the signed statement (:func:`update_targets`, UsageError without them).

    With ``url`` the archive is left out of the message and fetched from there (the
    caller uploads ``UpdatePackage.archive``); otherwise it travels inline.
    """
    targets = update_targets(site, gateways, all_gateways)
    private_key = (
        key
        if isinstance(key, signing.Ed25519PrivateKey)
        else signing.load_private_key(key)
    )
    if url is not None and url.split(":", 1)[0] not in URL_SCHEMES:
        raise UsageError(f"update URL must use one of {URL_SCHEMES}: {url!r}")
    statement = {
        "schema": STATEMENT_SCHEMA,
        "kind": KIND,
        "model_version": model_version,
        "sha256": bundle_mod.sha256_bytes(archive),
        "size": len(archive),
        "issued_at": time.time() if issued_at is None else float(issued_at),
        "key_id": signing.key_id(private_key.public_key()),
        "targets": targets,
    }
    if url is not None:
        statement["url"] = url
    raw = json.dumps(statement, sort_keys=True).encode()
    message = {
        "schema": MESSAGE_SCHEMA,
        "kind": KIND,
        "id": uuid.uuid4().hex,
        "sent_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_version": model_version,
        "statement": base64.b64encode(raw).decode(),
        "signature": base64.b64encode(signing.sign(private_key, raw)).decode(),
    }
    if url is None:
        message["payload"] = base64.b64encode(archive).decode()
    return UpdatePackage(
        message=json.dumps(message).encode(),
        archive=archive,
        model_version=model_version,
        sha256=statement["sha256"],
    )


# ------------------------------------------------------------------------- updater


class ModelUpdater:
    """Apply update messages to the A/B model slots in ``slots_dir``.

    ``pubkey_path``: the Ed25519 key updates must be signed with. ``site`` and
    ``gateway``: this gateway's ids (required): an update is installed only when
    its signed statement names this site and lists this gateway (or all of the
    site's gateways). ``tolerance``:
    the probe tolerance (default: the manifest's ``probe.atol``, else 1e-4).
    ``max_bytes``: the largest archive accepted. ``fetch_timeout``: seconds for an
    update by reference. :meth:`handle` never raises for a bad message; it returns
    an :class:`UpdateResult` that says why.
    """

    def __init__(
        self,
        pubkey_path: str | Path | None = None,
        slots_dir: str | Path | None = None,
        *,
        tolerance: float | None = None,
        max_bytes: int = MAX_ARCHIVE_BYTES,
        fetch_timeout: float = 30.0,
        public_key: str | Path | None = None,
        artifact: str | Path | None = None,
        current_version: str | None = None,
        site: str | None = None,
        gateway: str | None = None,
    ) -> None:
        # ``public_key``/``artifact`` are the agent's names for the same two things:
        # the key file, and the ``current`` link of the slots the model runs from.
        key_path = pubkey_path if pubkey_path is not None else public_key
        if key_path is None:
            raise UsageError("model updates need the update public key file")
        if slots_dir is None:
            if artifact is None:
                raise UsageError("model updates need the model slots folder")
            slots_dir = slots_of(artifact)
        if site is None or gateway is None:
            raise UsageError(
                "model updates need this gateway's site and gateway id: an update "
                "is installed only where its signed statement names them"
            )
        self.site = validate_id(site, "site")
        self.gateway = validate_id(gateway, "gateway")
        self.public_key = signing.load_public_key(key_path)
        self.key_id = signing.key_id(self.public_key)
        self.slots = ModelSlots(slots_dir)
        # What an update killed part way (kill -9, power loss) left beside the
        # slots: its pid no longer runs. A crash loop would fill the slots folder.
        try:
            self.slots.remove_stale_staging()
        except OSError as exc:
            logger.debug("leftovers in %s not removed: %s", self.slots.dir, exc)
        self.tolerance = tolerance
        self.max_bytes = int(max_bytes)
        self.fetch_timeout = float(fetch_timeout)
        self.current_version = current_version
        self._lock = threading.Lock()  # held while one update is worked through
        # The refusal in force has a lock of its own: the agent's status reads it
        # while an update (a slow download, say) holds the one above.
        self._refusal_lock = threading.Lock()
        # (sha256 of the last message handled, its result): the retained update
        # comes again after every reconnect and is not worked through again.
        self._last: tuple[str, UpdateResult] | None = None
        # The status fields of the refusal in force (see last_refusal).
        self._refusal: dict[str, Any] = {}

    @property
    def last_refusal(self) -> dict[str, Any]:
        """The refusal of the retained update, as status fields; empty when none.

        ``update_refused`` (why), ``update_refused_at`` (Unix seconds, when it was
        first refused), ``update_refused_model_version`` (as the message claims
        it; None when it could not be read) and ``update_refused_sha256`` (of the
        message). It holds until an update is installed or names the running
        model, or the retained update is withdrawn; the agent puts it in every
        status, so a refusal does not vanish at the next status interval.
        """
        with self._refusal_lock:
            return dict(self._refusal)

    def _note(self, digest: str, message: Any, result: UpdateResult) -> None:
        """Keep or clear the refusal in force after ``result`` (the lock held)."""
        if result.ok:
            with self._refusal_lock:
                self._refusal = {}
            return

        version = message.get("model_version") if isinstance(message, dict) else None
        refusal = {
            "update_refused": result.reason,
            "update_refused_at": time.time(),
            "update_refused_model_version": (
                None if version is None else str(version)[:200]
            ),
            "update_refused_sha256": digest,
        }
        with self._refusal_lock:
            self._refusal = refusal

    def handle(self, payload: bytes) -> UpdateResult:
        """Verify, install and activate the update in ``payload``, or refuse it.

        The same message as the last one handled is not worked through again
        (see the module doc); its result comes back with ``repeated`` set.
        """
        if not payload.strip():
            logger.info("the retained model update was withdrawn (an empty "
                        "message); the running model stays")
            with self._lock, self._refusal_lock:
                self._last = None  # an update published again is handled anew
                self._refusal = {}
            return UpdateResult(ok=False, withdrawn=True)
        digest = hashlib.sha256(payload).hexdigest()
        with self._lock:
            if self._last is not None and self._last[0] == digest:
                earlier = self._last[1]
                logger.debug(
                    "model update %s: the message handled last (sha256 %s) came "
                    "again; not verified or unpacked again (%s)",
                    earlier.update_id, digest[:16],
                    "installed or running" if earlier.ok else "refused",
                )
                return dataclasses.replace(
                    earlier, scorer=None, changed=False, repeated=True
                )
            update_id = None
            remember = True
            message = None
            try:
                message = _parse_message(payload)
                update_id = message.get("id")
                result = self._apply(message)
            except FetchError as exc:
                # The server, the network or the file at the URL (stale, not
                # uploaded yet) may be right for the next copy: tried again then.
                reason = f"{exc}; {_FETCH_AGAIN}"
                logger.warning("model update not installed: %s", reason)
                result = UpdateResult(ok=False, reason=reason)
                remember = False
            except GatewatchError as exc:
                logger.warning("model update refused: %s", exc)
                result = UpdateResult(ok=False, reason=str(exc))
                # An update that met a flash may install next time: tried again.
                remember = not isinstance(exc, FlashRunningError)
            except OSError as exc:  # a full disk, a read-only slots folder
                problem = write_problem(exc)
                logger.warning("model update not installed: %s", problem)
                result = UpdateResult(ok=False, reason=(
                    f"model update not installed: {problem}; the running model "
                    "stays, and the update is tried again when it comes again"))
                remember = False
            except Exception as exc:  # the agent must survive any update
                logger.exception("model update failed unexpectedly")
                result = UpdateResult(
                    ok=False, reason=f"internal error: {type(exc).__name__}: {exc}"
                )
                remember = False
            result.update_id = update_id
            self._note(digest, message, result)
            if remember:
                self._last = (digest, dataclasses.replace(result, scorer=None))
            return result

    def _apply(self, message: dict[str, Any]) -> UpdateResult:
        """The steps of one update; raises a gatewatch error to refuse it."""
        # 1. The signed statement is the only thing trusted.
        statement = self._verified_statement(message)
        version = str(statement["model_version"])
        self._check_targets(statement, version)
        active = self.slots.active()
        info = self.slots.info(active)
        if active is not None and info.get("sha256") == statement["sha256"]:
            return self._already_running(message, version, active)
        held = self.slots.held_back(
            version, str(statement["sha256"]).lower(), info.get("model_version")
        )
        if held is not None:
            raise RolledBackError(_rolled_back_reason(version, held))
        issued = float(statement["issued_at"])
        running = info.get("model_version")
        # The floor is the newest model ever active, not the running one: after
        # a rollback the updates issued between the two stay refused.
        floor = self.slots.floor()
        older = floor is not None and issued < float(floor["issued_at"])
        if older and version != running:
            raise BadInputError(_downgrade_reason(version, running, floor))

        # 2. The archive, by value or by reference, must be the one signed for.
        archive = self._archive(message, statement)

        # 3. Unpack and health-check beside the slots; only then take a slot.
        staging = self.slots.staging()
        lock = None
        try:
            _unpack(archive, staging)
            # The running model packed again, or flashed from a bundle (whose
            # slot records the bundle's digest, not this archive's): same files.
            if active is not None and _files_match(staging, self.slots.path(active)):
                return self._already_running(message, version, active)
            if older:
                raise BadInputError(
                    _downgrade_reason(version, running, floor, other_files=True)
                )
            load_checked(staging, tolerance=self.tolerance)
            # The flash lock, from the install to the switch: a flash writes the
            # inactive slot too.
            lock = self._hold_flash_lock(version)
            slot = self.slots.inactive()
            path = self.slots.install(
                slot,
                staging,
                {
                    "model_version": version,
                    "sha256": statement["sha256"],
                    "issued_at": issued,
                    "source": f"update {message.get('id')}",
                },
            )

            # 4. Load from the slot itself, check again, then switch.
            scorer = load_checked(path, tolerance=self.tolerance)
            self.slots.switch(slot)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if lock is not None:
                os.close(lock)
        logger.info("model update %s active in slot %s", version, slot)
        return UpdateResult(
            ok=True,
            version=scorer.model_version or version,
            scorer=scorer,
            slot=slot,
            changed=True,
        )

    def _hold_flash_lock(self, version: str) -> int | None:
        """The flash lock of the gateway root (see
        :func:`edge_agent.flash.hold_flash_lock`), or FlashRunningError when a
        flash holds it: the update is refused now and handled anew when it
        comes again."""
        try:
            return hold_flash_lock(self.slots.dir)
        except BlockingIOError:
            raise FlashRunningError(
                f"model update {version} not installed: a flash of this gateway "
                f"is running (it holds {self.slots.dir.parent / LOCK_FILE}); the "
                "update is tried again when it comes again"
            ) from None

    def _already_running(
        self, message: dict[str, Any], version: str, slot: str
    ) -> UpdateResult:
        """The result for an update of the model the active slot already holds:
        nothing is installed, and it is no refusal."""
        from edge_agent.runtime import load_artifact

        logger.info(
            "model update %s: model %s is already running (slot %s); nothing to do",
            message.get("id"),
            version,
            slot,
        )
        return UpdateResult(
            ok=True,
            version=version,
            scorer=load_artifact(self.slots.path(slot)),
            slot=slot,
            reason="already running this model",
        )

    def _verified_statement(self, message: dict[str, Any]) -> dict[str, Any]:
        """Decode and verify the signed statement of a message."""
        raw = _b64(message, "statement")
        signature = _b64(message, "signature")
        try:
            claimed = json.loads(raw).get("key_id")
        except (RecursionError, ValueError, AttributeError):
            claimed = None  # the signature check below refuses it
        signing.verify(
            self.public_key,
            raw,
            signature,
            what="model update",
            signed_by=claimed if isinstance(claimed, str) else None,
        )
        try:
            statement = json.loads(raw)
            if statement.get("schema") != STATEMENT_SCHEMA:
                raise BadInputError(f"statement schema {statement.get('schema')!r}")
            for key in ("model_version", "sha256", "size", "issued_at"):
                statement[key]  # noqa: B018 - presence check
            size = statement["size"]
            if isinstance(size, bool) or int(size) != size or int(size) < 0:
                raise ValueError(f"size {size!r} is not a whole number of bytes >= 0")
            if not math.isfinite(float(statement["issued_at"])):
                raise ValueError(f"issued_at {statement['issued_at']!r} is no time")
            problem = _targets_problem(statement.get("targets"))
            if problem is not None:
                raise ValueError(problem)
        except BadInputError:
            raise
        except (
            RecursionError, ValueError, KeyError, TypeError, AttributeError,
            OverflowError,
        ) as exc:
            raise BadInputError(f"update statement is malformed: {exc}") from exc
        return statement

    def _check_targets(self, statement: dict[str, Any], version: str) -> None:
        """NotForThisGateway unless the signed statement names this site and
        lists this gateway (or all of its gateways); a statement that names no
        targets (signed by an earlier pack-update) is refused too."""
        targets = statement.get("targets")
        if targets is None:
            raise NotForThisGateway(
                f"update {version} names no site or gateway: signed before updates "
                "named their targets; sign it again with --site"
            )
        site = targets.get("site")
        if site != self.site:
            raise NotForThisGateway(
                f"update {version} is for site {site}, not this "
                f"gateway's site {self.site}"
            )
        if targets.get("all_gateways") is True:
            return
        if self.gateway not in targets["gateways"]:
            named = ", ".join(targets["gateways"][:8])
            more = len(targets["gateways"]) - 8
            named += f" and {more} more" if more > 0 else ""
            raise NotForThisGateway(
                f"update {version} is for gateways {named} of site {site}, not "
                f"{self.gateway}"
            )

    def _archive(self, message: dict[str, Any], statement: dict[str, Any]) -> bytes:
        """The archive bytes, checked against the signed size and sha256."""
        size = int(statement["size"])
        if size > self.max_bytes:
            raise BadInputError(
                f"update archive is {size} bytes; the limit is {self.max_bytes}"
            )
        # TODO(gap): chunked transfer (chunks on sub-topics of the model topic) needs
        # the agent to subscribe to model/#; today it is inline or by reference.
        url = None
        if "payload" in message:
            archive = _b64(message, "payload")
        elif "url" in statement:
            url = str(statement["url"])
            archive = self._fetch(url, size)
        else:
            raise BadInputError("update carries neither a payload nor a signed url")
        digest = bundle_mod.sha256_bytes(archive)
        signed = str(statement["sha256"]).lower()
        if url is not None and (len(archive) != size or digest != signed):
            # The file at the URL is not (yet) the one signed: a failed fetch,
            # tried again when the message comes again, not a refusal for good.
            got = (f"more than {size} bytes" if len(archive) > size
                   else f"sha256 {digest}")  # fetched at most one byte past it
            raise FetchError(
                f"the archive fetched from {url} is not the signed one ({got}; "
                f"signed: {size} bytes, sha256 {signed}): the file there is stale "
                "or not uploaded yet"
            )
        if len(archive) != size:
            raise BadInputError(
                f"update archive is {len(archive)} bytes, the signed size is {size}: "
                "truncated or padded"
            )
        if digest != signed:
            raise BadInputError(
                f"update archive sha256 {digest} is not the signed "
                f"{statement['sha256']}: it was modified"
            )
        return archive

    def _fetch(self, url: str, size: int) -> bytes:
        """Download an archive by reference, reading at most one byte past ``size``,
        within ``fetch_timeout`` seconds in all (not per read: a server sending a
        byte a second would hold the update for hours); a download cut short or
        too slow is a FetchError, so the update is tried again when it comes
        again."""
        if url.split(":", 1)[0] not in URL_SCHEMES:
            raise BadInputError(f"update URL scheme is not allowed: {url!r}")
        deadline = time.monotonic() + self.fetch_timeout
        parts: list[bytes] = []
        got = 0
        try:
            with urllib.request.urlopen(url, timeout=self.fetch_timeout) as resp:
                while got <= size:
                    if time.monotonic() > deadline:
                        raise FetchError(
                            f"cannot fetch the update from {url}: {got} of {size} "
                            f"bytes came in {self.fetch_timeout:g} s")
                    read = getattr(resp, "read1", resp.read)  # what has come
                    part = read(min(1 << 16, size + 1 - got))
                    if not part:
                        break
                    parts.append(part)
                    got += len(part)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise FetchError(f"cannot fetch the update from {url}: {exc}") from exc
        if got < size:
            raise FetchError(
                f"cannot fetch the update from {url}: the download ended after "
                f"{got} of {size} bytes")
        return b"".join(parts)


class RolledBackError(BadInputError):
    """An update of a model the operator rolled back from (``edge-agent
    rollback``): held back until a newer model comes or it is flashed again."""


def _rolled_back_reason(version: str, mark: dict[str, Any]) -> str:
    """Why an update is held back by a rollback ``mark`` of ``slots.json``."""
    model = mark.get("model_version")
    when = mark.get("rolled_back_at")
    at = (
        ""
        if when is None
        else time.strftime(" at %Y-%m-%dT%H:%M:%SZ", time.gmtime(float(when)))
    )
    same = "" if model == version else f" (update {version} is its very archive)"
    return (
        f"model {model} was rolled back by the operator (edge-agent rollback{at})"
        f"{same}; publish a newer update or flash to install it again"
    )


def _downgrade_reason(
    version: str,
    running: Any,
    floor: dict[str, Any] | None,
    other_files: bool = False,
) -> str:
    """Why an update issued before the downgrade ``floor`` (see
    :meth:`edge_agent.flash.ModelSlots.floor`) is refused."""
    files = " and holds other files" if other_files else ""
    newest = (floor or {}).get("model_version")
    if newest == running:
        return (
            f"update {version} was issued before the running model {running}"
            f"{files}; refusing a downgrade (use rollback)"
        )
    return (
        f"update {version} was issued before model {newest}, the newest this "
        f"gateway has run (it now runs the older {running}){files}; refusing a "
        "downgrade: publish a newer update"
    )


class NotForThisGateway(BadInputError):
    """An update whose signed statement names another site, does not list this
    gateway, or names no targets at all."""


def _targets_problem(targets: Any) -> str | None:
    """What is wrong with a statement's ``targets`` (None: absent or sound)."""
    if targets is None:
        return None  # refused by _check_targets, with a hint
    if not isinstance(targets, dict) or not isinstance(targets.get("site"), str):
        return "targets is not an object with a text site"
    gateways = targets.get("gateways")
    if targets.get("all_gateways") is True and gateways is None:
        gateways = []
    elif (
        "all_gateways" in targets
        or not isinstance(gateways, list)
        or not gateways
        or not all(isinstance(g, str) for g in gateways)
    ):
        return "targets names neither a list of gateways nor all_gateways: true"

    # Ids as the agent's config takes them: the names go into refusals as they are.
    try:
        validate_id(targets["site"], "site")
        for gateway in gateways:
            validate_id(gateway, "gateway")
    except UsageError as exc:
        return f"targets names a {exc}"
    return None


class FetchError(BadInputError):
    """An update by reference whose archive could not be fetched, or whose file
    at the URL is not the signed archive (the server or the network may be back,
    and the right file uploaded, for the next copy of the message)."""


# How a failed fetch ends, in its log line and the status's ``update_refused``.
_FETCH_AGAIN = (
    "the running model stays, and the update is tried again when it comes again"
)


class FlashRunningError(GatewatchError):
    """An update that came while a flash of the gateway held its flash lock:
    refused, and not remembered, so that the next copy of the message (the
    retained update, after a reconnect or restart) is handled anew."""


def slots_of(artifact: str | Path) -> Path:
    """The slots folder of an artifact path that is a flashed gateway's model.

    Accepted: the ``current`` link itself, or a slot folder (``A``/``B``) next to
    one. Anything else is a UsageError: an update needs a second slot to go to.
    """
    path = Path(artifact)
    if path.is_symlink() and path.name == CURRENT:
        return path.parent
    if path.name in SLOTS and (path.parent / CURRENT).is_symlink():
        return path.parent
    raise UsageError(
        f"model updates need the artifact to be the '{CURRENT}' link of a model "
        f"slots folder, as flash installs it (e.g. /opt/gatewatch/models/current); "
        f"{path} is not"
    )


def _parse_message(payload: bytes) -> dict[str, Any]:
    """The JSON object of an update message, or BadInputError."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"model update is not JSON text: byte {exc.start} is not UTF-8"
        ) from exc
    try:
        message = json.loads(text)
    except (RecursionError, ValueError) as exc:
        # RecursionError: JSON nested thousands deep ("[" * 100000) is refused as
        # malformed like any other, not taken for a fault of the updater.
        raise BadInputError(
            f"model update is not JSON: {type(exc).__name__}: {exc}"[:200]
        ) from exc
    if not isinstance(message, dict):
        raise BadInputError("model update is not a JSON object")
    if message.get("kind") != KIND or message.get("schema") != MESSAGE_SCHEMA:
        raise BadInputError(
            f"not a model update (schema {message.get('schema')!r}, kind "
            f"{message.get('kind')!r})"
        )
    return message


def _files_match(update: Path, slot: Path) -> bool:
    """True when every file of the unpacked ``update`` is in ``slot``, byte for byte.

    Files only the slot has are left out of it: a ``site_thresholds.json``
    calibrated on the gateway does not make the running model another one.
    """
    for path in sorted(update.rglob("*")):
        if path.is_dir():
            continue
        twin = slot / path.relative_to(update)
        if twin.is_symlink() or not twin.is_file():
            return False
        if bundle_mod.sha256_path(twin) != bundle_mod.sha256_path(path):
            return False
    return True


def _b64(message: dict[str, Any], key: str) -> bytes:
    """One base64 field of a message, decoded strictly."""
    value = message.get(key)
    if not isinstance(value, str):
        raise BadInputError(f"model update lacks {key!r}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInputError(f"model update field {key!r} is not base64: {exc}") from exc


def _unpack(archive: bytes, dest: Path) -> None:
    """Unpack an artifact archive into the empty folder ``dest``: plain files only."""
    where = "update archive"
    for name, tar, member in bundle_mod.iter_members(
        io.BytesIO(archive), where=where, max_members=MAX_ARCHIVE_MEMBERS
    ):
        bundle_mod.copy_member(tar, member, dest, name, where=where)
    if not (dest / "manifest.json").is_file():
        raise BadInputError("update archive holds no manifest.json")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """``python -m edge_agent.ota check DIR``: health-check an artifact folder."""
    parser = argparse.ArgumentParser(prog="python -m edge_agent.ota")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="load an artifact and score its probe")
    check.add_argument("artifact", type=Path)
    check.add_argument("--tolerance", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        scorer = load_checked(args.artifact, tolerance=args.tolerance)
    except GatewatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"ok: model {scorer.model_version} passes its health check")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
