"""Seed ensembles, feature dropout and F1-based early stopping of the teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.errors import ModelError, UsageError
from flows.windows import window_index
from teacher.data import Prepared, stratified_split
from teacher.model import TeacherConfig, TeacherNet
from teacher.train import TrainConfig, fit

SMALL = {"conv_filters": (8,), "lstm_hidden": 8, "dense": (8,), "dropout": 0.1}


def _toy(n=400, seed=0) -> Prepared:
    """Malicious when the first two of four features sum high."""
    rng = np.random.default_rng(seed)
    X = rng.random((n, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 1.1).astype(np.int8)
    return Prepared(X=X, idx=window_index(np.zeros(n), 1), y=y,
                    split=stratified_split(y, seed=seed), encoder=None, name="toy",
                    family="unsw-nb15")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ensemble_averages_member_logits():
    cfg = TeacherConfig(n_features=4, window=2, members=3, **SMALL)
    net = TeacherNet(cfg).eval()
    assert len(net.members) == 3
    assert all(m.config == cfg.replace(members=1) for m in net.members)
    x = torch.rand(5, 2, 4)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in net.members]).mean(dim=0)
        np.testing.assert_allclose(net(x).numpy(), expected.numpy(), rtol=1e-6)
    assert TeacherConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ModelError, match="members"):
        TeacherConfig(n_features=4, members=0)


def test_fit_trains_members_apart_and_thresholds_the_average():
    prep = _toy()
    tc = TrainConfig(epochs=3, batch_size=32, lr=3e-3, samples_per_epoch=256)
    cfg = TeacherConfig(n_features=4, window=1, **SMALL)
    res = fit(prep, cfg.replace(members=2), tc)
    assert res.model.config.members == 2
    first = res.history[0]
    assert first["epoch"] == 1 and [m["member"] for m in first["members"]] == [0, 1]
    assert first["val_f1"] == pytest.approx(
        np.mean([m["val_f1"] for m in first["members"]]))

    # Member i is what a single fit with seed + i gives.
    for i in range(2):
        alone = fit(prep, cfg, TrainConfig(**{**tc.__dict__, "seed": i}))
        assert [r["val_f1"] for r in alone.history] == [
            m["val_f1"] for r in res.history for m in r["members"]
            if m["member"] == i]
        for key, value in alone.model.state_dict().items():
            torch.testing.assert_close(res.model.members[i].state_dict()[key], value)

    # The threshold is the best-F1 cut of the ensemble's validation scores.
    from teacher.metrics import choose_threshold

    va = prep.rows("val")
    with torch.no_grad():
        z = res.model.eval()(torch.from_numpy(prep.windows(va))).double().numpy()
    cut = choose_threshold(prep.y[va], 1 / (1 + np.exp(-z)))
    assert res.threshold["threshold"] == pytest.approx(cut)


def test_ensemble_checkpoint_round_trip(tmp_path):
    from teacher.checkpoint import load_teacher, save_checkpoint
    from tests.test_teacher_model import _encoder

    net = TeacherNet(TeacherConfig(n_features=4, window=3, members=2, **SMALL))
    net.train()
    net(torch.rand(16, 3, 4))
    net.eval()
    rule = {"threshold": 0.5, "rule": "best-f1", "chosen_on": "val"}
    save_checkpoint(tmp_path / "ck", net, encoder=_encoder(4, 3), threshold=rule,
                    history=[], metrics={}, provenance={})
    teacher = load_teacher(tmp_path / "ck", device="cpu")
    x = np.random.default_rng(0).random((6, 3, 4)).astype(np.float32)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(teacher.predict_proba(x), expected, rtol=1e-5,
                               atol=1e-6)


def test_feature_dropout_and_stop_on_are_checked_and_train():
    with pytest.raises(UsageError, match="feature_dropout"):
        TrainConfig(feature_dropout=1.0)
    with pytest.raises(UsageError, match="stop_on"):
        TrainConfig(stop_on="auc")
    prep = _toy(seed=1)
    cfg = TeacherConfig(n_features=4, window=1, **SMALL)
    tc = TrainConfig(epochs=4, patience=4, batch_size=32, lr=3e-3,
                     samples_per_epoch=256, feature_dropout=0.2, stop_on="f1")
    res = fit(prep, cfg, tc)
    best = max(res.history, key=lambda r: (r["val_f1"], -r["epoch"]))
    assert res.best_epoch == best["epoch"]
