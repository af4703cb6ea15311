"""Artifact folders: decision thresholds with the escalation band, and the manifest.

Escalation band rule (chosen on validation scores of the exported model, never on
test). ``decision`` is the best-F1 cut. Two wishes set the widest band:
``escalate_low`` no higher than the 1st percentile of the malicious validation scores
(at most ~1 % of the attacks seen fall silently under it) and ``alert`` the lowest cut
at which at least 99 % of the validation windows at or above it are malicious. The
re-scorer's load then bounds it: at most 2.5 % of all validation windows may fall in
``[escalate_low, decision)`` and 2.5 % in ``[decision, alert)`` (5 % escalated), so
the band is narrowed to the tightest score values that keep those shares; a group of
tied scores (int8 outputs tie a lot) is kept whole or left out whole. A floor keeps
the band from closing: at least 1 % of the validation windows, the highest-scoring
of those below ``decision``, are escalated even where validation shows no doubt. A
student that separates its own captures perfectly is the one whose misses on
another network nobody would see otherwise (the demo's conn-log student had a band
of width zero). Benign below ``escalate_low``, escalate in ``[escalate_low, alert)``,
alert at or above ``alert``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.runtime import (
    SCHEMA_VERSION,
    doubt_floor,
    midway_below,
    sha256_file,
)

__all__ = [
    "escalation_band",
    "library_versions",
    "portable_argv",
    "portable_path",
    "write_manifest",
    "write_thresholds",
]

REPO = Path(__file__).resolve().parent.parent
DATA_VAR = "GATEWATCH_DATA"
MISS_SHARE = 0.01
ALERT_PRECISION = 0.99
ESCALATE_SHARE = 0.05
MIN_DOUBT_SHARE = 0.01


def escalation_band(
    y: np.ndarray,
    prob: np.ndarray,
    decision: float,
    miss_share: float = MISS_SHARE,
    alert_precision: float = ALERT_PRECISION,
    escalate_share: float = ESCALATE_SHARE,
    min_doubt_share: float = MIN_DOUBT_SHARE,
) -> tuple[float, float]:
    """``(escalate_low, alert)`` by the rule in the module docstring."""
    y = np.asarray(y).astype(np.int64)
    p = np.asarray(prob, dtype=np.float64)
    n = max(len(p), 1)
    half = escalate_share / 2

    # The widest band the miss and precision wishes ask for.
    malicious = p[y == 1]
    lo = float(np.quantile(malicious, miss_share)) if malicious.size else decision
    lo = min(lo, decision)
    hi = float(np.nextafter(p.max(), np.inf)) if p.size else decision
    for cut in np.unique(p[p >= decision]):
        flagged = p >= cut
        if y[flagged].mean() >= alert_precision:
            hi = float(cut)
            break

    # Narrow it to the share of traffic the re-scorer is to take.
    below = np.unique(p[(p >= lo) & (p < decision)])
    for value in below:  # ascending: the first that fits is the widest
        if np.mean((p >= value) & (p < decision)) <= half:
            lo = float(value)
            break
    else:
        lo = decision
    lo = doubt_floor(p, decision, lo, min(min_doubt_share, half), half)
    above = np.unique(np.r_[p[(p > decision) & (p <= hi)], hi])
    cap = decision
    for value in above:  # ascending: keep the last cut that still fits
        if np.sum((p >= decision) & (p < value)) / n > half:
            break
        cap = float(value)
    hi = max(decision, min(hi, cap))

    # Each edge halfway below the score it was chosen at (as the decision is).
    if lo < decision:
        lo = midway_below(p, lo)
    if hi > decision:
        hi = midway_below(p, hi, floor=decision)
    return float(lo), float(hi)


# How each --threshold-rule chose the decision threshold, in thresholds.json's words.
DECISION_RULES = {
    "f1": "best F1 on validation",
    "teacher-rate": "the cut flagging as large a share of validation windows as "
                    "the teacher flags (teacher-rate)",
}


def write_thresholds(folder: Path, decision: float, lo: float, hi: float,
                     rule: str = "f1") -> Path:
    """``thresholds.json`` per docs/contracts.md, plus the rule that chose it:
    ``rule`` is the run's ``--threshold-rule`` (f1 or teacher-rate)."""
    if rule not in DECISION_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of "
                         f"{', '.join(DECISION_RULES)}")
    path = folder / "thresholds.json"
    data = {
        "decision": float(decision),
        "escalate_low": float(lo),
        "alert": float(hi),
        "rule": (
            f"decision: {DECISION_RULES[rule]}; escalate_low >= {MISS_SHARE:.0%} "
            f"quantile of malicious validation scores; alert <= lowest cut with "
            f"validation precision >= {ALERT_PRECISION:.0%}; at most "
            f"{ESCALATE_SHARE / 2:.1%} of validation windows on each side of "
            f"decision, and at least {MIN_DOUBT_SHARE:.0%} of them in "
            "[escalate_low, decision) (the tie group right below the decision "
            "whole, when it alone is over that cap)"
        ),
        "chosen_on": "val",
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact (installed ones only)."""
    from importlib import metadata

    names = [
        "torch", "numpy", "onnx", "onnxruntime", "tensorflow-cpu", "keras",
        "ai-edge-litert", "torch-pruning", "neural-compressor", "tflite-micro",
    ]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(folder: Path, fields: dict[str, Any], files: list[str]) -> Path:
    """``manifest.json`` with the sha256 of ``files`` (names inside ``folder``)."""
    manifest = {"schema_version": SCHEMA_VERSION, **fields}
    manifest["sha256"] = {name: sha256_file(folder / name) for name in files}
    manifest["size_bytes"] = int(
        sum((folder / n).stat().st_size for n in files if n.startswith("model."))
        if fields.get("target") != "tflite-micro"
        else fields.get("size_bytes", 0)
    )
    manifest.setdefault("provenance", {})["git_commit"] = _git_commit()
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, default=_default) + "\n")
    return path


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _data_roots(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    roots = [data_dir, os.environ.get(DATA_VAR)]
    return [Path(r).resolve() for r in roots if r]


def portable_path(
    value: Any, base: Path, data_dir: str | os.PathLike[str] | None = None
) -> Any:
    """``value`` as a manifest may ship it, without this machine's build paths.

    A path under the data folder (``data_dir``, else ``$GATEWATCH_DATA``) becomes
    ``$GATEWATCH_DATA/<relative>``; any other path one relative to ``base`` (the
    artifact folder). Strings that are not paths (a dataset name such as
    ``nsl-kdd``, a flag) and other values are returned unchanged.
    """
    if not isinstance(value, str | os.PathLike):
        return value
    text = os.fspath(value)
    if not text or (os.sep not in text and not Path(text).exists()):
        return text
    if text.startswith(f"${DATA_VAR}/"):  # a teacher's provenance, portable already
        return text
    if not Path(text).is_absolute():
        # A teacher's provenance names registered data files relative to the
        # data folder (zeek-conn/...), whatever the folder it ran in.
        for root in _data_roots(data_dir):
            if (root / text).exists() and not Path(text).exists():
                return f"${DATA_VAR}/{Path(text).as_posix()}"
    path = Path(text).resolve()
    for root in _data_roots(data_dir):
        if path == root or root in path.parents:
            rel = path.relative_to(root).as_posix()
            return f"${DATA_VAR}/{rel}" if rel != "." else f"${DATA_VAR}"
    try:
        return Path(os.path.relpath(path, Path(base).resolve())).as_posix()
    except ValueError:  # another drive (Windows): the name alone
        return path.name


def portable_argv(
    argv: list[str], base: Path, data_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """The command line with every path in it made portable (:func:`portable_path`);
    ``--flag=PATH`` forms too. The program is recorded by its name only."""
    out = []
    for i, arg in enumerate(argv):
        if i == 0:
            out.append(Path(arg).name)
        elif arg.startswith("--") and "=" in arg:
            flag, _, val = arg.partition("=")
            out.append(f"{flag}={portable_path(val, base, data_dir)}")
        elif arg.startswith("-"):
            out.append(arg)
        else:
            out.append(portable_path(arg, base, data_dir))
    return out
