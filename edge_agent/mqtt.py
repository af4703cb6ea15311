"""The MQTT link: one paho-mqtt 2.x client, MQTT v5 first, 3.1.1 where refused.

:class:`MqttLink` connects with ``CallbackAPIVersion.VERSION2``, tries MQTT v5 and
falls back to 3.1.1 when the broker answers "unsupported protocol version" (amqtt does),
sets a retained last will, keeps its subscriptions across reconnects and hands PUBACKs
and messages to callbacks. paho's return codes and socket errors become
:class:`~flows.errors.TransportError`; the link never raises a paho type.

Reconnect policy: after a lost connection the client retries after ``reconnect_min``
seconds, doubling the delay after each failure up to ``reconnect_max`` seconds. A
certificate the client cannot verify (wrong CA, a name it does not hold, expired) is
not retried: :meth:`MqttLink.connect` raises a TransportError at once that says
what to fix. So is a client certificate the broker refuses (revoked, say): with a
client certificate, ``connect`` first makes one TLS handshake of its own, because
under TLS 1.3 the broker's refusal comes after the handshake, where paho would take
it for a lost connection and retry it for ever. A message larger than the broker's
maximum packet size (from CONNACK) is refused before it is sent, with
:class:`MessageTooLargeError`; sent anyway, the broker would drop the connection
and paho would send it again after each reconnect (``docs/security-broker.md``).
"""

from __future__ import annotations

import enum
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import logger
from edge_agent.broker_config import (
    MessageTooLargeError,
    check_publish_size,
    check_tls_connect,
    connack_packet_limit,
    explain_connect_error,
)
from flows.errors import TransportError, UsageError

__all__ = [
    "BrokerAddress",
    "Delivery",
    "MessageTooLargeError",
    "MqttLink",
    "Protocol",
    "TlsOptions",
    "check_credentials",
    "redact_url",
    "redact_value",
]

# PUBACK reason code (MQTT v5): accepted, but no subscriber matched the topic.
NO_MATCHING_SUBSCRIBERS = 16

# DISCONNECT reason code (MQTT v5): another client connected with this client id.
SESSION_TAKEN_OVER = 142

# The ports a server can listen on (0 asks the system for any free one).
MIN_PORT, MAX_PORT = 1, 65535

# CONNACK codes meaning "this broker does not speak that protocol version".
_REFUSED_VERSION_V5 = 132
_REFUSED_VERSION_V3 = 1


