"""The feature encoder: flow columns in, float32 features in 0..1 out, everywhere alike.

An :class:`Encoder` is fitted once on training columns and saved as JSON (the feature
spec). Training, calibration, the edge agent and the re-scorer all load that JSON and
call :meth:`Encoder.transform`, so one flow gets the same numbers in every place.

What fitting decides, per field:

* **Numeric fields.** NaN is a null. A field whose training values are all
  non-negative is log-scaled when it is heavy-tailed, which here means *its training
  maximum is more than ten times its 90th percentile plus one* (byte and packet
  counts, durations; not rates in 0..1, not small counts).
  Log-scaled fields take ``log1p(max(x, 0))``. Then min-max to 0..1 with the training
  minimum and maximum, clipped, so a test value beyond the training range lands on 0
  or 1 (``+inf`` on 1). A field constant in training encodes as 0 at that constant
  and 1 above it.
* **Quantile scaling** (``scaling="quantile"``, the nsl-kdd and unsw-nb15 default).
  Instead of log1p and min-max, each numeric field keeps ``knots`` training quantiles
  (at evenly spaced levels 0..1) and maps a value to its interpolated level with
  ``np.interp``: the training distribution becomes uniform on 0..1, values beyond the
  training range land on 0 or 1, the training minimum maps to 0 and the maximum to 1
  (a mostly-0 field keeps 0 at 0), and any other value repeated across several knots
  gets the middle of their levels. This is the same map as scikit-learn's
  ``QuantileTransformer(output_distribution="uniform")``, stored as plain numbers in
  the JSON. Trees do not care about a monotone map; the network does, and a
  heavy-tailed min-max leaves most training rows squeezed near 0.
* **Nulls.** A numeric null encodes as 0 in its value column. A field that can be null
  (the family says so, or training had a null in it) also gets an indicator column
  ``<field>:null`` that is 1 on nulls.
* **Categorical fields.** One-hot over the training categories, most frequent first
  (ties by value), optionally capped to the top K; every other value, including values
  never seen in training, goes to ``<field>:other`` (a colon: NSL-KDD has a service
  literally named ``other``, which is ``service=other``). A nullable categorical field
  has its own ``<field>:null`` column; otherwise a null counts as "other". Numbers as
  categories (ports) are compared by their integer text, so ``80``, ``80.0`` and
  ``"80"`` are one category.
* **Zeek history** (conn family): one flag per letter in ``S H A D F R C T I Q W``, the
  upper-case letter for the originator and the lower-case one for the responder, plus
  ``^`` (direction flipped), and ``history:null``.

The window length and the grouping of windows (``"src_ip"``: per source host, or
``"stream"``: in stream order) are fitted settings too; :mod:`flows.windows` uses them.

Transforming needs numpy only: the edge agent imports this module. pyarrow tables are
accepted (they are turned into columns with their own methods), but pyarrow is never
imported here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flows import logger
from flows.errors import BadInputError, ModelError, UsageError

SPEC_SCHEMA = "gatewatch.encoder/v1"

# How numeric fields are scaled to 0..1; quantile maps keep this many knots.
SCALINGS = ("minmax", "quantile")
DEFAULT_KNOTS = 256

GROUP_BY = ("src_ip", "stream")

# Zeek conn.log history letters; upper case is the originator, lower the responder.
HISTORY_LETTERS = "SHADFRCTIQW"

# Heavy-tail rule for log1p: max > LOG_TAIL_RATIO * (q90 + 1) on non-negative data.
LOG_TAIL_RATIO = 10.0
LOG_TAIL_QUANTILE = 90.0

# Columns that are never features, whatever the family.
NEVER_FEATURES = frozenset(
    {
        "ts", "uid", "src_ip", "dst_ip", "src_port", "label", "label_detail",
        "attack_cat", "attack_family", "difficulty", "id", "split", "capture",
        # CICFlowMeter identifiers: addresses, ephemeral ports, clock time.
        "Flow ID", "Source IP", "Src IP", "Destination IP", "Dst IP", "Timestamp",
        "Source Port", "Src Port", "Label",
    }
)

NSL_KDD_NUMERIC = (
    "duration", "src_bytes", "dst_bytes", "land", "wrong_fragment", "urgent", "hot",
    "num_failed_logins", "logged_in", "num_compromised", "root_shell",
    "su_attempted", "num_root", "num_file_creations", "num_shells",
    "num_access_files", "num_outbound_cmds", "is_host_login", "is_guest_login",
    "count", "srv_count", "serror_rate", "srv_serror_rate", "rerror_rate",
    "srv_rerror_rate", "same_srv_rate", "diff_srv_rate", "srv_diff_host_rate",
    "dst_host_count", "dst_host_srv_count", "dst_host_same_srv_rate",
    "dst_host_diff_srv_rate", "dst_host_same_src_port_rate",
    "dst_host_srv_diff_host_rate", "dst_host_serror_rate",
    "dst_host_srv_serror_rate", "dst_host_rerror_rate", "dst_host_srv_rerror_rate",
)
NSL_KDD_CATEGORICAL = ("protocol_type", "service", "flag")


@dataclass(frozen=True)
class FamilySpec:
    """Which fields a feature family encodes, and how, before looking at the data.

    ``numeric`` None means "every numeric column that is not a categorical field and
    not in :data:`NEVER_FEATURES`" (UNSW-NB15, CIC). ``categorical`` maps a field to
    its top-K cap (None: all training categories). ``nullable`` lists fields that get
    a null indicator even when training had no null in them.
    """

    numeric: tuple[str, ...] | None
    categorical: dict[str, int | None]
    nullable: tuple[str, ...] = ()
    history: str | None = None
    group_by: str = "stream"
    window: int = 8
    scaling: str = "minmax"


FAMILIES: dict[str, FamilySpec] = {
    "conn": FamilySpec(
        numeric=(
            "duration", "orig_bytes", "resp_bytes", "orig_pkts", "resp_pkts",
            "orig_ip_bytes", "resp_ip_bytes", "missed_bytes",
        ),
        categorical={"proto": None, "service": 32, "conn_state": None, "dst_port": 32},
        # Zeek leaves these unset on S0/REJ flows and the flow meter may too.
        nullable=("duration", "orig_bytes", "resp_bytes", "service", "history"),
        history="history",
        group_by="src_ip",
        window=8,
    ),
    "nsl-kdd": FamilySpec(
        numeric=NSL_KDD_NUMERIC,
        categorical=dict.fromkeys(NSL_KDD_CATEGORICAL),
        group_by="stream",
        window=1,  # records are not in time order: no context to window over
        # Chosen on three held-out-type folds (teacher/results/round4).
        scaling="quantile",
    ),
    "unsw-nb15": FamilySpec(
        numeric=None,
        categorical={"proto": 32, "service": None, "state": None},
        group_by="stream",
        window=1,  # the CSV is sorted by class: stream windows would leak labels
        # Chosen on validation with two seed sets (teacher/results/round19).
        scaling="quantile",
    ),
    "cic": FamilySpec(
        numeric=None,
        categorical={"Protocol": None},
        group_by="stream",
        window=8,
    ),
}


@dataclass
class NumericField:
    """A fitted numeric field: optional log1p, then min-max over [lo, hi].

    With ``quantiles`` (non-decreasing training quantiles at evenly spaced levels)
    the value is mapped to its interpolated level instead; ``lo``/``hi`` are then
    the raw training range and ``log`` is False.
    """

    name: str
    log: bool
    lo: float
    hi: float
    null_indicator: bool
    quantiles: tuple[float, ...] | None = None

    def width(self) -> int:
        """Number of output columns."""
        return 1 + int(self.null_indicator)

    def names(self) -> list[str]:
        """Output column names."""
        return [self.name] + ([f"{self.name}:null"] if self.null_indicator else [])


@dataclass
class CategoricalField:
    """A fitted categorical field: one-hot over ``categories``, then other, null."""

    name: str
    categories: list[str]
    null_indicator: bool
    lookup: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.lookup = {value: i for i, value in enumerate(self.categories)}

    @property
    def other(self) -> int:
        """Offset of the "other" column inside this field's block."""
        return len(self.categories)

    @property
    def null(self) -> int:
        """Offset of the null column (or of "other" when there is none)."""
        return len(self.categories) + 1 if self.null_indicator else self.other

    def width(self) -> int:
        """Number of output columns."""
        return len(self.categories) + 1 + int(self.null_indicator)

    def names(self) -> list[str]:
        """Output column names."""
        out = [f"{self.name}={value}" for value in self.categories]
        out.append(f"{self.name}:other")
        if self.null_indicator:
            out.append(f"{self.name}:null")
        return out


