"""Tests of the feature encoder: fitted rules, values, round trips and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from flows.encoder import (
    FAMILIES,
    NSL_KDD_CATEGORICAL,
    NSL_KDD_NUMERIC,
    Encoder,
    category_key,
    history_flag_names,
)
from flows.errors import BadInputError, ModelError, UsageError
from tests.conftest import data_file


def conn_columns(n: int, seed: int) -> dict[str, np.ndarray]:
    """Random canonical conn columns with nulls, heavy tails and a few categories."""
    rng = np.random.default_rng(seed)

    def maybe_null(x: np.ndarray, p: float) -> np.ndarray:
        return np.where(rng.random(n) < p, np.nan, x)

    def text(choices: list, p_null: float = 0.0) -> np.ndarray:
        picked = rng.choice(np.array(choices, dtype=object), n)
        picked[rng.random(n) < p_null] = None
        return picked

    return {
        "ts": np.cumsum(rng.exponential(0.1, n)),
        "src_ip": text(["10.0.0.1", "10.0.0.2", "10.0.0.3", "fe80::1"]),
        "duration": maybe_null(rng.exponential(2.0, n), 0.3),
        "orig_bytes": maybe_null(np.floor(rng.pareto(1.0, n) * 100), 0.3),
        "resp_bytes": maybe_null(np.floor(rng.pareto(1.2, n) * 50), 0.3),
        "orig_pkts": rng.integers(1, 30, n).astype(np.float64),
        "resp_pkts": rng.integers(0, 30, n).astype(np.float64),
        "orig_ip_bytes": np.floor(rng.pareto(1.0, n) * 200),
        "resp_ip_bytes": np.floor(rng.pareto(1.0, n) * 200),
        "missed_bytes": np.zeros(n),
        "proto": text(["tcp", "udp", "icmp"]),
        "service": text(["dns", "http", "ssl"], p_null=0.4),
        "conn_state": text(["S0", "SF", "REJ", "OTH", "RSTO"]),
        "dst_port": rng.choice([80, 443, 53, 22, 8080, 1337, 23], n).astype(np.float64),
        "history": text(["ShADadFf", "S", "Sr", "^dA", "D", "ShAdDaTtFfWw"], 0.1),
        "label": rng.integers(0, 2, n).astype(np.float64),
    }


def rows_of(columns: dict[str, np.ndarray]) -> list[dict]:
    """The columns as canonical record dicts (Python scalars, None for nulls)."""
    out = []
    n = len(next(iter(columns.values())))
    for i in range(n):
        record = {}
        for name, col in columns.items():
            value = col[i]
            if isinstance(value, float) and math.isnan(value):
                value = None
            elif isinstance(value, np.floating):
                value = None if np.isnan(value) else float(value)
            record[name] = value
        out.append(record)
    return out


def field_of(feature_name: str) -> str:
    """The input field a feature column comes from ("proto=tcp" -> "proto")."""
    return feature_name.split("=")[0].split(":")[0]


def test_numeric_rules_and_values_computed_by_hand():
    # duration: small range, no tail -> plain min-max; bytes: one huge value -> log1p.
    duration = [0.0, 1.0, 2.0, 4.0, None] + [2.0] * 15
    orig_bytes = [0.0] + [10.0] * 18 + [100000.0]
    cols = {
        "duration": duration, "orig_bytes": orig_bytes,
        "resp_bytes": [5.0] * 20, "orig_pkts": list(range(20)),
        "resp_pkts": [1.0] * 20, "orig_ip_bytes": [1.0] * 20,
        "resp_ip_bytes": [1.0] * 20, "missed_bytes": [0.0] * 20,
        "proto": ["tcp"] * 20, "service": ["dns"] * 20, "conn_state": ["SF"] * 20,
        "dst_port": [53] * 20, "history": ["D"] * 20,
    }
    enc = Encoder.fit(cols, "conn")
    fields = {f.name: f for f in enc.numeric}
    assert not fields["duration"].log
    assert fields["orig_bytes"].log
    assert not fields["orig_pkts"].log  # 0..19: max 19 < 10 * (q90 + 1)

    X = enc.transform(cols)
    names = enc.feature_names
    col = names.index("duration")
    np.testing.assert_allclose(X[:5, col], [0.0, 0.25, 0.5, 1.0, 0.0])
    np.testing.assert_array_equal(X[:5, names.index("duration:null")], [0, 0, 0, 0, 1])
    col = names.index("orig_bytes")
    expected = np.log1p(np.array(orig_bytes)) / np.log1p(100000.0)
    np.testing.assert_allclose(X[:, col], expected.astype(np.float32), rtol=1e-6)
    # A field constant in training: 0 at the constant, 1 above it.
    test = dict(cols, resp_bytes=[5.0, 7.0] + [5.0] * 18)
    col = names.index("resp_bytes")
    np.testing.assert_array_equal(enc.transform(test)[:2, col], [0.0, 1.0])


def test_clipping_beyond_training_range():
    cols = conn_columns(500, seed=1)
    enc = Encoder.fit(cols, "conn")
    test = {k: v[:4].copy() for k, v in cols.items()}
    test["duration"] = np.array([-5.0, 1e12, np.inf, -np.inf])
    test["orig_bytes"] = np.array([-3.0, 1e15, np.inf, 0.0])
    X = enc.transform(test)
    names = enc.feature_names
    np.testing.assert_array_equal(X[:, names.index("duration")], [0, 1, 1, 0])
    np.testing.assert_array_equal(X[:, names.index("orig_bytes")], [0, 1, 1, 0])
    assert X.dtype == np.float32
    full = enc.transform(conn_columns(2000, seed=2))
    assert full.min() >= 0.0 and full.max() <= 1.0


def test_categories_other_null_and_top_k():
    cols = conn_columns(400, seed=3)
    enc = Encoder.fit(cols, "conn", max_categories={"conn_state": 2})
    names = enc.feature_names

    # Only the two most frequent conn_state values of training get a column.
    values, counts = np.unique(cols["conn_state"].astype(str), return_counts=True)
    top2 = [v for _, v in sorted(zip(-counts, values, strict=True))][:2]
    assert [n for n in names if n.startswith("conn_state")] == [
        f"conn_state={v}" for v in top2
    ] + ["conn_state:other"]

    test = {k: v[:3].copy() for k, v in cols.items()}
    test["service"] = np.array(["dns", "never-seen", None], dtype=object)
    test["conn_state"] = np.array([top2[0], "S1-unseen", top2[1]], dtype=object)
    X = enc.transform(test)
    service = [i for i, n in enumerate(names) if n.startswith("service")]
    assert [names[i] for i in service if X[0, i]] == ["service=dns"]
    assert [names[i] for i in service if X[1, i]] == ["service:other"]
    assert [names[i] for i in service if X[2, i]] == ["service:null"]
    assert X[1, names.index("conn_state:other")] == 1.0
    # Each categorical block holds exactly one 1 per row.
    for prefix in ("proto", "service", "conn_state", "dst_port"):
        block = [i for i, n in enumerate(names) if field_of(n) == prefix]
        np.testing.assert_array_equal(X[:, block].sum(axis=1), 1.0)


def test_port_as_int_float_or_text_is_one_category():
    assert category_key(80) == category_key(80.0) == category_key("80") == "80"
    assert category_key(float("nan")) is None and category_key(None) is None
    cols = conn_columns(200, seed=4)
    enc = Encoder.fit(cols, "conn")
    base = rows_of({k: v[:1] for k, v in cols.items()})[0]
    rows = [dict(base, dst_port=p) for p in (443, 443.0, "443", 9999)]
    X = enc.transform_records(rows)
    np.testing.assert_array_equal(X[0], X[1])
    np.testing.assert_array_equal(X[0], X[2])
    assert X[3, enc.feature_names.index("dst_port:other")] == 1.0


def test_history_letters_by_direction():
    cols = conn_columns(100, seed=5)
    enc = Encoder.fit(cols, "conn")
    base = rows_of({k: v[:1] for k, v in cols.items()})[0]
    names = history_flag_names()
    start = enc.feature_names.index(names[0])
    x = enc.transform_record(dict(base, history="ShADad^"))[start : start + len(names)]
    on = {n for n, v in zip(names, x, strict=True) if v}
    assert on == {"history:S", "history:h", "history:A", "history:D", "history:a",
                  "history:d", "history:^"}
    x = enc.transform_record(dict(base, history=None))[start : start + len(names)]
    assert {n for n, v in zip(names, x, strict=True) if v} == {"history:null"}


def test_never_addresses_labels_or_difficulty():
    enc = Encoder.fit(conn_columns(100, seed=6), "conn")
    for banned in ("src_ip", "dst_ip", "src_port", "ts", "uid", "label"):
        assert not any(field_of(n) == banned for n in enc.feature_names)


def nsl_kdd_columns(n: int, seed: int) -> dict[str, np.ndarray]:
    """Synthetic columns with the NSL-KDD names, labels and difficulty."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {
        name: rng.integers(0, 50, n).astype(np.float64) for name in NSL_KDD_NUMERIC
    }
    cols["src_bytes"] = np.floor(rng.pareto(0.8, n) * 100)
    cols["protocol_type"] = rng.choice(np.array(["tcp", "udp", "icmp"], object), n)
    cols["service"] = rng.choice(np.array(["http", "ftp", "smtp"], object), n)
    cols["flag"] = rng.choice(np.array(["SF", "S0", "REJ"], object), n)
    cols["label"] = rng.integers(0, 2, n).astype(np.float64)
    cols["label_detail"] = rng.choice(np.array(["normal", "neptune"], object), n)
    cols["difficulty"] = rng.integers(0, 22, n).astype(np.float64)
    return cols


