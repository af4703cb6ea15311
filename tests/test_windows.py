"""Tests of windows: batch indices, gathering, keys, and the streaming windower."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from flows.errors import BadInputError, UsageError
from flows.windows import (
    StreamWindower,
    gather_windows,
    record_key,
    time_order,
    window_index,
    window_index_for,
    window_keys,
)


def naive_index(keys, W, order=None):
    """Reference: walk rows in order, remember each key's last W rows."""
    n = len(keys)
    seq = range(n) if order is None else order
    history: dict = {}
    idx = np.full((n, W), -1, dtype=np.int64)
    for row in seq:
        past = history.setdefault(keys[row], [])
        past.append(row)
        last = past[-W:]
        idx[row, W - len(last) :] = last
    return idx


def naive_lru_windows(keys, X, W, max_hosts):
    """Reference for eviction: an evicted key comes back as a fresh key."""
    hosts: OrderedDict = OrderedDict()
    out = np.zeros((len(keys), W, X.shape[1]), dtype=np.float32)
    for i, key in enumerate(keys):
        if key not in hosts and len(hosts) >= max_hosts:
            hosts.popitem(last=False)
        rows = hosts.pop(key, [])
        rows.append(i)
        hosts[key] = rows
        last = rows[-W:]
        out[i, W - len(last) :] = X[last]
    return out


def test_window_index_by_hand():
    keys = ["a", "b", "a", "a", "b", "a"]
    idx = window_index(keys, 3)
    expected = [
        [-1, -1, 0],
        [-1, -1, 1],
        [-1, 0, 2],
        [0, 2, 3],
        [-1, 1, 4],
        [2, 3, 5],
    ]
    np.testing.assert_array_equal(idx, expected)
    assert idx.dtype == np.int64


def test_time_order_sorts_by_ts_stably():
    # Rows 1 and 3 share a timestamp: file order decides; the null ts goes last.
    columns = {"ts": [5.0, 2.0, 9.0, 2.0, np.nan, 1.0]}
    order = time_order(columns)
    np.testing.assert_array_equal(order, [5, 1, 3, 0, 2, 4])
    idx = window_index(["h"] * 6, 2, order)
    np.testing.assert_array_equal(idx[:, 0], [3, 5, 0, 1, 2, -1])
    assert time_order({"src_ip": ["x"]}) is None


@pytest.mark.parametrize("W", [1, 2, 5, 16])
def test_window_index_matches_reference(W):
    rng = np.random.default_rng(W)
    n = 3000
    keys = rng.integers(0, 40, n).astype(str).tolist()
    np.testing.assert_array_equal(window_index(keys, W), naive_index(keys, W))
    order = rng.permutation(n)
    np.testing.assert_array_equal(
        window_index(keys, W, order), naive_index(keys, W, order)
    )
    # A window's last flow is the row itself, so its label is that row's label.
    np.testing.assert_array_equal(window_index(keys, W)[:, -1], np.arange(n))


def test_gather_pads_with_zeros_on_the_left():
    X = np.arange(1, 13, dtype=np.float32).reshape(4, 3)
    idx = window_index(["a", "a", "b", "a"], 3)
    G = gather_windows(X, idx)
    assert G.shape == (4, 3, 3) and G.dtype == np.float32
    np.testing.assert_array_equal(G[0], [[0, 0, 0], [0, 0, 0], X[0]])
    np.testing.assert_array_equal(G[3], [X[0], X[1], X[3]])
    np.testing.assert_array_equal(G[2], [[0, 0, 0], [0, 0, 0], X[2]])
    with pytest.raises(UsageError):
        gather_windows(X, np.array([[7, 0]]))


class Settings:
    """Stands in for an encoder's window settings."""

    def __init__(self, group_by: str, window: int = 3) -> None:
        self.group_by = group_by
        self.window = window


