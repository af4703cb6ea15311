"""Signed agent bundles: everything a gateway needs to install offline, in one file.

A bundle is a gzip tar. Its first member is ``MANIFEST.json`` (what the bundle holds
and the sha256 and size of every other member), its second ``MANIFEST.sig`` (the
Ed25519 signature of the manifest's exact bytes). Then come ``wheels/`` (the agent's
wheel built from this source tree and the wheels of its ``edge`` requirements),
``model/`` (a model artifact, with the site's ``site_thresholds.json`` when the
artifact folder holds one), ``config/gateway.toml`` and
``systemd/gatewatch-agent.service``.

The bundled config is read by the flashed agent as it is, so its paths must be the
flashed layout's (:func:`check_flashed_paths`): ``artifact`` the link to the active
model slot, ``/opt/gatewatch/models/current``, and ``update_public_key``, when model
updates are wanted, the key flash installs, ``/etc/gatewatch/update.pub``.

Reading a bundle is one streaming pass that trusts nothing before the signature:
members must be plain files with relative names inside the bundle (no links, devices,
``..`` or absolute paths), each listed in the signed manifest with its size and hash,
and all of them present. A truncated or altered bundle raises a gatewatch error, and
when extracting, nothing is written outside the folder the caller gave.

This module also registers the ``keygen``, ``bundle``, ``verify``, ``flash``,
``rollback`` and ``pack-update`` subcommands of ``edge-agent`` (:func:`register`).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from edge_agent import logger, signing
from flows.argtypes import check_writable_above
from flows.errors import BadInputError, GatewatchError, UsageError, json_problem
from flows.outfile import check_output, refuse_existing, write_file

BUNDLE_SCHEMA = "gatewatch-bundle/1"
MANIFEST_NAME = "MANIFEST.json"
SIGNATURE_NAME = "MANIFEST.sig"
MODEL_DIR = "model"
CONFIG_PATH = "config/gateway.toml"
UNIT_PATH = "systemd/gatewatch-agent.service"
WHEEL_DIR = "wheels"
WHEEL_EPOCH = 315532800  # 1980-01-01, the earliest zip time: the agent wheel's files

# Limits that keep a hostile archive from filling the disk or memory.
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBERS = 4096
MAX_TOTAL_BYTES = 4 << 30

# The package that a gateway installs, and the extra with its runtime requirements.
AGENT_PACKAGE = "gatewatch"
AGENT_EXTRA = "edge"

# Gateway paths, as the gateway sees them (flash puts them under --root).
OPT_DIR = "opt/gatewatch"
ETC_DIR = "etc/gatewatch"
UNIT_FILE = "etc/systemd/system/gatewatch-agent.service"
MODELS_DIR = f"{OPT_DIR}/models"
MODEL_LINK = f"{MODELS_DIR}/current"  # the active model slot: the config's artifact
CONFIG_FILE = f"{ETC_DIR}/gateway.toml"
UPDATE_KEY_FILE = f"{ETC_DIR}/update.pub"  # the config's update_public_key
# The flashed agent's state folder (systemd StateDirectory): the outbox and any
# alerts or summary file must lie in it, the unit lets it write nowhere else.
STATE_DIR = "var/lib/gatewatch"

# What ``edge-agent calibrate`` writes into an artifact folder; the agent prefers it
# to the artifact's own thresholds (edge_agent.agent.SITE_THRESHOLDS).
SITE_THRESHOLDS = "site_thresholds.json"


class BundleError(GatewatchError):
    """A bundle that cannot be built: the wheel build or the download failed."""


@dataclass(frozen=True)
class FileEntry:
    """One member a bundle's manifest vouches for."""

    sha256: str
    size: int


@dataclass(frozen=True)
class BundleManifest:
    """The signed manifest of a bundle, as read back and verified.

    ``raw`` is the exact signed bytes; ``data`` the parsed JSON; ``files`` maps
    member names to their :class:`FileEntry`.
    """

    raw: bytes
    data: dict[str, Any]
    files: dict[str, FileEntry]

    @property
    def digest(self) -> str:
        """sha256 of the signed manifest bytes: names one bundle exactly."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def wheels_digest(self) -> str:
        """sha256 over the bundled wheels and the requirement: names one venv."""
        items = sorted(
            (name, entry.sha256)
            for name, entry in self.files.items()
            if name.startswith(f"{WHEEL_DIR}/")
        )
        return sha256_bytes(json.dumps([self.requirement, items]).encode())

    @property
    def agent_version(self) -> str:
        """Version of the agent wheel the bundle carries."""
        return str(self.data["agent"]["version"])

    @property
    def requirement(self) -> str:
        """What ``pip install`` is asked for on the gateway."""
        return str(self.data["agent"]["requirement"])

    @property
    def model_version(self) -> str:
        """``model_version`` of the bundled artifact."""
        return str(self.data["model"]["model_version"])

    @property
    def python(self) -> str:
        """``major.minor`` of the Python the wheels were chosen for."""
        return str(self.data["python"])


# ------------------------------------------------------------------- hashing helpers


def gateway_root(text: str) -> Path:
    """``--root`` of flash and rollback: a path, never the empty string, which
    ``Path`` would read as the current folder (an unset ``$GW_ROOT`` would then
    flash a gateway into wherever the command ran)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "is empty (an unset shell variable?); give the gateway's / explicitly "
            "(. for the current folder)"
        )
    return Path(text)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ safe tar reading


def safe_member_name(name: str, *, where: str) -> str:
    """The normalised relative name of a tar member, or BadInputError.

    Refused: empty names, absolute paths, ``..`` anywhere, backslashes, NUL and
    control characters. A leading ``./`` is dropped.
    """
    if not name or "\x00" in name or "\\" in name:
        raise BadInputError(f"member name {name!r} is not allowed", path=where)
    if any(ord(ch) < 32 for ch in name):
        raise BadInputError(f"member name {name!r} has control characters", path=where)
    pure = PurePosixPath(name)
    if pure.is_absolute():
        raise BadInputError(f"member {name!r} has an absolute path", path=where)
    parts = [part for part in pure.parts if part != "."]
    if not parts or ".." in parts:
        raise BadInputError(f"member {name!r} points outside the archive", path=where)
    return "/".join(parts)


