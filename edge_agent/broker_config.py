"""Write a locked-down mosquitto configuration for one gatewatch deployment.

A deployment is a set of gateways, named ``(site, gateway)``, one re-scorer account and
one operator account. :func:`write_broker_config` makes everything the broker needs: a
certificate authority, a server certificate for the broker's host names and addresses,
optional client certificates with a revocation list, hashed password files, an ACL
file and ``mosquitto.conf`` with two TLS listeners and no anonymous access. The ACL
lets each gateway user ``gw-<site>-<gateway>`` publish only its own escalations and
status and read only its own verdicts and model updates; the re-scorer reads every
escalation (also through ``$share/...`` subscriptions) and writes verdicts; the
operator publishes model updates and reads status.

Gateways log in on the gateway listener (``port``, 8883), where the broker replaces
the client id a client sends with its user name (``use_username_as_clientid``): one
gateway cannot end another's session by connecting with its client id. The re-scorer
and the operator log in on the service listener (``service_port``, 8884), which knows
only their two users and keeps the client ids they choose, so several re-scorers
sharing the ``rescorer`` user keep their own (stable, persistent) sessions.
:func:`revoke_client_cert` adds a client certificate to the deployment's CRL.

:func:`check_tls_connect` and :func:`check_broker_login` turn what a wrong CA, a wrong
host name or a wrong password cause into one :class:`TransportError` with a sentence
that says what is wrong, instead of a client that retries for ever.
:func:`check_publish_size` refuses, before anything is sent, a message larger than the
broker's maximum packet size: with mosquitto 2.0.11 and paho-mqtt 2.2 such a QoS 1
message otherwise starts an endless reconnect loop (``docs/security-broker.md``).

This module needs only the standard library, ``cryptography`` and (for the login check,
imported on use) paho-mqtt: it runs on a gateway and on the broker host alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent import logger
from edge_agent.protocol import MAX_PAYLOAD_BYTES, Channel, subscription, validate_id
from edge_agent.protocol import topic as channel_topic
from flows.argtypes import integer
from flows.errors import GatewatchError, TransportError, UsageError

__all__ = [
    "CertPair",
    "Deployment",
    "BrokerFiles",
    "MessageTooLargeError",
    "gateway_user",
    "make_ca",
    "make_server_cert",
    "make_client_cert",
    "make_crl",
    "revoke_client_cert",
    "acl_text",
    "mosquitto_conf_text",
    "write_password_file",
    "write_broker_config",
    "check_tls_connect",
    "check_broker_login",
    "explain_connect_error",
    "publish_packet_size",
    "largest_payload",
    "check_publish_size",
    "connack_packet_limit",
    "main",
]

GATEWAY_WRITES = (Channel.ESCALATIONS, Channel.STATUS)
GATEWAY_READS = (Channel.VERDICTS, Channel.MODEL)

# The smallest bound allowed: the largest payload the protocol allows
# (protocol.MAX_PAYLOAD_BYTES) plus room for the header, topic and v5 properties.
PACKET_HEADROOM = 4096
MIN_MAX_PACKET_SIZE = MAX_PAYLOAD_BYTES + PACKET_HEADROOM
# The default bound: 1 MiB, so that an inline model update (ota.py: base64 of the
# artifact archive) of up to about 750 KiB of archive fits; larger ones go by URL.
DEFAULT_MAX_PACKET_SIZE = 1 << 20
DEFAULT_PORT = 8883
# The listener of the re-scorer and the operator (client ids of their choosing).
DEFAULT_SERVICE_PORT = 8884
# The same group name as `teacher serve --share-group` uses by default.
DEFAULT_SHARE_GROUP = "gatewatch"
_CERT_DAYS = 825
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")
_MQTT_MAX_PACKET = 268435455 + 5

# A kept client certificate closer than this to its end is issued anew by a re-run.
_RENEW_BEFORE = dt.timedelta(days=30)

# OpenSSL verify codes that ssl.SSLCertVerificationError carries.
_X509_EXPIRED = 10
_X509_HOSTNAME_MISMATCH = 62
_X509_IP_MISMATCH = 64


class MessageTooLargeError(TransportError):
    """A message larger than the broker accepts; it was not sent and must not be."""


def _check_user(value: str) -> str:
    """Return ``value`` if it is a safe broker user name, else raise UsageError."""
    if not isinstance(value, str) or not _USER_RE.fullmatch(value):
        raise UsageError(
            f"user name {value!r} is not allowed: use letters, digits, '_', '.' or '-'"
        )
    return value


def gateway_user(site: str, gateway: str) -> str:
    """The broker user name of one gateway: ``gw-<site>-<gateway>``."""
    return f"gw-{validate_id(site, 'site')}-{validate_id(gateway, 'gateway')}"


@dataclass(frozen=True)
class Deployment:
    """Who may talk to the broker, and where the broker listens.

    ``gateways`` is a sequence of ``(site, gateway)`` pairs. ``host_names`` and
    ``ip_addresses`` go into the server certificate's subject alternative names, so
    clients must connect by one of them. ``bind_address`` is where both listeners
    bind: gateways use ``port``, the re-scorer and the operator ``service_port``.
    ``max_packet_size`` bounds every MQTT packet (the broker announces it in CONNACK).
    """

    gateways: tuple[tuple[str, str], ...]
    rescorer_user: str = "rescorer"
    operator_user: str = "operator"
    host_names: tuple[str, ...] = ("localhost",)
    ip_addresses: tuple[str, ...] = ("127.0.0.1",)
    bind_address: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    service_port: int = DEFAULT_SERVICE_PORT
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    share_group: str = DEFAULT_SHARE_GROUP
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "gateways", tuple(tuple(g) for g in self.gateways))
        object.__setattr__(self, "host_names", tuple(self.host_names))
        object.__setattr__(self, "ip_addresses", tuple(self.ip_addresses))

        # Names: safe characters, and no two gateways sharing one user name
        # (site "a-b" gateway "c" and site "a" gateway "b-c" both give gw-a-b-c).
        if not self.gateways:
            raise UsageError("a deployment needs at least one gateway")
        seen: dict[str, tuple[str, str]] = {}
        for pair in self.gateways:
            if len(pair) != 2:
                raise UsageError(f"a gateway is a (site, gateway) pair, not {pair!r}")
            user = gateway_user(*pair)
            if user in seen and seen[user] != pair:
                raise UsageError(
                    f"gateways {seen[user]} and {pair} would share the user name "
                    f"{user!r}; rename one of them"
                )
            seen[user] = pair
        for role in (self.rescorer_user, self.operator_user):
            _check_user(role)
            if role.startswith("gw-"):
                raise UsageError(f"user name {role!r} may not start with 'gw-'")
        if self.rescorer_user == self.operator_user:
            raise UsageError("the re-scorer and the operator need different users")
        validate_id(self.share_group, "share group")

        # Where to listen, what the certificate names, how big a packet may be.
        for addr in (*self.ip_addresses, self.bind_address):
            try:
                ipaddress.ip_address(addr)
            except ValueError as exc:
                raise UsageError(f"{addr!r} is not an IP address") from exc
        if not self.host_names and not self.ip_addresses:
            raise UsageError("the server certificate needs a host name or an address")
        for host in self.host_names:
            if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
                raise UsageError(f"{host!r} is not a DNS host name")
        for port in (self.port, self.service_port):
            if not 0 < port < 65536:
                raise UsageError(f"port {port} is outside 1..65535")
        if self.port == self.service_port:
            raise UsageError(
                f"the gateway and service listeners both use port {self.port}; "
                "give them different ports"
            )
        if self.max_packet_size > _MQTT_MAX_PACKET:
            raise UsageError(f"max_packet_size is above MQTT's {_MQTT_MAX_PACKET}")
        if self.max_packet_size < MIN_MAX_PACKET_SIZE:
            raise UsageError(
                f"max_packet_size {self.max_packet_size} is below "
                f"{MIN_MAX_PACKET_SIZE}: the largest escalation "
                f"({MAX_PAYLOAD_BYTES} bytes) would not fit"
            )

    @property
    def gateway_users(self) -> dict[str, tuple[str, str]]:
        """Gateway user name -> (site, gateway), in the order given."""
        return {gateway_user(s, g): (s, g) for s, g in self.gateways}

    @property
    def service_users(self) -> list[str]:
        """The users of the service listener: the re-scorer and the operator."""
        return [self.rescorer_user, self.operator_user]

    @property
    def users(self) -> list[str]:
        """Every broker user of the deployment."""
        return [*self.gateway_users, *self.service_users]

    def port_of(self, user: str) -> int:
        """The listener port ``user`` logs in on."""
        return self.service_port if user in self.service_users else self.port


# --- certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its PEM private key (unencrypted)."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (mode 0644) and the key (mode 0600)."""
        _write_private(Path(key_path), self.key_pem)
        Path(cert_path).write_bytes(self.cert_pem)
        os.chmod(cert_path, 0o644)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    # P-256: quick to make on a small machine, and every TLS stack we meet takes it.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _subject(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gatewatch"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: Any, issuer: Any, public_key: Any, days: int) -> Any:
    from cryptography import x509

    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
    )