def redact_url(url: str) -> str:
    """``url`` as it may be shown in a log line or an error: a password in it is
    replaced by ``***`` (``mqtt://admin:***@host:1883``); the rest is kept.

    The password is taken to run from the first ``:`` after the scheme to the
    last ``@``, wider than a URL parser would read it, so that a password with
    an unquoted ``/`` or ``@`` (a URL that then does not parse) is hidden too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, where = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at or not colon:
        return url
    return f"{scheme}{sep}{user}:***@{where}"


def check_credentials(url: str, given: Sequence[str]) -> None:
    """Refuse (UsageError) broker credentials given two ways: in the URL
    (``mqtt://user:password@host``) and by the flags or settings named in
    ``given`` (``--username``, ``--password-file``...), which would otherwise mix
    or one silently win. The error names both and shows the URL without its
    password (:func:`redact_url`)."""
    if not given:
        return
    address = BrokerAddress.parse(url)
    in_url = [what for what, there in (("a user name", address.username),
                                       ("a password", address.password)) if there]
    if not in_url:
        return
    flags = " and ".join(given)
    raise UsageError(
        f"broker {_cut_query(redact_url(url))!r} holds {' and '.join(in_url)}, and "
        f"{flags} {'is' if len(given) == 1 else 'are'} given too; give the "
        "credentials one way: in the URL or by the flags, not both"
    )


def _cut_query(url: str) -> str:
    """``url`` (already redacted) without its query or fragment, if any."""
    scheme_end = url.find("://")
    start = max(url.rfind("@") + 1, scheme_end + 3 if scheme_end >= 0 else 0)
    ends = [i for i in (url.find("?", start), url.find("#", start)) if i >= 0]
    return url[: min(ends)] if ends else url


def redact_value(value: object, limit: int = 200) -> str:
    """``repr(value)`` for an error message, with every string in it (also in
    lists, tuples and tables) passed through :func:`redact_url` and cut before a
    query or fragment, so a broker URL put under the wrong setting or in a list
    does not print its password. Cut to about ``limit`` characters.
    """

    def clean(item: object, depth: int = 0) -> object:
        if depth > 20:
            return "..."
        if isinstance(item, str):
            if "://" in item or "@" in item:
                return _cut_query(redact_url(item))
            return item
        if isinstance(item, (list, tuple)):
            return type(item)(clean(x, depth + 1) for x in item)
        if isinstance(item, dict):
            return {str(k): clean(v, depth + 1) for k, v in item.items()}
        return item

    text = repr(clean(value))
    return text if len(text) <= limit else text[:limit] + "..."


# A connection lost within FLAP_HELD_S of being made, FLAP_COUNT times within
# FLAP_WINDOW_S: named once as a likely client-id clash, then only counted.
FLAP_HELD_S = 10.0
FLAP_COUNT = 3
FLAP_WINDOW_S = 120.0

class Protocol(enum.StrEnum):
    """Which MQTT version to speak."""

    AUTO = "auto"
    V5 = "5"
    V311 = "3.1.1"


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is, from a ``mqtt://`` or ``mqtts://`` URL."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse ``mqtt[s]://[user[:password]@]host[:port]`` (ports 1883 / 8883;
        a port given must be 1..65535).

        A path, query or fragment is a UsageError (it would mean nothing). A
        UsageError shows the URL without its password (:func:`redact_url`).
        """
        shown = _cut_query(redact_url(url))
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError as exc:  # "Invalid IPv6 URL": mqtt://[::1 unclosed
            raise UsageError(
                f"broker {shown!r} is not a URL like mqtt://HOST:PORT ({exc}; an IPv6 "
                "address goes in brackets: mqtt://[::1]:1883)"
            ) from None
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not host:
            raise UsageError(
                f"broker {shown!r} is not a URL like mqtt://HOST:PORT or "
                "mqtts://HOST:PORT"
            )
        # Nothing after HOST:PORT means anything here (no WebSocket transport):
        # refused, not dropped, so a typo or a pasted HTTP URL is seen. A lone
        # trailing "/" is taken as none.
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            tail = url.partition(parts.netloc)[2]
            if "@" in tail:  # a password with a bare "/", "?" or "#" in it
                raise UsageError(
                    f"broker {shown!r} has a path, query or fragment after "
                    "HOST:PORT: a '/', '?' or '#' in the user name or password "
                    "must be written %2F, %3F or %23"
                )
            # A query or fragment may hold a secret (?password=...): only its
            # presence is said, never its text.
            if parts.query or parts.fragment:
                what = " and ".join(
                    name
                    for name, there in (
                        ("a query", parts.query),
                        ("a fragment", parts.fragment),
                    )
                    if there
                )
                raise UsageError(
                    f"broker {shown!r} has {what} after HOST:PORT (not shown); a "
                    "broker URL has no path, query or fragment (mqtt://HOST:PORT)"
                )
            raise UsageError(
                f"broker {shown!r} has {tail!r} after HOST:PORT; a broker URL "
                "has no path, query or fragment (mqtt://HOST:PORT)"
            )
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port
        except ValueError as exc:  # not a number, or past 65535
            raise UsageError(
                f"broker {shown!r} has a bad port; expected a number 1..65535"
            ) from exc
        if port is None:
            port = 8883 if tls else 1883
        elif not MIN_PORT <= port <= MAX_PORT:
            # Port 0 is no port a broker listens on (it was taken as no port).
            raise UsageError(
                f"broker {shown!r} has port {port}; expected a number 1..65535"
            )
        return cls(
            host=host,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


@dataclass(frozen=True)
class TlsOptions:
    """Files for a TLS connection; ``insecure`` skips the host name check only."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False


def _permanent_tls_error(exc: BaseException) -> bool:
    """True for a TLS failure that retrying cannot cure (a certificate problem)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    if not isinstance(exc, ssl.SSLError) or isinstance(exc, ssl.SSLEOFError):
        return False
    text = f"{exc.reason or ''} {exc}".lower()
    return "certificate" in text or "unknown_ca" in text or "unknown ca" in text


def reason_words(reason_code: object) -> str:
    """A CONNACK reason code as a person reads it: its name and its number
    (``Not authorized (135)``); the bare number when paho gives no name."""
    value = getattr(reason_code, "value", reason_code)
    name = str(reason_code) if hasattr(reason_code, "getName") else ""
    if not name or name == str(value):
        return str(value)
    return f"{name} ({value})"


def _check(rc: MQTTErrorCode | int, what: str) -> None:
    """Raise TransportError for a paho error code other than success."""
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise TransportError(f"{what} failed: {paho.error_string(rc)}")


class BrokerUnreachable(TransportError):
    """No answer at the broker's address (refused, unreachable, timed out).

    Unlike a refused CONNECT (credentials, ACL) or a certificate problem, it may pass
    by itself: the broker restarting, the network not up yet at boot.
    """


class MqttLink:
    """A connection to one broker that reconnects by itself (policy: module docstring).

    Callbacks run on paho's network thread and must be quick: ``on_message(topic,
    payload)`` (with ``manual_ack``: ``on_message(topic, payload, token)``, and the
    message is acknowledged only when :meth:`ack` is called with the token),
    ``on_publish(mid, ok)`` (``ok`` is false when the broker refused the message in
    its PUBACK) and ``on_connect()`` after each successful (re)connect.

    ``max_packet_size`` is the bound to assume where the broker's CONNACK does not
    announce one (MQTT 3.1.1); ``packet_limit`` holds the bound in force.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        keepalive: int = 30,
        protocol: Protocol | str = Protocol.AUTO,
        will: tuple[str, bytes] | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        max_inflight: int = 200,
        session_expiry: int = 0,
        max_packet_size: int | None = None,
        manual_ack: bool = False,
        on_message: Callable[[str, bytes], None] | None = None,
        on_publish: Callable[[int, bool], None] | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.address = BrokerAddress.parse(url)
        # The URL as messages show it, without a password; the credentials to
        # connect with are in ``address``, ``username`` and ``password``.
        self.url = redact_url(url)
        self.client_id = client_id
        # Credentials come from the URL or from the arguments, never half of each.
        given = [name for name, value in (("username", username),
                                          ("password", password)) if value]
        check_credentials(url, given)
        self.username = username or self.address.username
        self.password = password or self.address.password
        self.tls = (
            tls if tls is not None else (TlsOptions() if self.address.tls else None)
        )
        self.keepalive = keepalive
        self.requested = Protocol(protocol)
        self.will = will
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.max_inflight = max_inflight
        self.session_expiry = session_expiry
        self.max_packet_size = max_packet_size
        self.packet_limit: int | None = max_packet_size
        self.manual_ack = manual_ack
        self.on_message = on_message
        self.callback_errors = 0
        self.on_publish = on_publish
        self.on_connect = on_connect
        self.protocol: Protocol | None = None
        self.generation = 0
        # Connections that ended soon after they were made (see _note_loss): a
        # run of them is named once, then counted, not logged every time.
        self._up_at = 0.0
        self._quick_losses: list[float] = []
        self.flapping = False
        self.losses_unlogged = 0
        # Reconnects after which the broker had no session for us although we asked
        # it to keep one: it restarted without its saved state, or the session
        # expired, and what it held for or from this client is gone.
        self.sessions_lost = 0
        # Connects (the first one too) after which the broker had no session for us
        # although we asked for one: whatever it held for us is not there.
        self.sessions_absent = 0
        self.refused_publishes = 0
        self._unrouted: set[int] = set()
        self._subscriptions: dict[str, int] = {}
        # mid of a SUBSCRIBE or UNSUBSCRIBE -> [event, refused reason or None]
        self._subacks: dict[int, list] = {}
        self._sub_lock = threading.Lock()
        self._connected = threading.Event()
        self._connack = threading.Event()
        self._connack_rc = 0
        self._connack_reason = "0"  # the code in words, for the error line
        self._client: paho.Client | None = None
        self._closing = False
        self._retrier: threading.Thread | None = None
        self._stop_retrying = threading.Event()
        # Told once when the broker turns this link down for good after it was up
        # (a client certificate revoked meanwhile); the link then stops retrying.
        self.on_give_up: Callable[[TransportError], None] | None = None
        self.failure: TransportError | None = None
        self._rechecking = threading.Lock()

    # -- connection -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up."""
        return self._connected.is_set()

    def connect(self, timeout: float = 10.0) -> None:
        """Connect, waiting up to ``timeout`` seconds; raise TransportError on failure.

        With protocol ``auto`` a refusal of MQTT v5 is retried once as 3.1.1.
        """
        versions = [Protocol.V5, Protocol.V311]
        if self.requested is not Protocol.AUTO:
            versions = [self.requested]
        deadline = time.monotonic() + timeout
        for version in versions:
            rc = self._attempt(version, deadline)
            if rc == 0:
                return
            if (
                rc in (_REFUSED_VERSION_V5, _REFUSED_VERSION_V3)
                and version is Protocol.V5
            ):
                logger.info(
                    "broker %s refused MQTT v5; falling back to 3.1.1", self.url
                )
                continue
            raise TransportError(
                f"broker {self.url} refused the connection: {self._connack_reason}"
            )
        raise TransportError(f"broker {self.url} refused MQTT v5 and 3.1.1")

    def connect_in_background(
        self,
        timeout: float = 10.0,
        on_give_up: Callable[[TransportError], None] | None = None,
    ) -> None:
        """Retry :meth:`connect` in a thread until it succeeds or the link closes.

        For a client that must work while its broker is away (an agent booting
        before the network): attempts are spaced 1 s, 2 s, ... up to
        ``reconnect_max``. A refusal that will not pass by itself (credentials,
        ACL, a certificate) is logged as an error, ends the attempts and is handed
        to ``on_give_up``.
        """

        def attempts() -> None:
            delay = 1.0
            while not self._stop_retrying.is_set():
                try:
                    self.connect(timeout)
                    return
                except BrokerUnreachable as exc:
                    logger.debug("still no broker: %s", exc)
                except TransportError as exc:
                    logger.error("%s; no further attempts to connect", exc)
                    if on_give_up is not None:
                        on_give_up(exc)
                    return
                self._stop_retrying.wait(delay)
                delay = min(2 * delay, self.reconnect_max)

        self._retrier = threading.Thread(
            target=attempts, name="mqtt-connect", daemon=True
        )
        self._retrier.start()

    def _attempt(self, version: Protocol, deadline: float) -> int | str:
        """One connection with one protocol version; returns the CONNACK code."""
        self._teardown()
        client = self._build(version)
        self._check_client_certificate(deadline)
        self._connack.clear()
        last_error: Exception | None = None
        while True:
            try:
                client.connect(
                    self.address.host,
                    self.address.port,
                    self.keepalive,
                    **self._session_args(version),
                )
                break
            except (OSError, ssl.SSLError) as exc:
                if _permanent_tls_error(exc):
                    raise self._tls_failure(exc) from exc
                last_error = exc
                if time.monotonic() + 0.2 > deadline:
                    raise BrokerUnreachable(
                        f"cannot reach broker {self.url}: {last_error}"
                    ) from exc
                time.sleep(0.2)
        self._client = client
        client.loop_start()
        if not self._connack.wait(max(0.1, deadline - time.monotonic())):
            self._teardown()
            raise BrokerUnreachable(
                f"broker {self.url} did not answer CONNECT in time"
            )
        if self._connack_rc != 0:
            self._teardown()
        else:
            self.protocol = version
        return self._connack_rc

    def _check_client_certificate(self, deadline: float) -> None:
        """Raise TransportError if the broker refuses our client certificate.

        One TLS handshake, then a short read, on the link's own terms (CA, host
        name, certificate). Only a permanent failure is raised; anything passing
        (no answer, refused connection) is left to the attempt that follows.
        """
        if not self._client_certificate_in_use():
            return
        tls = self.tls
        try:
            check_tls_connect(
                self.address.host,
                self.address.port,
                tls.ca_certs,
                certfile=tls.certfile,
                keyfile=tls.keyfile,
                timeout=max(0.5, min(5.0, deadline - time.monotonic())),
            )
        except TransportError as exc:
            cause = exc.__cause__
            if cause is not None and _permanent_tls_error(cause):
                raise
            logger.debug("TLS pre-check of %s inconclusive: %s", self.url, exc)

    def _client_certificate_in_use(self) -> bool:
        """True when the link presents a client certificate checked against a CA."""
        tls = self.tls
        return not (
            tls is None or tls.certfile is None or not tls.ca_certs or tls.insecure
        )

    def _recheck_after_loss(self) -> None:
        """After a lost connection, check in a thread of its own whether the broker
        now refuses our certificate (revoked while the link was up).

        paho reconnects by itself, and under TLS 1.3 a refused certificate looks to
        it like one more lost connection, so it would retry for ever. A permanent
        refusal stops the link instead: logged once as an error, kept in
        ``failure`` and handed to ``on_give_up``. A broker that is only away is
        left to paho's reconnects. One check runs at a time.
        """
        if self._closing or not self._rechecking.acquire(blocking=False):
            return

        def check() -> None:
            try:
                self._check_client_certificate(time.monotonic() + 5.0)
            except UsageError as exc:
                # The certificate files cannot be read now (paho holds its copy):
                # nothing to learn from the broker, so paho goes on retrying.
                logger.debug("TLS re-check of %s not possible: %s", self.url, exc)
            except TransportError as exc:
                if self._closing:
                    return
                logger.error("%s; no further attempts to connect", exc)
                self.failure = exc
                self._stop_retrying.set()
                self._teardown()
                if self.on_give_up is not None:
                    self.on_give_up(exc)
            finally:
                self._rechecking.release()

        threading.Thread(target=check, name="mqtt-tls-recheck", daemon=True).start()

    def _tls_failure(self, exc: BaseException) -> TransportError:
        """A certificate problem as one TransportError naming it (no retry)."""
        ca = (self.tls and self.tls.ca_certs) or "the system CA store"
        return explain_connect_error(exc, self.address.host, self.address.port, ca)

    def _session_args(self, version: Protocol) -> dict:
        """CONNECT options of MQTT v5: a session kept ``session_expiry`` seconds."""
        if version is not Protocol.V5:
            return {}
        if self.session_expiry <= 0:
            return {"clean_start": True}
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = int(self.session_expiry)
        return {"clean_start": False, "properties": props}

    def _build(self, version: Protocol) -> paho.Client:
        v5 = version is Protocol.V5
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            **({} if v5 else {"clean_session": self.session_expiry <= 0}),
        )
        client.reconnect_delay_set(
            min_delay=max(1, round(self.reconnect_min)),
            max_delay=int(self.reconnect_max),
        )
        client.max_inflight_messages_set(self.max_inflight)
        client.manual_ack_set(self.manual_ack)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls is not None:
            try:
                client.tls_set(
                    ca_certs=self.tls.ca_certs,
                    certfile=self.tls.certfile,
                    keyfile=self.tls.keyfile,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                files = ", ".join(
                    f"{name} {value}"
                    for name, value in (
                        ("CA", self.tls.ca_certs),
                        ("certificate", self.tls.certfile),
                        ("key", self.tls.keyfile),
                    )
                    if value
                )
                raise UsageError(
                    f"bad TLS settings ({files}): {exc}; expected PEM files (a CA "
                    "certificate, and a client certificate with its key)"
                ) from exc
            client.tls_insecure_set(self.tls.insecure)
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_connect_fail = self._handle_connect_fail
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_unsubscribe = self._handle_unsubscribe
        return client

    def _teardown(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            client.loop_stop()
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001 - the socket may already be gone
                pass

    def close(
        self,
        final: tuple[str, bytes] | None = None,
        timeout: float = 5.0,
        *,
        end_session: bool = False,
    ) -> None:
        """Publish ``final`` (topic, payload; retained) if connected; disconnect.

        With ``end_session`` over MQTT v5 the DISCONNECT sets the session expiry to
        0, so the broker drops the session (and anything it would queue for it) at
        once, whatever ``session_expiry`` the link connected with. MQTT 3.1.1 has no
        such field: there it is a plain disconnect.
        """
        self._closing = True
        self._stop_retrying.set()
        if self._retrier is not None:
            self._retrier.join(timeout)  # an attempt in progress ends by its timeout
        client = self._client
        if client is not None and final is not None and self.connected:
            self.publish(final[0], final[1], qos=1, retain=True).wait(timeout)
        if client is not None:
            if end_session and self.protocol is Protocol.V5:
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
                client.disconnect(properties=props)
            else:
                client.disconnect()
            client.loop_stop()
        self._client = None
        self._connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected or ``timeout`` seconds passed; return connected."""
        return self._connected.wait(timeout)

    # -- paho callbacks (network thread) ----------------------------------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        code = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        self._connack_rc = code
        self._connack_reason = reason_words(reason_code)
        self._connack.set()
        if code != 0:
            logger.warning(
                "broker %s refused CONNECT: %s", self.url, self._connack_reason
            )
            return
        self.packet_limit = connack_packet_limit(properties) or self.max_packet_size
        present = bool(getattr(flags, "session_present", False))
        if self.session_expiry > 0 and not present:
            self.sessions_absent += 1
            if self.generation:  # a reconnect: there was a session to lose
                self.sessions_lost += 1
                logger.warning(
                    "broker %s kept no session for client %s across the reconnect "
                    "(it restarted without its saved state, or the session "
                    "expired): what it held for this client or had taken from it "
                    "is gone", self.url, self.client_id)
        for flt, qos in self._subscriptions.items():
            client.subscribe(flt, qos)
        self.generation += 1
        self._up_at = time.monotonic()
        self._connected.set()
        log = logger.debug if self.flapping else logger.info
        log("connected to %s (client %s)", self.url, self.client_id)
        if self.on_connect is not None:
            self.on_connect()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties):
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._closing:
            words = self.loss_words(flags, reason_code)
            if self._note_loss(time.monotonic()):
                logger.warning("%s; reconnecting", words)
            else:
                self.losses_unlogged += 1
                logger.debug("%s; reconnecting", words)
        if not self._closing and self._client_certificate_in_use():
            self._recheck_after_loss()

    def _note_loss(self, now: float) -> bool:
        """Note a lost connection; whether to log it. One that ended within
        FLAP_HELD_S of being made is a quick loss; FLAP_COUNT of them within
        FLAP_WINDOW_S are named once (with mosquitto, a second client with this
        client id is the usual cause: each connect closes the other's, and its
        broker sends no reason) and the losses after it only counted, until a
        connection holds FLAP_WINDOW_S."""
        held = now - self._up_at
        if held >= FLAP_WINDOW_S:
            self._quick_losses.clear()
            self.flapping = False
        if held >= FLAP_HELD_S:
            return True
        self._quick_losses = [
            t for t in self._quick_losses if now - t < FLAP_WINDOW_S] + [now]
        if self.flapping:
            return False
        if len(self._quick_losses) < FLAP_COUNT:
            return True
        self.flapping = True
        logger.warning(
            "the connection to %s ended %d times in %.0f s, each within %.0f s of "
            "being made: another client is likely using the client id %s (a second "
            "agent with the same --site/--gateway on another host, or in a unit "
            "with PrivateTmp=), each connect closing the other's; further losses "
            "are only counted (the summary's broker_losses_unlogged) until a "
            "connection holds for %.0f s",
            self.url, len(self._quick_losses), now - self._quick_losses[0],
            FLAP_HELD_S, self.client_id, FLAP_WINDOW_S,
        )
        return False

    def loss_words(self, flags: object, reason_code: object) -> str:
        """Why the connection ended, as the log says it: the broker's own reason
        when it sent one (an MQTT v5 DISCONNECT), a takeover of this client id
        named as such; otherwise "lost broker" (a closed socket, the broker gone).

        MQTT 3.1.1 has no DISCONNECT from the broker, and mosquitto 2.0.11 sends
        none to a v5 client either when it closes an old connection for a new
        one with the same id: that takeover reads as a plain loss here (the
        broker's log says "already connected, closing old connection").
        """
        value = getattr(reason_code, "value", reason_code)
        if value == SESSION_TAKEN_OVER:
            return (
                f"the broker {self.url} closed this session: another client "
                f"connected with the client id {self.client_id} (a second agent "
                "with the same --site/--gateway on another host, or in a unit with "
                "PrivateTmp=)"
            )

        if getattr(flags, "is_disconnect_packet_from_server", False):
            return (
                f"lost broker {self.url} (it closed this session: "
                f"{reason_words(reason_code)})"
            )
        return f"lost broker {self.url} ({reason_code})"

    def _handle_connect_fail(self, client, userdata) -> None:
        # paho's own reconnect failed before any MQTT packet (a TLS 1.2 handshake
        # refused, a socket error): the same check as after a lost connection.
        if not self._closing and self._client_certificate_in_use():
            self._recheck_after_loss()

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        ok = not getattr(reason_code, "is_failure", False)
        if getattr(reason_code, "value", 0) == NO_MATCHING_SUBSCRIBERS:
            self._unrouted.add(mid)
        if not ok:
            self.refused_publishes += 1
            if self.refused_publishes == 1:
                logger.warning("broker refused a publish: %s", reason_code)
        if self.on_publish is not None:
            self.on_publish(mid, ok)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._sub_lock:
            waiter = self._subacks.pop(mid, None)
        if waiter is None:
            return
        refused = [
            str(rc)
            for rc in reason_codes
            if getattr(rc, "is_failure", False) or rc == 128
        ]
        waiter[1] = ", ".join(refused) or None
        waiter[0].set()

    def _handle_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        with self._sub_lock:
            waiter = self._subacks.pop(mid, None)
        if waiter is not None:
            waiter[0].set()

    # The retain flag of the message whose handler runs now (paho calls it on its
    # one network thread, one message at a time): a handler that must tell a
    # retained message apart (the re-scorer refuses retained escalations) reads it.
    retained = False

    def _handle_message(self, client, userdata, msg) -> None:
        if self.on_message is None:
            if self.manual_ack:
                client.ack(msg.mid, msg.qos)
            return
        self.retained = bool(getattr(msg, "retain", False))
        try:
            if self.manual_ack:
                self.on_message(msg.topic, msg.payload, (msg.mid, msg.qos))
            else:
                self.on_message(msg.topic, msg.payload)
        except Exception:  # noqa: BLE001 - an escape here would stop paho's thread
            # Last guard: a handler that raised did not take the message, so it is
            # acknowledged here (else it is redelivered forever) and counted.
            self.callback_errors += 1
            if self.callback_errors == 1:
                logger.exception(
                    "message handler failed on %s; further failures only counted",
                    msg.topic,
                )
            if self.manual_ack:
                client.ack(msg.mid, msg.qos)
        finally:
            self.retained = False

    def ack(self, token: tuple[int, int]) -> None:
        """Acknowledge a message received with ``manual_ack`` once it is safe."""
        client = self._client
        if client is not None:
            client.ack(*token)

    # -- operations -------------------------------------------------------------------

    def subscribe(
        self, topic_filter: str, qos: int = 1, timeout: float | None = None
    ) -> None:
        """Subscribe now (when connected) and again after every reconnect.

        With ``timeout``, wait that many seconds for the broker's SUBACK, so that
        messages published after this returns are routed to us; no SUBACK in time,
        or a refusal, raises TransportError.
        """
        if topic_filter.startswith("$share/") and self.protocol is Protocol.V311:
            raise TransportError(
                "shared subscriptions need MQTT v5; this broker speaks only 3.1.1"
            )
        self._subscriptions[topic_filter] = qos
        client = self._client
        if client is None or not self.connected:
            return
        waiter = [threading.Event(), None]
        with self._sub_lock:
            rc, mid = client.subscribe(topic_filter, qos)
            if timeout is not None and mid is not None:
                self._subacks[mid] = waiter
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            _check(rc, f"subscribe to {topic_filter}")
        if timeout is None or rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return
        if not waiter[0].wait(timeout):
            raise TransportError(
                f"broker {self.url} did not acknowledge the subscription to "
                f"{topic_filter} within {timeout:g} s"
            )
        if waiter[1] is not None:
            raise TransportError(
                f"broker {self.url} refused the subscription to {topic_filter}: "
                f"{waiter[1]}"
            )

    def unsubscribe(self, topic_filter: str, timeout: float = 5.0) -> bool:
        """Stop receiving ``topic_filter``, now and after any reconnect.

        Waits up to ``timeout`` seconds for the broker's UNSUBACK and returns True
        once it came: from then on the broker routes no new message to us on that
        filter (ones it had already sent or queued for us may still arrive). False
        when not connected or when no UNSUBACK came in time.
        """
        self._subscriptions.pop(topic_filter, None)
        client = self._client
        if client is None or not self.connected:
            return False
        waiter = [threading.Event(), None]
        with self._sub_lock:
            rc, mid = client.unsubscribe(topic_filter)
            if mid is not None:
                self._subacks[mid] = waiter
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            with self._sub_lock:
                self._subacks.pop(mid, None)
            return False
        if waiter[0].wait(timeout):
            return True
        with self._sub_lock:
            self._subacks.pop(mid, None)
        return False

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Delivery:
        """Queue one message; the returned :class:`Delivery` tells when it was acked.

        A connection lost at this moment is not an error: the delivery reports
        ``lost`` and the caller publishes the message again after reconnecting. A
        message over the broker's packet limit raises :class:`MessageTooLargeError`
        and nothing is sent (it would fail the same way on every retry). Other paho
        failures raise TransportError.
        """
        client = self._client
        if client is None:
            raise TransportError(f"not connected to broker {self.url}")

        check_publish_size(
            topic,
            payload,
            qos=qos,
            limit=self.packet_limit,
            v5=self.protocol is not Protocol.V311,
        )
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise TransportError(f"publish to {topic} refused: {exc}") from exc
        if info.rc not in (
            MQTTErrorCode.MQTT_ERR_SUCCESS,
            MQTTErrorCode.MQTT_ERR_NO_CONN,
        ):
            _check(info.rc, f"publish to {topic}")
        self._unrouted.discard(info.mid)
        return Delivery(info, self._unrouted)


class Delivery:
    """The fate of one published message: acknowledged, waiting, or lost.

    ``unrouted`` turns true when an MQTT v5 broker acknowledged the message with
    "no matching subscribers": nobody received it, so a sender that needs a reader
    publishes it again later.
    """

    def __init__(self, info: paho.MQTTMessageInfo, unrouted: set[int]) -> None:
        self._info = info
        self._unrouted_mids = unrouted
        self.mid = info.mid
        self.lost = info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN

    @property
    def unrouted(self) -> bool:
        """True when the broker's PUBACK said no subscriber matched."""
        return self.mid in self._unrouted_mids

    def forget(self) -> None:
        """Drop the broker's answer for this mid (call once the delivery is done)."""
        self._unrouted_mids.discard(self.mid)

    def acked(self) -> bool:
        """True once the broker acknowledged the message (PUBACK for QoS 1)."""
        if self.lost:
            return False
        return self._info.is_published()

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for the acknowledgement."""
        if self.lost:
            return False
        try:
            self._info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return self._info.is_published()
