"""The report's figures (matplotlib, Agg backend, small PNGs).

* ``size_vs_f1.png``: file size against test F1, one panel per dataset, with the
  search candidates compress exported but did not publish (light blue), and the
  Pareto frontier (no other model is both smaller and better) ringed and joined;
* ``latency_vs_f1.png``: batch-1 latency (median of the repeats, bars from the
  fastest to the slowest repeat) against test F1, with its frontier;
* ``latency_<dataset>.png``: the distribution of every batch-1 sample per model and
  target (box: quartiles; whiskers: 1st and 99th percentiles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["pareto", "write_all"]

DPI = 80
COLORS = {"teacher": "tab:red", "student": "tab:blue", "baseline": "tab:gray",
          "candidate": "tab:cyan"}


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x and higher y.

    A point is on the frontier when no other point has ``x <=`` and ``y >=`` with
    one of them strict. Returned sorted by x.

    >>> pareto([(1, 0.5), (2, 0.9), (3, 0.8), (0.5, 0.4)])
    [3, 0, 1]
    """
    keep = []
    for i, (x, y) in enumerate(points):
        beaten = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not beaten:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def _human(value: float, _pos: int | None = None) -> str:
    """Tick label like 5k or 1.2M."""
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _label(rec: dict[str, Any], one_student: bool) -> str:
    model = rec["model"].replace("student-", "")
    if rec["family"] == "baseline":
        return model
    if rec["family"] == "student" and one_student:
        return rec["target"]
    return f"{model} {rec['target']}"


def _scatter(ax, recs: list[dict[str, Any]], xkey: str, title: str,
             xrange: str | None = None) -> None:
    pts, kept = [], []
    for rec in recs:
        x, y = rec.get(xkey), rec.get("f1")
        if x is None or y is None or x <= 0:
            continue
        pts.append((float(x), float(y)))
        kept.append(rec)
    students = {r["model"] for r in kept if r["family"] == "student"}
    one = len(students) == 1
    if one:
        title += f" (student {next(iter(students)).replace('student-', '')})"
    n = 0
    for rec, (x, y) in zip(kept, pts, strict=True):
        color = COLORS.get(rec["family"], "black")
        if rec["family"] == "candidate":
            # Search candidates: small, hollow, unlabeled, under the published ones.
            ax.plot([x], [y], "o", ms=4, mfc="none", mec=color, zorder=1)
            continue
        n += 1
        if xrange and rec.get(xrange):
            lo, hi = rec[xrange]
            ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt="o", color=color,
                        ms=5, capsize=2, lw=0.8)
        else:
            ax.plot([x], [y], "o", color=color, ms=5)
        # Staggered labels, so models of (nearly) equal size stay readable.
        ax.annotate(_label(rec, one), (x, y), fontsize=6,
                    xytext=(4, -10 + 7 * (n % 4)),
                    textcoords="offset points")
    front = pareto(pts)
    if front:
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        ax.plot(fx, fy, "o", ms=11, mfc="none", mec="tab:green", mew=1.2,
                label="Pareto frontier")
        ax.step(fx, fy, where="post", color="tab:green", lw=1, ls="--")
    if any(r["family"] == "candidate" for r in kept):
        ax.plot([], [], "o", ms=4, mfc="none", mec=COLORS["candidate"],
                label="search candidate (not published)")
    if front or kept:
        ax.legend(fontsize=6, loc="best")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(_human))
    xs = [x for x, _ in pts]
    narrow = bool(xs) and max(xs) / min(xs) < 20
    ax.xaxis.set_minor_formatter(FuncFormatter(_human) if narrow else NullFormatter())
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("F1 (test)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _other_candidates(results: dict[str, Any], name: str,
                      recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exported search candidates (e.g. the unpruned or pruned twin) not published."""
    published = {(r["model"], r["target"]) for r in recs}
    out = []
    for row in results.get("candidates", {}).get(name, []):
        if row.get("test_f1") is None or not row.get("size_bytes"):
            continue
        ratio = float(row.get("prune") or 0.0)
        model = "student-" + str(row["student"]).replace("-", "")
        if ratio:
            model += f"-pruned{int(round(ratio * 100))}"
        if (model, row["target"]) in published:
            continue
        published.add((model, row["target"]))
        out.append({"model": model + " (cand.)", "family": "candidate",
                    "target": row["target"], "size_bytes": row["size_bytes"],
                    "f1": row["test_f1"]})
    return out


def _panels(results: dict[str, Any], xkey: str, xlabel: str, out: Path,
            xrange: str | None = None, candidates: bool = False) -> str | None:
    import matplotlib.pyplot as plt

    datasets = [d for d in results.get("settings", {}).get("datasets", [])
                if any(r["dataset"] == d for r in results["records"])]
    if not datasets:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.6),
                             squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        recs = [r for r in results["records"] if r["dataset"] == name]
        if candidates:
            recs += _other_candidates(results, name, recs)
        _scatter(ax, recs, xkey, name, xrange)
        ax.set_xlabel(xlabel, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out.name


def _distributions(name: str, samples: dict[str, np.ndarray], out: Path) -> str | None:
    import matplotlib.pyplot as plt

    keys = [k for k, v in samples.items() if len(v)]
    if not keys:
        return None
    data = [samples[k] for k in keys]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(keys) + 2), 3.6))
    ax.boxplot(data, whis=(1, 99), showfliers=False)
    ax.set_xticks(range(1, len(keys) + 1))
    ax.set_xticklabels([k.replace("student-", "").replace("/", "\n") for k in keys],
                       fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("batch-1 latency per flow (µs)", fontsize=8)
    ax.set_title(f"{name}: latency per target (box: quartiles, whiskers: p1-p99)",
                 fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out.name


def write_all(results: dict[str, Any], samples: dict[str, dict[str, np.ndarray]],
              out: Path) -> dict[str, str]:
    """Write every figure into ``out``; returns figure kind -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    made: dict[str, str] = {}
    name = _panels(results, "size_bytes", "file size (bytes)",
                   out / "size_vs_f1.png", candidates=True)
    if name:
        made["size_vs_f1"] = name
    name = _panels(results, "latency_us_p50", "batch-1 latency p50 (µs)",
                   out / "latency_vs_f1.png", xrange="latency_us_p50_range")
    if name:
        made["latency_vs_f1"] = name
    for dataset, per in samples.items():
        name = _distributions(dataset, per, out / f"latency_{dataset}.png")
        if name:
            made[f"latency_{dataset}"] = name
    return made
