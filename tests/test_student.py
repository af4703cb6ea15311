"""student: the zoo's shared contract, the distillation loss, training and the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flows.errors import ModelError, UsageError  # noqa: E402
from student.distill import (  # noqa: E402
    ArrayWindows,
    DistillConfig,
    TeacherCache,
    distill,
    kd_loss,
    student_logits,
)
from student.zoo import ALL_TARGETS, KINDS, StudentConfig, build_student  # noqa: E402

W, F = 5, 4


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_student_keeps_the_contract(kind: str) -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(7, W, F)).astype("f4"))
    a = build_student(kind, F, W, width=6, seed=3).eval()
    b = build_student(kind, F, W, width=6, seed=3).eval()
    wide = build_student(kind, F, W, width=12, seed=3)

    out = a(x)

    assert out.shape == (7,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, b(x))  # same seed, same network
    prob = a.predict_proba(x)
    assert ((prob >= 0) & (prob <= 1)).all()
    assert set(a.TARGETS) <= set(ALL_TARGETS) and a.TARGETS
    assert 0 < a.n_params() < wide.n_params()
    assert StudentConfig.from_dict(a.config.to_dict()) == a.config


def test_unknown_kind_is_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown student kind 'rnn'"):
        build_student("rnn", F, W)


def _bce(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(-(q * np.log(p) + (1 - q) * np.log(1 - p))))


def test_kd_loss_matches_its_definition() -> None:
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=16), rng.normal(size=16) * 3
    y = rng.integers(0, 2, size=16).astype(float)
    T, alpha = 3.0, 0.3
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731

    want = alpha * T**2 * _bce(sig(s / T), sig(t / T)) + (1 - alpha) * _bce(sig(s), y)
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T, alpha)

    assert float(got) == pytest.approx(want, rel=1e-6)


def test_soft_term_is_minimal_at_the_teacher() -> None:
    t = torch.tensor([-2.0, 0.5, 3.0])
    s = t.clone().requires_grad_(True)
    kd_loss(s, t, torch.zeros(3), alpha=1.0).backward()
    assert s.grad.abs().max() < 1e-6

    s2 = (t + 1.0).requires_grad_(True)
    kd_loss(s2, t, torch.zeros(3), alpha=1.0).backward()
    assert (s2.grad > 0).all()  # pulled back down towards the teacher


def _toy(n: int = 900, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, W, F)).astype(np.float32)
    logit = 3 * x[:, -1, 0] + 2 * x[:, :, 1].mean(axis=1)
    return x, logit.astype(np.float32), (logit > 0).astype(np.int64)


def test_distillation_learns_the_teacher_and_keeps_best_epoch() -> None:
    torch.set_num_threads(1)
    x, logit, y = _toy()
    source = ArrayWindows(x)
    train, val = np.arange(700), np.arange(700, 900)
    model = build_student("mlp", F, W, width=16, seed=0)
    before = student_logits(model, source, val)

    history = distill(model, source, train, y, logit[train], val,
                      DistillConfig(epochs=8, batch_size=64, lr=1e-2, patience=8))

    after = student_logits(model, source, val)
    acc_before = np.mean((before > 0) == y[val])
    acc_after = np.mean((after > 0) == y[val])
    assert acc_after > 0.9 > acc_before
    # The weights kept are those of the epoch with the lowest validation loss.
    v = torch.from_numpy(after)
    final = float(torch.nn.functional.binary_cross_entropy_with_logits(
        v, torch.from_numpy(y[val]).float()))
    assert final == pytest.approx(min(h["val_loss"] for h in history), rel=1e-5)


def test_noisy_distillation_asks_the_teacher_about_the_noisy_windows() -> None:
    torch.set_num_threads(1)
    x, logit, y = _toy()
    source = ArrayWindows(x)
    train, val = np.arange(700), np.arange(700, 900)
    seen: list[np.ndarray] = []

    def teacher(windows: np.ndarray) -> np.ndarray:
        seen.append(windows.copy())
        return 3 * windows[:, -1, 0] + 2 * windows[:, :, 1].mean(axis=1)

    model = build_student("mlp", F, W, width=16, seed=0)
    cfg = DistillConfig(epochs=2, batch_size=100, lr=1e-2, patience=2,
                        input_noise=0.1, alpha=1.0)
    distill(model, source, train, y, logit[train], val, cfg, teacher_fn=teacher)

    # Every training window was shown to the teacher once per epoch, with noise of
    # the asked size on it (each batch is a shuffled part of the training rows).
    assert sum(len(w) for w in seen) == 2 * len(train)
    shown = np.concatenate(seen[:7])  # epoch 1
    clean = np.sort(x[train].reshape(len(train), -1), axis=0)
    assert not np.allclose(np.sort(shown.reshape(len(train), -1), axis=0), clean)
    diffs = []
    for batch in seen[:7]:
        nearest = np.abs(batch[:, None] - x[train][None]).sum(axis=(2, 3)).argmin(1)
        diffs.append(batch - x[train][nearest])
    assert np.std(np.concatenate(diffs)) == pytest.approx(0.1, rel=0.05)
    assert student_logits(model, source, val).shape == (len(val),)


@pytest.mark.parametrize("select", ["teacher", "f1"])
def test_the_epoch_kept_is_the_best_by_the_measure_asked(select) -> None:
    """select='teacher': the lowest soft loss against the teacher on validation;
    select='f1': the best validation F1. The kept model scores that best value."""
    from torch.nn import functional as nnf

    from student.distill import best_f1

    torch.set_num_threads(1)
    x, logit, y = _toy()
    source = ArrayWindows(x)
    train, val = np.arange(700), np.arange(700, 900)
    model = build_student("mlp", F, W, width=8, seed=0)
    cfg = DistillConfig(epochs=6, batch_size=64, lr=1e-2, patience=6, select=select)
    history = distill(model, source, train, y, logit[train], val, cfg,
                      val_teacher_logits=logit[val])

    z = torch.from_numpy(student_logits(model, source, val))
    if select == "teacher":
        t = torch.sigmoid(torch.from_numpy(logit[val]) / cfg.temperature)
        kept = float(nnf.binary_cross_entropy_with_logits(z / cfg.temperature, t)
                     * cfg.temperature**2)
    else:
        kept = 1.0 - best_f1(y[val], z.numpy())
    assert kept == pytest.approx(min(h["val_loss"] for h in history), abs=1e-6)
    assert len({round(h["val_loss"], 6) for h in history}) > 1  # it had a choice


def test_choosing_by_the_teacher_needs_its_validation_logits() -> None:
    x, logit, y = _toy(100)
    model = build_student("mlp", F, W, width=4, seed=0)
    with pytest.raises(ModelError, match="validation logits"):
        distill(model, ArrayWindows(x), np.arange(80), y, logit[:80],
                np.arange(80, 100), DistillConfig(epochs=1, select="teacher"))
    with pytest.raises(ValueError, match="select"):
        DistillConfig(select="best")
    with pytest.raises(ValueError, match="loss"):
        DistillConfig(loss="l1")


def _shown_to_the_teacher(n: int, w: int, f: int, n_train: int,
                          cfg: DistillConfig) -> np.ndarray:
    """Every training window the teacher re-scored in one distillation, where
    every value of row r is r (a shown window tells which rows its columns hold)."""
    torch.set_num_threads(1)
    x = np.repeat(np.arange(n, dtype=np.float32), w * f).reshape(n, w, f)
    y = (np.arange(n) % 2).astype(np.int64)
    seen: list[np.ndarray] = []

    def teacher(windows: np.ndarray) -> np.ndarray:
        seen.append(windows.copy())
        return np.zeros(len(windows), dtype=np.float32)

    model = build_student("mlp", f, w, width=4, seed=0)
    distill(model, ArrayWindows(x), np.arange(n_train), y,
            np.zeros(n_train, np.float32), np.arange(n_train, n), cfg,
            teacher_fn=teacher)
    return np.concatenate(seen)


def test_swapped_columns_come_from_another_window_of_the_batch() -> None:
    f = 40
    cfg = DistillConfig(epochs=1, batch_size=50, patience=1, swap=0.3, alpha=1.0)
    shown = _shown_to_the_teacher(400, 2, f, 300, cfg)
    assert len(shown) == 300
    # The same columns at every flow of a window; each window mixes at most two
    # rows, both of the training rows, and about 30 % of its columns are swapped.
    assert np.array_equal(shown[:, 0], shown[:, 1])
    swapped = []
    for window in shown[:, 0]:
        rows, counts = np.unique(window, return_counts=True)
        assert len(rows) <= 2 and rows.max() < 300
        swapped.append(0 if len(rows) == 1 else counts.min() / f)
    assert np.mean(swapped) == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize("share", [1.0, 0.5, 0.2])
def test_swap_rows_alters_that_share_of_each_batch_and_leaves_the_rest(share) -> None:
    cfg = DistillConfig(epochs=1, batch_size=200, patience=1, swap=0.3,
                        swap_rows=share, alpha=1.0)
    # A window with one value left is a row as it was.
    shown = _shown_to_the_teacher(2000, 1, 40, 1800, cfg)[:, 0]
    assert len(shown) == 1800
    altered = np.array([len(np.unique(window)) > 1 for window in shown])
    # A window drawn for swapping stays whole only when its donor is itself
    # (1 in 200) or no column was drawn (0.7 ** 40): below 1 % either way.
    assert altered.mean() == pytest.approx(share, abs=0.04)


def test_mixup_blends_pairs_of_training_windows_as_beta_says() -> None:
    torch.set_num_threads(1)
    n, w = 400, 2
    # Row r is one-hot at column r: a shown window tells which rows it blends, and how.
    x = np.repeat(np.eye(n, dtype=np.float32)[:, None, :], w, axis=1)
    y = (np.arange(n) % 2).astype(np.int64)
    seen: list[np.ndarray] = []

    def teacher(windows: np.ndarray) -> np.ndarray:
        seen.append(windows.copy())
        return np.zeros(len(windows), dtype=np.float32)

    model = build_student("mlp", n, w, width=4, seed=0)
    cfg = DistillConfig(epochs=2, batch_size=50, patience=5, mixup=0.4, alpha=1.0)
    distill(model, ArrayWindows(x), np.arange(300), y, np.zeros(300, np.float32),
            np.arange(300, 400), cfg, teacher_fn=teacher)

    shown = np.concatenate(seen)
    assert len(shown) == 600 and np.array_equal(shown[:, 0], shown[:, 1])
    smaller = []
    for window in shown[:, 0]:
        rows = np.flatnonzero(window)
        assert 1 <= len(rows) <= 2 and rows.max() < 300
        assert window.sum() == pytest.approx(1.0, abs=1e-5)
        smaller.append(window[rows].min() if len(rows) == 2 else 0.0)
    # Independently: the mean of min(lam, 1 - lam) for lam ~ Beta(0.4, 0.4).
    lam = np.random.default_rng(7).beta(0.4, 0.4, 200_000)
    expected = np.minimum(lam, 1 - lam).mean()
    assert np.mean(smaller) == pytest.approx(expected, abs=0.03)


def test_teacher_cache_scores_once_and_reuses_disk(tmp_path: Path) -> None:
    x, logit, _ = _toy(50)
    calls = []

    def teacher(windows: np.ndarray) -> np.ndarray:
        calls.append(len(windows))
        return windows[:, -1, 0] * 2

    rows = np.arange(10, 40)
    cache = TeacherCache(teacher, ArrayWindows(x), key="t1", folder=tmp_path,
                         batch_size=8)
    first = cache.logits(rows)
    again = cache.logits(rows)
    fresh = TeacherCache(teacher, ArrayWindows(x), key="t1", folder=tmp_path)
    from_disk = fresh.logits(rows)
    other = TeacherCache(teacher, ArrayWindows(x), key="t2", folder=tmp_path)
    other.logits(rows)

    np.testing.assert_allclose(first, x[rows, -1, 0] * 2)
    assert again is first and np.array_equal(from_disk, first)
    assert sum(calls) == 2 * len(rows)  # once for t1, once for the other teacher


def test_target_shift_moves_the_teachers_decision_to_the_students_zero() -> None:
    torch.set_num_threads(1)
    x, logit, y = _toy()
    source = ArrayWindows(x)
    train, val = np.arange(700), np.arange(700, 900)
    cfg = DistillConfig(epochs=8, batch_size=64, lr=1e-2, patience=8, alpha=1.0,
                        target_shift=2.0)

    shifted = build_student("mlp", F, W, width=16, seed=0)
    distill(shifted, source, train, y, logit[train], val, cfg)

    # The same as distilling on logits already lowered by 2, weight for weight.
    lowered = build_student("mlp", F, W, width=16, seed=0)
    distill(lowered, source, train, y, logit[train] - 2.0, val,
            DistillConfig(**{**cfg.__dict__, "target_shift": 0.0}))
    pairs = zip(shifted.state_dict().values(), lowered.state_dict().values(),
                strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    # The student's 0 is the teacher's logit 2, not its 0: windows the teacher
    # puts between 0 and 2 are mostly below the shifted student's 0.
    z = student_logits(shifted, source, val)
    between = (logit[val] > 0.0) & (logit[val] < 2.0)
    assert between.sum() >= 10
    assert np.mean((z > 0) == (logit[val] > 2.0)) > 0.9
    assert np.mean(z[between] > 0) < 0.4
    plain = build_student("mlp", F, W, width=16, seed=0)
    distill(plain, source, train, y, logit[train], val,
            DistillConfig(**{**cfg.__dict__, "target_shift": 0.0}))
    assert np.mean(student_logits(plain, source, val)[between] > 0) > 0.75


def test_target_shift_applies_to_re_scored_windows_too() -> None:
    torch.set_num_threads(1)
    x, logit, y = _toy()
    source = ArrayWindows(x)
    train, val = np.arange(700), np.arange(700, 900)

    def teacher(windows: np.ndarray) -> np.ndarray:
        return 3 * windows[:, -1, 0] + 2 * windows[:, :, 1].mean(axis=1)

    def lowered_teacher(windows: np.ndarray) -> np.ndarray:
        return teacher(windows) - 1.5

    base = dict(epochs=2, batch_size=100, lr=1e-2, patience=2, swap=0.3, alpha=1.0)
    one = build_student("mlp", F, W, width=16, seed=0)
    distill(one, source, train, y, logit[train], val,
            DistillConfig(**base, target_shift=1.5), teacher_fn=teacher)
    two = build_student("mlp", F, W, width=16, seed=0)
    distill(two, source, train, y, logit[train] - 1.5, val, DistillConfig(**base),
            teacher_fn=lowered_teacher)
    pairs = zip(one.state_dict().values(), two.state_dict().values(), strict=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in pairs)
