"""The agent's settings: a TOML file (``tomllib``) with command-line flags on top.

A config file holds the same names as the ``edge-agent run`` flags, with underscores,
at the top level or under an ``[agent]`` table, for example::

    artifact = "/opt/gatewatch/models/current"
    source = "zeek:/var/log/zeek/current/conn.log"
    follow = true
    broker = "mqtts://broker.example:8883"
    site = "plant-3"
    gateway = "gw-17"
    username = "gw-plant-3-gw-17"
    password_file = "/etc/gatewatch/mqtt.pass"
    tls_ca = "/etc/gatewatch/ca.pem"
    update_public_key = "/etc/gatewatch/update.pub"

The paths are those of a gateway that ``edge-agent flash`` installed:
``artifact`` is the link to the active model slot (``/opt/gatewatch/models/current``,
which rollback and model updates switch) and ``update_public_key`` the key flash
writes (``/etc/gatewatch/update.pub``); ``edge-agent bundle`` and ``flash`` refuse
a config whose ``artifact`` or ``update_public_key`` is elsewhere (the layout:
``edge_agent/README.md``). ``timezone`` (an IANA name, default ``UTC``) is the zone
of flow-file times written without one, as ``--timezone`` (an unknown name is a
usage error). A flag given on the command line wins over the file;
:meth:`AgentConfig.validate` checks the result before anything starts.

Anything wrong with the config file itself (missing, a folder, not UTF-8, not TOML,
an unknown or mistyped setting) is a usage error, exit 2 (:func:`read_config_file`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from edge_agent.mqtt import (
    BrokerAddress,
    Protocol,
    TlsOptions,
    check_credentials,
    redact_value,
)
from edge_agent.protocol import validate_id
from flows.errors import BadInputError, UsageError


def _unknown_keys(unknown: list[str], known: list[str]) -> str:
    """The unknown settings of a config file, each with the known setting
    closest to it when one is close (difflib's ratio): ``unknown key
    'max_batchh' (did you mean 'max_batch'?)``."""
    import difflib

    said = []
    for name in unknown:
        match = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        said.append(f"{name!r}{hint}")
    keys = "key" if len(said) == 1 else "keys"
    return f"unknown {keys} {', '.join(said)}"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_value(value: object, limit: int = 200) -> str:
    """``value`` as a TOML file spells it, for an error about a config setting:
    ``true``/``false`` for a boolean (not Python's ``True``), ``inf``/``nan``,
    ``[1, 2]`` for an array and ``{ a = 1 }`` for a table, dates in ISO form;
    strings quoted and passed through :func:`~edge_agent.mqtt.redact_value`, so a
    broker URL under the wrong key does not print its password. Cut to about
    ``limit`` characters."""

    def spell(item: object, depth: int = 0) -> str:
        if depth > 20:
            return "..."
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, float):
            if math.isnan(item):
                return "nan"
            if math.isinf(item):
                return "inf" if item > 0 else "-inf"
            return repr(item)
        if isinstance(item, int):
            return str(item)
        if isinstance(item, str):
            return redact_value(item, limit)
        if isinstance(item, (list, tuple)):
            return "[" + ", ".join(spell(x, depth + 1) for x in item) + "]"
        if isinstance(item, dict):
            pairs = ", ".join(
                f"{k if _BARE_KEY.fullmatch(str(k)) else json.dumps(str(k))} = "
                f"{spell(v, depth + 1)}"
                for k, v in item.items()
            )
            return "{ " + pairs + " }" if pairs else "{}"
        if isinstance(item, (datetime.date, datetime.time)):
            return item.isoformat()
        return redact_value(item, limit)

    text = spell(value)
    return text if len(text) <= limit else text[:limit] + "..."


def default_state_dir() -> Path:
    """Where the outbox lives by default: ``$XDG_STATE_HOME/gatewatch``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gatewatch"


# Float settings that must be finite and >= 0 (nan, inf or a negative wait are
# usage errors, not a broker "unreachable within nan s").
_FINITE_SECONDS = ("connect_timeout", "drain_timeout", "max_wait_ms", "status_interval",
                   "resend_after", "wait_interface")
# Their upper bounds: a year (a wait the clock functions can still add to now),
# an hour for the batching wait in milliseconds.
_YEAR = 366 * 24 * 3600.0
_MOST_SECONDS = {"max_wait_ms": 3_600_000.0}
# Integer settings and their allowed ranges (keepalive: MQTT's 16-bit field;
# session_expiry: MQTT 5's 32-bit interval).
_INT_RANGES = {
    "max_batch": (1, 4096),  # at most the agent's queue of parsed flows
    # Escalations out without an answer (0: no flow control); the outbox keeps
    # twice as many sent ones.
    "max_awaiting": (0, 100_000),
    "outbox_max": (1, (1 << 63) - 1),
    "max_hosts": (1, (1 << 63) - 1),
    "max_flows": (1, 100_000_000),
    "keepalive": (0, 65535),
    "session_expiry": (0, (1 << 32) - 1),
    # 0: none assumed; else MQTT's largest packet (a 4-byte remaining length).
    "max_packet_size": (0, 268_435_455 + 5),
}
# The smallest max_packet_size that is not 0: below it not even a status message
# fits, so the number is surely a mistake.
MIN_PACKET_SIZE = 128


def check_regular_file(path: str | Path, what: str) -> Path:
    """``path`` when it is missing or a regular file; BadInputError otherwise.

    A FIFO would block a read for ever and a folder or device would fail somewhere
    less clear, so a settings file that is one of these is refused by name.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a FIFO or device)"
        raise BadInputError(f"is {kind}; {what} must be a regular file", path=str(path))
    return path


CONFIG_EXPECTED = "expected a UTF-8 TOML file of edge-agent run settings"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The parsed TOML of a ``--config`` file; UsageError (exit 2) if it is unusable.

    One rule for the whole file: it is the operator's settings, like the flags it
    stands for, so a config that is missing, a folder, FIFO or device, unreadable,
    not UTF-8 or not TOML is a usage error, as are unknown or mistyped settings in
    it. The files a config names are judged as if given by flags: the source,
    ``password_file`` and ``thresholds`` are input (exit 3 when they are bad), an
    artifact that is missing or modified is an unusable model (exit 1).
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a FIFO or device)"
        raise UsageError(f"config {path}: is {kind}; {CONFIG_EXPECTED}")
    try:
        # utf-8-sig: a byte-order mark some editors write is not TOML's business.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(
            f"config {path}: does not exist; {CONFIG_EXPECTED}"
        ) from None
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"config {path}: byte offset {exc.start}: is not UTF-8 text; "
            f"{CONFIG_EXPECTED}"
        ) from exc
    except OSError as exc:
        raise UsageError(
            f"config {path}: cannot be read ({exc.strerror or exc}); {CONFIG_EXPECTED}"
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(
            f"config {path}: is not valid TOML ({exc}); {CONFIG_EXPECTED}"
        ) from exc


@dataclass
class AgentConfig:
    """Everything ``edge-agent run`` needs (the file form: module docstring)."""

    artifact: str | None = None
    source: str | None = None
    broker: str | None = None
    site: str | None = None
    gateway: str | None = None
    follow: bool = False
    outbox: str | None = None
    outbox_max: int = 100_000
    alerts: str | None = "-"
    summary_json: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    protocol: str = "auto"
    connect_timeout: float = 10.0
    drain_timeout: float = 30.0
    wait_verdicts: bool = True
    max_batch: int = 256
    max_wait_ms: float = 20.0
    max_hosts: int = 10_000
    # Open connections a capture source (pcap:, iface:) tracks at once; past it the
    # least recently active are ended early. About 1 KB each: a bound on memory
    # a flood of spoofed SYNs cannot raise.
    max_flows: int = 100_000
    capture_filter: str | None = None  # libpcap filter of an iface: source
    # Seconds an iface: source waits for its interface to appear or come up.
    wait_interface: float = 0.0
    session_expiry: int = 3600
    max_packet_size: int = 0
    update_public_key: str | None = None
    thresholds: str | None = None
    status_interval: float = 60.0
    timezone: str = "UTC"
    max_awaiting: int = 500
    resend_after: float = 10.0

    # The config file the settings came from and the keys read from it that no
    # flag replaced, so that an error names a setting where it was given: its
    # flag (``--username``) or its key in the file (``username in config F``).
    _config: ClassVar[tuple[str | None, frozenset[str]]] = (None, frozenset())

    @classmethod
    def names(cls) -> list[str]:
        """The setting names (also the TOML keys)."""
        return [f.name for f in fields(cls)]

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any]) -> AgentConfig:
        """Read ``path`` (if given), then apply the non-None ``overrides``."""
        values: dict[str, Any] = {}
        if path is not None:
            data = read_config_file(path)
            data = data.get("agent", data)
            if not isinstance(data, dict):
                raise UsageError(f"config {path}: [agent] must be a table")
            unknown = sorted(set(data) - set(cls.names()))
            if unknown:
                raise UsageError(
                    f"config {path}: {_unknown_keys(unknown, cls.names())}"
                )
            cls._check_types(path, data)
            values.update(data)
        flags = {k: v for k, v in overrides.items() if v is not None}
        values.update(flags)
        try:
            config = cls(**values)
        except TypeError as exc:
            raise UsageError(f"bad settings: {exc}") from exc
        if path is not None:
            config._config = (str(path), frozenset(set(data) - set(flags)))
        return config.validate()

    @classmethod
    def _check_types(cls, path: str | Path, data: dict[str, Any]) -> None:
        """Raise UsageError naming the key when a file value has the wrong type."""
        kinds = {f.name: str(f.type) for f in fields(cls)}
        for key, value in data.items():
            kind = kinds[key]
            if kind == "bool":
                ok, wanted = isinstance(value, bool), "true or false"
            elif kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
                wanted = "an integer"
            elif kind == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                wanted = "a number"
            else:
                ok, wanted = isinstance(value, str), "a string"
            if not ok:
                raise UsageError(
                    f"config {path}: {key} must be {wanted}, got "
                    f"{toml_value(value)}"
                )

    def validate(self) -> AgentConfig:
        """Raise UsageError with what is allowed when a setting is wrong."""
        for name in ("artifact", "source", "site", "gateway"):
            if not getattr(self, name):
                raise UsageError(f"--{name} is required (flag or config file)")
        if self.outbox is not None and not str(self.outbox).strip():
            # Not the default outbox in its place: that one may hold another run's.
            where = self._given_as("outbox")
            leave = "it" if where != "--outbox" else "--outbox"
            raise UsageError(f"{where} is an empty file name; name the outbox file, "
                             f"or leave {leave} out for the default")
        validate_id(self.site, "site")
        validate_id(self.gateway, "gateway")
        if self.broker is not None:
            address = BrokerAddress.parse(self.broker)
            check_credentials(self.broker, [
                self._given_as(name)
                for name in ("username", "password", "password_file")
                if getattr(self, name)
            ])
            self._check_user_for_password(address)
        try:
            Protocol(self.protocol)
        except ValueError as exc:
            raise UsageError("protocol must be auto, 5 or 3.1.1") from exc
        if self.timezone != "UTC":
            # The flag is checked as it is parsed; a config file's value here,
            # in the same words, before any source is opened.
            from flows.readers import check_timezone

            try:
                check_timezone(self.timezone)
            except UsageError as exc:
                raise UsageError(f"{self._given_as('timezone')}: {exc}") from None
        for name in _FINITE_SECONDS:
            value = getattr(self, name)
            most = _MOST_SECONDS.get(name, _YEAR)
            if not (math.isfinite(value) and 0 <= value <= most):
                raise UsageError(
                    f"{self._setting(name)} must be a number from 0 to "
                    f"{most:,.0f}, got {toml_value(value)}"
                )
        for name in ("status_interval", "resend_after"):
            if getattr(self, name) <= 0:
                raise UsageError(
                    f"{self._setting(name)} must be above 0 s, got "
                    f"{toml_value(getattr(self, name))}"
                )
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise UsageError(
                    f"{self._setting(name)} must be {low}..{high}, got "
                    f"{toml_value(value)}"
                )
        if 0 < self.max_packet_size < MIN_PACKET_SIZE:
            raise UsageError(
                f"{self._setting('max_packet_size')} must be 0 (none assumed) or at "
                f"least {MIN_PACKET_SIZE} bytes, got {self.max_packet_size}"
            )
        return self

    def _setting(self, name: str) -> str:
        """The start of a range error for ``name``: ``config FILE: key`` when the
        value came from the config file (as its type errors read), else its flag
        (``--max-batch``)."""
        path, keys = self._config
        if name in keys:
            return f"config {path}: {name}"
        return f"--{name.replace('_', '-')}"

    def _given_as(self, name: str) -> str:
        """How an error names the setting ``name``: by its key in the config file
        when it came from there (``username in config agent.toml``), else by its
        flag (``--username``); ``password`` has no flag."""
        path, keys = self._config
        if name in keys:
            return f"{name} in config {path}"
        if name == "password":
            return "password (config)"
        return f"--{name.replace('_', '-')}"

    def _check_user_for_password(self, address: BrokerAddress) -> None:
        """Refuse a broker password without a user name (UsageError): a broker
        that checks passwords looks them up by user name, so the connection would
        only be refused ("Not authorized"), and MQTT 3.1.1 forbids it outright."""
        if self.username or address.username:
            return
        given = [self._given_as(name) for name in ("password", "password_file")
                 if getattr(self, name)]
        if address.password:
            given.append("a password in the broker URL")
        if given:
            raise UsageError(
                f"{given[0]} gives a broker password but no user name is given; "
                "give the user name with --username (or username in the config "
                "file), or in the broker URL (mqtt://USER:PASSWORD@HOST:PORT)"
            )

    def outbox_path(self) -> Path:
        """The outbox file: the setting, else one per site/gateway in the state dir."""
        if self.outbox:
            return Path(self.outbox)
        return default_state_dir() / f"outbox-{self.site}-{self.gateway}.sqlite"

    def secret(self) -> str | None:
        """The broker password: given, or the first line of ``password_file``."""
        if self.password is not None or self.password_file is None:
            return self.password
        check_regular_file(self.password_file, "password_file")
        try:
            lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise BadInputError(
                "is not UTF-8 text; password_file must be UTF-8 text whose first "
                "line is the broker password",
                path=str(self.password_file),
                offset=exc.start,
            ) from exc
        except OSError as exc:
            # Missing or unreadable: bad input (exit 3), as a folder or an empty
            # file is, named by its path on one line.
            what = (
                "no such file" if isinstance(exc, FileNotFoundError)
                else f"cannot be read ({exc.strerror or exc})"
            )
            raise BadInputError(
                f"{what}; password_file must be a UTF-8 text file whose first line "
                "is the broker password",
                path=str(self.password_file),
            ) from exc
        if not lines or not lines[0]:
            raise BadInputError(
                "is empty or starts with an empty line; password_file must hold the "
                "broker password on its first line",
                path=str(self.password_file),
            )
        return lines[0]

    def tls(self) -> TlsOptions | None:
        """TLS options when any TLS file is set (``mqtts://`` turns TLS on too)."""
        if not (self.tls_ca or self.tls_cert or self.tls_key or self.tls_insecure):
            return None
        return TlsOptions(self.tls_ca, self.tls_cert, self.tls_key, self.tls_insecure)

    def replace(self, **changes: Any) -> AgentConfig:
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)