def make_ca(common_name: str = "gatewatch CA", days: int = 3650) -> CertPair:
    """A self-signed certificate authority that may sign leaf certificates only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    name = _subject(common_name)
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertPair(_cert_pem(cert), _key_pem(key))


def _leaf(
    ca: CertPair, common_name: str, sans: list, usage: Any, days: int
) -> CertPair:
    """A leaf certificate for ``common_name`` signed by ``ca``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = _new_key()
    builder = (
        _builder(_subject(common_name), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return CertPair(_cert_pem(cert), _key_pem(key))


def make_server_cert(
    ca: CertPair,
    host_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    days: int = _CERT_DAYS,
) -> CertPair:
    """A broker certificate signed by ``ca``, valid for the given names and addresses.

    Clients check the name they connect to against these subject alternative names,
    so list every name and address that gateways and re-scorers will use.
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    sans: list = [x509.DNSName(h) for h in host_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if not sans:
        raise UsageError("a server certificate needs at least one host name or address")
    first = [*host_names, *ip_addresses][0]
    return _leaf(ca, first, sans, ExtendedKeyUsageOID.SERVER_AUTH, days)


def make_client_cert(ca: CertPair, user: str, days: int = _CERT_DAYS) -> CertPair:
    """A client certificate whose common name is broker user ``user``, signed by ca."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    _check_user(user)
    return _leaf(ca, user, [], ExtendedKeyUsageOID.CLIENT_AUTH, days)


def make_crl(ca: CertPair, revoked: Mapping[int, dt.datetime] | None = None) -> bytes:
    """A PEM certificate revocation list signed by ``ca``: serial -> revocation time.

    The list is valid until the CA itself expires: OpenSSL refuses every client once
    the CRL's next-update time has passed, and a broker whose CRL nobody remembered
    to re-sign must not lock all gateways out.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(ca_cert.not_valid_after_utc)
    )
    for serial, when in sorted((revoked or {}).items()):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(when)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def _revoked_in(crl_path: Path, ca: CertPair) -> dict[int, dt.datetime]:
    """Serial -> revocation time listed in ``crl_path`` if ``ca`` signed it, else {}."""
    from cryptography import x509

    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise UsageError(f"{crl_path} is not a PEM revocation list: {exc}") from exc
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    if not crl.is_signature_valid(ca_cert.public_key()):
        return {}  # the list of an earlier CA: its certificates fail anyway
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def _issued_by(cert_path: Path, ca: CertPair) -> Any | None:
    """The certificate in ``cert_path`` if ``ca`` signed it, else None."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    except (OSError, ValueError, TypeError, InvalidSignature):
        return None
    return cert


def _kept_client_cert(
    cdir: Path, ca: CertPair, user: str, revoked: Mapping[int, dt.datetime]
) -> bool:
    """Whether ``cdir`` holds a usable certificate of ``user``: same CA, not revoked,
    the key that goes with it, and not within ``_RENEW_BEFORE`` of its end."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    cert = _issued_by(cdir / "client.crt", ca)
    if cert is None or cert.serial_number in revoked:
        return False
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [user]:
        return False
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < _RENEW_BEFORE:
        return False
    try:
        key = serialization.load_pem_private_key(
            (cdir / "client.key").read_bytes(), password=None
        )
    except (OSError, ValueError, TypeError):
        return False
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*raw) == cert.public_key().public_bytes(*raw)


def _write_private(path: Path, data: bytes | str) -> None:
    """Write a secret file that only its owner can read, at no moment more open."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
    os.chmod(path, 0o600)


# --- ACL, password file, mosquitto.conf ----------------------------------------------


def acl_text(dep: Deployment) -> str:
    """The mosquitto ACL file for ``dep``: nothing is allowed that is not listed here.

    No rule comes before the first ``user`` line, so anonymous clients (refused by the
    configuration anyway) would be granted nothing.
    """
    lines = [
        "# gatewatch broker ACL, written by edge_agent.broker_config.",
        "# Anything not granted below is denied. Regenerate it rather than edit it.",
        "",
    ]

    # Each gateway: its own topics and nothing else.
    for user, (site, gw) in dep.gateway_users.items():
        lines.append(f"user {user}")
        lines += [f"topic write {channel_topic(site, gw, c)}" for c in GATEWAY_WRITES]
        lines += [f"topic read {channel_topic(site, gw, c)}" for c in GATEWAY_READS]
        lines.append("")

    # The re-scorer: every escalation, plain or shared; it answers with verdicts.
    lines += [
        f"user {dep.rescorer_user}",
        f"topic read {subscription(Channel.ESCALATIONS)}",
        f"topic read {subscription(Channel.ESCALATIONS, dep.share_group)}",
        f"topic write {subscription(Channel.VERDICTS)}",
        "",
    ]

    # The operator: pushes model updates and watches gateway status.
    lines += [
        f"user {dep.operator_user}",
        f"topic write {subscription(Channel.MODEL)}",
        f"topic read {subscription(Channel.STATUS)}",
        "",
    ]
    return "\n".join(lines)


# The broker's queue per client (see mosquitto_conf_text): room for the bursts of
# 200 gateways at the agents' default --max-awaiting.
MAX_QUEUED_MESSAGES = 100_000
# mosquitto's log_dest values; "file" takes an absolute path after it.
_LOG_DESTS = ("stdout", "stderr", "syslog", "topic", "dlt", "none")


def check_log_dest(value: str) -> str:
    """UsageError unless ``value`` is a log_dest mosquitto accepts: stdout, stderr,
    syslog, topic, dlt, none, or ``file /absolute/path``."""
    if value in _LOG_DESTS:
        return value
    kind, _, path = value.partition(" ")
    if kind == "file" and path.strip() and Path(path.strip()).is_absolute():
        return value
    raise UsageError(
        f"log_dest {value!r} is not one mosquitto takes: one of "
        f"{', '.join(_LOG_DESTS)}, or 'file /absolute/path'"
    )


def mosquitto_conf_text(
    dep: Deployment,
    files_dir: str | Path,
    *,
    persistence_location: str | Path | None = None,
    log_dest: str = "stdout",
) -> str:
    """``mosquitto.conf`` for ``dep``, naming files as they will lie in ``files_dir``.

    ``files_dir`` is the absolute folder that holds ``ca.crt``, ``server.crt``,
    ``server.key``, ``gateways.passwd``, ``services.passwd``, ``acl`` and, with
    client certificates, ``ca.crl`` on the broker host. Without
    ``persistence_location`` the broker keeps no state on disk.
    """
    for value in (str(files_dir), str(persistence_location or ""), log_dest):
        if any(c in value for c in "\r\n\0") or value != value.strip():
            raise UsageError(f"{value!r} cannot go into mosquitto.conf as one value")
    check_log_dest(log_dest)
    d = Path(files_dir)
    lines = [
        "# gatewatch locked-down broker for mosquitto 2.0, written by",
        "# edge_agent.broker_config. Two TLS listeners (gateways; re-scorer and",
        "# operator), no anonymous clients, a password and an ACL per user.",
        "# Nothing listens in plain text.",
        "",
        "# Each listener has its own users and client-id rule (below).",
        "per_listener_settings true",
        "",
        "# Every packet is bounded; the broker announces the bound in CONNACK and",
        "# disconnects a client that sends more. Agents check it before publishing",
        "# (edge_agent.broker_config.check_publish_size): message_size_limit is not",
        "# used, as mosquitto 2.0.11 answers it with a PUBACK code paho-mqtt 2.2",
        "# rejects as malformed, which ends in a reconnect loop.",
        f"max_packet_size {dep.max_packet_size}",
        "",
        "# Each client's queue of QoS 1 messages it has not taken yet. mosquitto",
        "# drops what is past max_queued_messages (1000 by default) after it has",
        "# acknowledged it to the sender: the re-scorer's queue holds the bursts",
        "# of every gateway at once. Agents keep at most --max-awaiting (500)",
        "# escalations out each, and publish again those left unanswered.",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        "",
    ]
    if persistence_location is None:
        lines += [
            "# No state on disk (tests, or a broker that may forget).",
            "persistence false",
        ]
    else:
        lines += [
            "persistence true",
            f"persistence_location {persistence_location}/",
            "# Saved every minute as well as at a clean stop: a broker that dies",
            "# (power loss, kill -9) loses at most the last minute of what it had",
            "# acknowledged (mosquitto's default is 30 minutes). Agents publish",
            "# their unanswered escalations again when they find the session gone.",
            "autosave_interval 60",
        ]
    lines += [
        "",
        f"log_dest {log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "",
    ]

    def listener(port: int, passwd: str, id_is_user: bool) -> list[str]:
        out = [
            f"listener {port} {dep.bind_address}",
            "protocol mqtt",
            "allow_anonymous false",
            f"password_file {d / passwd}",
            f"acl_file {d / 'acl'}",
            "allow_zero_length_clientid false",
            f"use_username_as_clientid {'true' if id_is_user else 'false'}",
            f"cafile {d / 'ca.crt'}",
            f"certfile {d / 'server.crt'}",
            f"keyfile {d / 'server.key'}",
            "tls_version tlsv1.2",
            f"require_certificate {'true' if dep.require_client_cert else 'false'}",
        ]
        if dep.require_client_cert:
            out.append(f"crlfile {d / 'ca.crl'}")
        return [
            *out,
            "# The MQTT user name, not the certificate, picks the ACL; a client",
            "# certificate, when required, is a second factor.",
            "use_identity_as_username false",
            "",
        ]

    lines += [
        "# Gateways. The broker takes the user name as the client id, whatever the",
        "# client sends, so no gateway can end another's session with its id.",
        *listener(dep.port, "gateways.passwd", True),
        "# The re-scorer and the operator, with client ids of their own choosing",
        "# (several re-scorers share one user). Gateways cannot log in here.",
        *listener(dep.service_port, "services.passwd", False),
    ]
    return "\n".join(lines)


def _mosquitto_passwd() -> str:
    path = shutil.which("mosquitto_passwd")
    if path is None:
        raise UsageError(
            "mosquitto_passwd is not on PATH; install mosquitto (it ships the tool) "
            "on the machine that writes the broker configuration"
        )
    return path


def write_password_file(path: str | Path, credentials: Mapping[str, str]) -> Path:
    """Write a mosquitto password file holding only hashes of ``credentials``.

    The plain ``user:password`` lines go to a 0600 file that ``mosquitto_passwd -U``
    hashes in place, so no password ever appears on a command line.
    """
    path = Path(path)
    for user, password in credentials.items():
        _check_user(user)
        if not password or any(c in password for c in "\r\n\0"):
            raise UsageError(f"the password of {user!r} is empty or holds a line break")
    tool = _mosquitto_passwd()

    # Plain text first, readable by us only, then hashed in place.
    _write_private(path, "".join(f"{u}:{p}\n" for u, p in credentials.items()))
    try:
        done = subprocess.run(
            [tool, "-U", str(path)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as exc:
        path.unlink(missing_ok=True)
        raise GatewatchError("mosquitto_passwd -U did not finish in 60 s") from exc
    if done.returncode != 0:
        path.unlink(missing_ok=True)
        raise GatewatchError(f"mosquitto_passwd -U failed: {done.stderr.strip()}")

    # Every line must now be a hash ($7$ is PBKDF2-SHA512 in mosquitto 2.0).
    for line in path.read_text().splitlines():
        user, _, digest = line.partition(":")
        if user not in credentials or not digest.startswith("$"):
            path.unlink(missing_ok=True)
            raise GatewatchError(f"mosquitto_passwd left an unhashed line for {user!r}")
    return path


@dataclass
class BrokerFiles:
    """What :func:`write_broker_config` wrote, and the passwords it made or used.

    ``broker_dir`` goes to the broker host; ``ca_key`` stays offline (it signs new
    certificates); ``clients[user]`` is the folder to hand to that user.
    """

    root: Path
    broker_dir: Path
    conf: Path
    ca_cert: Path
    ca_key: Path
    passwords: dict[str, str]
    clients: dict[str, Path] = field(default_factory=dict)
    crl: Path | None = None  # broker/ca.crl, with client certificates only


def _share_with_group(broker: Path, group: str) -> None:
    """Let ``group`` (the broker's own user) read the broker folder, nobody else."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise UsageError(f"group {group!r} does not exist on this machine") from exc
    os.chown(broker, -1, gid)
    os.chmod(broker, 0o750)
    for item in broker.iterdir():
        os.chown(item, -1, gid)
        os.chmod(item, 0o640)


def _kept_password(client_dir: Path) -> str | None:
    """The password a previous run handed to this client, if its folder is there."""
    try:
        return (client_dir / "password").read_text().splitlines()[0] or None
    except (OSError, IndexError):
        return None


def write_broker_config(
    dep: Deployment,
    out_dir: str | Path,
    *,
    passwords: Mapping[str, str] | None = None,
    install_dir: str | Path | None = None,
    persistence_location: str | Path | None = None,
    log_dest: str = "stdout",
    group: str | None = None,
    ca: CertPair | None = None,
) -> BrokerFiles:
    """Write the broker's files, the CA and each user's client folder under out_dir.

    Layout: ``broker/`` (mosquitto.conf, acl, gateways.passwd, services.passwd,
    ca.crt, server.crt, server.key, and ca.crl when client certificates are
    required), ``ca/`` (ca.crt, ca.key: keep it off the broker; ca.crl), and
    ``clients/<user>/`` (ca.crt, password, and client.crt/client.key when client
    certificates are required). ``passwords`` maps user -> password; users left out
    keep the password of a previous run into the same folder or get a fresh random
    one; the CA and each user's valid, unrevoked client certificate of a previous run
    are kept too, so adding a gateway is a re-run that changes nobody else's
    credentials. The client folders of users no longer in the deployment are
    deleted and their client certificates revoked (a removed gateway that comes back
    gets a new password and certificate). ``install_dir`` is where ``broker/``
    will be installed (default: where it is written). ``group`` (e.g.
    ``mosquitto``) gets read access to ``broker/``: mosquitto started as root reads
    these files after it has dropped to its own user. An existing CA may be passed
    to keep the clients' trust.
    """
    root = Path(out_dir).resolve()
    broker, ca_dir, clients_dir = root / "broker", root / "ca", root / "clients"
    for d in (broker, ca_dir, clients_dir):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    given = dict(passwords or {})
    unknown = sorted(set(given) - set(dep.users))
    if unknown:
        raise UsageError(f"passwords given for users not in the deployment: {unknown}")

    # Certificates: a CA given, else the one a previous run left here, else a new one.
    if ca is None and (ca_dir / "ca.key").exists():
        kept = (ca_dir / "ca.crt").read_bytes(), (ca_dir / "ca.key").read_bytes()
        ca = CertPair(*kept)
    ca = ca or make_ca()
    ca.write(ca_dir / "ca.crt", ca_dir / "ca.key")
    (broker / "ca.crt").write_bytes(ca.cert_pem)
    server = make_server_cert(ca, dep.host_names, dep.ip_addresses)
    server.write(broker / "server.crt", broker / "server.key")

    # Credentials, ACL and the configuration itself.
    creds = {
        u: given.get(u) or _kept_password(clients_dir / u) or secrets.token_urlsafe(24)
        for u in dep.users
    }
    for stale in ("passwd",):  # the single password file of earlier versions
        (broker / stale).unlink(missing_ok=True)
    write_password_file(
        broker / "gateways.passwd", {u: creds[u] for u in dep.gateway_users}
    )
    write_password_file(
        broker / "services.passwd", {u: creds[u] for u in dep.service_users}
    )
    (broker / "acl").write_text(acl_text(dep))
    conf = broker / "mosquitto.conf"
    conf.write_text(
        mosquitto_conf_text(
            dep,
            install_dir or broker,
            persistence_location=persistence_location,
            log_dest=log_dest,
        )
    )

    # One folder per user, to hand over; none for users who left, whose client
    # certificates go on the revocation list.
    revoked = _revoked_in(ca_dir / "ca.crl", ca)
    now = dt.datetime.now(dt.UTC)
    for old in clients_dir.iterdir():
        if old.is_dir() and old.name not in dep.users:
            cert = _issued_by(old / "client.crt", ca)
            if cert is not None:
                revoked.setdefault(cert.serial_number, now)
            shutil.rmtree(old)
    clients: dict[str, Path] = {}
    for user in dep.users:
        cdir = clients_dir / user
        cdir.mkdir(exist_ok=True)
        os.chmod(cdir, 0o700)
        (cdir / "ca.crt").write_bytes(ca.cert_pem)
        _write_private(cdir / "password", creds[user] + "\n")
        if dep.require_client_cert and not _kept_client_cert(cdir, ca, user, revoked):
            make_client_cert(ca, user).write(cdir / "client.crt", cdir / "client.key")
        clients[user] = cdir
    crl = None
    if dep.require_client_cert or revoked:
        crl = _write_crl(ca, revoked, ca_dir, broker)
    else:
        (broker / "ca.crl").unlink(missing_ok=True)
    if group is not None:
        _share_with_group(broker, group)
    logger.info("wrote broker configuration for %d users under %s", len(creds), root)
    return BrokerFiles(
        root, broker, conf, ca_dir / "ca.crt", ca_dir / "ca.key", creds, clients, crl
    )


def _write_crl(
    ca: CertPair, revoked: Mapping[int, dt.datetime], ca_dir: Path, broker: Path
) -> Path:
    """Sign the revocation list; write it to ``ca/`` and (for the broker) ``broker/``.

    The broker's copy is rewritten in place, so it keeps the owner, group and mode
    it was installed with.
    """
    pem = make_crl(ca, revoked)
    (ca_dir / "ca.crl").write_bytes(pem)
    target = broker / "ca.crl"
    existed = target.exists()
    target.write_bytes(pem)
    if not existed:
        os.chmod(target, 0o644)
    return target


def revoke_client_cert(
    out_dir: str | Path,
    *,
    user: str | None = None,
    cert_file: str | Path | None = None,
) -> dict[str, Any]:
    """Put one client certificate of a deployment on its revocation list.

    ``out_dir`` is the folder :func:`write_broker_config` wrote (it needs
    ``ca/ca.key``). Give ``user`` to revoke the certificate in ``clients/<user>/``
    (its ``client.crt`` and ``client.key`` are then deleted, so the next ``write``
    issues that user a new one), or ``cert_file`` for any certificate this CA
    issued. The new list goes to ``ca/ca.crl`` and ``broker/ca.crl``; install it
    on the broker host, then reload mosquitto (SIGHUP: new connections are checked
    against it) or restart it (which also ends the sessions already open). Returns
    what was
    revoked: ``{"user", "serial", "crl", "revoked"}`` (the count on the list).
    """
    from cryptography.x509.oid import NameOID

    root = Path(out_dir)
    ca_dir, broker = root / "ca", root / "broker"
    if (user is None) == (cert_file is None):
        raise UsageError("revoke needs exactly one of a user or a certificate file")
    try:
        pems = (ca_dir / "ca.crt").read_bytes(), (ca_dir / "ca.key").read_bytes()
        ca = CertPair(*pems)
    except OSError as exc:
        raise UsageError(
            f"{root} holds no deployment CA (ca/ca.crt and ca/ca.key): {exc}"
        ) from exc
    path = root / "clients" / _check_user(user) / "client.crt" if user else cert_file
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no client certificate there to revoke")
    cert = _issued_by(path, ca)
    if cert is None:
        raise UsageError(
            f"{path} is not a PEM certificate issued by the CA in {ca_dir / 'ca.crt'}"
        )
    revoked = _revoked_in(ca_dir / "ca.crl", ca)
    revoked.setdefault(cert.serial_number, dt.datetime.now(dt.UTC))
    crl = _write_crl(ca, revoked, ca_dir, broker)
    if user is not None:
        (path.parent / "client.crt").unlink()
        (path.parent / "client.key").unlink(missing_ok=True)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    who = str(names[0].value) if names else None
    logger.info("revoked client certificate %x of %s", cert.serial_number, who)
    return {
        "user": who,
        "serial": f"{cert.serial_number:x}",
        "crl": str(crl),
        "revoked": len(revoked),
    }


# --- clear errors at connect time ----------------------------------------------------


def _client_context(
    ca: str | Path, certfile: str | Path | None, keyfile: str | Path | None
) -> ssl.SSLContext:
    """A TLS client context that trusts only ``ca`` and checks the host name."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the CA file {ca}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is not None:
        key = None if keyfile is None else str(keyfile)
        try:
            ctx.load_cert_chain(str(certfile), key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"cannot load client certificate {certfile}: {exc}"
            ) from exc
    return ctx


def _names_in(der: bytes | None) -> str:
    """The subject alternative names of a DER certificate, for an error message."""
    if not der:
        return "unknown"
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return "no subject alternative names"
    names = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in san.value.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) or "no names"


def _peer_cert_unverified(
    host: str, port: int, server_name: str, timeout: float
) -> bytes | None:
    """The broker's certificate, fetched unchecked, only to explain an error."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def explain_connect_error(
    exc: BaseException,
    host: str,
    port: int,
    ca: str | Path,
    server_name: str | None = None,
    timeout: float = 5.0,
) -> TransportError:
    """Translate a socket or TLS failure into a TransportError that says what to fix.

    ``exc`` is what ``connect`` raised (an ``ssl.SSLCertVerificationError``, another
    ``ssl.SSLError`` or an ``OSError``). A verification error is permanent: a client
    should report it and stop, not retry. For a host name mismatch the message lists
    the names the certificate holds (fetched once more, unverified, to say so).
    """
    server_name = server_name or host
    where = f"broker {host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        reason = getattr(exc, "verify_message", None) or str(exc)
        if code in (_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH):
            names = _names_in(_peer_cert_unverified(host, port, server_name, timeout))
            return TransportError(
                f"{where}: TLS certificate verification failed: the certificate is "
                f"not valid for {server_name!r} (it names: {names}); connect by one of "
                "those names or issue a server certificate that lists this one"
            )
        if code == _X509_EXPIRED:
            return TransportError(
                f"{where}: TLS certificate verification failed: it has expired"
            )
        return TransportError(
            f"{where}: TLS certificate verification failed ({reason}): the broker's "
            f"certificate is not signed by the CA in {ca}; use the deployment's ca.crt"
        )
    if isinstance(exc, ssl.SSLError):
        text = f"{exc.reason or ''} {exc}".lower().replace("_", " ")
        if "certificate revoked" in text:
            return TransportError(
                f"{where}: TLS handshake refused ({exc.reason}): the broker has "
                "revoked this client certificate; retrying cannot help, ask for a new "
                "one (broker_config write issues it)"
            )
        if "certificate required" in text or "handshake failure" in text:
            return TransportError(
                f"{where}: TLS handshake refused ({exc.reason}): the broker requires "
                "a client certificate signed by its CA"
            )
        return TransportError(f"{where}: TLS handshake failed: {exc.reason or exc}")
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(f"{where}: connection refused (nothing listens there)")
    if isinstance(exc, TimeoutError):
        return TransportError(f"{where}: no answer within {timeout:g} s")
    if isinstance(exc, socket.gaierror):
        return TransportError(f"{where}: cannot resolve {host!r}: {exc}")
    return TransportError(f"{where}: {exc}")


def check_tls_connect(
    host: str,
    port: int,
    ca: str | Path,
    *,
    server_name: str | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    timeout: float = 5.0,
) -> dict[str, str]:
    """Open one TLS connection to the broker, check its certificate, and close it.

    Returns ``{"tls_version", "cipher", "names"}`` on success. Raises
    :class:`TransportError` at once, with a sentence naming the cause, when the
    certificate is not signed by ``ca``, does not name ``server_name`` (default
    ``host``), has expired, when the broker wants a client certificate, refuses the
    connection or does not answer within ``timeout`` seconds. Call it before handing
    the settings to a client that reconnects by itself: a verification error is
    permanent and retrying it only fills the logs.
    """
    name = server_name or host
    ctx = _client_context(ca, certfile, keyfile)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                # TLS 1.3 sends the server's verdict on a client certificate after
                # the handshake: read briefly so that a refusal surfaces here.
                tls.settimeout(0.3)
                try:
                    tls.recv(1)
                except TimeoutError:
                    pass
                info = {
                    "tls_version": tls.version() or "",
                    "cipher": (tls.cipher() or ("",))[0],
                    "names": _names_in(tls.getpeercert(binary_form=True)),
                }
    except (OSError, ssl.SSLError) as exc:
        raise explain_connect_error(exc, host, port, ca, name, timeout) from exc
    logger.info("TLS to %s:%d checked (%s)", host, port, info["tls_version"])
    return info


def check_broker_login(
    host: str,
    port: int,
    ca: str | Path,
    username: str,
    password: str,
    *,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    timeout: float = 5.0,
) -> str:
    """Log in to the broker once over TLS (MQTT v5) and log out; no retries.

    ``host`` must be a name or address the broker's certificate holds, as for the
    clients themselves.

    Returns the CONNACK reason (``"Success"``). Raises :class:`TransportError`
    naming the cause: a TLS problem (as :func:`check_tls_connect`), a refused login
    (mosquitto 2.0 answers a wrong password with "Not authorized"), or no CONNACK
    within ``timeout`` seconds.
    """
    import paho.mqtt.client as mqtt

    # TLS first, with its clear messages; then one MQTT CONNECT on the same terms.
    name = host
    check_tls_connect(
        host,
        port,
        ca,
        certfile=certfile,
        keyfile=keyfile,
        timeout=timeout,
    )
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"gatewatch-check-{secrets.token_hex(4)}",
        protocol=mqtt.MQTTv5,
    )
    client.tls_set_context(_client_context(ca, certfile, keyfile))
    client.username_pw_set(username, password)
    client.connect_timeout = timeout
    result: dict[str, Any] = {}
    client.on_connect = lambda c, u, f, rc, p: result.setdefault("rc", rc)

    # connect() is synchronous and raises at once; loop() reads the CONNACK.
    try:
        client.connect(host, port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise explain_connect_error(exc, host, port, ca, name, timeout) from exc
    deadline = time.monotonic() + timeout
    try:
        while "rc" not in result and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    finally:
        client.disconnect()
    rc = result.get("rc")
    if rc is None:
        raise TransportError(f"broker {host}:{port}: no CONNACK within {timeout:g} s")
    if rc.is_failure:
        raise TransportError(
            f"broker {host}:{port} refused user {username!r}: {rc} (wrong user name "
            "or password, the user is not in the broker's password file, or this is "
            f"the other listener: gateways log in on {DEFAULT_PORT}, the re-scorer and "
            f"the operator on {DEFAULT_SERVICE_PORT} by default)"
        )
    return str(rc)


# --- message size -------------------------------------------------------------------


def _varint_len(n: int) -> int:
    """Bytes an MQTT variable byte integer takes for ``n``."""
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(
    topic: str, payload_len: int, qos: int, *, properties: Any = None, v5: bool = True
) -> int:
    """Bytes of the whole PUBLISH packet that paho sends for this message.

    ``properties`` is a paho ``Properties`` object or None (MQTT v5 only).
    """
    remaining = 2 + len(topic.encode()) + payload_len + (2 if qos > 0 else 0)
    if v5:
        remaining += len(properties.pack()) if properties is not None else 1
    return 1 + _varint_len(remaining) + remaining


def largest_payload(
    topic: str, qos: int, limit: int, *, properties: Any = None, v5: bool = True
) -> int:
    """The largest payload, in bytes, whose PUBLISH fits in ``limit`` bytes."""
    fits = limit - publish_packet_size(topic, 0, qos, properties=properties, v5=v5)
    while fits > 0 and publish_packet_size(
        topic, fits, qos, properties=properties, v5=v5
    ) > limit:
        fits -= 1
    return max(fits, 0)


def connack_packet_limit(properties: Any) -> int | None:
    """The Maximum Packet Size a broker announced in CONNACK properties, or None."""
    return getattr(properties, "MaximumPacketSize", None) if properties else None


def check_publish_size(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    limit: int | None,
    properties: Any = None,
    v5: bool = True,
) -> int:
    """Return the packet size of this PUBLISH, or raise MessageTooLargeError.

    ``limit`` is the broker's maximum packet size (:func:`connack_packet_limit`, or
    the deployment's ``max_packet_size`` for MQTT 3.1.1 where CONNACK cannot say);
    None means no limit. Call it before ``publish``: a message over the limit makes
    mosquitto drop the connection, and paho would send it again after each
    reconnect, for ever.
    """
    size = publish_packet_size(topic, len(payload), qos, properties=properties, v5=v5)
    if limit is not None and size > limit:
        raise MessageTooLargeError(
            f"message to {topic} is {size} bytes as an MQTT packet, over the broker's "
            f"limit of {limit}; it was not sent"
        )
    return size


# --- command line -------------------------------------------------------------------


# A port a listener can have, as a flag: a usage error (exit 2) outside 1..65535.
LISTEN_PORT = integer(1, 65535)


def _parse_gateway(text: str) -> tuple[str, str]:
    site, sep, gw = text.partition("/")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: give a gateway as SITE/GATEWAY")
    return site, gw


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.broker_config",
        description="Write a locked-down mosquitto configuration for gatewatch, "
        "or check that a client can log in to it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    write = sub.add_parser("write", help="write (or update) a deployment's files")
    add = write.add_argument
    add("--out", required=True, type=Path, help="folder to write (kept CA, passwords)")
    add("--gateway", action="append", type=_parse_gateway, default=[],
        metavar="SITE/GATEWAY", help="a gateway (repeat for each)")
    add("--host", action="append", default=[], help="broker DNS name (repeatable)")
    add("--ip", action="append", default=[], help="broker IP address (repeatable)")
    add("--bind", default="127.0.0.1", help="address the listener binds")
    add("--port", type=LISTEN_PORT, default=DEFAULT_PORT,
        help="the gateways' listener, 1..65535")
    add("--service-port", type=LISTEN_PORT, default=DEFAULT_SERVICE_PORT,
        help="the listener of the re-scorer and the operator, 1..65535")
    add("--install-dir", help="where broker/ will be installed on the broker host")
    add("--persistence-location", help="folder for the broker's state")
    add("--log-dest", default="stdout",
        help="mosquitto log_dest: stdout, stderr, syslog, topic, dlt, none, or "
        "'file /absolute/path' (default: stdout)")
    add("--group", help="group that may read broker/ (e.g. mosquitto)")
    add("--client-certs", action="store_true", help="require client certificates")
    add("--max-packet-size", type=int, default=DEFAULT_MAX_PACKET_SIZE)

    revoke = sub.add_parser(
        "revoke", help="put a client certificate on the deployment's CRL"
    )
    add = revoke.add_argument
    add("--out", required=True, type=Path, help="the folder 'write' wrote")
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="revoke the certificate in clients/USER/")
    who.add_argument("--cert", type=Path, help="revoke this certificate file")

    check = sub.add_parser("check", help="one TLS handshake and one login, no retry")
    add = check.add_argument
    add("--host", required=True, help="broker name or address, as clients use it")
    add("--port", type=LISTEN_PORT, default=DEFAULT_PORT,
        help="the broker's port, 1..65535")
    add("--ca", required=True, type=Path, help="the deployment's ca.crt")
    add("--user", help="broker user (without it: TLS only)")
    add("--password-file", type=Path, help="file whose first line is the password")
    add("--cert", type=Path, help="client certificate, when the broker wants one")
    add("--key", type=Path, help="client key")
    add("--timeout", type=float, default=5.0)
    return parser


def _write_command(args: argparse.Namespace) -> dict[str, Any]:
    if not args.gateway:
        raise UsageError("give at least one --gateway SITE/GATEWAY")
    check_log_dest(args.log_dest)  # before any file is written
    dep = Deployment(
        gateways=tuple(args.gateway),
        host_names=tuple(args.host or ([] if args.ip else ["localhost"])),
        ip_addresses=tuple(args.ip or ([] if args.host else ["127.0.0.1"])),
        bind_address=args.bind,
        port=args.port,
        service_port=args.service_port,
        max_packet_size=args.max_packet_size,
        require_client_cert=args.client_certs,
    )
    files = write_broker_config(
        dep,
        args.out,
        install_dir=args.install_dir,
        persistence_location=args.persistence_location,
        log_dest=args.log_dest,
        group=args.group,
    )
    return {
        "broker": str(files.broker_dir),
        "ca_key": str(files.ca_key),
        "clients": {u: str(p) for u, p in files.clients.items()},
        "ports": {u: dep.port_of(u) for u in dep.users},
    }


def _check_command(args: argparse.Namespace) -> dict[str, Any]:
    tls = dict(certfile=args.cert, keyfile=args.key, timeout=args.timeout)
    report: dict[str, Any] = check_tls_connect(args.host, args.port, args.ca, **tls)
    if args.user is not None:
        if args.password_file is None:
            raise UsageError("--user needs --password-file")
        try:
            password = args.password_file.read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise UsageError(f"cannot read {args.password_file}: {exc}") from exc
        report["login"] = check_broker_login(
            args.host, args.port, args.ca, args.user, password, **tls
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent.broker_config write|revoke|check``; the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "write":
            report = _write_command(args)
        elif args.command == "revoke":
            report = revoke_client_cert(args.out, user=args.user, cert_file=args.cert)
            report["next"] = (
                "install broker/ca.crl on the broker host, then reload mosquitto "
                "(new connections) or restart it (also ends open sessions)"
            )
        else:
            report = _check_command(args)
    except GatewatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
