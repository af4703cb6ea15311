"""Ed25519 keys and signatures for agent bundles and over-the-air model updates.

A key pair lives in one folder: ``signing.key`` (PKCS#8 PEM, mode 0600) and
``signing.pub`` (SubjectPublicKeyInfo PEM). A signature is always over exact bytes
(a bundle manifest, an update statement), never over re-serialised data, so what was
signed is what is checked. Every failure is a gatewatch error; a signature that does
not match raises :class:`SignatureError` and names the key that was expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge_agent import logger
from flows.argtypes import check_writable_above
from flows.errors import BadInputError, GatewatchError, UsageError

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class SignatureError(BadInputError):
    """A signature that is missing, malformed or made by another key (exit 3)."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(
    keydir: str | Path, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write a new Ed25519 pair into ``keydir``; returns (private path, public path).

    An existing key is never replaced unless ``overwrite`` is set, because losing a
    signing key strands every gateway that trusts it.
    """
    if not os.fspath(keydir).strip():
        # Path("") is the current folder: never a key pair written there unasked.
        raise UsageError(
            f"keygen -o is an empty folder name; name a folder for {PRIVATE_NAME} "
            f"and {PUBLIC_NAME}"
        )
    keydir = Path(keydir)
    private_path = keydir / PRIVATE_NAME
    public_path = keydir / PUBLIC_NAME
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise UsageError(
            f"{keydir} already holds a signing key; pass --force to replace it"
        )
    _check_keydir(keydir)
    try:
        keydir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"keygen -o {keydir}: cannot make the folder ({exc.strerror or exc})"
        ) from exc

    # Make the pair.
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    # The private half is created 0600 from the start, never chmod-ed afterwards.
    # A write that fails takes back what it made: never half a pair.
    made: list[Path] = []
    try:
        if private_path.exists():
            private_path.unlink()
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        made.append(private_path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_pem)
        os.chmod(private_path, 0o600)
        made.append(public_path)
        public_path.write_bytes(public_pem)
        os.chmod(public_path, 0o644)
    except OSError as exc:
        for path in made:
            with contextlib.suppress(OSError):
                path.unlink()
        raise GatewatchError(
            f"keygen -o {keydir}: cannot write {exc.filename or keydir} "
            f"({exc.strerror or exc})"
        ) from exc

    logger.info(
        "wrote signing key %s (key id %s)",
        private_path,
        key_id(private_key.public_key()),
    )
    return private_path, public_path


def _check_keydir(keydir: Path) -> None:
    """Refuse (UsageError, exit 2) a key folder that is a file, lies under a file
    or cannot be written in; checked before anything is made."""
    try:
        if keydir.exists() and not keydir.is_dir():
            raise UsageError(
                f"keygen -o {keydir} exists and is not a folder; name a folder for "
                f"{PRIVATE_NAME} and {PUBLIC_NAME} (an existing file is never "
                "replaced)"
            )
        check_writable_above(keydir, f"keygen -o {keydir}")
    except OSError as exc:
        raise UsageError(f"keygen -o {keydir}: cannot be used ({exc})") from exc


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM) written by :func:`generate_keypair`."""
    path = Path(path)
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BadInputError(
            "not an unencrypted PEM private key", path=str(path)
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInputError("the signing key is not an Ed25519 key", path=str(path))
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM) written by :func:`generate_keypair`."""
    path = Path(path)
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise BadInputError("not a PEM public key", path=str(path)) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BadInputError("the public key is not an Ed25519 key", path=str(path))
    return key


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    return private_key.sign(data)


def verify(
    public_key: Ed25519PublicKey,
    data: bytes,
    signature: bytes,
    *,
    what: str,
    signed_by: str | None = None,
) -> None:
    """Check ``signature`` over ``data``; raise :class:`SignatureError` if it fails.

    ``what`` names the signed thing in the message; ``signed_by`` is the key id the
    signer claimed, so a wrong key reads as a wrong key and not as tampering.
    """
    expected = key_id(public_key)
    if signed_by is not None and signed_by != expected:
        raise SignatureError(
            f"{what} is signed by key {signed_by}, but the trusted key is {expected}"
        )
    if len(signature) != 64:
        raise SignatureError(
            f"{what} has a malformed signature ({len(signature)} bytes, expected 64)"
        )
    try:
        public_key.verify(signature, data)
    except InvalidSignature as exc:
        raise SignatureError(
            f"{what} does not match its signature under key {expected}: "
            "it was changed after signing, or signed by another key"
        ) from exc


def _read(path: Path, what: str) -> bytes:
    """The bytes of a key file, or a gatewatch error naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise BadInputError(f"cannot read {what}: {exc}", path=str(path)) from exc
