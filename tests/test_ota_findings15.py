"""Model updates by reference from a slow or failing server (found by a tester: a
server sending a byte a second held the update, the agent's status and its
shutdown for as long as the download lasted; a download cut short was refused
for good)."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edge_agent import signing  # noqa: E402
from edge_agent.ota import ModelUpdater, pack_update  # noqa: E402
from tests.test_ota_artifacts import flashed_slots, make_artifact  # noqa: E402

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

pytestmark = pytest.mark.timeout(60)


class _Server:
    """An HTTP server on 127.0.0.1 that sends ``body`` as ``how`` says: "slow" (a
    byte every 0.2 s), "cut" (half, then closes), or "whole"."""

    def __init__(self, body: bytes, how: str) -> None:
        outer = self
        self.body, self.how, self.stop = body, how, threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the library's name
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                if outer.how == "whole":
                    self.wfile.write(outer.body)
                elif outer.how == "cut":
                    self.wfile.write(outer.body[: len(outer.body) // 2])
                else:
                    for i in range(len(outer.body)):
                        if outer.stop.wait(0.2):
                            return
                        self.wfile.write(outer.body[i : i + 1])
                        self.wfile.flush()

            def log_message(self, *_args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/u.tar.gz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def setup(tmp_path: Path):
    priv, pub = signing.generate_keypair(tmp_path / "keys")
    v1 = make_artifact(tmp_path / "v1", version="v1", seed=1)
    slots = flashed_slots(tmp_path / "models", v1)
    v2 = make_artifact(tmp_path / "v2", version="v2", seed=2)
    return priv, pub, slots, v2


def _update(setup, url: str):
    priv, pub, slots, v2 = setup
    package = pack_update(v2, priv, url=url, **TARGET)
    return package, ModelUpdater(
        pub, slots.dir, tolerance=1e-5, fetch_timeout=1.0,
        **HERE,
    )


def test_a_slow_download_ends_at_the_timeout_and_does_not_hold_the_status(setup):
    server = _Server(b"", "slow")
    try:
        package, updater = _update(setup, server.url)
        server.body = package.archive
        done: list = []
        worker = threading.Thread(
            target=lambda: done.append(updater.handle(package.message)), daemon=True)
        start = time.monotonic()
        worker.start()
        time.sleep(0.3)  # the download is under way, the update's lock held
        t0 = time.monotonic()
        assert updater.last_refusal == {}  # the status reads it without waiting
        assert time.monotonic() - t0 < 0.1
        worker.join(10)
        took = time.monotonic() - start
    finally:
        server.close()
    assert not worker.is_alive() and took < 4.0  # 1 s in all, not per byte
    result = done[0]
    assert not result.ok and "bytes came in 1 s" in result.reason
    assert updater.last_refusal["update_refused"] == result.reason


def test_a_download_cut_short_is_tried_again_when_the_update_comes_again(setup):
    server = _Server(b"", "cut")
    try:
        package, updater = _update(setup, server.url)
        server.body = package.archive
        first = updater.handle(package.message)
        server.how = "whole"
        second = updater.handle(package.message)
    finally:
        server.close()
    assert not first.ok and "the download ended after" in first.reason
    assert second.ok and second.changed and not second.repeated


def test_a_rollback_on_a_full_disk_is_one_error_line(tmp_path, monkeypatch, capsys):
    """Found: rollback on a full disk ended in a traceback (exit 1 documented only
    for a failing model); nothing was switched then, and it says so."""
    import errno
    import shutil

    from edge_agent import bundle as bundle_mod
    from edge_agent.cli import main
    from edge_agent.flash import ModelSlots

    root = tmp_path / "root"
    v1 = make_artifact(tmp_path / "v1", version="v1", seed=1)
    v2 = make_artifact(tmp_path / "v2", version="v2", seed=2)
    slots = flashed_slots(root / bundle_mod.MODELS_DIR, v1)
    staged = slots.staging()
    shutil.rmtree(staged)
    shutil.copytree(v2, staged)
    slots.install("B", staged, {"model_version": "v2", "sha256": "c" * 64,
                                "issued_at": 2000.0, "source": "update"})
    slots.switch("B")
    before = (slots.current_path.readlink(), (slots.dir / "slots.json").read_text())

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(slots.dir))

    monkeypatch.setattr(ModelSlots, "mark_rolled_back", full)
    code = main(["rollback", "--root", str(root)])

    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: rollback refused, slot B (v2) stays active: cannot write "
        f"{slots.dir}: No space left on device"]
    after = (slots.current_path.readlink(), (slots.dir / "slots.json").read_text())
    assert after == before


def test_an_updater_removes_what_a_killed_update_left(setup, tmp_path):
    """Found: every agent killed during an update left a staging folder beside
    the slots, which only a flash removed."""
    import subprocess
    import sys

    _priv, pub, slots, _v2 = setup
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = slots.dir / f".incoming-{dead}-abc"
    left.mkdir()
    ours = slots.staging()  # this process runs: kept
    ModelUpdater(pub, slots.dir, tolerance=1e-5, **HERE)
    assert not left.exists() and ours.exists()
