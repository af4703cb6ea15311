"""fit(): learning, determinism, early stopping, thresholds, sampling, SMOTE, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.errors import BadInputError, ModelError, UsageError
from flows.windows import window_index
from teacher.data import Prepared, concat, holdout_types, stratified_split
from teacher.metrics import binary_metrics, choose_threshold
from teacher.model import TeacherConfig
from teacher.train import (
    TrainConfig,
    _epoch_order,
    _smote,
    _with_benign_mixup,
    _with_outliers,
    fit,
    watched_rows,
)

SMALL = {"conv_filters": (8,), "lstm_hidden": 8, "dense": (8,), "dropout": 0.1}


def synthetic(n=600, n_features=4, window=1, seed=0, positive=1.1) -> Prepared:
    """A learnable toy problem: malicious when the first two features sum high."""
    rng = np.random.default_rng(seed)
    X = rng.random((n, n_features)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > positive).astype(np.int8)
    idx = window_index(np.zeros(n), window)
    split = stratified_split(y, seed=seed)
    return Prepared(X=X, idx=idx, y=y, split=split, encoder=None, name="toy",
                    family="unsw-nb15")


def _config(prep, **kw):
    return TeacherConfig(n_features=prep.n_features, window=prep.window,
                         **{**SMALL, **kw})


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fit_learns_and_threshold_is_chosen_on_val():
    prep = synthetic()
    res = fit(prep, _config(prep), TrainConfig(epochs=12, batch_size=32, lr=3e-3))
    assert res.val_metrics["f1"] > 0.9

    # Recompute the validation scores and the threshold independently.
    va = prep.rows("val")
    with torch.no_grad():
        z = res.model.eval()(torch.from_numpy(prep.windows(va))).numpy()
    prob = 1 / (1 + np.exp(-z.astype(np.float64)))
    assert res.threshold == {"threshold": pytest.approx(
        choose_threshold(prep.y[va], prob)), "rule": "best-f1", "chosen_on": "val"}
    again = binary_metrics(prep.y[va], prob, res.threshold["threshold"])
    assert res.val_metrics["f1"] == pytest.approx(again["f1"])


def test_early_stopping_keeps_the_best_epoch():
    prep = synthetic(seed=1)
    res = fit(prep, _config(prep), TrainConfig(epochs=40, patience=2, batch_size=16,
                                                lr=1e-2))
    losses = [h["val_loss"] for h in res.history]
    assert res.best_epoch == int(np.argmin(losses)) + 1
    assert len(losses) == 40 or len(losses) == res.best_epoch + 2
    assert len(losses) < 40  # a big learning rate on a toy set stops early

    # The returned weights are the best epoch's: their val loss is the minimum.
    va = prep.rows("val")
    with torch.no_grad():
        z = res.model.eval()(torch.from_numpy(prep.windows(va))).double()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        z, torch.from_numpy(prep.y[va].astype(np.float64)))
    assert float(loss) == pytest.approx(min(losses), rel=1e-5)


def test_same_seed_same_weights_other_seed_other_weights():
    prep = synthetic(n=300, window=3)
    tc = TrainConfig(epochs=2, batch_size=32, seed=7)
    a = fit(prep, _config(prep), tc).model.state_dict()
    b = fit(prep, _config(prep), tc).model.state_dict()
    c = fit(prep, _config(prep), TrainConfig(epochs=2, batch_size=32, seed=8)
            ).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fpr_rule_respects_the_target_on_val():
    prep = synthetic(seed=2)
    res = fit(prep, _config(prep), TrainConfig(epochs=3, batch_size=32,
                                                threshold_rule="fpr", target_fpr=0.02))
    assert res.threshold["rule"] == "fpr" and res.threshold["target_fpr"] == 0.02
    assert res.val_metrics["fpr"] <= 0.02


def test_balanced_sampling_draws_classes_evenly():
    y = np.r_[np.zeros(900, dtype=np.int64), np.ones(100, dtype=np.int64)]
    order = _epoch_order(y, 20000, True, seed=0, epoch=1)
    assert abs(y[order].mean() - 0.5) < 0.02
    plain = _epoch_order(y, 1000, False, seed=0, epoch=1)
    assert sorted(plain.tolist()) == list(range(1000))
    assert not np.array_equal(order, _epoch_order(y, 20000, True, seed=0, epoch=2))


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
def test_type_power_shares_the_malicious_half_among_types(power):
    # 100 benign rows; attack types of 90 and 10 rows.
    y = np.r_[np.zeros(100, dtype=np.int64), np.ones(100, dtype=np.int64)]
    types = np.array(["normal"] * 100 + ["big"] * 90 + ["small"] * 10)
    order = _epoch_order(y, 100_000, True, 0, 1, types, power)

    expected_small = 10**power / (10**power + 90**power)
    drawn = types[order]
    assert abs((drawn == "normal").mean() - 0.5) < 0.01
    assert abs((drawn == "small").sum() / (y[order] == 1).sum() - expected_small) < 0.01


@pytest.mark.parametrize("power", [0.0, 0.5])
def test_benign_power_shares_the_benign_half_among_groups(power):
    # Benign rows of two services (90 and 10 rows); 100 malicious rows.
    y = np.r_[np.zeros(100, dtype=np.int64), np.ones(100, dtype=np.int64)]
    groups = np.r_[np.zeros(90), np.ones(10), np.full(100, 2)].astype(np.int64)
    order = _epoch_order(y, 100_000, True, 0, 1, None, 1.0, groups, power)

    expected_rare = 10**power / (10**power + 90**power)
    drawn = groups[order]
    assert abs((drawn == 2).mean() - 0.5) < 0.01
    assert abs((drawn == 1).sum() / (y[order] == 0).sum() - expected_rare) < 0.01


def test_benign_group_must_be_a_categorical_field_of_the_encoder():
    prep = synthetic(n=200)
    with pytest.raises(UsageError, match="benign_group 'service'"):
        fit(prep, _config(prep), TrainConfig(epochs=1, benign_power=0.5))
    with pytest.raises(UsageError, match="benign_power"):
        TrainConfig(benign_power=0.5, smote=True)


def test_outliers_relabel_a_share_of_the_batch_with_features_of_other_windows():
    torch.manual_seed(0)
    x = torch.arange(40 * 2 * 50, dtype=torch.float32).reshape(40, 2, 50)
    target = torch.zeros(40)
    out, labels = _with_outliers(x, target, 0.25, 0.5)

    assert labels[:10].tolist() == [1.0] * 10 and labels[10:].sum() == 0
    assert torch.equal(out[10:], x[10:]) and target.sum() == 0  # inputs untouched
    changed = (out[:10] != x[:10]).any(dim=1)  # [10, F]: features swapped in
    assert 0.3 < changed.float().mean() < 0.7
    for i in range(10):
        # A swapped feature is the same donor window's, at every step.
        donor = [j for j in range(40)
                 if torch.equal(out[i][:, changed[i]], x[j][:, changed[i]])]
        assert donor, "every swapped feature comes from one other window"


def test_outlier_donors_take_features_from_the_named_class_only():
    torch.manual_seed(0)
    x = torch.arange(40 * 2 * 50, dtype=torch.float32).reshape(40, 2, 50)
    target = torch.zeros(40)
    target[30:] = 1.0  # windows 30-39 malicious
    out, labels = _with_outliers(x, target, 0.25, 0.5, donors_from="malicious")

    assert labels[:10].tolist() == [1.0] * 10 and torch.equal(labels[10:],
                                                             target[10:])
    assert torch.equal(out[10:], x[10:])
    changed = (out[:10] != x[:10]).any(dim=1)
    assert changed.any(dim=1).all()
    for i in range(10):
        donors = [j for j in range(40)
                  if torch.equal(out[i][:, changed[i]], x[j][:, changed[i]])]
        assert donors and all(j >= 30 for j in donors)

    # The default draws donors as before: the same windows, the same RNG use.
    torch.manual_seed(0)
    a, _ = _with_outliers(x, target, 0.25, 0.5)
    torch.manual_seed(0)
    b, _ = _with_outliers(x, target, 0.25, 0.5, donors_from="any")
    assert torch.equal(a, b)
    out, _ = _with_outliers(x, target, 0.25, 0.5, donors_from="benign")
    changed = (out[:10] != x[:10]).any(dim=1)
    for i in range(10):
        donors = [j for j in range(40)
                  if torch.equal(out[i][:, changed[i]], x[j][:, changed[i]])]
        assert donors and all(j < 30 for j in donors)
    with pytest.raises(UsageError, match="outlier_donors"):
        TrainConfig(outlier_donors="attack")


def test_benign_mixup_blends_two_benign_windows_into_the_tail_of_the_batch():
    torch.manual_seed(0)
    x = torch.rand(40, 2, 6)
    target = torch.zeros(40)
    target[:15] = 1.0  # windows 0-14 malicious
    out, labels = _with_benign_mixup(x, target, 0.25)

    assert torch.equal(out[:30], x[:30]) and torch.equal(labels[:30], target[:30])
    assert labels[30:].sum() == 0 and target[30:].sum() == 0  # inputs untouched
    benign = x[15:].reshape(25, -1)
    for window in out[30:].reshape(10, -1):
        # Some pair (a, b) of benign windows and one weight in [0, 1] give it.
        found = False
        for a in benign:
            for b in benign:
                d = a - b
                w = float((window - b) @ d / (d @ d)) if float(d @ d) > 0 else 0.0
                if -1e-6 <= w <= 1 + 1e-6 and torch.allclose(
                        window, w * a + (1 - w) * b, atol=1e-5):
                    found = True
                    break
            if found:
                break
        assert found, "a blended window is a mix of two benign windows"

    all_bad = torch.ones(40)
    same, labels = _with_benign_mixup(x, all_bad, 0.25)
    assert same is x and labels is all_bad  # no benign window: nothing made up
    with pytest.raises(UsageError, match="benign_mixup"):
        TrainConfig(outliers=0.5, benign_mixup=0.5)


def test_type_power_is_refused_without_balanced_sampling():
    with pytest.raises(UsageError, match="type_power"):
        TrainConfig(type_power=0.5, balance=False)
    with pytest.raises(UsageError, match="type_power"):
        TrainConfig(type_power=1.5)


def test_smote_balances_the_training_part_only():
    prep = synthetic(seed=3, positive=1.5)  # about 12% malicious
    tr = prep.rows("train")
    x, y = _smote(prep.windows(tr), prep.y[tr].astype(np.int64), seed=0)
    assert np.bincount(y).tolist() == [int((prep.y[tr] == 0).sum())] * 2
    assert x.shape[1:] == (1, 4)
    res = fit(prep, _config(prep), TrainConfig(epochs=2, batch_size=32, smote=True))
    assert res.val_metrics["n"] == prep.rows("val").size


def test_errors():
    prep = synthetic(n=100)
    with pytest.raises(ModelError, match="W=1, F=5"):
        fit(prep, TeacherConfig(n_features=5, window=1))
    prep.split[:] = "train"
    with pytest.raises(BadInputError, match="validation"):
        fit(prep, _config(prep), TrainConfig(epochs=1))


def test_holdout_moves_whole_types_to_val():
    rng = np.random.default_rng(0)
    n = 1000
    details = rng.choice(["normal", "neptune", "smurf", "pod", "satan", "nmap"], n,
                         p=[0.5, 0.2, 0.1, 0.05, 0.1, 0.05])
    fam = {"normal": "normal", "neptune": "DoS", "smurf": "DoS", "pod": "DoS",
           "satan": "Probe", "nmap": "Probe"}
    y = (details != "normal").astype(np.int8)
    split = np.where(rng.random(n) < 0.1, "test", np.where(rng.random(n) < 0.1,
                                                           "val", "train"))
    prep = Prepared(X=np.zeros((n, 1), np.float32), idx=window_index(np.zeros(n), 1),
                    y=y, split=split.astype(object), encoder=None, name="t",
                    family="nsl-kdd",
                    families=np.array([fam[d] for d in details], dtype=object),
                    details=details.astype(object))
    before = prep.split.copy()
    held = holdout_types(prep, fraction=0.5, seed=0)
    # Neptune and satan are their families' most common types: never held out.
    assert held and not {"neptune", "satan", "normal"} & set(held)
    moved = np.isin(details, held)
    assert not (prep.split[moved] == "train").any()
    assert (prep.split[moved & (before == "test")] == "test").all()
    assert (prep.split[~moved] == before[~moved]).all()


def test_concat_keeps_windows_inside_each_part():
    a, b = synthetic(n=50, window=3, seed=0), synthetic(n=40, window=3, seed=1)
    both = concat([a, b])
    np.testing.assert_array_equal(both.windows(np.arange(50, 90)),
                                  b.windows(np.arange(40)))
    np.testing.assert_array_equal(both.windows(np.arange(50)), a.windows(np.arange(50)))


def test_regularisers_are_validated_and_change_training():
    from flows.errors import UsageError

    for bad in ({"label_smoothing": 1.0}, {"input_noise": -0.1}, {"ema": 1.0}):
        with pytest.raises(UsageError):
            TrainConfig(**bad)
    prep = synthetic(n=300)
    base = TrainConfig(epochs=2, batch_size=32, label_smoothing=0.0)
    plain = fit(prep, _config(prep), base).model.state_dict()
    for change in ({"label_smoothing": 0.2}, {"input_noise": 0.1}, {"ema": 0.9}):
        other = fit(prep, _config(prep), TrainConfig(
            **{**base.__dict__, **change})).model.state_dict()
        assert not all(torch.equal(plain[k], other[k]) for k in plain), change


def test_stop_rows_seen_watches_benign_and_trained_types_only():
    prep = synthetic(n=400)
    details = np.where(prep.y == 1, "known", "normal").astype(object)
    va = prep.rows("val")
    novel = va[prep.y[va] == 1][::2]  # half the malicious val rows: a type not trained
    details[novel] = "novel"
    prep.details = details
    tr = prep.rows("train")
    mask = watched_rows(prep, tr, va, "seen")
    assert mask.sum() == len(va) - len(novel)
    assert not mask[np.isin(va, novel)].any()
    assert mask[prep.y[va] == 0].all()
    assert watched_rows(prep, tr, va, "all").all()

    # Training records the watched loss apart and stops on it.
    res = fit(prep, _config(prep), TrainConfig(epochs=3, batch_size=32,
                                                stop_rows="seen"))
    z = res.model.eval()(torch.from_numpy(prep.windows(va))).detach().double()
    y = torch.from_numpy(prep.y[va].astype(np.float64))
    watch = torch.nn.functional.binary_cross_entropy_with_logits(
        z[torch.from_numpy(mask)], y[torch.from_numpy(mask)])
    best = res.history[res.best_epoch - 1]
    assert best["watch_loss"] == pytest.approx(float(watch), rel=1e-5)
    assert best["watch_loss"] == min(h["watch_loss"] for h in res.history)


def test_cosine_schedule_and_keep_last():
    for bad in ({"stop_rows": "some"}, {"schedule": "step"}, {"keep": "first"}):
        with pytest.raises(Exception, match="must be"):
            TrainConfig(**bad)
    prep = synthetic(seed=1)

    # keep=last runs every epoch even when validation stops improving, and the
    # weights returned are the last epoch's (their val loss is the last record's).
    res = fit(prep, _config(prep), TrainConfig(epochs=8, patience=1, batch_size=16,
                                                lr=1e-2, keep="last"))
    assert res.epochs_run == 8 and res.best_epoch == 8
    va = prep.rows("val")
    with torch.no_grad():
        z = res.model.eval()(torch.from_numpy(prep.windows(va))).double()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        z, torch.from_numpy(prep.y[va].astype(np.float64)))
    assert float(loss) == pytest.approx(res.history[-1]["val_loss"], rel=1e-5)

    # The cosine schedule decays the rate to zero by the last epoch; constant keeps it.
    assert [h["lr"] for h in res.history] == [1e-2] * 8
    base = TrainConfig(epochs=4, batch_size=32, keep="last")
    plain = fit(prep, _config(prep), base)
    cos = fit(prep, _config(prep), TrainConfig(**{**base.__dict__,
                                                  "schedule": "cosine"}))
    rates = [h["lr"] for h in cos.history]
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0)
    assert rates[1] == pytest.approx(base.lr * (1 + np.cos(np.pi / 2)) / 2)
    weights = plain.model.state_dict()
    assert not all(torch.equal(weights[k], cos.model.state_dict()[k]) for k in weights)


def test_field_outliers_swap_whole_fields_and_keep_one_hot_blocks_one_hot():
    torch.manual_seed(0)
    # Columns 0-1: numeric field 0 (value, null); 2-5: a one-hot field 1; 6: field 2.
    fields = torch.tensor([0, 0, 1, 1, 1, 1, 2])
    n = 200
    x = torch.zeros(n, 1, 7)
    x[:, 0, 0] = torch.arange(n, dtype=torch.float32)
    x[:, 0, 1] = torch.arange(n, dtype=torch.float32) + 1000
    x[torch.arange(n), 0, 2 + torch.arange(n) % 4] = 1.0
    x[:, 0, 6] = -torch.arange(n, dtype=torch.float32)
    out, labels = _with_outliers(x, torch.zeros(n), 0.5, 0.5, fields)

    assert labels[:100].sum() == 100 and labels[100:].sum() == 0
    made = out[:100, 0]
    # Every window's one-hot block still holds exactly one 1.
    assert torch.equal(made[:, 2:6].sum(dim=1), torch.ones(100))
    # A field's columns move together: value and null come from the same window.
    assert torch.equal(made[:, 1] - made[:, 0], torch.full((100,), 1000.0))
    # About half of the fields were taken (from a donor that may be the window
    # itself, so count the windows whose numeric field changed).
    moved = (made[:, 0] != x[:100, 0, 0]).float().mean()
    assert 0.35 < moved < 0.65


def test_field_outliers_need_an_encoder_that_names_fields():
    prep = synthetic(seed=1)
    with pytest.raises(UsageError, match="outlier_unit"):
        fit(prep, _config(prep), TrainConfig(epochs=1, outliers=0.1,
                                             outlier_unit="field"))
    with pytest.raises(UsageError, match="outlier_unit"):
        TrainConfig(outlier_unit="row")


@pytest.mark.data
def test_held_out_types_do_not_shape_the_encoder(data_dir):
    """KDDTrain+'s held-out attack types (seed 0) are moved to validation before
    the encoder is fitted: their value ranges and quantiles are not in it."""
    from flows.encoder import Encoder
    from flows.readers import read
    from teacher.data import prepare

    prep = prepare("nsl-kdd", data_dir=data_dir, seed=0, need_split=True,
                   holdout={"nsl-kdd": 0.5})
    assert prep.held == ["pod", "teardrop", "ipsweep", "nmap", "guess_passwd"]

    # Independently: the encoder fitted on the training rows without those types.
    table = read(data_dir / "nsl-kdd" / "KDDTrain+.txt.gz").table
    columns = {k: np.asarray(v) for k, v in table.to_pydict().items()}
    details = columns["label_detail"].astype(str)
    train = prep.split[: len(details)] == "train"
    assert not np.isin(details[train], prep.held).any()
    expected = Encoder.fit({k: v[train] for k, v in columns.items()}, "nsl-kdd")
    assert prep.encoder.to_dict() == expected.to_dict()

    # Another fold on the same split: the types drawn with holdout_seed.
    fold1 = prepare("nsl-kdd", data_dir=data_dir, seed=0, need_split=True,
                    holdout=0.5, holdout_seed=1)
    assert fold1.held == ["back", "teardrop", "ipsweep", "portsweep", "warezmaster"]
    same = np.isin(fold1.split, ("train", "val"))
    assert (same == np.isin(prep.split, ("train", "val"))).all()

    # wrong_fragment is non-zero only in pod and teardrop rows: constant here.
    field = next(f for f in prep.encoder.numeric if f.name == "wrong_fragment")
    assert field.hi == field.lo == 0.0
    assert columns["wrong_fragment"][np.isin(details, ["pod", "teardrop"])].max() > 0


def test_a_file_under_the_data_folder_is_named_so_it_is_found_after_a_move(
    tmp_path, monkeypatch
):
    """Found by an ML tester: a teacher trained with --data FILE recorded the
    file's absolute path, so compress run could not find it once the data folder
    moved (artifacts already wrote $GATEWATCH_DATA/...)."""
    import shutil

    from teacher.checkpoint import sha256_file
    from teacher.data import data_ref, prepare
    from tests.test_compress import synthetic_flows

    before = tmp_path / "a"
    (before / "sub").mkdir(parents=True)
    flows_file = synthetic_flows(before / "sub" / "flows.parquet", n=400)
    monkeypatch.setenv("GATEWATCH_DATA", str(before))
    ref = data_ref(flows_file)
    assert ref == "$GATEWATCH_DATA/sub/flows.parquet"
    assert data_ref(tmp_path / "elsewhere.parquet") == str(
        (tmp_path / "elsewhere.parquet").resolve())
    first = prepare(str(flows_file), window=4, group_by="src_ip", need_split=True)
    assert first.files == {ref: sha256_file(flows_file)}

    shutil.move(before, tmp_path / "b")
    monkeypatch.setenv("GATEWATCH_DATA", str(tmp_path / "b"))
    again = prepare(ref, encoder=first.encoder, need_split=True)
    assert again.files == first.files and len(again.y) == len(first.y)


def test_forest_scores_judge_each_row_by_trees_that_did_not_see_it():
    from teacher.train import forest_scores

    # Malicious when x0 > 0.5; the labels of 8 rows deep on the benign side are
    # flipped. A forest scoring rows it learned repeats their labels (near 1); the
    # out-of-bag score follows their benign neighbours instead.
    rng = np.random.default_rng(3)
    x = rng.random((600, 1, 3)).astype(np.float32)
    y = (x[:, 0, 0] > 0.5).astype(np.int64)
    flipped = np.flatnonzero(x[:, 0, 0] < 0.25)[:8]
    y[flipped] = 1

    scores = forest_scores(x, y, seed=0)

    assert scores.shape == (600,) and scores.dtype == np.float32
    assert scores[flipped].max() < 0.5
    clean = np.setdiff1d(np.arange(600), flipped)
    assert ((scores[clean] >= 0.5) == y[clean].astype(bool)).mean() > 0.9


def _recording_loss(seen: list) -> type:
    """A BCEWithLogitsLoss class whose every call adds its targets to ``seen``."""

    class Recording(torch.nn.BCEWithLogitsLoss):
        def forward(self, logits, target):
            seen.append(target.detach().clone())
            return super().forward(logits, target)

    return Recording


def test_forest_targets_blend_the_forest_score_into_each_training_target(monkeypatch):
    import teacher.train as train_mod

    # The forest replaced by a known score (0.8 for every row) and the loss by one
    # that records its targets: each target must be 0.75 * label + 0.25 * 0.8.
    seen: list[torch.Tensor] = []

    fitted = []

    def fake_forest(x, y, seed):
        fitted.append((len(x), seed))
        return np.full(len(y), 0.8, dtype=np.float32)

    monkeypatch.setattr(train_mod, "forest_scores", fake_forest)
    monkeypatch.setattr(train_mod.nn, "BCEWithLogitsLoss", _recording_loss(seen))
    prep = synthetic(n=300)
    tc = TrainConfig(epochs=1, batch_size=32, label_smoothing=0.0, input_noise=0.0,
                     forest_targets=0.25, seed=7)
    res = fit(prep, _config(prep), tc)

    assert fitted == [(len(prep.rows("train")), 7)]
    values = torch.cat(seen).unique().tolist()
    assert values == pytest.approx([0.2, 0.95])
    assert res.train_config["forest_targets"] == 0.25


def test_forest_targets_leave_made_up_anomalies_at_one(monkeypatch):
    import teacher.train as train_mod

    seen: list[torch.Tensor] = []

    monkeypatch.setattr(train_mod, "forest_scores",
                        lambda x, y, seed: np.zeros(len(y), dtype=np.float32))
    monkeypatch.setattr(train_mod.nn, "BCEWithLogitsLoss", _recording_loss(seen))
    prep = synthetic(n=300)
    tc = TrainConfig(epochs=1, batch_size=40, label_smoothing=0.0, outliers=0.25,
                     forest_targets=0.4)
    fit(prep, _config(prep), tc)

    for target in seen:
        assert target[:10].tolist() == [1.0] * 10  # the made-up anomalies
        assert {round(v, 6) for v in target[10:].tolist()} <= {0.0, 0.6}


def test_forest_targets_below_one_half_only():
    with pytest.raises(UsageError, match="forest_targets"):
        TrainConfig(forest_targets=0.5)
    with pytest.raises(UsageError, match="forest_targets"):
        TrainConfig(forest_targets=-0.1)