def history_flag_names(name: str = "history") -> list[str]:
    """Names of the history flag columns, in output order."""
    letters = [c for u in HISTORY_LETTERS for c in (u, u.lower())] + ["^"]
    return [f"{name}:{c}" for c in letters] + [f"{name}:null"]


def _history_row(text: str) -> np.ndarray:
    """Flags of one history string (the letters' presence), without the null column."""
    letters = [c for u in HISTORY_LETTERS for c in (u, u.lower())] + ["^"]
    return np.array([c in text for c in letters], dtype=np.float32)


def category_key(value: Any) -> str | None:
    """The text a categorical value is compared by; None for a null.

    Integral numbers become their integer text so a port read as int, float or text
    is one category.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    return str(value)


def _as_columns(columns: Any, names: Sequence[str] | None = None) -> Mapping[str, Any]:
    """Accept a mapping of columns, or a pyarrow Table (converted without pyarrow).

    With ``names``, only those columns of a table are converted.
    """
    if hasattr(columns, "column_names") and hasattr(columns, "select"):
        from flows.record import table_to_columns

        if names is not None:
            columns = columns.select([n for n in names if n in columns.column_names])
        return table_to_columns(columns)
    if not isinstance(columns, Mapping):
        raise UsageError(
            f"expected a mapping of column name -> values, got {type(columns).__name__}"
        )
    return columns


def _column_length(columns: Mapping[str, Any], names: Sequence[str]) -> int:
    """The common row count of the named columns; an error if they disagree."""
    lengths = {name: len(columns[name]) for name in names if name in columns}
    if len(set(lengths.values())) > 1:
        raise BadInputError(
            f"columns have different lengths: {lengths}", column=next(iter(lengths))
        )
    return next(iter(lengths.values()), 0)


def _to_float(values: Any, name: str) -> np.ndarray:
    """A column as float64 with NaN for nulls; a clear error on a non-number."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        return values.astype(np.float64, copy=False)
    try:
        return np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        for row, value in enumerate(values):
            try:
                float(np.nan if value is None else value)
            except (TypeError, ValueError):
                raise BadInputError(
                    f"row {row}: expected a number, got {value!r}", column=name
                ) from None
        raise


