"""The long fuzz run's harness: a hang is CPU spent, not time spent waiting."""

from __future__ import annotations

import time

from benchmarks import fuzz_long


def test_an_input_that_burns_cpu_is_a_hang_one_that_waits_is_not(
    tmp_path, monkeypatch
):
    def busy(kind, data, scratch):
        end = time.process_time() + 5
        while time.process_time() < end:
            pass

    monkeypatch.setattr(fuzz_long, "run_target", busy)
    res = fuzz_long.fuzz_target("verdict", inputs=2, seconds=None, rng_seed=0,
                                data_dir=None, out=tmp_path, hang_seconds=0.2)
    assert (res["inputs"], res["hangs"], res["crashes"]) == (2, 2, 0)
    assert any(p.name.startswith("verdict-") for p in tmp_path.iterdir())

    # Waiting (a starved process, a slow disk) uses no CPU: no hang.
    monkeypatch.setattr(fuzz_long, "run_target", lambda *a: time.sleep(0.4))
    res = fuzz_long.fuzz_target("verdict", inputs=1, seconds=None, rng_seed=0,
                                data_dir=None, out=tmp_path / "w", hang_seconds=0.2)
    assert (res["inputs"], res["hangs"]) == (1, 0)
