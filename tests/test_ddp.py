"""DistributedDataParallel: two CPU processes under torchrun end with equal weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, free_port

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from flows.windows import window_index
    from teacher.data import Prepared, stratified_split
    from teacher.model import TeacherConfig, TeacherNet
    from teacher.train import TrainConfig, fit

    torch.set_num_threads(1)
    out = sys.argv[1]
    rng = np.random.default_rng(0)
    X = rng.random((400, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 1.1).astype(np.int8)
    prep = Prepared(X=X, idx=window_index(np.zeros(400), 2), y=y,
                    split=stratified_split(y, seed=0), encoder=None, name="toy",
                    family="unsw-nb15")
    cfg = TeacherConfig(n_features=4, window=2, conv_filters=(8,), lstm_hidden=8,
                        dense=(8,))
    torch.manual_seed(0)
    init = TeacherNet(cfg).state_dict()
    res = fit(prep, cfg, TrainConfig(epochs=3, batch_size=32, seed=0))
    rank = dist.get_rank()
    assert dist.get_world_size() == 2 and dist.get_backend() == "gloo"
    save_file({k: v.contiguous() for k, v in res.model.state_dict().items()},
              os.path.join(out, f"rank{rank}.safetensors"))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in init.items()},
                  os.path.join(out, "init.safetensors"))
        with open(os.path.join(out, "f1.txt"), "w") as fh:
            fh.write(str(res.val_metrics["f1"]))
    # Both ranks leave together: rank 1 tearing gloo down while rank 0 still
    # wrote its files aborted it once on a loaded machine ("terminate called
    # without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.timeout(300)
def test_two_cpu_replicas_end_with_identical_weights(tmp_path: Path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]

    a = load_file(str(tmp_path / "rank0.safetensors"))
    b = load_file(str(tmp_path / "rank1.safetensors"))
    init = load_file(str(tmp_path / "init.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # They trained: the weights moved away from the shared initialisation.
    assert not all(torch.equal(a[k], init[k]) for k in a if k in init)
    assert float((tmp_path / "f1.txt").read_text()) > 0.5


@pytest.mark.timeout(300)
def test_teacher_train_runs_under_torchrun_and_writes_one_checkpoint(
        tmp_path: Path, slices):
    # The command itself under torchrun (the test above drives fit() directly):
    # rank 0 writes the checkpoint; rank 1 waits for it and leaves with it.
    import json

    from safetensors.torch import load_file

    out = tmp_path / "teacher"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "teacher.cli", "train",
           "--data", str(slices[0]), "--out", str(out), "--epochs", "2",
           "--members", "1", "--batch-size", "64", "--conv-filters", "8",
           "--lstm-hidden", "8", "--dense", "8", "--samples-per-epoch", "640",
           "--replay-size", "0", "-q"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    summaries = [json.loads(line) for line in done.stdout.splitlines()
                 if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["checkpoint"] == str(out)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["world_size"] == 2
    assert load_file(str(out / "model.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