def test_window_keys_host_stream_and_capture():
    cols = {"src_ip": ["10.0.0.1", None, "10.0.0.1"], "ts": [1.0, 2.0, 3.0]}
    assert list(window_keys(cols, Settings("src_ip"))) == ["10.0.0.1", "", "10.0.0.1"]
    assert list(window_keys(cols, Settings("stream"))) == ["", "", ""]
    cols["capture"] = ["a.log", "a.log", "b.log"]
    assert list(window_keys(cols, Settings("src_ip"))) == [
        "a.log|10.0.0.1", "a.log|", "b.log|10.0.0.1"
    ]
    assert list(window_keys(cols, Settings("stream"))) == ["a.log", "a.log", "b.log"]
    # The same host in two captures never shares a window.
    idx = window_index_for(cols, Settings("src_ip"))
    np.testing.assert_array_equal(idx[2], [-1, -1, 2])
    # One record's key is its row's key.
    for by in ("src_ip", "stream"):
        table = zip(*cols.values(), strict=True)
        rows = [dict(zip(cols, values, strict=True)) for values in table]
        assert [record_key(r, Settings(by)) for r in rows] == list(
            window_keys(cols, Settings(by))
        )
        no_capture = [{k: v for k, v in r.items() if k != "capture"} for r in rows]
        assert [record_key(r, Settings(by)) for r in no_capture] == list(
            window_keys({k: v for k, v in cols.items() if k != "capture"}, Settings(by))
        )
    with pytest.raises(BadInputError, match="src_ip"):
        window_keys({"ts": [1.0]}, Settings("src_ip"))
    with pytest.raises(UsageError):
        window_keys(cols, Settings("dst_ip"))


def test_window_keys_from_an_arrow_table():
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"src_ip": ["h1", "h2", "h1"], "ts": [3.0, 2.0, 1.0]})
    idx = window_index_for(table, Settings("src_ip", window=2))
    # The rows' order, not ts: row 2 (ts 1.0) was recorded after row 0 (ts 3.0),
    # as a connection that started first but ended last is, so row 0 comes first.
    np.testing.assert_array_equal(idx, [[-1, 0], [-1, 1], [0, 2]])


def test_stream_windower_equals_batch_windows():
    rng = np.random.default_rng(7)
    n, F, W = 2000, 6, 5
    keys = rng.choice([f"10.0.0.{i}" for i in range(25)], n).tolist()
    X = rng.random((n, F), dtype=np.float32)
    batch = gather_windows(X, window_index(keys, W))

    stream = StreamWindower(W, F, max_hosts=25)
    got = np.stack([stream.push(k, x) for k, x in zip(keys, X, strict=True)])
    assert got.tobytes() == batch.tobytes()
    assert stream.evictions == 0 and len(stream) == 25

    again = StreamWindower(W, F, max_hosts=100).push_many(keys, X)
    assert again.tobytes() == batch.tobytes()


def test_eviction_restarts_a_host_with_an_empty_window():
    F = 2
    stream = StreamWindower(3, F, max_hosts=2)
    a1, b1, c1, a2 = (np.full(F, v, np.float32) for v in (1, 2, 3, 4))
    stream.push("A", a1)
    stream.push("B", b1)
    stream.push("C", c1)  # evicts A, the least recently pushed
    assert stream.evictions == 1 and "A" not in stream
    window = stream.push("A", a2)  # A is new again: a2 alone, after zeros
    np.testing.assert_array_equal(window, [[0, 0], [0, 0], [4, 4]])
    assert "B" not in stream and "C" in stream  # pushing A evicted B

    # Recency is by push: touching B keeps it, so C is the one evicted.
    stream = StreamWindower(3, F, max_hosts=2)
    for key in ("B", "C", "B", "A"):
        stream.push(key, a1)
    assert "B" in stream and "C" not in stream


def test_eviction_matches_reference_on_a_random_stream():
    rng = np.random.default_rng(8)
    n, F, W, cap = 3000, 3, 4, 7
    keys = rng.choice(list("ABCDEFGHIJKL"), n).tolist()
    X = rng.random((n, F), dtype=np.float32)
    stream = StreamWindower(W, F, max_hosts=cap)
    got = stream.push_many(keys, X)
    np.testing.assert_array_equal(got, naive_lru_windows(keys, X, W, cap))
    assert stream.evictions > 0


