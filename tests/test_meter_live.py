"""Live capture on the loopback interface (root only) and the no-privilege message."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from flows.errors import BadInputError, UsageError

pcapy = pytest.importorskip("pcapy", reason="pcapy-ng is not installed")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo needs root here")
def test_live_capture_on_loopback():
    from flows.meter import iter_flows

    port = _free_udp_port()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    sport = sender.getsockname()[1]
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", port))

    def talk():
        time.sleep(0.5)
        for i in range(5):
            sender.sendto(b"x" * (10 + i), ("127.0.0.1", port))
            receiver.recvfrom(100)
            time.sleep(0.02)

    th = threading.Thread(target=talk)
    th.start()
    from flows.meter.live import iter_live

    recs = list(iter_live("lo", bpf=f"udp and port {port}", duration=2.0))
    th.join()
    sender.close()
    receiver.close()
    assert len(recs) == 1
    (r,) = recs
    assert (r["src_ip"], r["src_port"], r["dst_port"]) == ("127.0.0.1", sport, port)
    assert r["orig_pkts"] == 5 and r["orig_bytes"] == sum(10 + i for i in range(5))
    assert r["orig_ip_bytes"] == sum(28 + 10 + i for i in range(5))
    assert r["conn_state"] == "S0" and r["history"] == "D"
    assert callable(iter_flows)


def test_unknown_interface_is_named():
    from flows.meter.live import open_live

    with pytest.raises((BadInputError, UsageError), match="gw-no-such0"):
        open_live("gw-no-such0")


def test_without_privilege_the_error_says_how_to_grant_it(tmp_path):
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run a check as an unprivileged user")
    code = (
        "import sys\n"
        "from flows.errors import GatewatchError\n"
        "from flows.meter.live import open_live\n"
        "try:\n    open_live('lo')\n"
        "except GatewatchError as e:\n    print(e); sys.exit(e.exit_code)\n"
    )
    proc = subprocess.run(
        [
            setpriv,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    if "Permission denied" in proc.stderr and "python" in proc.stderr.lower():
        pytest.skip("the unprivileged user cannot run this Python")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "setcap cap_net_raw,cap_net_admin+eip" in proc.stdout
    assert "cannot capture on 'lo'" in proc.stdout


class _FakeCapture:
    """A capture handle with nothing to read (a pipe's read end as its fd), or one
    that fails on its first read; records whether it was closed."""

    def __init__(self, fail: bool = False):
        self.read_fd, self.write_fd = os.pipe()
        self.fail, self.closed = fail, 0
        if fail:
            os.write(self.write_fd, b"x")  # select says ready, dispatch fails

    def datalink(self):
        return 1

    def setnonblock(self, flag):
        pass

    def getfd(self):
        return self.read_fd

    def dispatch(self, budget, callback):
        if self.fail:
            raise OSError(19, "No such device")
        return 0

    def stats(self):
        return 0, 0, 0

    def close(self):
        self.closed += 1
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.mark.parametrize("how", ["ends", "fails", "stopped"])
def test_the_capture_handle_is_closed_however_the_capture_ends(monkeypatch, how):
    # Found: iter_live never closed its libpcap handle; it stayed open until the
    # garbage collector took the generator.
    import flows.meter.live as live

    cap = _FakeCapture(fail=how == "fails")
    monkeypatch.setattr(live, "open_live", lambda *a, **k: cap)
    monkeypatch.setattr(live, "fast_available", lambda: True, raising=False)
    flows = live.iter_live("lo", duration=0.3)

    if how == "ends":
        assert list(flows) == []
    elif how == "fails":
        with pytest.raises(live.CaptureFailedError, match="No such device"):
            list(flows)
    else:
        end = threading.Event()
        flows = live.iter_live("lo", duration=5.0, end=end)
        end.set()
        assert list(flows) == []
    assert cap.closed == 1
