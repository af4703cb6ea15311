"""Shared fixtures: the data folder, and a real mosquitto broker on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Re-scorers started with default options hold their client ids by lock files in
# this folder; the suite keeps its own, apart from re-scorers running on the host.
os.environ.setdefault(
    "GATEWATCH_RUN_DIR", tempfile.mkdtemp(prefix="gatewatch-test-run-")
)


def _data_dir() -> Path | None:
    env = os.environ.get("GATEWATCH_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture
def interactive_sigint():
    """SIGINT as a terminal gives it to Python (raise KeyboardInterrupt) for the
    test, whatever the suite inherited: a job started in the background by a
    non-interactive shell (CI) has SIGINT ignored, and the commands then rightly
    ignore Ctrl-C too."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder (GATEWATCH_DATA); tests that need it skip without it."""
    path = _data_dir()
    if path is None:
        pytest.skip("no data folder: set GATEWATCH_DATA to the shared data directory")
    return path


def data_file(data_dir: Path, rel: str) -> Path:
    """A file under the data folder, or a skip that names it."""
    path = data_dir / rel
    if not path.exists():
        pytest.skip(f"{rel} is absent from {data_dir}")
    return path


@pytest.fixture(scope="module")
def slices(data_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Two disjoint 1,000-row slices of KDDTrain+_20Percent, written by the test."""
    src = data_file(data_dir, "nsl-kdd/KDDTrain+_20Percent.txt")
    lines = src.read_text().splitlines(keepends=True)
    out = tmp_path_factory.mktemp("kdd")
    first, second = out / "first.txt", out / "second.txt"
    first.write_text("".join(lines[:1000]))
    second.write_text("".join(lines[1000:2000]))
    return first, second


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def signal_state(pid: int, signum: int, field: str) -> bool:
    """Whether process ``pid`` catches (``field`` "SigCgt") or ignores ("SigIgn")
    ``signum``, from /proc/PID/status (Linux); False once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def wait_for(cond, timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll ``cond`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


class FixedTeacher:
    """A stand-in teacher for 4 x 3 windows: every window scores 0.7, so is
    malicious (no torch needed; for tests where the teacher is not under test)."""

    threshold = 0.5
    version = "fixed"
    config = {"window": 4, "n_features": 3}

    def predict_proba(self, windows):
        import numpy as np

        return np.full(len(windows), 0.7)


class FakeServer:
    """Stands in for ReScorer: no broker; counts like one that saw 3 messages."""

    version = "fake"
    store_error = None
    STATS: dict = {}  # counts a test sets on top of the 3 messages

    def __init__(self, *args, **kwargs) -> None:
        pass

    def start(self, timeout):
        pass

    def stop(self):
        pass

    def stats(self):
        return {"received": 3, "scored": 3, "stored": 3, "duplicates": 0,
                "verdicts_sent": 3, "rejected": {}, "teacher_version": "fake",
                **self.STATS}


@pytest.fixture
def fake_serve(monkeypatch):
    """``teacher serve`` without a teacher or a broker: a FixedTeacher and
    :class:`FakeServer` patched in; a test sets ``STATS`` on what it returns."""
    import teacher.checkpoint
    import teacher.serve

    monkeypatch.setattr(
        teacher.checkpoint, "load_teacher", lambda path, **kw: FixedTeacher()
    )
    monkeypatch.setattr(teacher.serve, "_set_threads", lambda *a: None)
    monkeypatch.setattr(teacher.serve, "ReScorer", FakeServer)
    monkeypatch.setattr(FakeServer, "STATS", {})
    return FakeServer


class Mosquitto:
    """A mosquitto process on 127.0.0.1 with a config written by the test."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = "") -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
            "max_queued_messages 100000\n" + self.extra
        )
        log = open(self.workdir / f"mosquitto-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def persistent_broker(
    tmp_path: Path, port: int | None = None
) -> tuple[Mosquitto, Path, Path]:
    """A mosquitto on 127.0.0.1 that keeps its state in a file (saved at SIGTERM);
    (broker, its state file, its log: a file mosquitto flushes line by line)."""
    state = tmp_path / "broker-state"
    state.mkdir()
    events = tmp_path / "broker-events.log"
    # Started as root, mosquitto changes to the user "mosquitto", which cannot write
    # under pytest's tmp_path (mode 0700): the save would fail, logged and ignored.
    user = "user root\n" if os.geteuid() == 0 else ""
    extra = (
        f"persistence true\npersistence_location {state}/\n"
        f"log_dest file {events}\n{user}"
    )
    # The fixture's "persistence false" comes first; the later line wins.
    return Mosquitto(tmp_path, port=port, extra=extra), state / "mosquitto.db", events


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A running mosquitto broker for one test; skipped where mosquitto is absent."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def label_cap_raised(monkeypatch):
    """Flow text is capped (edge_agent.protocol.FLOW_TEXT_CAPS) and the agent cuts
    what is longer, so one text field alone no longer makes an oversized
    escalation (a wide window does, in practice): raise label_detail's cap so that
    a huge label still does. Made a fixture by the modules that need it."""
    from edge_agent import protocol as proto

    monkeypatch.setitem(proto.FLOW_TEXT_CAPS, "label_detail", 1_000_000)