def test_nsl_kdd_family_uses_the_41_features_only():
    cols = nsl_kdd_columns(300, seed=7)
    enc = Encoder.fit(cols, "nsl-kdd")
    assert len(NSL_KDD_NUMERIC) + len(NSL_KDD_CATEGORICAL) == 41
    assert [f.name for f in enc.numeric] == list(NSL_KDD_NUMERIC)
    assert [f.name for f in enc.categorical] == list(NSL_KDD_CATEGORICAL)
    assert enc.n_features == 38 + 3 * 4  # three values + other, per categorical
    assert "difficulty" not in enc.feature_names and "label" not in enc.feature_names
    assert enc.group_by == "stream"


def test_csv_family_takes_numeric_columns_but_not_ids_or_labels():
    rng = np.random.default_rng(8)
    n = 100
    cols = {
        "id": np.arange(n, dtype=np.float64), "dur": rng.random(n),
        "proto": rng.choice(np.array(["tcp", "udp"], object), n),
        "service": rng.choice(np.array(["dns", None], object), n),
        "state": rng.choice(np.array(["FIN", "INT"], object), n),
        "sbytes": rng.integers(0, 10**6, n).astype(np.float64),
        "attack_cat": rng.choice(np.array(["Normal", "DoS"], object), n),
        "label": rng.integers(0, 2, n).astype(np.float64),
    }
    enc = Encoder.fit(cols, "unsw-nb15")
    assert [f.name for f in enc.numeric] == ["dur", "sbytes"]
    assert [f.name for f in enc.categorical] == ["proto", "service", "state"]
    assert "service:null" in enc.feature_names