def iter_members(
    fileobj: IO[bytes], *, where: str, max_members: int = MAX_MEMBERS
) -> Iterator[tuple[str, tarfile.TarFile, tarfile.TarInfo]]:
    """Yield (safe name, tar, member) for each regular file of a gzip tar stream.

    Directories are skipped (the reader makes its own); links, devices, FIFOs and
    anything else raise BadInputError, as do duplicate names, too many members and
    a stream that is truncated or not a gzip tar at all. Once the caller has read
    every member, the rest of the gzip stream is read and its CRC checked.
    """
    seen: set[str] = set()
    gz = gzip.GzipFile(fileobj=fileobj, mode="rb")
    draining = False
    try:
        with tarfile.open(fileobj=gz, mode="r|") as tar:
            for count, member in enumerate(tar, start=1):
                if count > max_members:
                    raise BadInputError(
                        f"more than {max_members} members; refusing", path=where
                    )
                name = safe_member_name(member.name, where=where)
                if member.isdir():
                    continue
                if not member.isreg():
                    kind = "link" if member.issym() or member.islnk() else "special"
                    raise BadInputError(
                        f"member {name!r} is a {kind} file; only regular files "
                        "are allowed",
                        path=where,
                    )
                if name in seen:
                    raise BadInputError(f"member {name!r} appears twice", path=where)
                seen.add(name)
                yield name, tar, member

        # Read to the end of the gzip stream, so its length and CRC are checked too:
        # a file cut inside the tar's zero padding still has members that all pass.
        draining = True
        while gz.read(1 << 20):
            pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        # Past a whole, checked gzip stream, bytes that start no other one.
        if draining and str(exc).startswith("Not a gzipped file"):
            raise BadInputError(
                f"not a single gzip tar (damaged, or with bytes after its end): "
                f"{exc}",
                path=where,
            ) from exc
        raise BadInputError(
            f"not a complete gzip tar (truncated or damaged): {exc}", path=where
        ) from exc