def _batches(n: int, rng) -> list[slice]:
    """Random micro-batch bounds over n rows, sizes 1 to 300 (as the agent makes)."""
    cuts = [0]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + int(rng.integers(1, 300))))
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


@pytest.mark.parametrize("W", [1, 2, 8])
def test_push_many_in_micro_batches_equals_the_batch_form(W):
    """The vectorized path, batch after batch, gives the batch windows bit for bit."""
    rng = np.random.default_rng(11 + W)
    n, F = 5000, 7
    hosts = [f"10.0.{i // 256}.{i % 256}" for i in range(300)]
    keys = rng.choice(hosts, n, p=_zipf(len(hosts))).tolist()
    X = rng.standard_normal((n, F)).astype(np.float32)
    X[rng.random(n) < 0.05] = 0.0  # all-zero flows look like padding; still real
    batch = gather_windows(X, window_index(keys, W))

    stream = StreamWindower(W, F, max_hosts=len(hosts))
    got = np.concatenate([stream.push_many(keys[b], X[b]) for b in _batches(n, rng)])
    assert got.dtype == np.float32 and got.tobytes() == batch.tobytes()
    assert stream.evictions == 0 and len(stream) == len(set(keys))


def _zipf(k: int) -> np.ndarray:
    """A skewed host mix: a few busy hosts, many quiet ones."""
    w = 1.0 / np.arange(1, k + 1)
    return w / w.sum()


@pytest.mark.parametrize("cap", [3, 40, 120])
def test_push_many_with_evictions_equals_row_by_row(cap):
    """Batches that evict, mixed with single pushes and forget(): same as push()."""
    rng = np.random.default_rng(cap)
    n, F, W = 4000, 3, 4
    keys = rng.choice([f"h{i}" for i in range(150)], n, p=_zipf(150)).tolist()
    X = rng.random((n, F), dtype=np.float32)

    one = StreamWindower(W, F, max_hosts=cap)
    many = StreamWindower(W, F, max_hosts=cap)
    for b in _batches(n, rng):
        want = np.stack([one.push(k, x) for k, x in zip(keys[b], X[b], strict=True)])
        if b.stop - b.start == 1 and rng.random() < 0.5:
            got = many.push(keys[b.start], X[b.start])[None]
        else:
            got = many.push_many(keys[b], X[b])
        assert got.tobytes() == want.tobytes()
        if rng.random() < 0.1:
            gone = keys[b.start]
            one.forget(gone)
            many.forget(gone)
        assert list(one._hosts) == list(many._hosts)  # same recency order
    assert many.evictions == one.evictions
    np.testing.assert_array_equal(
        StreamWindower(W, F, cap).push_many(keys, X),
        naive_lru_windows(keys, X, W, cap),
    )


def test_push_many_edge_cases():
    stream = StreamWindower(3, 2, max_hosts=5)
    assert stream.push_many([], np.zeros((0, 2))).shape == (0, 3, 2)
    with pytest.raises(UsageError, match="keys for"):
        stream.push_many(["a"], np.zeros((2, 2)))
    with pytest.raises(UsageError, match="shape"):
        stream.push_many(["a"], np.zeros((1, 3)))
    stream.push_many(["a", "b"], np.ones((2, 2)))
    stream.reset()
    assert len(stream) == 0
    np.testing.assert_array_equal(
        stream.push_many(["a"], np.full((1, 2), 5.0)), [[[0, 0], [0, 0], [5, 5]]]
    )


def test_bad_settings_are_usage_errors():
    with pytest.raises(UsageError):
        window_index(["a"], 0)
    with pytest.raises(UsageError, match="permutation"):
        window_index(["a", "b"], 2, order=[0, 0])
    with pytest.raises(UsageError):
        StreamWindower(0, 3)
    with pytest.raises(UsageError, match="shape"):
        StreamWindower(2, 3).push("h", np.zeros(4))