def test_json_round_trip_is_bit_identical(tmp_path):
    train = conn_columns(3000, seed=9)
    enc = Encoder.fit(train, "conn", window=5, group_by="stream")
    test = conn_columns(3000, seed=10)
    test["service"][:5] = "unseen-service"
    test["orig_bytes"][:5] = 1e13

    again = Encoder.from_json(enc.to_json())
    assert again.feature_names == enc.feature_names
    assert (again.window, again.group_by, again.family) == (5, "stream", "conn")
    X, Y = enc.transform(test), again.transform(test)
    assert X.tobytes() == Y.tobytes()

    path = enc.save(tmp_path / "encoder.json")
    loaded = Encoder.load(path)
    assert loaded.transform(test).tobytes() == X.tobytes()
    assert json.loads(path.read_text())["feature_names"] == enc.feature_names


def test_record_paths_equal_the_batch_rows():
    train = conn_columns(1000, seed=11)
    enc = Encoder.fit(train, "conn")
    test = conn_columns(300, seed=12)
    X = enc.transform(test)
    records = rows_of(test)
    assert enc.transform_records(records).tobytes() == X.tobytes()
    for i, record in enumerate(records):
        assert enc.transform_record(record).tobytes() == X[i].tobytes(), i
    # Lists with None (not numpy arrays) give the same numbers too.
    as_lists = {k: [r[k] for r in records] for k in test}
    assert enc.transform(as_lists).tobytes() == X.tobytes()