@contextlib.contextmanager
def _damage_is_bad_input(where: str) -> Iterator[None]:
    """Turn the errors of reading a damaged gzip tar into BadInputError."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BadInputError(
            f"not a complete gzip tar (truncated or damaged): {exc}", path=where
        ) from exc


def read_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, *, limit: int, where: str
) -> bytes:
    """The whole content of a small member, refusing one over ``limit`` bytes."""
    if member.size > limit:
        raise BadInputError(
            f"member {member.name!r} is {member.size} bytes; the limit is {limit}",
            path=where,
        )
    handle = tar.extractfile(member)
    if handle is None:  # pragma: no cover - regular files always have a handle
        raise BadInputError(f"member {member.name!r} has no content", path=where)
    with _damage_is_bad_input(where):
        data = handle.read()
    if len(data) != member.size:
        raise BadInputError(f"member {member.name!r} is truncated", path=where)
    return data


def copy_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    dest_root: Path | None,
    name: str,
    *,
    where: str = "",
) -> tuple[str, int]:
    """Hash a member while (optionally) writing it under ``dest_root``/``name``.

    The file is created fresh (``O_EXCL``, mode 0644) in folders this function makes,
    so a name that survived :func:`safe_member_name` cannot land outside the root.
    Returns (sha256 hex, bytes read).
    """
    handle = tar.extractfile(member)
    digest = hashlib.sha256()
    size = 0
    out = None
    if dest_root is not None:
        target = dest_root.joinpath(*name.split("/"))
        if not target.resolve().is_relative_to(dest_root.resolve()):
            raise BadInputError(f"member {name!r} would land outside {dest_root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        out = os.fdopen(fd, "wb")
    try:
        assert handle is not None
        while True:
            with _damage_is_bad_input(where):
                chunk = handle.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    return digest.hexdigest(), size


# --------------------------------------------------------------------------- verify


# (path into the manifest, allowed types) of every field read after verification.
_MANIFEST_FIELDS: tuple[tuple[tuple[str, ...], type | tuple[type, ...]], ...] = (
    (("key_id",), str),
    (("python",), str),
    (("agent",), dict),
    (("agent", "version"), str),
    (("agent", "requirement"), str),
    (("model",), dict),
    (("model", "model_version"), str),
    (("config",), str),
    (("unit",), str),
    (("files",), dict),
)
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")  # whole value: fullmatch


def _manifest_field(data: dict[str, Any], keys: tuple[str, ...], where: str) -> Any:
    """The value at ``keys`` in the manifest; BadInputError naming it when absent."""
    node: Any = data
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise BadInputError(
                f"bundle manifest lacks the field {'.'.join(keys[: depth + 1])!r}",
                path=where,
            )
        node = node[key]
    return node


def _type_names(types: type | tuple[type, ...]) -> str:
    """``str`` or ``int or float``: the names of the allowed types."""
    if isinstance(types, type):
        return types.__name__
    return " or ".join(t.__name__ for t in types)


def _finite_or_null(value: Any) -> bool:
    """Whether ``value`` is null or a finite number (an int past float64 is not)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _file_entry(name: str, entry: Any, where: str) -> FileEntry:
    """One ``files`` entry: a 64-hex-digit sha256 and a size of 0 or more bytes."""
    if not isinstance(entry, dict):
        entry = {}
    sha, size = entry.get("sha256"), entry.get("size")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise BadInputError(
            f"bundle manifest entry {name!r} lacks a sha256 of 64 hex digits",
            path=where,
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadInputError(
            f"bundle manifest entry {name!r} lacks a size in bytes (0 or more)",
            path=where,
        )
    return FileEntry(sha.lower(), size)


def _parse_manifest(raw: bytes, where: str) -> BundleManifest:
    """Parse signed manifest bytes into a :class:`BundleManifest` (schema checked)."""
    try:
        data = json.loads(raw)
    except (RecursionError, ValueError) as exc:
        raise BadInputError(
            f"bundle manifest is malformed: {json_problem(exc)}", path=where
        ) from exc
    if not isinstance(data, dict):
        raise BadInputError("bundle manifest is not a JSON object", path=where)
    if data.get("schema") != BUNDLE_SCHEMA:
        raise BadInputError(
            f"manifest schema is {data.get('schema')!r}, expected {BUNDLE_SCHEMA!r}",
            path=where,
        )

    # Every field something reads later, with its type: a signature proves who
    # wrote the manifest, not that it is well formed.
    for keys, types in _MANIFEST_FIELDS:
        value = _manifest_field(data, keys, where)
        if isinstance(value, bool) or not isinstance(value, types):
            raise BadInputError(
                f"bundle manifest field {'.'.join(keys)!r} is "
                f"{type(value).__name__}, expected {_type_names(types)}",
                path=where,
            )
    if not _finite_or_null(data.get("created_ts")):
        raise BadInputError(
            "bundle manifest field 'created_ts' is not a finite number", path=where
        )

    files = {
        safe_member_name(name, where=where): _file_entry(name, entry, where)
        for name, entry in data["files"].items()
    }
    if MANIFEST_NAME in files or SIGNATURE_NAME in files:
        raise BadInputError("bundle manifest lists itself", path=where)
    return BundleManifest(raw=raw, data=data, files=files)


def verify_bundle(
    bundle: str | Path,
    pubkey: str | Path | signing.Ed25519PublicKey,
    *,
    extract_to: str | Path | None = None,
) -> BundleManifest:
    """Check a bundle's signature and every member; optionally unpack it.

    ``extract_to`` (an empty or absent folder) receives the members as they are
    checked. If anything fails, what was written there is removed and a gatewatch
    error is raised: :class:`~edge_agent.signing.SignatureError` for a signature
    that does not hold, :class:`~flows.errors.BadInputError` for the rest.
    """
    bundle = Path(bundle)
    where = str(bundle)
    public_key = (
        pubkey
        if isinstance(pubkey, signing.Ed25519PublicKey)
        else signing.load_public_key(pubkey)
    )
    dest = Path(extract_to) if extract_to is not None else None
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise UsageError(f"{dest} must be empty to unpack a bundle into it")
    try:
        handle = open(bundle, "rb")
    except OSError as exc:
        raise BadInputError(f"cannot open the bundle: {exc}", path=where) from exc
    try:
        with handle:
            manifest = _verify_stream(handle, public_key, dest, where)
    except BaseException:
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    logger.info(
        "verified bundle %s: agent %s, model %s, %d files",
        bundle,
        manifest.agent_version,
        manifest.model_version,
        len(manifest.files),
    )
    return manifest


def _verify_stream(
    handle: IO[bytes],
    public_key: signing.Ed25519PublicKey,
    dest: Path | None,
    where: str,
) -> BundleManifest:
    """One pass over the tar: manifest, signature, then every member in turn."""
    members = iter_members(handle, where=where)

    # The manifest and its signature come first, so nothing else is read unsigned.
    head = []
    for name, tar, member in members:
        head.append(
            (name, read_member(tar, member, limit=MAX_MANIFEST_BYTES, where=where))
        )
        if len(head) == 2:
            break
    names = [name for name, _ in head]
    if names != [MANIFEST_NAME, SIGNATURE_NAME]:
        raise BadInputError(
            f"a bundle starts with {MANIFEST_NAME} and {SIGNATURE_NAME}; this one "
            f"starts with {names}",
            path=where,
        )
    raw, signature = head[0][1], head[1][1]
    claimed = _claimed_key_id(raw)
    signing.verify(
        public_key, raw, signature, what=f"bundle {where}", signed_by=claimed
    )
    manifest = _parse_manifest(raw, where)

    # Every other member: listed, the right size, the right hash.
    seen: set[str] = set()
    total = 0
    for name, tar, member in members:
        entry = manifest.files.get(name)
        if entry is None:
            raise BadInputError(
                f"member {name!r} is not in the signed manifest", path=where
            )
        if member.size != entry.size:
            raise BadInputError(
                f"member {name!r} is {member.size} bytes; the manifest says "
                f"{entry.size}",
                path=where,
            )
        total += member.size
        if total > MAX_TOTAL_BYTES:
            raise BadInputError("bundle unpacks to more than the limit", path=where)
        digest, size = copy_member(tar, member, dest, name, where=where)
        if size != entry.size or digest != entry.sha256:
            raise BadInputError(
                f"sha256 mismatch for {name}: manifest {entry.sha256}, bundle "
                f"{digest}; the bundle was modified",
                path=where,
            )
        seen.add(name)
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise BadInputError(
            f"bundle lacks {len(missing)} signed file(s): {', '.join(missing[:5])}",
            path=where,
        )
    return manifest


def _claimed_key_id(raw: bytes) -> str | None:
    """The key id an (unverified) manifest claims, for a clearer wrong-key error."""
    try:
        value = json.loads(raw).get("key_id")
    except (RecursionError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------- wheels


def source_root() -> Path:
    """The source tree this agent was installed from (holds ``pyproject.toml``)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise UsageError(
            f"no pyproject.toml next to {root / 'edge_agent'}; pass --source with the "
            "gatewatch source tree"
        )
    return root


def runtime_requirements(source: Path, extra: str = AGENT_EXTRA) -> list[str]:
    """The core requirements and those of ``extra``, as pinned in pyproject.toml."""
    try:
        project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        raise UsageError(f"cannot read {source / 'pyproject.toml'}: {exc}") from exc
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise UsageError(f"pyproject.toml has no {extra!r} extra")
    out: list[str] = []
    for req in [*project.get("dependencies", []), *extras[extra]]:
        if req not in out:
            out.append(req)
    return out


def build_agent_wheel(source: Path, outdir: Path, *, compiled: bool = False) -> Path:
    """Build the agent's wheel from a clean copy of ``source`` into ``outdir``.

    The copy keeps stale ``build/`` leftovers of the working tree out of the wheel.
    ``compiled``: build the flow meter's compiled packet path into it (``setup.py``;
    a wheel for this machine's Python and platform only, and pure Python after all
    where Cython or a C compiler is missing); otherwise a pure-Python wheel, which
    installs anywhere and meters packets about ten times slower.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gatewatch-src-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        names = ("pyproject.toml", "README.md", "LICENSE")
        for name in names + (("setup.py",) if compiled else ()):
            if (source / name).is_file():
                shutil.copy2(source / name, tree / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for pkg in ("flows", "teacher", "student", "compress", "edge_agent"):
            if (source / pkg).is_dir():
                shutil.copytree(source / pkg, tree / pkg, ignore=ignore)
        if not (tree / "README.md").exists():
            (tree / "README.md").write_text("gatewatch\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(outdir),
            str(tree),
        ]
        if not compiled:  # setuptools of this environment is enough
            cmd.insert(cmd.index("--quiet"), "--no-build-isolation")
        # A fixed time for the wheel's zip entries, unless one is given: the same
        # source tree then gives the same wheel, so a re-flash of an unchanged
        # agent finds its release (named by the wheels' digest) already built.
        env = {**os.environ}
        env.setdefault("SOURCE_DATE_EPOCH", str(WHEEL_EPOCH))
        if compiled:  # nor the temporary folder's name in the compiled module
            flags = f"-ffile-prefix-map={tree}=. -ffile-prefix-map={tmp}=."
            env["CFLAGS"] = f"{env.get('CFLAGS', '')} {flags}".strip()
        _run(cmd, "building the agent wheel", env=env)
    wheels = sorted(outdir.glob(f"{AGENT_PACKAGE}-*.whl"))
    if not wheels:
        raise BundleError(f"pip wheel wrote no {AGENT_PACKAGE} wheel into {outdir}")
    return wheels[-1]


# Platform tags a gateway of a given tag also runs (PEP 600, PEP 656), as pip's
# packaging.tags lists them for a glibc or musl of that version: a manylinux_2_N
# gateway takes every manylinux_2_M with M <= N down to 2_17 (2_5 on x86_64 and
# i686), and the legacy names of 2_17, 2_12 and 2_5 where those go.
_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_(\w+)")
_MUSLLINUX = re.compile(r"musllinux_(\d+)_(\d+)_(\w+)")
_LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
_LEGACY_TAG = re.compile(r"(manylinux2014|manylinux2010|manylinux1)_(\w+)")


def compatible_platforms(tag: str) -> list[str]:
    """The pip platform tags a gateway of platform ``tag`` can install, ``tag``
    first, newest to oldest, for ``pip download --platform`` (once per tag).

    Projects publish wheels for the oldest glibc they need, so one gateway's
    requirements can span several tags: ai-edge-litert ships
    ``manylinux_2_27_aarch64`` while pyarrow ships ``manylinux_2_28_aarch64``,
    and pip takes a ``--platform`` tag only as written. ``manylinux_2_N_ARCH``
    (or a legacy ``manylinux2014_ARCH`` and the like) gives every older
    ``manylinux_2_M_ARCH`` down to 2_17 (2_5 on x86_64 and i686) with the
    legacy names on the way; ``musllinux_1_N_ARCH`` every ``musllinux_1_M_ARCH``
    down to 1_0. Any other tag (``linux_armv7l``, ``macosx_...``, which pip
    widens itself) is kept as given.
    """
    legacy = _LEGACY_TAG.fullmatch(tag)
    if legacy:
        glibc = {v: k for k, v in _LEGACY_MANYLINUX.items()}[legacy.group(1)]
        return _dedupe([tag, *compatible_platforms(f"manylinux_2_{glibc}_"
                                                   f"{legacy.group(2)}")])
    many = _MANYLINUX.fullmatch(tag)
    if many and many.group(1) == "2":
        minor, arch = int(many.group(2)), many.group(3)
        oldest = 5 if arch in ("x86_64", "i686") else 17
        tags = []
        for m in range(minor, oldest - 1, -1):
            tags.append(f"manylinux_2_{m}_{arch}")
            if m in _LEGACY_MANYLINUX:
                tags.append(f"{_LEGACY_MANYLINUX[m]}_{arch}")
        return _dedupe([tag, *tags])
    musl = _MUSLLINUX.fullmatch(tag)
    if musl and musl.group(1) == "1":
        arch = musl.group(3)
        older = [f"musllinux_1_{m}_{arch}" for m in range(int(musl.group(2)), -1, -1)]
        return _dedupe([tag, *older])
    return [tag]


def _dedupe(tags: list[str]) -> list[str]:
    """``tags`` in their order, each once."""
    return list(dict.fromkeys(tags))


def runtime_wheels(
    requirements: list[str], cache: Path, *, platform_tag: str | None = None
) -> list[Path]:
    """Wheels for ``requirements`` and their dependencies, from or into ``cache``.

    A cache entry is a folder named by the hash of the requirement list, the Python
    version and the platform, with a ``lock.json`` of the wheels and their sha256.
    An entry whose files all still match is reused without asking an index.
    ``platform_tag`` (the gateway's, as given) is asked of pip together with the
    older tags that gateway also runs (:func:`compatible_platforms`); the cache
    entry is named by the tag as given.
    """
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    plat = platform_tag or f"{sys.platform}-{platform.machine()}"
    key = sha256_bytes(json.dumps([requirements, python, plat]).encode())[:16]
    entry = cache / key
    lock = entry / "lock.json"

    # Reuse a complete entry.
    if lock.is_file():
        try:
            listed = json.loads(lock.read_text())["wheels"]
            paths = [entry / name for name in listed]
            if all(p.is_file() and sha256_path(p) == listed[p.name] for p in paths):
                logger.info("using %d cached wheels from %s", len(paths), entry)
                return paths
        except (ValueError, KeyError, TypeError, OSError):
            pass
        logger.info("wheel cache entry %s is stale; downloading again", entry)

    # Download into a scratch folder, then move the finished entry into place.
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--only-binary=:all:",
            "--quiet",
            "--dest",
            str(scratch),
        ]
        if platform_tag:
            # TODO(gap): only the build machine's own platform is tested end to
            # end; a manylinux_2_28_aarch64 bundle was built and verified here,
            # never installed and run on such a gateway.
            # Every tag the gateway runs, not only the one given: the wheels of
            # its requirements are built for different glibc versions.
            for tag in compatible_platforms(platform_tag):
                cmd += ["--platform", tag]
            cmd += ["--python-version", python]
        _run(cmd + requirements, "downloading the edge wheels")
        wheels = sorted(scratch.glob("*.whl"))
        if not wheels:
            raise BundleError("pip download produced no wheels")
        lock_data = {
            "requirements": requirements,
            "python": python,
            "platform": plat,
            "wheels": {p.name: sha256_path(p) for p in wheels},
        }
        (scratch / "lock.json").write_text(json.dumps(lock_data, indent=1))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(scratch, entry)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("cached %d wheels in %s", len(wheels), entry)
    return [entry / p.name for p in wheels]


def default_wheel_cache() -> Path:
    """Where wheels are cached when ``--wheel-cache`` is not given."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gatewatch" / "wheels"


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run a pip command; BundleError with its output when it fails."""
    logger.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise BundleError(
            f"{what} failed (exit {proc.returncode}): " + " | ".join(tail)
        )


# ----------------------------------------------------------------------------- build


def systemd_unit() -> str:
    """The systemd unit that runs the agent from the installed venv."""
    return (
        "[Unit]\n"
        "Description=gatewatch edge agent (flow scoring, MQTT escalation)\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        # TODO(gap): runs as root; a dedicated user needs the package to create it.
        "Type=simple\n"
        f"ExecStart=/{OPT_DIR}/venv/bin/edge-agent run --config "
        f"/{ETC_DIR}/gateway.toml\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "NoNewPrivileges=yes\n"
        "ProtectSystem=strict\n"
        "ProtectHome=yes\n"
        "PrivateTmp=yes\n"
        f"ReadWritePaths=/{OPT_DIR}/models /{STATE_DIR}\n"
        "StateDirectory=gatewatch\n"
        # The default outbox ($XDG_STATE_HOME/gatewatch/outbox-S-G.sqlite) then
        # lies in the state folder, the one place besides the models it may write.
        "Environment=XDG_STATE_HOME=/var/lib\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def artifact_files(artifact: Path) -> tuple[dict[str, Any], list[str]]:
    """The artifact manifest and its file list, every listed hash checked.

    Only ``manifest.json``, the files it lists and the site's calibrated thresholds
    (``site_thresholds.json``, checked by :func:`check_site_thresholds`) go into a
    bundle or an update, so a stray file in the folder cannot ride along. A
    ``model_version`` the re-scorer would refuse is a BadInputError naming the
    manifest (:func:`edge_agent.runtime.check_model_version`).
    """
    path = artifact / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        hashes = manifest["sha256"]
        model_version = manifest["model_version"]
    except (OSError, RecursionError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(
            f"not an artifact manifest: {json_problem(exc)}", path=str(path)
        ) from exc
    if not isinstance(hashes, dict) or not model_version:
        raise BadInputError("manifest needs sha256 and model_version", path=str(path))
    from edge_agent.runtime import check_model_version

    # Not covered by the sha256 list: an edited name would ride into every
    # escalation of every gateway, and the re-scorer would refuse them all.
    check_model_version(manifest, path)
    names = []
    for name, expected in sorted(hashes.items()):
        safe = safe_member_name(name, where=str(path))
        file = artifact / safe
        if file.is_symlink() or not file.is_file():
            raise BadInputError(f"{safe} is not a regular file", path=str(artifact))
        if sha256_path(file) != str(expected).lower():
            raise BadInputError(
                f"sha256 mismatch for {safe}: the artifact was modified",
                path=str(artifact),
            )
        names.append(safe)
    site = check_site_thresholds(artifact, str(model_version))
    if site is not None and SITE_THRESHOLDS not in names:
        names.append(SITE_THRESHOLDS)
    return manifest, ["manifest.json", *names]


def check_site_thresholds(artifact: str | Path, model_version: str) -> Path | None:
    """The artifact folder's ``site_thresholds.json`` once checked; None if absent.

    The file must be a regular file whose thresholds the agent accepts
    (:func:`edge_agent.agent.read_thresholds_file`) and, when it names the model it
    was calibrated for (``edge-agent calibrate`` does), that model must be
    ``model_version``: another model's scores are on another scale. Anything else
    is a BadInputError (exit 3) naming the file.
    """
    from edge_agent.agent import read_thresholds_file

    path = Path(artifact) / SITE_THRESHOLDS
    if not path.is_symlink() and not path.exists():
        return None
    if path.is_symlink() or not path.is_file():
        raise BadInputError(
            "is not a regular file; site thresholds must be a JSON file written by "
            "edge-agent calibrate",
            path=str(path),
        )

    # BadInputError naming the file and the key, or the model it was made for.
    read_thresholds_file(path, model_version)
    return path


def _check_agent_config(config: Path) -> None:
    """UsageError unless ``edge-agent run --config CONFIG`` would accept the config.

    The flashed agent runs with this file alone, so a missing ``source`` or ``site``,
    an unknown key or a value out of range would only show on the gateway.
    """
    from edge_agent.config import AgentConfig

    try:
        AgentConfig.load(config, {})
    except GatewatchError as exc:
        raise UsageError(
            f"config {config}: {str(exc).removeprefix(f'config {config}: ')} (the "
            "flashed agent runs with this config alone)"
        ) from exc


def check_flashed_paths(
    config: dict[str, Any], where: str, *, root: Path | None = None
) -> None:
    """UsageError unless the config's paths are the ones flash installs.

    The flashed agent runs ``edge-agent run --config /etc/gatewatch/gateway.toml``
    and nothing else, so ``artifact`` must be the link to the active model slot
    (``/opt/gatewatch/models/current``) and ``update_public_key``, when set, the
    key flash writes (``/etc/gatewatch/update.pub``). ``where`` names the config in
    the message. With ``root`` (flashing into a folder) the same paths under that
    folder are accepted too, for an agent run from the folder itself; without it
    (building a bundle) any folder in front of them is, and flash checks it.
    """
    settings = config.get("agent", config)
    if not isinstance(settings, dict):
        raise UsageError(f"config {where}: [agent] must be a table")
    wanted = {"artifact": MODEL_LINK, "update_public_key": UPDATE_KEY_FILE}
    for key, relative in wanted.items():
        value = settings.get(key)
        if value is None and key == "update_public_key":
            continue  # no model updates: flash still installs the key, unused
        gateway_path = f"/{relative}"
        if value is None:
            raise UsageError(
                f"config {where}: {key} is not set; the flashed agent runs with "
                f'--config only, so set {key} = "{gateway_path}"'
            )
        if not isinstance(value, str) or not _is_flashed_path(value, relative, root):
            from edge_agent.mqtt import redact_value  # paho only when needed

            under_root = (
                f" (or {Path(root).absolute() / relative} for an agent run from "
                f"{root} itself)"
                if root is not None
                else ""
            )
            raise UsageError(
                f"config {where}: {key} is {redact_value(value)}, but flash installs "
                f"it at "
                f"{gateway_path!r}{under_root}; set {key} = "
                f'"{gateway_path}"'
            )
    for key in ("outbox", "alerts", "summary_json"):
        value = settings.get(key)
        if value is None or (key == "alerts" and value in ("-", "")):
            continue  # the default outbox, alerts to the journal or none
        if not isinstance(value, str) or not _is_under_state(value, root):
            from edge_agent.mqtt import redact_value

            raise UsageError(
                f"config {where}: {key} is {redact_value(value)}, but the flashed "
                f"agent may write only under /{STATE_DIR} (systemd ProtectSystem); "
                f"put it there (e.g. /{STATE_DIR}/{key.replace('_', '.')}) or leave "
                "it out"
                + (" (alerts: - for the journal)" if key == "alerts" else "")
            )


def _is_under_state(value: str, root: Path | None) -> bool:
    """Whether a config path lies in the flashed state folder: ``/var/lib/
    gatewatch/...``, or the same under ROOT; without ``root`` (building a bundle)
    under any folder ending in var/lib/gatewatch, as :func:`_is_flashed_path`."""
    path = PurePosixPath(os.path.normpath(value))
    if not path.is_absolute():
        return False
    state = PurePosixPath(STATE_DIR).parts
    if root is None:
        parents = [p.parts[-len(state):] for p in path.parents]
        return state in parents
    bases = [PurePosixPath("/", STATE_DIR)] + [
        PurePosixPath(r, STATE_DIR)
        for r in {Path(root).absolute(), Path(root).resolve()}
    ]
    return any(path != base and path.is_relative_to(base) for base in bases)


def _is_flashed_path(value: str, relative: str, root: Path | None) -> bool:
    """Whether a config path is ``/relative`` (or ``ROOT/relative``, see above)."""
    path = PurePosixPath(os.path.normpath(value))
    if not path.is_absolute():
        return False
    if path == PurePosixPath("/", relative):
        return True
    if root is None:
        return path.parts[-len(PurePosixPath(relative).parts) :] == (
            PurePosixPath(relative).parts
        )
    roots = {Path(root).absolute(), Path(root).resolve()}
    return any(path == PurePosixPath(r / relative) for r in roots)


def check_bundle_out(out: Path) -> None:
    """Refuse (UsageError, exit 2) a bundle ``-o`` that cannot be written: an
    existing folder, a folder above it that does not exist or cannot be written
    in. Checked before the wheels are built, so no work is lost."""
    if not str(out).strip():
        raise UsageError("-o is empty; name the bundle file to write")
    try:
        if out.is_dir():
            raise UsageError(
                f"-o {out} is a folder; name the bundle file to write "
                f"(e.g. {out / 'gateway.tar.gz'})"
            )
        parent = out.parent
        if not parent.is_dir():
            raise UsageError(
                f"-o {out}: {parent} is not an existing folder; make it first"
            )
        check_writable_above(parent, f"-o {out}")
        if out.exists() and not out.is_file():
            raise UsageError(f"-o {out} exists and is not a regular file")
    except OSError as exc:
        raise UsageError(f"-o {out}: cannot be used ({exc})") from exc


def build_bundle(
    artifact: str | Path,
    config: str | Path,
    key: str | Path,
    out: str | Path,
    *,
    wheels: list[Path] | None = None,
    wheel_cache: str | Path | None = None,
    source: str | Path | None = None,
    platform_tag: str | None = None,
    created_ts: float | None = None,
) -> BundleManifest:
    """Write a signed bundle to ``out`` and return its manifest.

    ``wheels`` (every wheel the gateway needs) skips the build and the download;
    otherwise the agent wheel is built from ``source`` (default: this tree) and the
    runtime wheels come from ``wheel_cache`` (downloaded there once).
    ``created_ts``: the build time the manifest records, in seconds with their
    fraction (default: now, to the microsecond), which flash orders bundles by:
    two bundles built within one second are still told apart. Bundles of older
    versions that recorded whole seconds are read as they are.
    """
    if created_ts is not None and not _finite_or_null(float(created_ts)):
        raise UsageError(f"build time {created_ts!r} is not a finite number")
    artifact, config, out = Path(artifact), Path(config), Path(out)
    check_bundle_out(out)
    private_key = signing.load_private_key(key)

    # Check the inputs before any slow step: the artifact must load and pass its
    # health check here (its model matches its encoder, its probe scores as built).
    model_manifest, model_names = artifact_files(artifact)
    from edge_agent.ota import load_checked

    load_checked(artifact)
    try:
        settings = tomllib.loads(config.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadInputError(
            f"config is not valid TOML: {exc}", path=str(config)
        ) from exc
    check_flashed_paths(settings, str(config))
    _check_agent_config(config)
    if SITE_THRESHOLDS in model_names and settings.get("agent", settings).get(
        "thresholds"
    ):
        logger.warning(
            "%s sets thresholds, so the flashed agent will not use the bundled "
            "%s; remove that setting to use the site's calibration",
            config,
            artifact / SITE_THRESHOLDS,
        )

    with tempfile.TemporaryDirectory(prefix="gatewatch-bundle-") as tmp:
        # Wheels: the agent's own, then its runtime requirements.
        if wheels is None:
            src = Path(source) if source else source_root()
            # For this machine (no --platform): with the compiled flow meter.
            agent_wheel = build_agent_wheel(src, Path(tmp) / "agent",
                                            compiled=platform_tag is None)
            cache = Path(wheel_cache) if wheel_cache else default_wheel_cache()
            deps = runtime_wheels(
                runtime_requirements(src), cache, platform_tag=platform_tag
            )
            wheels = [agent_wheel, *deps]
        wheels = [Path(w) for w in wheels]
        agent = [w for w in wheels if w.name.startswith(f"{AGENT_PACKAGE}-")]
        if len(agent) != 1:
            raise UsageError(f"expected one {AGENT_PACKAGE} wheel, found {len(agent)}")
        version = agent[0].name.split("-")[1]

        # Every member, by bundle name, with its source file or content.
        members: dict[str, Path | bytes] = {}
        for wheel in wheels:
            members[f"{WHEEL_DIR}/{wheel.name}"] = wheel
        for name in model_names:
            members[f"{MODEL_DIR}/{name}"] = artifact / name
        members[CONFIG_PATH] = config
        members[UNIT_PATH] = systemd_unit().encode()

        files = {}
        for name, src_item in members.items():
            data_hash = (
                sha256_bytes(src_item)
                if isinstance(src_item, bytes)
                else sha256_path(src_item)
            )
            size = (
                len(src_item)
                if isinstance(src_item, bytes)
                else src_item.stat().st_size
            )
            files[name] = {"sha256": data_hash, "size": size}

        built = time.time() if created_ts is None else float(created_ts)
        manifest = {
            "schema": BUNDLE_SCHEMA,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(built)),
            "created_ts": built,
            "key_id": signing.key_id(private_key.public_key()),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "platform": platform_tag or f"{sys.platform}-{platform.machine()}",
            "agent": {
                "name": AGENT_PACKAGE,
                "version": version,
                "wheel": f"{WHEEL_DIR}/{agent[0].name}",
                "requirement": f"{AGENT_PACKAGE}[{AGENT_EXTRA}]=={version}",
            },
            "model": {
                "dir": MODEL_DIR,
                "model_version": str(model_manifest["model_version"]),
                "target": model_manifest.get("target"),
            },
            "config": CONFIG_PATH,
            "unit": UNIT_PATH,
            "files": files,
        }
        raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
        signature = signing.sign(private_key, raw)

        # Write to a temporary name next to ``out``, then rename into place; the
        # temporary file goes whatever happens (a full disk, Ctrl-C).
        check_bundle_out(out)
        partial = out.with_name(out.name + ".partial")
        try:
            # Level 0: wheels are zip-deflated already; level 1 saved 0.7 % of the
            # edge wheels (128 MB) for 15 times the time. Still a gzip tar.
            with tarfile.open(partial, "w:gz", compresslevel=0) as tar:
                _add_bytes(tar, MANIFEST_NAME, raw)
                _add_bytes(tar, SIGNATURE_NAME, signature)
                for name, src_item in members.items():
                    if isinstance(src_item, bytes):
                        _add_bytes(tar, name, src_item)
                    else:
                        with open(src_item, "rb") as handle:
                            _add_file(tar, name, handle, src_item.stat().st_size)
            os.replace(partial, out)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                if partial.is_file() or partial.is_symlink():
                    partial.unlink()
            if isinstance(exc, OSError):
                raise GatewatchError(
                    f"cannot write -o {out}: {exc.strerror or exc}"
                ) from exc
            raise

    logger.info(
        "wrote bundle %s: agent %s, model %s, %d files, %.1f MB",
        out,
        version,
        manifest["model"]["model_version"],
        len(files),
        out.stat().st_size / 1e6,
    )
    return BundleManifest(raw=raw, data=manifest, files=_parse_manifest(raw, "").files)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add an in-memory regular file."""
    _add_file(tar, name, io.BytesIO(data), len(data))


def _add_file(tar: tarfile.TarFile, name: str, handle: IO[bytes], size: int) -> None:
    """Add a regular file with neutral owner, mode and time."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    info.uname = info.gname = "root"
    tar.addfile(info, handle)


# ------------------------------------------------------------------------------- CLI


# The help of keygen and verify: what each does and its exit codes.
VERIFY_DESCRIPTION = """\
Check a bundle made by edge-agent bundle without installing anything: the
Ed25519 signature of its manifest under --pubkey, then every member against
the size and sha256 the signed manifest lists (no member unlisted, none
missing). Prints the agent and model versions and the signing key's id.
edge-agent flash runs the same check before it installs a bundle."""
VERIFY_EPILOG = """\
exit codes:
  0    the signature and every file hash hold
  2    usage: bad flags or arguments, or a --pubkey file that does not
       exist
  3    bad input: a bundle that cannot be opened, is truncated or is
       not a gzip tar, was changed after signing (a member altered, added
       or missing, a link or special file) or was signed by another key;
       a --pubkey that cannot be read or is not an Ed25519 public key
  130  interrupted (Ctrl-C)
"""
KEYGEN_DESCRIPTION = """\
Make a new Ed25519 signing key pair in --out: signing.key, the private key
(PKCS#8 PEM, mode 0600), which signs bundles and model updates and stays off
the gateways, and signing.pub, the public key that edge-agent verify and flash
take as --pubkey and a gateway's update_public_key names. Prints both paths and
the key id. A pair already there is replaced only with --force: losing a signing
key strands every gateway that trusts it."""
KEYGEN_EPILOG = """\
exit codes:
  0    key pair written
  1    failure: a key file cannot be written (disk full, I/O error);
       what was written is removed, never half a pair
  2    usage: bad flags or arguments; an --out that is empty (never the
       current folder unasked), holds a key pair already (without
       --force), is a file, lies under a file, or cannot be made or
       written in
  130  interrupted (Ctrl-C)
"""

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``keygen``, ``bundle``, ``verify``, ``flash``, ``rollback``, ``pack-update``.

    Each sets ``func(args) -> int``; gatewatch errors propagate to the caller's
    ``main``, which prints them and returns their exit code.
    """
    p = subparsers.add_parser(
        "keygen",
        help="make an Ed25519 signing key pair",
        description=KEYGEN_DESCRIPTION,
        epilog=KEYGEN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="folder for signing.key and signing.pub (required; made if missing; "
        "an empty name is refused, exit 2)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a key pair already in the folder (default: refuse)",
    )
    p.set_defaults(func=_cmd_keygen)

    p = subparsers.add_parser(
        "bundle",
        help="build a signed, offline agent bundle",
        description="Build a signed bundle of the agent, the model artifact (with "
        "its site_thresholds.json from edge-agent calibrate, when the folder holds "
        "one) and the gateway config. The config must point at the flashed layout: "
        f'artifact = "/{MODEL_LINK}" and, for model updates, update_public_key = '
        f'"/{UPDATE_KEY_FILE}". Exit codes: 0 written, 1 the wheel build or '
        "download failed, the model fails its health check or -o cannot be "
        "written, 2 wrong flags (an -o that is a folder, whose folder does not "
        "exist, or that exists, without --force) or a config path that is not "
        "the flashed layout's, 3 an "
        "unreadable artifact, site thresholds or config.",
    )
    p.add_argument(
        "--artifact",
        required=True,
        type=Path,
        help="model artifact folder from compress run (required)",
    )
    p.add_argument(
        "--config",
        required=True,
        type=Path,
        help="the gateway.toml: site, gateway, broker; artifact must be "
        f"/{MODEL_LINK} (required)",
    )
    p.add_argument(
        "--key",
        required=True,
        type=Path,
        help="the private signing.key made by keygen (required)",
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        type=Path,
        help="bundle file to write, a signed tar.gz; an existing file is "
        "replaced only with --force (required)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing -o file (default: refuse, before any work)",
    )
    p.add_argument(
        "--wheel-cache",
        type=Path,
        default=None,
        help=f"wheel cache folder (default {default_wheel_cache()})",
    )
    p.add_argument(
        "--source",
        type=Path,
        default=None,
        help="gatewatch source tree to package (default: the installed one)",
    )
    p.add_argument(
        "--platform",
        default=None,
        help="pip platform tag of the gateway, e.g. manylinux_2_28_aarch64 "
        "(default: this machine's platform; the agent wheel then carries the flow "
        "meter's compiled packet path, built here; with --platform it is pure "
        "Python, about ten times slower on live traffic). The runtime wheels may "
        "be of the older tags such a gateway also runs: manylinux_2_27_aarch64 "
        "... manylinux_2_17_aarch64 and manylinux2014_aarch64 for that one, "
        "musllinux_1_1 and 1_0 for musllinux_1_2; other tags go to pip as given",
    )
    p.set_defaults(func=_cmd_bundle)

    p = subparsers.add_parser(
        "verify",
        help="check a bundle's signature and hashes",
        description=VERIFY_DESCRIPTION,
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", type=Path, help="the bundle file to check")
    p.add_argument(
        "--pubkey",
        required=True,
        type=Path,
        help="the public signing.pub to check the signature with (required)",
    )
    p.set_defaults(func=_cmd_verify)

    p = subparsers.add_parser(
        "flash",
        help="install a verified bundle into a root",
        description="Verify a bundle and install it under --root: the agent venv "
        f"in /{OPT_DIR}/releases, the model in a free slot of /{MODELS_DIR} (made "
        f"active through /{MODEL_LINK}), the config as /{CONFIG_FILE}, the "
        f"--pubkey as /{UPDATE_KEY_FILE}. A bundle built before the running model, "
        "or before the last bundle flashed on the root, is refused unless "
        "--allow-downgrade is given; one whose model is already "
        "active leaves the model slots as they are. Exit codes: 0 flashed, 1 the "
        "install or the model's health check failed (the previous install is "
        "kept), 2 wrong flags (a --root that does not exist included: flash "
        "makes no root), another Python, a config path that is not the "
        "flashed layout's, a refused downgrade, another flash of the root (or a "
        "model update of its agent) running, or a root that trusts another "
        "update key (without --replace-key), 3 a damaged, altered or "
        "wrongly signed bundle, or a damaged install under --root.",
    )
    p.add_argument("bundle", type=Path, help="the bundle file to install")
    p.add_argument(
        "--root",
        required=True,
        type=gateway_root,
        help="the gateway's / (an existing folder; / on the gateway itself) "
        "(required)",
    )
    p.add_argument(
        "--pubkey",
        required=True,
        type=Path,
        help="the public signing.pub (required); nothing installs unless it verifies",
    )
    p.add_argument(
        "--python",
        default=None,
        help="interpreter for the gateway venv (default: this one)",
    )
    p.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="install a bundle built before the running model or the last "
        "bundle flashed (default: refuse)",
    )
    p.add_argument(
        "--replace-key",
        action="store_true",
        help="install --pubkey although the root trusts another update key "
        "(default: refuse, so that a re-flash does not change which model "
        "updates the gateway takes)",
    )
    p.set_defaults(func=_cmd_flash)

    p = subparsers.add_parser(
        "rollback",
        help="switch back to the other model slot",
        description="Make the other model slot under --root active again, after "
        "checking that its model still loads and passes its health check. The "
        "model left is marked as rolled back in models/slots.json: the agent "
        "refuses model updates of it (also the retained one at its next start) "
        "until a newer model is published or it is flashed again. Exit "
        "codes: 0 switched, 1 the other model fails its health check or the "
        "switch cannot be written (a full disk: nothing switched), 2 nothing "
        "to roll back to (the other slot empty, or holding a model that was "
        "never active: a flash or update that did not finish), 3 a damaged "
        "install (models/slots.json or the models/current link).",
    )
    p.add_argument(
        "--root",
        required=True,
        type=gateway_root,
        help="the gateway's / (a folder; / on the gateway itself) (required)",
    )
    p.set_defaults(func=_cmd_rollback)

    p = subparsers.add_parser(
        "pack-update",
        help="sign a model artifact for OTA",
        description="""\
Sign a model artifact (with its site_thresholds.json from edge-agent
calibrate, when the folder holds one) as a model update message, to publish
retained on the gateways' model topic. The artifact must first pass the health
check each gateway runs before it switches (its files match their sha256, its
model matches its encoder, its probe windows score as built): an update that
fails it would be refused by every gateway, so it is not signed.

The update names its targets, inside what is signed: --site and either each
--gateway it is for or --all-gateways of the site. A gateway installs it only
when it names the gateway's own site and lists the gateway (or all of the
site's); other gateways refuse it, whatever topic it reaches them on, and so
does every gateway for an update signed before updates named their targets.""",
        epilog="""\
exit codes:
  0  written
  1  the model fails its health check; --out or --archive-out cannot be
     written (an existing file is then kept as it was)
  2  wrong flags (--url without --archive-out, a URL scheme other than
     https, http or file; no --site, neither --gateway nor --all-gateways or
     both, a site or gateway id that is not a topic segment); a key file
     that does not exist; an --out or
     --archive-out file that already exists, without --force; one that is
     empty, -, a folder, a device, FIFO or socket, or in a folder that does
     not exist or cannot be written in, with --force too (all checked before
     anything is signed)
  3  an unreadable or modified artifact (a manifest that is not JSON or whose
     model_version the re-scorer would refuse, a file whose sha256 differs),
     unreadable site thresholds, a key that is not an Ed25519 private key""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--artifact", required=True, type=Path, help="model artifact folder (required)"
    )
    p.add_argument(
        "--key",
        required=True,
        type=Path,
        help="the private signing.key made by keygen (required)",
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="the signed update message to write (publish it retained), in an "
        "existing folder; an existing file is refused before anything is signed, "
        "unless --force; an empty name, - (no standard output), a folder, and a "
        "device, FIFO or socket are refused, with --force too (required)",
    )
    p.add_argument(
        "--site",
        required=True,
        help="the site the update is for; it is signed into the update, and a "
        "gateway of another site refuses it (required)",
    )
    p.add_argument(
        "--gateway",
        action="append",
        default=[],
        metavar="ID",
        help="a gateway of --site the update is for (repeat for more); it is "
        "signed into the update, and the site's other gateways refuse it "
        "(one of --gateway and --all-gateways is required)",
    )
    p.add_argument(
        "--all-gateways",
        action="store_true",
        help="the update is for every gateway of --site, now and later (instead "
        "of --gateway; one of the two is required)",
    )
    p.add_argument(
        "--url",
        default=None,
        help="serve the archive from this URL instead of inline "
        "(default: the archive travels inside the message)",
    )
    p.add_argument(
        "--archive-out",
        default=None,
        help="with --url: where to write the archive to upload (required then); "
        "an existing file is refused as for --out",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="let --out and --archive-out replace existing regular files; each "
        "is written beside its name and renamed into place, so a failed write "
        "keeps the old file; a link's target is written, the link stays "
        "(default: refuse them)",
    )
    p.set_defaults(func=_cmd_pack_update)


def _cmd_keygen(args: argparse.Namespace) -> int:
    private_path, public_path = signing.generate_keypair(args.out, overwrite=args.force)
    key = signing.load_public_key(public_path)
    print(f"{private_path}\n{public_path}\nkey id {signing.key_id(key)}")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    # Checked before the wheels are built: a folder or missing folder first, then
    # a bundle already there (never replaced unasked: it may be the one flashed).
    check_bundle_out(args.out)
    refuse_existing(args.out, "-o", args.force)
    manifest = build_bundle(
        args.artifact,
        args.config,
        args.key,
        args.out,
        wheel_cache=args.wheel_cache,
        source=args.source,
        platform_tag=args.platform,
    )
    site = f"{MODEL_DIR}/{SITE_THRESHOLDS}"
    print(
        f"{args.out}: agent {manifest.agent_version}, model "
        f"{manifest.model_version}, {len(manifest.files)} files; "
        + (
            f"site thresholds {site} included"
            if site in manifest.files
            else f"no {SITE_THRESHOLDS} in {args.artifact}: the model's own "
            "thresholds apply"
        )
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    manifest = verify_bundle(args.bundle, args.pubkey)
    print(
        f"{args.bundle}: signature and {len(manifest.files)} file hashes OK "
        f"(agent {manifest.agent_version}, model {manifest.model_version}, "
        f"key {manifest.data['key_id']})"
    )
    return 0


def _cmd_flash(args: argparse.Namespace) -> int:
    from edge_agent.flash import flash

    result = flash(
        args.bundle,
        args.root,
        args.pubkey,
        python=args.python,
        allow_downgrade=args.allow_downgrade,
        replace_key=args.replace_key,
    )
    if result.model_kept:
        print(
            f"flashed {args.root}: agent {result.agent_version}; model "
            f"{result.model_version} was already active in slot {result.slot}, so the "
            "model slots are unchanged (the other slot keeps its model for rollback)"
        )
    else:
        print(
            f"flashed {args.root}: agent {result.agent_version}, model "
            f"{result.model_version} in slot {result.slot}"
        )
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from edge_agent.flash import rollback

    slot, version = rollback(args.root)
    print(
        f"{args.root}: model slot {slot} is active again (model {version}); a "
        "running agent takes it on SIGHUP (systemctl reload gatewatch-agent); "
        "model updates of the model left are refused until a newer model is "
        "published or it is flashed again"
    )
    return 0


def _write_output(
    path: str | Path, data: bytes, flag: str, force: bool = False
) -> None:
    """Write a file a command was asked for, through a temporary file renamed into
    place (:func:`flows.outfile.write_file`: a failed write keeps what was there);
    GatewatchError (exit 1) naming it."""
    try:
        write_file(path, data, force)
    except FileExistsError as exc:
        raise GatewatchError(
            f"cannot write {flag} {path}: a file appeared there meanwhile; not "
            "overwritten (--force overwrites it)"
        ) from exc
    except OSError as exc:
        raise GatewatchError(
            f"cannot write {flag} {path}: {exc.strerror or exc}"
        ) from exc


def _cmd_pack_update(args: argparse.Namespace) -> int:
    from edge_agent.ota import pack_update

    archive = None
    if args.url and args.archive_out is None:
        raise UsageError("--url needs --archive-out (the file to serve at that URL)")
    # Checked before anything is signed: a name nothing can be written to (empty,
    # -, a folder, a device, FIFO or socket, a missing folder), --force or not,
    # then one already there (never overwritten unasked; a dangling link counts).
    out = check_output(args.out, "--out", "update.json")
    if args.url and out == check_output(
        args.archive_out, "--archive-out", "update.tar.gz"
    ):
        raise UsageError(f"--out and --archive-out both name {args.out}; name two "
                         "files (the message and the archive it points to)")
    refuse_existing(args.out, "--out", args.force)
    if args.url:
        refuse_existing(args.archive_out, "--archive-out", args.force)
    # Health-checked before it is signed (ModelError, exit 1, when it fails).
    payload = pack_update(
        args.artifact,
        args.key,
        site=args.site,
        gateways=args.gateway,
        all_gateways=args.all_gateways,
        url=args.url,
    )
    if args.url:
        archive = payload.archive
        _write_output(args.archive_out, archive, "--archive-out", args.force)
    _write_output(args.out, payload.message, "--out", args.force)
    print(
        f"{args.out}: model {payload.model_version}, {len(payload.message)} bytes"
        + (f"; archive {args.archive_out}" if archive is not None else "")
    )
    return 0