@pytest.mark.data
def test_real_ctu_conn_stream_equals_batch(data_dir):
    from flows.datasets import REGISTRY, load_dataset
    from flows.encoder import Encoder
    from flows.record import table_to_columns
    from tests.conftest import data_file

    for entry in REGISTRY["ctu-conn"].files:
        data_file(data_dir, entry.path)
    ds = load_dataset("ctu-conn", data_dir=data_dir)
    columns = table_to_columns(ds.table)
    train = ds.split == "train"
    enc = Encoder.fit(
        {k: v[train] for k, v in columns.items()}, ds.family,
        window=ds.window_default, group_by=ds.group_by_default,
    )
    X = enc.transform(columns)
    batch = gather_windows(X, window_index_for(columns, enc))

    # The agent's view: flows arrive in the file's order, one by one, keyed by host.
    order = np.arange(len(ds.table))
    keys = window_keys(columns, enc)
    records = ds.table.to_pylist()
    stream = StreamWindower(enc.window, enc.n_features, max_hosts=10_000)
    got = np.empty_like(batch)
    for row in order:
        assert record_key(records[row], enc) == keys[row]
        got[row] = stream.push(record_key(records[row], enc), X[row])
    assert got.tobytes() == batch.tobytes()
    assert len(stream) == len(set(keys.tolist()))

    # The same in the agent's micro-batches of 256 through push_many.
    stream = StreamWindower(enc.window, enc.n_features, max_hosts=10_000)
    again = np.empty_like(batch)
    for start in range(0, len(order), 256):
        rows = order[start : start + 256]
        again[rows] = stream.push_many([keys[r] for r in rows], X[rows])
    assert again.tobytes() == batch.tobytes()


def test_batch_windows_of_a_conn_log_out_of_ts_order_are_the_agents(data_dir):
    """Found: training and evaluation (``window_index_for``) sorted a table by ts
    while the edge agent windows flows as it reads them. A Zeek conn.log is written
    as connections end, so its rows are not in ts order (this log has a few hundred
    rows out of it), and the two disagreed: the gateway scored windows that
    ``compress eval`` never saw. Both follow the file's order now; the agent's
    windows here are built independently of both, in file order per source host."""
    from flows.encoder import Encoder
    from flows.readers import read
    from flows.record import table_to_columns
    from tests.conftest import data_file
    from tests.test_agent_fixtures import numpy_windows, read_records

    log = data_file(
        data_dir, "zeek-conn/ctu-malware-botnet-230-1-njrat-first1000.conn.log.labeled"
    )
    columns = table_to_columns(read(str(log)).table)
    ts = np.asarray(columns["ts"], dtype=np.float64)
    assert np.sum(np.diff(ts) < 0) > 100  # the premise: rows not in ts order
    enc = Encoder.fit(columns, "conn", window=8, group_by="src_ip")

    batch = gather_windows(enc.transform(columns), window_index_for(columns, enc))

    agent = numpy_windows(read_records(log), enc, window=8)
    np.testing.assert_allclose(batch, agent, atol=1e-6)


def test_a_captures_table_keeps_the_order_the_agent_gets_its_flows_in(data_dir):
    """``read_capture`` (``flows convert``, ``compress eval --data X.pcap``) gave
    its flows sorted by ts, the agent (``iter_flows``) as the connections end; the
    windows of one differed from the other's. Both give the meter's order now."""
    from flows.meter import iter_flows, read_capture
    from tests.conftest import data_file

    pcap = data_file(data_dir, "pcap/test7-malicious.pcap")
    key = ("ts", "src_ip", "src_port", "dst_ip", "dst_port", "proto", "duration")

    table = read_capture(str(pcap)).table.to_pylist()
    streamed = list(iter_flows(str(pcap)))

    assert [tuple(r[k] for k in key) for r in table] == [
        tuple(r[k] for k in key) for r in streamed
    ]
    ts = [r["ts"] for r in streamed]
    assert ts != sorted(ts)  # the premise: connections do not end in start order