def _is_numeric_column(values: Any) -> bool:
    """True when a column holds numbers (numeric dtype, or values that parse)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        return True
    sample = [v for v in values[:1000] if v is not None]
    if not sample:
        return False
    return all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        for v in sample
    )


def _category_codes(values: Any, fitted: CategoricalField) -> np.ndarray:
    """Per row, the offset of its one-hot column inside the field's block."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        uniques, inverse = np.unique(values, return_inverse=True)
        table = np.array(
            [_code_of(category_key(u), fitted) for u in uniques.tolist()], np.int64
        )
        return table[inverse.reshape(-1)]

    cache: dict[Any, int] = {}
    codes = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        try:
            code = cache[value]
        except (KeyError, TypeError):
            code = _code_of(category_key(value), fitted)
            try:
                cache[value] = code
            except TypeError:
                pass
        codes[row] = code
    return codes


def _code_of(key: str | None, fitted: CategoricalField) -> int:
    """Offset of one category key: its column, "other", or the null column."""
    if key is None:
        return fitted.null
    return fitted.lookup.get(key, fitted.other)


def _fit_numeric(
    name: str, values: np.ndarray, nullable: bool, scaling: str = "minmax",
    knots: int = DEFAULT_KNOTS,
) -> NumericField:
    """Decide the scaling of one numeric field (log1p + min-max, or quantiles)."""
    finite = values[np.isfinite(values)]
    has_null = bool(np.isnan(values).any())
    if scaling == "quantile" and finite.size:
        levels = np.linspace(0.0, 1.0, min(knots, finite.size)) * 100.0
        # Rounding in the percentile interpolation may break monotonicity; restore.
        q = np.maximum.accumulate(np.percentile(finite, levels))
        return NumericField(name, False, float(finite.min()), float(finite.max()),
                            null_indicator=nullable or has_null,
                            quantiles=tuple(float(v) for v in q))

    log = False
    if finite.size:
        lo_raw, hi_raw = float(finite.min()), float(finite.max())
        q = float(np.percentile(finite, LOG_TAIL_QUANTILE))
        log = lo_raw >= 0.0 and hi_raw > LOG_TAIL_RATIO * (q + 1.0)

    scaled = np.log1p(np.maximum(finite, 0.0)) if log else finite
    lo = float(scaled.min()) if scaled.size else 0.0
    hi = float(scaled.max()) if scaled.size else 0.0
    return NumericField(name, log, lo, hi, null_indicator=nullable or has_null)