def test_bad_input_names_the_column_and_row():
    cols = conn_columns(50, seed=13)
    enc = Encoder.fit(cols, "conn")
    bad = {k: list(v[:3]) for k, v in cols.items()}
    bad["orig_pkts"][1] = "twelve"
    with pytest.raises(BadInputError, match=r"orig_pkts.*row 1.*'twelve'"):
        enc.transform(bad)
    with pytest.raises(BadInputError, match="conn_state"):
        enc.transform({k: v for k, v in cols.items() if k != "conn_state"})
    record = rows_of({k: v[:1] for k, v in cols.items()})[0]
    del record["history"]
    with pytest.raises(BadInputError, match="history"):
        enc.transform_record(record)
    with pytest.raises(BadInputError, match="history"):
        enc.transform_records([record])
    with pytest.raises(BadInputError, match="service"):
        Encoder.fit({k: v for k, v in cols.items() if k != "service"}, "conn")
    with pytest.raises(UsageError, match="family"):
        Encoder.fit(cols, "no-such-family")
    with pytest.raises(UsageError, match="group_by"):
        Encoder.fit(cols, "conn", group_by="dst_ip")


def test_bad_specs_are_model_errors(tmp_path):
    enc = Encoder.fit(conn_columns(50, seed=14), "conn")
    with pytest.raises(ModelError, match="not JSON"):
        Encoder.from_json("{oops")
    spec = json.loads(enc.to_json())
    spec["schema"] = "something-else"
    with pytest.raises(ModelError, match="schema"):
        Encoder.from_json(json.dumps(spec))
    spec = json.loads(enc.to_json())
    spec["feature_names"] = spec["feature_names"][:-1]
    with pytest.raises(ModelError, match="feature_names"):
        Encoder.from_json(json.dumps(spec))
    with pytest.raises(ModelError, match="cannot read"):
        Encoder.load(tmp_path / "absent.json")


