"""TeacherNet, its config and the checkpoint folder: shapes, round trips, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flows.errors import BadInputError, ModelError
from teacher.checkpoint import (
    CHECKPOINT_FILES,
    CHECKSUMS_FILE,
    load_teacher,
    save_checkpoint,
)
from teacher.model import TeacherConfig, TeacherNet


def _encoder(n_features: int, window: int):
    from flows.encoder import Encoder

    rng = np.random.default_rng(0)
    cols = {f"f{i}": rng.random(50) for i in range(n_features)}
    enc = Encoder.fit(cols, "unsw-nb15", window=window, group_by="stream")
    assert enc.n_features == n_features
    return enc


@pytest.mark.parametrize("window", [1, 2, 3, 5, 16])
def test_forward_shape_for_small_and_large_windows(window):
    net = TeacherNet(TeacherConfig(n_features=6, window=window, conv_filters=(8, 8, 8)))
    net.eval()
    out = net(torch.rand(4, window, 6))
    assert out.shape == (4,)
    assert torch.isfinite(out).all()


def test_layers_follow_the_config():
    cfg = TeacherConfig(n_features=5, window=8, conv_filters=(16, 32), lstm_hidden=12,
                        dense=(20, 10), dropout=0.2)
    net = TeacherNet(cfg)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (5, 16, 3), (16, 32, 3)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()) == 2
    assert sum(isinstance(m, torch.nn.MaxPool1d) for m in net.modules()) == 2
    assert net.lstm.bidirectional and net.lstm.hidden_size == 12
    linears = [m for m in net.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (24, 20), (20, 10), (10, 1)]


def test_pooling_stops_before_the_sequence_vanishes():
    # W=3: pool once (3 -> 1), then no more pooling for the next two blocks.
    net = TeacherNet(TeacherConfig(n_features=4, window=3, conv_filters=(4, 4, 4)))
    pools = [any(isinstance(m, torch.nn.MaxPool1d) for m in block)
             for block in net.conv]
    assert pools == [True, False, False]


@pytest.mark.parametrize("position", [0, 5])
def test_first_and_last_flow_of_the_window_both_matter(position):
    torch.manual_seed(0)
    net = TeacherNet(TeacherConfig(n_features=3, window=6, conv_filters=(4,))).eval()
    x = torch.rand(1, 6, 3)
    y = x.clone()
    y[0, position, :] += 1.0
    assert not torch.allclose(net(x), net(y))


def test_config_round_trip_and_validation():
    cfg = TeacherConfig(n_features=7, window=4, conv_filters=(8,), dense=(5, 3))
    again = TeacherConfig.from_json(cfg.to_json())
    assert again == cfg and isinstance(again.conv_filters, tuple)
    for bad in ({"n_features": 0}, {"n_features": 3, "kernel_size": 2},
                {"n_features": 3, "dropout": 1.0}, {"n_features": 3, "window": 0}):
        with pytest.raises(ModelError):
            TeacherConfig(**bad)
    with pytest.raises(ModelError, match="unknown"):
        TeacherConfig.from_dict({"n_features": 3, "colour": "red"})


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    cfg = TeacherConfig(n_features=4, window=3, conv_filters=(8,), lstm_hidden=8)
    net = TeacherNet(cfg)
    # Give BatchNorm real running statistics.
    net.train()
    net(torch.rand(32, 3, 4) * 3)
    net.eval()
    enc = _encoder(4, 3)
    rule = {"threshold": 0.25, "rule": "best-f1", "chosen_on": "val"}
    save_checkpoint(tmp_path / "ck", net, encoder=enc, threshold=rule,
                    history=[{"epoch": 1}], metrics={"val": {"f1": 0.5}},
                    provenance={"dataset": "synthetic"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(
        [*CHECKPOINT_FILES, CHECKSUMS_FILE])

    teacher = load_teacher(tmp_path / "ck", device="cpu")
    assert teacher.config == cfg and teacher.threshold == 0.25
    assert not teacher.model.training
    assert teacher.encoder.to_dict() == enc.to_dict()
    assert teacher.metrics == {"val": {"f1": 0.5}}
    x = np.random.default_rng(2).random((10, 3, 4)).astype(np.float32)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(teacher.predict_proba(x), expected, rtol=1e-5, atol=1e-6)
    decided = (expected >= 0.25).astype(np.int8)
    np.testing.assert_array_equal(teacher.predict(x), decided)

    # The weights file is plain safetensors.
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert set(state) == set(net.state_dict())


def test_checkpoint_errors(tmp_path):
    cfg = TeacherConfig(n_features=4, window=2, conv_filters=(4,), lstm_hidden=4)
    net = TeacherNet(cfg).eval()
    enc = _encoder(4, 2)
    ck = save_checkpoint(tmp_path / "ck", net, encoder=enc,
                         threshold={"threshold": 0.5, "rule": "best-f1",
                                    "chosen_on": "val"})
    teacher = load_teacher(ck, device="cpu")
    with pytest.raises(BadInputError, match=r"\[B, 2, 4\]"):
        teacher.predict_proba(np.zeros((3, 5, 4), dtype=np.float32))

    # Config that does not fit the weights: the checksum catches the edit first;
    # without checksums (an older checkpoint) the shape check still does.
    data = json.loads((ck / "config.json").read_text())
    data["lstm_hidden"] = 9
    (ck / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"config\.json: sha256"):
        load_teacher(ck)
    (ck / CHECKSUMS_FILE).unlink()
    with pytest.raises(ModelError, match="do not fit"):
        load_teacher(ck, allow_unverified=True)
    (ck / "config.json").write_text(cfg.to_json())

    # Damaged weights, a missing file, a bad threshold, no folder.
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError):
        load_teacher(ck, allow_unverified=True)
    with pytest.raises(ModelError, match="not found"):
        load_teacher(tmp_path / "nothing")
    with pytest.raises(ModelError, match="threshold"):
        save_checkpoint(tmp_path / "ck2", net, encoder=enc, threshold={"threshold": 2})


def _saved(tmp_path, name: str = "ck"):
    cfg = TeacherConfig(n_features=4, window=2, conv_filters=(4,), lstm_hidden=4)
    torch.manual_seed(0)  # the same weights in every folder
    net = TeacherNet(cfg).eval()
    rule = {"threshold": 0.5, "rule": "best-f1", "chosen_on": "val"}
    return save_checkpoint(tmp_path / name, net, encoder=_encoder(4, 2),
                           threshold=rule)


def test_checksums_are_recorded_and_verified(tmp_path, caplog):
    import hashlib
    import logging

    ck = _saved(tmp_path)
    sums = json.loads((ck / CHECKSUMS_FILE).read_text())
    assert sums["algorithm"] == "sha256"
    assert set(sums["files"]) == set(CHECKPOINT_FILES)
    for name, digest in sums["files"].items():
        assert digest == hashlib.sha256((ck / name).read_bytes()).hexdigest()
    x = np.random.default_rng(3).random((5, 2, 4)).astype(np.float32)
    before = load_teacher(ck, device="cpu").predict_proba(x)

    # One changed byte in any file is named, with its path.
    text = (ck / "threshold.json").read_text()
    (ck / "threshold.json").write_text(text.replace("0.5", "0.4"))
    with pytest.raises(ModelError, match=rf"{ck / 'threshold.json'}: sha256"):
        load_teacher(ck)
    (ck / "threshold.json").write_text(text)
    weights = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(ModelError, match="model.safetensors: sha256"):
        load_teacher(ck)
    (ck / "model.safetensors").write_bytes(weights)

    # A file dropped from the list is no way around it.
    edited = json.loads(json.dumps(sums))
    del edited["files"]["threshold.json"]
    (ck / CHECKSUMS_FILE).write_text(json.dumps(edited))
    (ck / "threshold.json").write_text(text.replace("0.5", "0.0"))
    with pytest.raises(ModelError, match="does not list threshold.json"):
        load_teacher(ck)
    (ck / CHECKSUMS_FILE).write_text(json.dumps(sums))
    (ck / "threshold.json").write_text(text)
    (ck / "metrics.json").unlink()
    with pytest.raises(ModelError, match=f"missing: {ck / 'metrics.json'}"):
        load_teacher(ck)

    # Without checksums.json (deleted, or a checkpoint from before checksums): the
    # weights are changed and still refused, naming the folder and the opt-in.
    old = _saved(tmp_path, "old")
    (old / CHECKSUMS_FILE).unlink()
    with pytest.raises(BadInputError) as info:
        load_teacher(old, device="cpu")
    assert str(info.value).startswith(f"{old}: ")
    assert "--allow-unverified" in str(info.value)
    assert "GATEWATCH_ALLOW_UNVERIFIED=1" in str(info.value)
    # Opted in (flag or environment): loads, same scores, with a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="teacher"):
        again = load_teacher(old, device="cpu", allow_unverified=True)
    assert any("not verified" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again.predict_proba(x), before)
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {"GATEWATCH_ALLOW_UNVERIFIED": "1"}):
        env = load_teacher(old, device="cpu")
    np.testing.assert_array_equal(env.predict_proba(x), before)
    with mock.patch.dict(os.environ, {"GATEWATCH_ALLOW_UNVERIFIED": "1"}):
        with pytest.raises(BadInputError):
            load_teacher(old, device="cpu", allow_unverified=False)


def test_broken_encoder_json_is_named_by_its_path(tmp_path):
    ck = _saved(tmp_path)
    (ck / CHECKSUMS_FILE).unlink()  # as in a checkpoint from before checksums
    (ck / "encoder.json").write_text("{not json")
    with pytest.raises(ModelError) as info:
        load_teacher(ck, allow_unverified=True)
    assert str(ck / "encoder.json") in str(info.value)
    assert "<json>" not in str(info.value)
    (ck / "encoder.json").write_text(json.dumps({"schema": "gatewatch.encoder/v1"}))
    with pytest.raises(ModelError, match=f"{ck / 'encoder.json'}: malformed"):
        load_teacher(ck, allow_unverified=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["encoder.json", "config.json", "threshold.json"])
def test_a_fifo_or_folder_in_a_checkpoint_is_refused_not_waited_on(tmp_path, name):
    """Unverified (checksums.json gone), a FIFO in place of a checkpoint file used
    to block the load for ever; a folder gave an OS error text. Both are refused
    naming the file."""
    import os

    ck = _saved(tmp_path)
    (ck / CHECKSUMS_FILE).unlink()
    (ck / name).unlink()
    os.mkfifo(ck / name)
    with pytest.raises(ModelError, match=f"{ck / name} is not a regular file"):
        load_teacher(ck, allow_unverified=True)
    (ck / name).unlink()
    (ck / name).mkdir()
    with pytest.raises(ModelError, match=f"{ck / name} is not a regular file"):
        load_teacher(ck, allow_unverified=True)


def test_damaged_weights_config_and_threshold_are_one_line_naming_the_file(tmp_path):
    """Found: a changed layer size gave torch's 28-line list of tensors; garbage
    weights were said not to "fit config.json"; a NaN threshold named no file."""
    ck = _saved(tmp_path)
    (ck / CHECKSUMS_FILE).unlink()  # edits below would fail the checksums first
    config = json.loads((ck / "config.json").read_text())
    config["lstm_hidden"] = 6
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as info:
        load_teacher(ck, allow_unverified=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"weights in {ck / 'model.safetensors'} do not fit")
    assert "size mismatch for" in message and "more)" in message

    ck = _saved(tmp_path, "garbage")
    (ck / CHECKSUMS_FILE).unlink()
    (ck / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_teacher(ck, allow_unverified=True)

    ck = _saved(tmp_path, "nan")
    (ck / CHECKSUMS_FILE).unlink()
    (ck / "threshold.json").write_text('{"threshold": NaN}')
    with pytest.raises(ModelError) as info:
        load_teacher(ck, allow_unverified=True)
    assert str(info.value).startswith(f"{ck / 'threshold.json'}: threshold must be")


def test_bins_expand_quantile_columns_piecewise_linearly():
    cfg = TeacherConfig(n_features=4, window=2, conv_filters=(4,), lstm_hidden=4,
                        bins=5, binned=(1, 3))
    net = TeacherNet(cfg).eval()
    x = torch.rand(3, 2, 4)

    out = net.expand_bins(x).numpy()

    # Independently: bin t of level v is min(max(5v - t, 0), 1); kept columns first.
    v = x.numpy()
    want = [v[..., 0], v[..., 2]]
    for col in (1, 3):
        want += [np.clip(5 * v[..., col] - t, 0, 1) for t in range(5)]
    np.testing.assert_allclose(out, np.stack(want, axis=-1), atol=1e-6)
    assert net.conv[0][0].in_channels == 2 + 2 * 5
    assert TeacherConfig.from_json(cfg.to_json()) == cfg
    for bad in ({"bins": 3}, {"bins": 3, "binned": (4,)}, {"bins": 3, "binned": (0, 0)},
                {"bins": 300, "binned": (0,)}):
        with pytest.raises(ModelError):
            TeacherConfig(n_features=4, **bad)


def test_subspace_member_ignores_the_columns_it_does_not_see(tmp_path):
    cfg = TeacherConfig(n_features=10, window=1, conv_filters=(4,), lstm_hidden=4,
                        subspace=0.3)
    net = TeacherNet(cfg)
    net.draw_feature_mask(0)
    net.eval()
    mask = net.feature_mask.numpy()
    assert mask.sum() == 3 and set(np.unique(mask)) == {0.0, 1.0}

    # Changing only unseen columns leaves the logit alone; a seen one moves it.
    x = torch.rand(5, 1, 10)
    changed = x.clone()
    changed[..., mask == 0] = torch.rand(5, 1, int((mask == 0).sum()))
    assert torch.equal(net(x), net(changed))
    seen = x.clone()
    seen[..., int(np.flatnonzero(mask)[0])] += 1.0
    assert not torch.equal(net(x), net(seen))

    # Another seed sees other columns; the checkpoint keeps the mask.
    other = TeacherNet(cfg)
    other.draw_feature_mask(1)
    assert not torch.equal(other.feature_mask, net.feature_mask)
    save_checkpoint(tmp_path / "ck", net, encoder=_encoder(10, 1),
                    threshold={"threshold": 0.5, "rule": "best-f1"}, history=[],
                    metrics={}, provenance={})
    again = load_teacher(tmp_path / "ck", device="cpu")
    assert torch.equal(again.model.feature_mask, net.feature_mask)
    assert torch.equal(again.model(x), net(x))


@pytest.mark.parametrize("sizes", [
    {"n_features": 124},
    {"n_features": 124, "members": 3},
    {"n_features": 10, "window": 8, "conv_filters": (4, 8), "lstm_layers": 2,
     "dense": (5, 3), "bins": 4, "binned": (1, 2, 3)},
    {"n_features": 7, "window": 3, "lstm_hidden": 5, "subspace": 0.5},
])
def test_weight_count_is_known_before_the_network_is_built(sizes):
    cfg = TeacherConfig(**sizes)
    assert cfg.estimated_params() == TeacherNet(cfg).n_params()


def test_a_config_asking_for_gigabytes_is_refused_before_allocating():
    # Each size is within MAX_SIZE; together they would be ~51 GB of weights.
    huge = {"n_features": 60_000, "conv_filters": [60_000, 60_000], "members": 1}
    with pytest.raises(ModelError, match="weights, more than"):
        TeacherConfig.from_dict(huge)
    with pytest.raises(ModelError, match="weights, more than"):
        TeacherConfig(n_features=124, conv_filters=(4096, 4096), members=8)