def quantile_levels(x: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Levels in 0..1 of ``x`` under non-decreasing knots at even levels.

    The mean of interpolating upwards and downwards, so a value equal to a run of
    repeated inner knots gets the middle of their levels; the first knot and below
    give 0, the last and above 1 (NaN stays NaN).
    """
    levels = np.linspace(0.0, 1.0, len(quantiles))
    up = np.interp(x, quantiles, levels)
    down = -np.interp(-x, -quantiles[::-1], -levels[::-1])
    out = 0.5 * (up + down)
    # The ends are exact: the training minimum (and below) is 0, the maximum 1.
    out[x <= quantiles[0]] = 0.0
    out[x >= quantiles[-1]] = 1.0
    return out


def _fit_categorical(
    name: str, values: Any, cap: int | None, nullable: bool
) -> CategoricalField:
    """Count the training categories of one field, most frequent first, capped."""
    counts: dict[str, int] = {}
    has_null = False
    raw_counts: dict[Any, int] = {}
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        uniques, n = np.unique(values, return_counts=True)
        raw_counts = dict(zip(uniques.tolist(), n.tolist(), strict=True))
    else:
        for value in values:
            try:
                raw_counts[value] = raw_counts.get(value, 0) + 1
            except TypeError:
                key = category_key(value)
                raw_counts[key] = raw_counts.get(key, 0) + 1
    for value, n in raw_counts.items():
        key = category_key(value)
        if key is None:
            has_null = True
            continue
        counts[key] = counts.get(key, 0) + n

    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    if cap is not None:
        ranked = ranked[:cap]
    return CategoricalField(name, ranked, null_indicator=nullable or has_null)


def _spec_range(d: Mapping[str, Any], source: str) -> tuple[float, float]:
    """The ``lo``/``hi`` of one numeric field in a spec: finite, lo <= hi."""
    lo, hi = float(d["lo"]), float(d["hi"])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ModelError(
            f"{source}: numeric field {d.get('name')!r}: lo and hi must be finite "
            f"with lo <= hi, got {lo!r} and {hi!r}"
        )
    return lo, hi


def _spec_quantiles(d: Mapping[str, Any], source: str) -> tuple[float, ...] | None:
    """The ``quantiles`` of one numeric field in a spec, checked; None when absent."""
    raw = d.get("quantiles")
    if raw is None:
        return None
    q = np.asarray(raw, dtype=np.float64)
    if q.ndim != 1 or q.size < 2 or not np.isfinite(q).all() or (np.diff(q) < 0).any():
        raise ModelError(
            f"{source}: numeric field {d.get('name')!r}: quantiles must be at least "
            "2 finite, non-decreasing numbers"
        )
    return tuple(float(v) for v in q)


class Encoder:
    """A fitted feature spec: turns flow columns into float32 features in 0..1.

    Build one with :meth:`fit`, or load one with :meth:`from_json` / :meth:`load`.
    ``feature_names[i]`` names column ``i`` of every transform.
    """

    def __init__(
        self,
        family: str,
        numeric: list[NumericField],
        categorical: list[CategoricalField],
        history: str | None,
        window: int,
        group_by: str,
        scaling: str = "minmax",
    ) -> None:
        if scaling not in SCALINGS:
            raise UsageError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        if group_by not in GROUP_BY:
            raise UsageError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
        if int(window) < 1:
            raise UsageError(f"window must be at least 1, got {window!r}")
        self.family = family
        self.numeric = numeric
        self.categorical = categorical
        self.history = history
        self.window = int(window)
        self.group_by = group_by
        self.scaling = scaling
        self._plan()

    def _plan(self) -> None:
        """Precompute output offsets and the arrays the transform uses."""
        names: list[str] = []
        for f in self.numeric:
            names.extend(f.names())
        self._cat_offsets = []
        for f in self.categorical:
            self._cat_offsets.append(len(names))
            names.extend(f.names())
        self._history_offset = len(names)
        if self.history is not None:
            names.extend(history_flag_names(self.history))
            self._history_cache: dict[str, np.ndarray] = {}
        self.feature_names: list[str] = names

        # Vectorized numeric step: value columns, their indicator columns, and ranges.
        pos, value_cols, null_cols = 0, [], []
        for f in self.numeric:
            value_cols.append(pos)
            null_cols.append(pos + 1 if f.null_indicator else -1)
            pos += f.width()
        self._num_value_cols = np.array(value_cols, dtype=np.int64)
        self._num_null_cols = np.array(null_cols, dtype=np.int64)
        self._num_log = np.array([f.log for f in self.numeric], dtype=bool)
        lo = np.array([f.lo for f in self.numeric], dtype=np.float64)
        hi = np.array([f.hi for f in self.numeric], dtype=np.float64)
        span = hi - lo
        self._num_lo = lo
        self._num_span = np.where(span > 0, span, 1.0)
        self._num_const = span <= 0
        # Quantile-scaled fields: (column in the numeric block, knots as an array).
        self._num_quantiles = [
            (j, np.asarray(f.quantiles, dtype=np.float64))
            for j, f in enumerate(self.numeric)
            if f.quantiles is not None and not self._num_const[j]
        ]
        self._num_names = [f.name for f in self.numeric]
        self._record_codes: dict[str, dict[Any, int]] = {
            f.name: {} for f in self.categorical
        }

    @property
    def n_features(self) -> int:
        """Width F of each encoded flow."""
        return len(self.feature_names)

    def category_block(self, name: str) -> tuple[int, int] | None:
        """The output columns ``[start, stop)`` of categorical field ``name``'s
        one-hot block, or None when the encoder has no such categorical field."""
        for f, offset in zip(self.categorical, self._cat_offsets, strict=True):
            if f.name == name:
                return offset, offset + f.width()
        return None

    @property
    def field_of_column(self) -> list[int]:
        """For each output column, the number of the input field it comes from.

        A numeric field's value and null columns, a categorical field's one-hot
        block and the history flags each share one number (fields in the order
        of :attr:`input_fields`), so a change made field by field keeps every
        one-hot block one-hot.
        """
        out: list[int] = []
        for i, f in enumerate([*self.numeric, *self.categorical]):
            out += [i] * f.width()
        if self.history is not None:
            out += [len(self.numeric) + len(self.categorical)] * (
                self.n_features - len(out))
        return out

    @property
    def quantile_columns(self) -> list[int]:
        """Feature columns that hold a quantile level (rank in 0..1) of a field.

        Empty under min-max scaling. A model may expand these into piecewise-linear
        bins (``TeacherConfig.bins``): in rank space, evenly spaced bins are the
        training quantiles.
        """
        return [int(self._num_value_cols[j]) for j, _ in self._num_quantiles]

    @property
    def input_fields(self) -> list[str]:
        """The column names a transform reads."""
        fields = [f.name for f in self.numeric] + [f.name for f in self.categorical]
        return fields + ([self.history] if self.history else [])

    # ---- fitting -------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        columns: Any,
        family: str,
        window: int | None = None,
        group_by: str | None = None,
        *,
        max_categories: dict[str, int | None] | None = None,
        exclude: Sequence[str] = (),
        scaling: str | None = None,
        knots: int | None = None,
    ) -> Encoder:
        """Fit the feature spec of ``family`` on training columns.

        ``window`` and ``group_by`` default to the family's (conn: 8 per source
        host; nsl-kdd and unsw-nb15: 1 in stream order; cic: 8 in stream order).
        ``max_categories`` overrides the top-K cap per categorical field (a field
        named there that the family lacks is added as categorical); ``exclude``
        drops fields from the family's list. ``scaling`` picks how numeric fields
        map to 0..1 (``"minmax"``: log1p where heavy-tailed, then min-max;
        ``"quantile"``: ``knots`` training quantiles, default
        :data:`DEFAULT_KNOTS`); it defaults to the family's.
        """
        if family not in FAMILIES:
            raise UsageError(
                f"unknown feature family {family!r}; known: {list(FAMILIES)}"
            )
        spec = FAMILIES[family]
        scaling = spec.scaling if scaling is None else scaling
        if scaling not in SCALINGS:
            raise UsageError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        knots = DEFAULT_KNOTS if knots is None else int(knots)
        if knots < 2:
            raise UsageError(f"a quantile map needs at least 2 knots, got {knots}")
        columns = _as_columns(columns)
        excluded = set(exclude)

        # Which fields: the family's list, or every numeric column for CSV families.
        caps = {**spec.categorical, **(max_categories or {})}
        cat_names = [n for n in caps if n not in excluded]
        if spec.numeric is not None:
            num_names = [n for n in spec.numeric if n not in excluded]
        else:
            num_names = [
                n for n in columns
                if n not in NEVER_FEATURES and n not in caps and n not in excluded
                and _is_numeric_column(columns[n])
            ]
        if spec.numeric is None:
            cat_names = [n for n in cat_names if n in columns]
        history = spec.history if spec.history not in excluded else None
        needed = num_names + cat_names + ([history] if history else [])
        missing = [n for n in needed if n not in columns]
        if missing:
            raise BadInputError(
                f"training columns lack {missing} required by the {family!r} family",
                column=missing[0],
            )
        if _column_length(columns, needed) == 0:
            raise BadInputError("cannot fit an encoder on zero training rows")

        # Fit each field.
        numeric = [
            _fit_numeric(
                n, _to_float(columns[n], n), n in spec.nullable, scaling, knots
            )
            for n in num_names
        ]
        categorical = [
            _fit_categorical(n, columns[n], caps[n], n in spec.nullable)
            for n in cat_names
        ]
        enc = cls(
            family,
            numeric,
            categorical,
            history,
            window if window is not None else spec.window,
            group_by if group_by is not None else spec.group_by,
            scaling,
        )
        logger.info(
            "fitted %s encoder: %d fields -> %d features (%s scaling, %d log-scaled)",
            family, len(needed), enc.n_features, scaling, sum(f.log for f in numeric),
        )
        return enc

    # ---- transforming --------------------------------------------------------------

    def transform(self, columns: Any) -> np.ndarray:
        """Encode N flows given as columns; returns float32 [N, n_features]."""
        columns = _as_columns(columns, self.input_fields)
        missing = [n for n in self.input_fields if n not in columns]
        if missing:
            raise BadInputError(
                f"flows lack the columns {missing} that this {self.family!r} encoder "
                "reads", column=missing[0],
            )
        n = _column_length(columns, self.input_fields)
        out = np.zeros((n, self.n_features), dtype=np.float32)

        # Numeric fields: log1p where fitted, min-max, clip; nulls to 0 and flagged.
        if self.numeric:
            raw = np.empty((n, len(self.numeric)), dtype=np.float64)
            for j, name in enumerate(self._num_names):
                raw[:, j] = _to_float(columns[name], name)
            self._numeric_block(raw, out)

        # Categorical fields: one 1 per row inside each field's block.
        rows = np.arange(n)
        for f, offset in zip(self.categorical, self._cat_offsets, strict=True):
            out[rows, offset + _category_codes(columns[f.name], f)] = 1.0

        # History flags.
        if self.history is not None:
            self._history_block(columns[self.history], out)
        return out

    def _numeric_block(self, raw: np.ndarray, out: np.ndarray) -> None:
        """Scale the raw numeric matrix [N, n_numeric] into ``out`` in place."""
        null = np.isnan(raw)
        if self._num_log.any():
            logged = raw[:, self._num_log]
            with np.errstate(invalid="ignore"):
                raw[:, self._num_log] = np.log1p(np.maximum(logged, 0.0))
        with np.errstate(invalid="ignore"):
            scaled = np.clip((raw - self._num_lo) / self._num_span, 0.0, 1.0)
            for j, knots in self._num_quantiles:
                scaled[:, j] = quantile_levels(raw[:, j], knots)
        scaled[:, self._num_const] = np.where(
            raw[:, self._num_const] > self._num_lo[self._num_const], 1.0, 0.0
        )
        scaled[null] = 0.0
        out[:, self._num_value_cols] = scaled
        flagged = self._num_null_cols >= 0
        if flagged.any():
            out[:, self._num_null_cols[flagged]] = null[:, flagged]

    def _history_block(self, values: Any, out: np.ndarray) -> None:
        """Write the history letter flags (and null flag) into ``out`` in place."""
        width = len(HISTORY_LETTERS) * 2 + 2
        cache = self._history_cache
        block = np.empty((len(values), width), dtype=np.float32)
        null_row = np.zeros(width, dtype=np.float32)
        null_row[-1] = 1.0
        for row, value in enumerate(values):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                block[row] = null_row
                continue
            flags = cache.get(value)
            if flags is None:
                flags = np.append(_history_row(str(value)), np.float32(0.0))
                if len(cache) < 4096:
                    cache[value] = flags
            block[row] = flags
        out[:, self._history_offset : self._history_offset + width] = block

    def transform_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Encode a small batch of flow records (dicts); float32 [len(records), F]."""
        fields = self.input_fields
        try:
            columns = {name: [r[name] for r in records] for name in fields}
        except KeyError as exc:
            raise BadInputError(
                f"a flow record lacks the field {exc.args[0]!r} that this "
                f"{self.family!r} encoder reads", column=str(exc.args[0]),
            ) from None
        return self.transform(columns)

    def transform_record(self, record: Mapping[str, Any]) -> np.ndarray:
        """Encode one flow record (a dict); float32 [F], equal to the batch row.

        A shorter path than a batch of one: the same numeric kernel on a 1-row
        matrix, and cached lookups for categories and history strings.
        """
        try:
            out = np.zeros((1, self.n_features), dtype=np.float32)

            # Numeric fields through the batch kernel, on one row.
            if self.numeric:
                values = [record[name] for name in self._num_names]
                try:
                    raw = np.array([values], dtype=np.float64)
                except (TypeError, ValueError):
                    raw = np.array(
                        [[_to_float([v], n)[0] for v, n in
                          zip(values, self._num_names, strict=True)]]
                    )
                self._numeric_block(raw, out)

            # Categorical fields and history.
            row = out[0]
            for f, offset in zip(self.categorical, self._cat_offsets, strict=True):
                value = record[f.name]
                try:
                    code = self._record_codes[f.name][value]
                except (KeyError, TypeError):
                    code = _code_of(category_key(value), f)
                    self._remember_code(f.name, value, code)
                row[offset + code] = 1.0
            if self.history is not None:
                self._history_block([record[self.history]], out)
        except KeyError as exc:
            raise BadInputError(
                f"a flow record lacks the field {exc.args[0]!r} that this "
                f"{self.family!r} encoder reads", column=str(exc.args[0]),
            ) from None
        return row

    def _remember_code(self, name: str, value: Any, code: int) -> None:
        """Cache a category code for :meth:`transform_record` (bounded per field)."""
        cache = self._record_codes[name]
        if len(cache) < 4096:
            try:
                cache[value] = code
            except TypeError:
                pass

    # ---- saving --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The feature spec as plain JSON-ready data."""
        return {
            "schema": SPEC_SCHEMA,
            "family": self.family,
            "window": self.window,
            "group_by": self.group_by,
            "scaling": self.scaling,
            "numeric": [
                {"name": f.name, "log": f.log, "lo": f.lo, "hi": f.hi,
                 "null_indicator": f.null_indicator,
                 **({} if f.quantiles is None else {"quantiles": list(f.quantiles)})}
                for f in self.numeric
            ],
            "categorical": [
                {"name": f.name, "categories": list(f.categories),
                 "null_indicator": f.null_indicator}
                for f in self.categorical
            ],
            "history": self.history,
            "history_letters": HISTORY_LETTERS,
            "feature_names": list(self.feature_names),
        }

    def to_json(self) -> str:
        """The feature spec as JSON text (floats written exactly)."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], source: str = "<spec>") -> Encoder:
        """Rebuild an encoder from :meth:`to_dict` data; checks it is well formed."""
        if spec.get("schema") != SPEC_SCHEMA:
            raise ModelError(
                f"{source}: not a gatewatch encoder spec (schema "
                f"{spec.get('schema')!r}, expected {SPEC_SCHEMA!r})"
            )
        if spec.get("history") and spec.get("history_letters") != HISTORY_LETTERS:
            raise ModelError(f"{source}: history letters differ from this version's")
        try:
            enc = cls(
                spec["family"],
                [
                    NumericField(d["name"], bool(d["log"]), *_spec_range(d, source),
                                 bool(d["null_indicator"]), _spec_quantiles(d, source))
                    for d in spec["numeric"]
                ],
                [
                    CategoricalField(d["name"], [str(c) for c in d["categories"]],
                                     bool(d["null_indicator"]))
                    for d in spec["categorical"]
                ],
                spec.get("history"),
                int(spec["window"]),
                spec["group_by"],
                # Specs written before quantile scaling existed are min-max.
                spec.get("scaling", "minmax"),
            )
        except UsageError as exc:
            raise ModelError(f"{source}: malformed encoder spec ({exc})") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: malformed encoder spec ({exc!r})") from exc
        if "feature_names" in spec and list(spec["feature_names"]) != enc.feature_names:
            raise ModelError(f"{source}: feature_names disagree with the fields")
        return enc

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> Encoder:
        """Rebuild an encoder from :meth:`to_json` text."""
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{source}: encoder spec is not JSON ({exc})") from exc
        if not isinstance(spec, dict):
            raise ModelError(f"{source}: encoder spec must be a JSON object")
        return cls.from_dict(spec, source)

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON to ``path``; returns the path."""
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Encoder:
        """Read a spec written by :meth:`save`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelError(f"{path}: cannot read encoder spec ({exc})") from exc
        return cls.from_json(text, source=str(path))

    def __repr__(self) -> str:
        return (
            f"Encoder(family={self.family!r}, n_features={self.n_features}, "
            f"window={self.window}, group_by={self.group_by!r})"
        )