def test_transform_needs_numpy_only():
    code = (
        "import sys, numpy as np\n"
        "from flows.encoder import Encoder\n"
        "from flows.windows import StreamWindower, window_index, gather_windows\n"
        "import flows.encoder as e\n"
        "c = {n: np.arange(30.0) for n in e.NSL_KDD_NUMERIC}\n"
        "c.update({n: np.array(['a', 'b', 'c'] * 10, object)\n"
        "          for n in e.NSL_KDD_CATEGORICAL})\n"
        "enc = Encoder.from_json(Encoder.fit(c, 'nsl-kdd').to_json())\n"
        "X = enc.transform(c)\n"
        "w = StreamWindower(enc.window, enc.n_features).push('h', X[0])\n"
        "g = gather_windows(X, window_index(np.zeros(30, int), enc.window))\n"
        "bad = [m for m in ('pyarrow', 'sklearn', 'torch', 'tensorflow')\n"
        "       if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_family_defaults():
    assert FAMILIES["conn"].group_by == "src_ip"
    assert FAMILIES["nsl-kdd"].group_by == "stream"
    enc = Encoder.fit(conn_columns(50, seed=15), "conn")
    assert (enc.window, enc.group_by) == (FAMILIES["conn"].window, "src_ip")


@pytest.mark.data
def test_real_nsl_kdd_unseen_services_go_to_other(data_dir):
    readers = pytest.importorskip("flows.readers")
    train = readers.read(data_file(data_dir, "nsl-kdd/KDDTrain+.txt.gz")).table
    test = readers.read(data_file(data_dir, "nsl-kdd/KDDTest+.txt")).table
    enc = Encoder.fit(train, "nsl-kdd")
    assert "difficulty" not in enc.feature_names
    X = enc.transform(test)
    assert X.shape == (22544, enc.n_features)
    assert X.min() >= 0.0 and X.max() <= 1.0

    # Rows whose service KDDTrain+ never had are exactly the rows in service:other.
    seen = set(train.column("service").to_pylist())
    unseen = np.array([s not in seen for s in test.column("service").to_pylist()])
    other = X[:, enc.feature_names.index("service:other")] == 1.0
    np.testing.assert_array_equal(other, unseen)


def test_arrow_table_input_equals_columns():
    pa = pytest.importorskip("pyarrow")
    cols = conn_columns(300, seed=16)
    table = pa.table({k: pa.array(list(v), from_pandas=True) for k, v in cols.items()})
    enc = Encoder.fit(table, "conn")
    same = Encoder.fit(cols, "conn")
    assert enc.to_json() == same.to_json()
    assert enc.transform(table).tobytes() == same.transform(cols).tobytes()


@pytest.mark.data
def test_real_ctu_records_equal_batch_rows(data_dir):
    from flows.datasets import REGISTRY, load_dataset

    for entry in REGISTRY["ctu-conn"].files:
        data_file(data_dir, entry.path)
    ds = load_dataset("ctu-conn", data_dir=data_dir)
    train = ds.table.filter(pytest.importorskip("pyarrow").array(ds.split == "train"))
    enc = Encoder.fit(train, "conn")
    assert not any(n.startswith(("src_ip", "dst_ip")) for n in enc.feature_names)
    X = enc.transform(ds.table)
    records = ds.table.to_pylist()  # what the agent's record reader hands over
    assert enc.transform_records(records).tobytes() == X.tobytes()
    for i in range(0, len(records), 7):
        assert enc.transform_record(records[i]).tobytes() == X[i].tobytes(), i


def _quantile_columns(n: int, seed: int) -> dict[str, np.ndarray]:
    """NSL-KDD-shaped columns: mostly-zero heavy tails, rates, small counts."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for i, name in enumerate(NSL_KDD_NUMERIC):
        kind = i % 3
        if kind == 0:  # mostly zero, heavy tail
            cols[name] = np.where(rng.random(n) < 0.7, 0.0,
                                  np.floor(rng.pareto(1.0, n) * 1000))
        elif kind == 1:  # rates in 0..1, 40 % of them exactly 0.5
            cols[name] = np.round(np.where(rng.random(n) < 0.4, 0.5, rng.random(n)), 2)
        else:
            cols[name] = rng.integers(0, 50, n).astype(np.float64)
    for name in NSL_KDD_CATEGORICAL:
        cols[name] = rng.choice(np.array(["a", "b", "c"], dtype=object), n)
    return cols


@pytest.mark.parametrize("knots", [16, 256])
def test_quantile_scaling_equals_sklearn_quantile_transformer(knots):
    from sklearn.preprocessing import QuantileTransformer

    train = _quantile_columns(700, seed=21)
    test = _quantile_columns(300, seed=22)
    test[NSL_KDD_NUMERIC[0]][:3] = [-1.0, 1e12, np.inf]  # below, above, inf
    enc = Encoder.fit(train, "nsl-kdd", scaling="quantile", knots=knots)
    assert enc.scaling == "quantile"
    X = enc.transform(test)

    # The reference: scikit-learn's uniform quantile map, fitted on the same rows.
    raw_train = np.column_stack([train[n] for n in NSL_KDD_NUMERIC])
    raw_test = np.column_stack([test[n] for n in NSL_KDD_NUMERIC])
    raw_test[2, 0] = 1e300  # sklearn rejects inf; any value above the range maps to 1
    ref = QuantileTransformer(n_quantiles=knots, output_distribution="uniform",
                              subsample=None).fit(raw_train).transform(raw_test)
    cols = [enc.feature_names.index(n) for n in NSL_KDD_NUMERIC]
    np.testing.assert_allclose(X[:, cols], ref.astype(np.float32), atol=1e-6)
    assert X[0, cols[0]] == 0.0 and X[1, cols[0]] == 1.0 and X[2, cols[0]] == 1.0
    # Ties: the training minimum (0 in 70 % of rows) stays 0; a value shared by
    # inner knots gets the middle of their levels.
    assert (X[test[NSL_KDD_NUMERIC[0]] == 0, cols[0]] == 0).all()
    rate = train[NSL_KDD_NUMERIC[1]]
    tied = 0.5
    share_below = float((rate < tied).mean())
    share_at = float((rate == tied).mean())
    assert share_at > 2.0 / knots  # the value spans several knots
    got = enc.transform({**test, NSL_KDD_NUMERIC[1]: np.full(300, tied)})[0, cols[1]]
    assert abs(got - (share_below + share_at / 2)) < 1.5 / knots
    # Min-max encoders are untouched by the option.
    assert Encoder.fit(train, "nsl-kdd", scaling="minmax").scaling == "minmax"


def test_quantile_json_round_trip_and_records(tmp_path):
    train = _quantile_columns(500, seed=23)
    test = _quantile_columns(200, seed=24)
    enc = Encoder.fit(train, "nsl-kdd", scaling="quantile", knots=64)
    spec = json.loads(enc.to_json())
    assert spec["scaling"] == "quantile"
    assert all(len(d["quantiles"]) == 64 for d in spec["numeric"])
    loaded = Encoder.load(enc.save(tmp_path / "encoder.json"))
    assert loaded.scaling == "quantile"
    X = enc.transform(test)
    assert loaded.transform(test).tobytes() == X.tobytes()
    records = rows_of(test)
    for i in (0, 7, 199):
        assert loaded.transform_record(records[i]).tobytes() == X[i].tobytes()
    # Bad knots in a spec are named.
    spec["numeric"][1]["quantiles"] = [0.5, 0.2, 0.9]
    with pytest.raises(ModelError, match=f"{NSL_KDD_NUMERIC[1]}.*non-decreasing"):
        Encoder.from_json(json.dumps(spec), source="bad.json")
    spec["numeric"][1]["quantiles"] = [0.2, 0.9]
    spec["scaling"] = "sideways"
    with pytest.raises(ModelError, match="bad.json.*scaling"):
        Encoder.from_json(json.dumps(spec), source="bad.json")
    with pytest.raises(UsageError, match="scaling"):
        Encoder.fit(train, "nsl-kdd", scaling="sideways")
    with pytest.raises(UsageError, match="knots"):
        Encoder.fit(train, "nsl-kdd", scaling="quantile", knots=1)
    # So are ranges that are not finite or run backwards.
    spec["scaling"] = "quantile"
    for lo, hi in ((float("nan"), 1.0), (0.0, float("inf")), (5.0, 1.0)):
        spec["numeric"][1]["lo"], spec["numeric"][1]["hi"] = lo, hi
        with pytest.raises(ModelError, match=f"{NSL_KDD_NUMERIC[1]}.*lo <= hi"):
            Encoder.from_json(json.dumps(spec), source="bad.json")


def test_old_specs_without_scaling_still_load():
    # A spec as written before quantile scaling existed: no "scaling", no quantiles.
    train = _quantile_columns(300, seed=25)
    enc = Encoder.fit(train, "nsl-kdd", scaling="minmax")
    spec = json.loads(enc.to_json())
    del spec["scaling"]
    assert all("quantiles" not in d for d in spec["numeric"])
    old = Encoder.from_json(json.dumps(spec))
    assert old.scaling == "minmax"
    test = _quantile_columns(100, seed=26)
    assert old.transform(test).tobytes() == enc.transform(test).tobytes()
    # Its numbers are the min-max rule's, computed here by hand for one field.
    name = NSL_KDD_NUMERIC[2]  # small counts, not log-scaled
    lo, hi = train[name].min(), train[name].max()
    want = np.clip((test[name] - lo) / (hi - lo), 0, 1).astype(np.float32)
    got = old.transform(test)[:, old.feature_names.index(name)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _small_conn_columns() -> dict[str, list]:
    """21 conn records whose fields take a few values each (nulls among them)."""
    return {
        "duration": [0.0, 1.0, None] * 7, "orig_bytes": [1.0, 5.0, 9.0] * 7,
        "resp_bytes": [5.0] * 21, "orig_pkts": list(range(21)),
        "resp_pkts": [1.0] * 21, "orig_ip_bytes": [1.0] * 21,
        "resp_ip_bytes": [1.0] * 21, "missed_bytes": [0.0] * 21,
        "proto": ["tcp", "udp", None] * 7, "service": ["dns", "http", "-"] * 7,
        "conn_state": ["SF"] * 21, "dst_port": [53] * 21, "history": ["ShAD"] * 21,
    }


def test_category_block_holds_the_one_hot_columns_of_a_field() -> None:
    cols = _small_conn_columns()
    enc = Encoder.fit(cols, "conn")
    start, stop = enc.category_block("service")

    # Independently: the columns whose names are "service=..." or "service:...".
    named = [i for i, n in enumerate(enc.feature_names)
             if n.startswith(("service=", "service:"))]
    assert list(range(start, stop)) == named
    x = enc.transform(cols)
    assert enc.feature_names[start + int(np.argmax(x[0, start:stop]))] == "service=dns"
    assert enc.category_block("duration") is None  # numeric, not categorical
    assert enc.category_block("nope") is None


def test_field_of_column_follows_the_feature_names() -> None:
    cols = _small_conn_columns()
    enc = Encoder.fit(cols, "conn")

    # Independently: a column belongs to the field its name starts with
    # ("service=dns", "duration:null", "history:S").
    fields = enc.input_fields
    expected = [fields.index(name.split("=")[0].split(":")[0])
                for name in enc.feature_names]
    assert enc.field_of_column == expected
    assert len(set(expected)) == len(fields)
