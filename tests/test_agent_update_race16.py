"""Model updates in a burst: the model the agent runs is the one installed last."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("onnx")

from tests.test_ota_artifacts import make_artifact  # noqa: E402


def test_a_late_update_thread_cannot_swap_an_older_model_in(tmp_path) -> None:
    """Each model-topic message is handled in its own thread. The updater works
    through one at a time, but the agent swapped the installed model in after the
    updater let go: a thread that handled v2 and was late to swap put v2 in after
    v3's thread swapped v3 (the slots naming v3). Handling and swap now go
    together, so the model running is the one the updater installed last."""
    from edge_agent.agent import Agent
    from edge_agent.outbox import Outbox
    from edge_agent.runtime import load_artifact

    installed: list[str] = []
    lock = threading.Lock()

    class Updater:
        """Installs whatever version a message names, one at a time."""

        def handle(self, payload: bytes):
            with lock:
                installed.append(payload.decode())
                return SimpleNamespace(
                    ok=True, changed=True, version=payload.decode(),
                    scorer=payload.decode(), withdrawn=False, repeated=False)

    agent = Agent(load_artifact(make_artifact(tmp_path / "v1", version="v1")),
                  site="s1", gateway="g1", outbox=Outbox(tmp_path / "o.db"))
    agent._model_updater = Updater()  # no broker: messages are handed in below
    swapped: list[str] = []

    def swap_scorer(scorer: str) -> None:
        if scorer == "v2":
            time.sleep(0.3)  # the late thread
        swapped.append(scorer)

    agent.swap_scorer = swap_scorer
    try:
        first = threading.Thread(target=agent._model_message, args=(b"v2",))
        first.start()
        time.sleep(0.1)  # v2 handled, its swap under way
        second = threading.Thread(target=agent._model_message, args=(b"v3",))
        second.start()
        first.join(5)
        second.join(5)
    finally:
        agent.close()

    assert installed == ["v2", "v3"]
    assert swapped == ["v2", "v3"]  # the last swapped is the last installed
