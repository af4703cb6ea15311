"""Artifact folders: decision thresholds with the escalation band, and the manifest.

Escalation band rule (chosen on validation scores of the exported model, never on
test): ``decision`` is the best-F1 cut. ``escalate_low`` is the 1st percentile of the
scores of malicious validation windows, capped at ``decision`` (so at most ~1 % of the
attacks seen in validation fall silently under it). ``alert`` is the lowest cut, at
or above ``decision``, at which at least 99 % of the validation windows scoring at or
above it are malicious (else the highest validation score, so nothing doubtful is
alerted on). Benign below ``escalate_low``, escalate in ``[escalate_low, alert)``,
alert at or above ``alert``.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.runtime import SCHEMA_VERSION, sha256_file

__all__ = ["escalation_band", "library_versions", "write_manifest", "write_thresholds"]

REPO = Path(__file__).resolve().parent.parent
MISS_SHARE = 0.01
ALERT_PRECISION = 0.99


def escalation_band(
    y: np.ndarray,
    prob: np.ndarray,
    decision: float,
    miss_share: float = MISS_SHARE,
    alert_precision: float = ALERT_PRECISION,
) -> tuple[float, float]:
    """``(escalate_low, alert)`` by the rule in the module docstring."""
    y = np.asarray(y).astype(np.int64)
    p = np.asarray(prob, dtype=np.float64)
    malicious = p[y == 1]
    lo = float(np.quantile(malicious, miss_share)) if malicious.size else decision
    lo = min(lo, decision)

    # Precision of "alert at or above c" for each candidate cut c >= decision.
    hi = float(p.max()) if p.size else decision
    for cut in np.unique(p[p >= decision]):
        flagged = p >= cut
        if flagged.any() and y[flagged].mean() >= alert_precision:
            hi = float(cut)
            break
    return lo, max(hi, decision)


def write_thresholds(folder: Path, decision: float, lo: float, hi: float) -> Path:
    """``thresholds.json`` per docs/contracts.md, plus the rule that chose it."""
    path = folder / "thresholds.json"
    data = {
        "decision": float(decision),
        "escalate_low": float(lo),
        "alert": float(hi),
        "rule": (
            f"decision: best F1 on validation; escalate_low: {MISS_SHARE:.0%} quantile "
            f"of malicious validation scores (<= decision); alert: lowest cut >= "
            f"decision with validation precision >= {ALERT_PRECISION:.0%}"
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
