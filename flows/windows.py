"""Windows of consecutive flows: the model's input ``[N, W, F]``, in batch or streaming.

A flow's window is the flow itself preceded by the W-1 flows before it *with the same
key*. The key is the source host (``group_by="src_ip"``) or one key for the whole
stream (``group_by="stream"``); a ``capture`` column, when present, is part of the key
so windows never span two capture files. "Before" means the order the flows were
recorded in, the file's (or table's) row order: that is the order an edge agent
reading the same file, or metering the same traffic, gets them in (Zeek writes a
connection when it ends, and so does the flow meter), so that training, evaluation
and the gateway see the same windows. Sorting by ``ts`` instead would give windows
the agent can never build: a flow's predecessors would include connections that
started before it but had not ended when it did. A window shorter than W (the
first flows of a key) is padded with zero rows on the left. A window's label is its
last flow's label, i.e. the label of the row the window belongs to.

The batch form (:func:`window_index` + :func:`gather_windows`) and the streaming form
(:class:`StreamWindower`, used by the edge agent) give the same windows for the same
flows in the same order. The streaming form keeps at most ``max_hosts`` keys: past
that, the least recently seen key is evicted and, when it comes back, it starts again
from an empty window, exactly as if it were a new host.

numpy only: the edge agent imports this module.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from flows.errors import BadInputError, UsageError

KEY_SEPARATOR = "|"


def window_keys(columns: Mapping[str, Any], enc: Any) -> np.ndarray:
    """The grouping key of each row: an object array of str.

    ``group_by="src_ip"``: the source address (null addresses share the key ``""``);
    ``"stream"``: ``""`` for every row. With a ``capture`` column the key is
    ``capture|src_ip`` (or the capture alone for stream order).
    """
    n = columns.num_rows if hasattr(columns, "num_rows") else _n_rows(columns)
    columns = _as_columns(columns)
    group_by = getattr(enc, "group_by", enc)

    # The part that comes from the grouping setting.
    if group_by == "src_ip":
        if "src_ip" not in columns:
            raise BadInputError(
                "windows per source host need a src_ip column", column="src_ip"
            )
        keys = np.array(["" if v is None else str(v) for v in columns["src_ip"]],
                        dtype=object)
    elif group_by == "stream":
        keys = np.full(n, "", dtype=object)
    else:
        raise UsageError(f"group_by must be 'src_ip' or 'stream', got {group_by!r}")

    # The capture file, when the table says which one each row came from.
    if "capture" in columns:
        captures = ["" if v is None else str(v) for v in columns["capture"]]
        keys = np.array(
            [c + KEY_SEPARATOR + k if group_by == "src_ip" else c
             for c, k in zip(captures, keys, strict=True)],
            dtype=object,
        )
    return keys


def record_key(record: Mapping[str, Any], enc: Any) -> str:
    """The grouping key of one flow record, equal to :func:`window_keys`' for its row.

    For the streaming form: ``StreamWindower.push(record_key(r, enc), x)``.
    """
    group_by = getattr(enc, "group_by", enc)
    if group_by == "src_ip":
        host = record.get("src_ip")
        key = "" if host is None else str(host)
    elif group_by == "stream":
        key = ""
    else:
        raise UsageError(f"group_by must be 'src_ip' or 'stream', got {group_by!r}")
    capture = record.get("capture", _ABSENT)
    if capture is _ABSENT:
        return key
    capture = "" if capture is None else str(capture)
    return capture + KEY_SEPARATOR + key if group_by == "src_ip" else capture


_ABSENT = object()


def time_order(columns: Mapping[str, Any]) -> np.ndarray | None:
    """Rows in ``ts`` order (a stable sort), or None without ``ts``; null ``ts``
    values sort last, in file order. Not the order of windows (see the module
    docstring): for callers that want the rows by start time."""
    columns = _as_columns(columns)
    if "ts" not in columns:
        return None
    ts = np.asarray(columns["ts"], dtype=np.float64)
    return np.argsort(ts, kind="stable")


def window_index(keys: Any, W: int, order: Any = None) -> np.ndarray:
    """Row indices of each row's window: int64 [N, W], -1 where the window is short.

    ``keys`` gives each row's grouping key (any hashable values, e.g. from
    :func:`window_keys`). ``order`` is a permutation of the rows giving their time
    order (e.g. :func:`time_order`); None means file order. Column W-1 is the row
    itself, column W-1-k its k-th predecessor with the same key.
    """
    if int(W) < 1:
        raise UsageError(f"window length W must be at least 1, got {W!r}")
    W = int(W)
    codes = _factorize(keys)
    n = codes.size

    # The processing order, then rows of one key together, keeping that order.
    if order is None:
        seq = np.arange(n, dtype=np.int64)
    else:
        seq = np.asarray(order, dtype=np.int64)
        if seq.shape != (n,) or not np.array_equal(np.sort(seq), np.arange(n)):
            raise UsageError("order must be a permutation of the row indices")
    grouped = seq[np.argsort(codes[seq], kind="stable")]

    # Position of each grouped row inside its key's run.
    run_code = codes[grouped]
    starts = np.ones(n, dtype=bool)
    starts[1:] = run_code[1:] != run_code[:-1]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank = np.arange(n) - run_start

    # Predecessor k of grouped position p is grouped position p-k, within the run.
    idx = np.full((n, W), -1, dtype=np.int64)
    for k in range(W):
        ok = rank >= k
        idx[grouped[ok], W - 1 - k] = grouped[np.flatnonzero(ok) - k]
    return idx


def gather_windows(X: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The windows of rows ``idx`` as float32 [n, W, F]; index -1 gives a zero row."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise UsageError(f"X must be [N, F], got shape {X.shape}")
    idx = np.asarray(idx, dtype=np.int64)
    if idx.ndim != 2:
        raise UsageError(f"idx must be [n, W], got shape {idx.shape}")
    if idx.size and (idx.max() >= X.shape[0] or idx.min() < -1):
        raise UsageError(f"window indices out of range for {X.shape[0]} rows")
    out = X[np.maximum(idx, 0)]
    out[idx < 0] = 0.0
    return out


def window_index_for(columns: Mapping[str, Any], enc: Any) -> np.ndarray:
    """Window indices of a table under an encoder's settings (keys, W), in the
    order its rows were recorded (the module docstring says why not by ``ts``)."""
    columns = _as_columns(columns)
    return window_index(window_keys(columns, enc), enc.window)


# Below this many rows a batch is cheaper row by row (measured: about 20 on x86).
_MIN_VECTOR_BATCH = 24


class StreamWindower:
    """Per-key windows that turn a stream of encoded flows into model inputs.

    ``push(key, x)`` records flow ``x`` (float32 [F]) for ``key`` and returns its
    window float32 [W, F], oldest first, zero rows on the left while the key has
    fewer than W flows. At most ``max_hosts`` keys are kept; pushing a new key past
    that evicts the least recently pushed key, which starts from an empty window if
    it returns. ``evictions`` counts them.

    ``push_many(keys, X)`` gives exactly what pushing the rows one by one gives. A
    batch that evicts no key is done with a few numpy operations whatever its size
    (one gather for all its windows); a batch that must evict goes row by row.
    """

    def __init__(self, W: int, n_features: int, max_hosts: int = 10_000) -> None:
        if int(W) < 1 or int(n_features) < 1 or int(max_hosts) < 1:
            raise UsageError(
                "StreamWindower needs W, n_features and max_hosts of at least 1, got "
                f"{W!r}, {n_features!r}, {max_hosts!r}"
            )
        self.W = int(W)
        self.n_features = int(n_features)
        self.max_hosts = int(max_hosts)
        self.evictions = 0
        # key -> row of _windows holding its current window, least recent first.
        self._hosts: OrderedDict[Hashable, int] = OrderedDict()
        self._windows = np.zeros((0, self.W, self.n_features), dtype=np.float32)
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._hosts)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._hosts

    def _new_row(self) -> int:
        """A zeroed row of the window store for a new key (the store grows by half)."""
        if not self._free:
            have = self._windows.shape[0]
            grow = min(max(16, have // 2), self.max_hosts - have) or 1
            extra = np.zeros((grow, self.W, self.n_features), dtype=np.float32)
            self._windows = np.concatenate([self._windows, extra])
            self._free = list(range(have + grow - 1, have - 1, -1))
            return self._free.pop()
        row = self._free.pop()
        self._windows[row] = 0.0
        return row

    def _row_for(self, key: Hashable) -> int:
        """The key's store row, made (evicting past the cap) when it is new."""
        row = self._hosts.get(key)
        if row is not None:
            self._hosts.move_to_end(key)
            return row
        if len(self._hosts) >= self.max_hosts:
            _, old = self._hosts.popitem(last=False)
            self._free.append(old)
            self.evictions += 1
        row = self._new_row()
        self._hosts[key] = row
        return row

    def push(self, key: Hashable, x: Any) -> np.ndarray:
        """Add one encoded flow for ``key``; returns its window float32 [W, F]."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (self.n_features,):
            raise UsageError(
                f"flow vector has shape {x.shape}, expected ({self.n_features},)"
            )

        # Shift the key's window one flow to the left and put this flow last.
        row = self._row_for(key)  # first: it may grow the store
        window = self._windows[row]
        window[:-1] = window[1:]
        window[-1] = x
        return window.copy()

    def push_many(self, keys: Any, X: Any) -> np.ndarray:
        """Push rows of X [n, F] in order with their keys; returns float32 [n, W, F]."""
        X = np.asarray(X, dtype=np.float32)
        keys = list(keys)
        n = len(keys)
        if n != X.shape[0]:
            raise UsageError(f"{n} keys for {X.shape[0]} flows")
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise UsageError(
                f"flows have shape {X.shape}, expected (n, {self.n_features})"
            )
        if n < _MIN_VECTOR_BATCH:
            return self._push_rows(keys, X)

        # Number the batch's keys by first appearance; a batch that must evict
        # some key goes row by row, so that recency decides as in push().
        table: dict[Hashable, int] = {}
        codes = np.fromiter(
            (table.setdefault(k, len(table)) for k in keys), dtype=np.int64, count=n
        )
        unique = list(table)
        new = sum(1 for k in unique if k not in self._hosts)
        if len(self._hosts) + new > self.max_hosts:
            # TODO(gap): a batch that evicts (more hosts than max_hosts, e.g. a
            # scan) is windowed row by row, at the old speed.
            return self._push_rows(keys, X)
        return self._push_batch(unique, codes, X)

    def _push_rows(self, keys: list[Hashable], X: np.ndarray) -> np.ndarray:
        """push() for each row, in order."""
        out = np.empty((len(keys), self.W, self.n_features), dtype=np.float32)
        for i, key in enumerate(keys):
            row = self._row_for(key)
            window = self._windows[row]
            window[:-1] = window[1:]
            window[-1] = X[i]
            out[i] = window
        return out

    def _push_batch(
        self, unique: list[Hashable], codes: np.ndarray, X: np.ndarray
    ) -> np.ndarray:
        """All windows of a batch that evicts nothing, in one gather.

        Key j's flows are its W-1 previous flows (the store's window without its
        oldest row; zeros for a new key) followed by its rows of the batch; the
        r-th batch row of key j has the window of positions r .. r+W-1 of that.
        """
        W, n, u = self.W, len(codes), len(unique)
        rows = np.fromiter(
            (self._hosts[k] if k in self._hosts else self._new_row() for k in unique),
            dtype=np.int64,
            count=u,
        )

        # Rows of one key together, in batch order: each row's rank in its key.
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=u)
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - np.repeat(first, counts)

        # Index every window position into [previous rows of all keys; the batch].
        pos = rank[:, None] + np.arange(W)[None, :]
        earlier = pos < W - 1
        prev = codes[:, None] * (W - 1) + pos
        in_batch = first[codes][:, None] + pos - (W - 1)
        batch_row = order[np.clip(in_batch, 0, n - 1)]
        index = np.where(earlier, prev, u * (W - 1) + batch_row)
        before = self._windows[rows, 1:, :].reshape(u * (W - 1), self.n_features)
        out = np.concatenate([before, X])[index]

        # Each key's window is now that of its last row; recency follows last rows.
        last = order[first + counts - 1]
        self._windows[rows] = out[last]
        for j in np.argsort(last, kind="stable"):
            key = unique[j]
            if key in self._hosts:
                self._hosts.move_to_end(key)
            else:
                self._hosts[key] = int(rows[j])
        return out

    def forget(self, key: Hashable) -> None:
        """Drop one key's window (e.g. when a host leaves)."""
        row = self._hosts.pop(key, None)
        if row is not None:
            self._free.append(row)

    def reset(self) -> None:
        """Drop every window."""
        self._hosts.clear()
        self._windows = np.zeros((0, self.W, self.n_features), dtype=np.float32)
        self._free = []


def _factorize(keys: Any) -> np.ndarray:
    """Integer codes for arbitrary hashable keys, in order of first appearance."""
    arr = np.asarray(keys) if not isinstance(keys, np.ndarray) else keys
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False).reshape(-1)
    table: dict[Any, int] = {}
    return np.fromiter(
        (table.setdefault(k, len(table)) for k in keys), dtype=np.int64, count=len(keys)
    )


def _n_rows(columns: Mapping[str, Any]) -> int:
    """The row count of a mapping of columns (0 for none)."""
    for values in columns.values():
        return len(values)
    return 0


def _as_columns(columns: Any) -> Mapping[str, Any]:
    """Accept a mapping of columns, or a pyarrow Table (only the columns used here)."""
    if hasattr(columns, "column_names") and hasattr(columns, "select"):
        from flows.record import table_to_columns

        used = [n for n in ("ts", "src_ip", "capture") if n in columns.column_names]
        return table_to_columns(columns.select(used))
    return columns
