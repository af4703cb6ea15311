"""A second agent on one host with the same MQTT client id is refused at start.

Found: two agents with different outboxes but the same site and gateway connected
under one client id (``gatewatch-SITE-GATEWAY``), so the broker kept only the
newer connection and the two took turns kicking each other off. Now the id is
held for the run by a lock file in ``$GATEWATCH_RUN_DIR``, as the re-scorer holds
its own, and a second agent exits 2 naming the holder's pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.agent import ClientIdInUseError, claim_client_id
from tests.conftest import free_port
from tests.test_agent_fixtures import tiny

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


def _agent(tm, tmp_path: Path, outbox: str, port: int) -> list[str]:
    """``edge-agent run`` on stdin for site s1, gateway g1, towards a broker that
    does not answer (tried again in the background: the agent keeps running)."""
    return [sys.executable, "-m", "edge_agent.cli", "run", "--artifact",
            str(tm.artifact), "--source", "-", "--site", "s1", "--gateway", "g1",
            "--outbox", str(tmp_path / outbox), "--alerts", "",
            "--broker", f"mqtt://127.0.0.1:{port}", "--connect-timeout", "0.5",
            "--drain-timeout", "0.5"]


def test_a_second_agent_with_the_same_client_id_is_refused(tm, tmp_path: Path):
    run = tmp_path / "run"
    env = {**os.environ, "GATEWATCH_RUN_DIR": str(run), "PYTHONPATH": str(REPO)}
    port = free_port()
    lock = run / "gatewatch-s1-g1.lock"
    first = subprocess.Popen(_agent(tm, tmp_path, "a.db", port), cwd=REPO, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and first.poll() is None:
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        assert lock.read_text().strip() == str(first.pid)

        second = subprocess.run(_agent(tm, tmp_path, "b.db", port), cwd=REPO,
                                env=env, input="", capture_output=True, text=True,
                                timeout=60)

        assert second.returncode == 2, second.stderr
        [line] = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert "the MQTT client id gatewatch-s1-g1 is in use by another process" in line
        assert f"(pid {first.pid} holds {lock})" in line
        assert "--site/--gateway" in line
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one runs on
    finally:
        first.stdin.close()  # the end of its input: it drains and exits
        try:
            first.wait(60)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
        first.stderr.close()

    # Once the first has ended, its id is free again.
    held = claim_client_id_in(run, "gatewatch-s1-g1")
    os.close(held)


def claim_client_id_in(run: Path, name: str) -> int:
    """``claim_client_id`` with ``$GATEWATCH_RUN_DIR`` set to ``run``."""
    before = os.environ.get("GATEWATCH_RUN_DIR")
    os.environ["GATEWATCH_RUN_DIR"] = str(run)
    try:
        return claim_client_id(name)
    finally:
        if before is None:
            os.environ.pop("GATEWATCH_RUN_DIR")
        else:
            os.environ["GATEWATCH_RUN_DIR"] = before


def test_an_id_is_held_until_let_go_and_others_stay_free(tmp_path: Path):
    run = tmp_path / "run"
    held = claim_client_id_in(run, "gatewatch-s1-g1")
    try:
        with pytest.raises(ClientIdInUseError, match=f"pid {os.getpid()} holds"):
            claim_client_id_in(run, "gatewatch-s1-g1")
        os.close(claim_client_id_in(run, "gatewatch-s1-g2"))  # another gateway
    finally:
        os.close(held)
    os.close(claim_client_id_in(run, "gatewatch-s1-g1"))
    assert (run.stat().st_mode & 0o777) == 0o700


def test_a_lock_folder_others_can_write_is_refused(tmp_path: Path):
    from flows.errors import UsageError

    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    with pytest.raises(UsageError, match="writable by other users"):
        claim_client_id_in(run, "gatewatch-s1-g1")
