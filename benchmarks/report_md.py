"""``report.md`` from a run's ``results.json`` dict: tables, figures, the research.

Everything printed here was measured in the run the dict describes, except the one
column of the research tables marked "as published, not reproduced".
"""

from __future__ import annotations

from typing import Any

__all__ = ["PUBLISHED", "headline", "render"]

# Values the research we start from reports. Only what we know is listed; a missing
# entry is left out of the tables rather than guessed.
PUBLISHED: dict[str, dict[str, float]] = {
    "nsl-kdd": {"accuracy": 0.923},
}

RESEARCH_TABLES = (
    ("Table 1", "NSL-KDD", ("nsl-kdd", "nsl-kdd-20"),
     "The research reports {pub} accuracy on an NSL-KDD split it does not describe; "
     "we train on KDDTrain+{part} and test on KDDTest+ only, whose 17 attack types "
     "unseen in training make it the harder, honest test, with thresholds chosen on "
     "validation, so the two numbers measure different things."),
    ("Table 2", "ISCX-IDS (we use UNSW-NB15)", ("unsw-nb15",),
     "ISCX-IDS is not in our data, so this table uses UNSW-NB15 (its 82,332-row "
     "partition, split 80/10/10 stratified): another dataset with other attacks and "
     "features, so no number here is comparable with the research's ISCX-IDS "
     "results, whose values we do not know and so do not print."),
    ("Table 3", "CTU-13 (we use the CTU labeled Zeek conn logs)", ("ctu-conn",),
     "CTU-13's binetflow scenarios are not in our data; we use two labeled Zeek conn "
     "logs of the same lab (CTU-Normal-40 day 1 and Botnet-230-1 NjRAT, 6,655 flows) "
     "split row by row, where the same hosts appear in train and test, so near-"
     "perfect scores here say little about CTU-13, and no published value is known "
     "to us."),
)


def _f(value: Any, fmt: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, int | float):
        return format(value, fmt)
    return str(value)


def _size(value: Any) -> str:
    if value is None:
        return "–"
    if value >= 1e6:
        return f"{value / 1e6:.2f} MB"
    if value >= 1e3:
        return f"{value / 1e3:.1f} kB"
    return f"{value} B"


def _lat(rec: dict[str, Any]) -> str:
    p50 = rec.get("latency_us_p50")
    if p50 is None:
        return "–"
    rng = rec.get("latency_us_p50_range")
    if rng and rng[0] is not None and rec.get("repeats", 0) > 1:
        return f"{p50:.1f} ({rng[0]:.1f}–{rng[1]:.1f})"
    return f"{p50:.1f}"


def _tput(rec: dict[str, Any]) -> str:
    value = rec.get("throughput_flows_s")
    if value is None:
        return "–"
    rng = rec.get("throughput_flows_s_range")
    if rng and rng[0] is not None and rec.get("repeats", 0) > 1:
        return f"{value:,.0f} ({rng[0]:,.0f}–{rng[1]:,.0f})"
    return f"{value:,.0f}"


def _ratio(stats: Any) -> str:
    if not stats or stats.get("median") is None:
        return "–"
    return f"{stats['median']:.3g}× ({stats['min']:.3g}–{stats['max']:.3g})"


def _vs_teacher(rec: dict[str, Any]) -> str:
    if (rec["model"], rec["target"]) == ("teacher", "torch-fp32"):
        return "reference"
    if rec.get("latency_p50_vs_teacher"):
        return _ratio(rec["latency_p50_vs_teacher"])
    if rec.get("latency_p50_vs_fp32_in_compress"):
        return (f"{rec['latency_p50_vs_fp32_in_compress']:.3g}× (vs fp32 in the "
                "same compress call, 1 repeat)")
    return "–"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _datasets(results: dict[str, Any]) -> list[str]:
    names = list(results.get("settings", {}).get("datasets", []))
    return [n for n in names if any(r["dataset"] == n for r in results["records"])]


def _headline(results: dict[str, Any]) -> list[str]:
    rows = []
    for name in _datasets(results):
        recs = [r for r in results["records"] if r["dataset"] == name]
        baselines = [r for r in recs if r["family"] == "baseline"]
        best = max(baselines, key=lambda r: r.get("f1") or 0, default=None)
        chosen = [r for r in recs if r["family"] != "baseline"]
        if best is not None:
            chosen.append(best)
        for r in chosen:
            rows.append([
                name, r["model"], r["target"], _f(r.get("params"), ","),
                _size(r.get("size_bytes")), _f(r.get("f1")), _f(r.get("accuracy")),
                _lat(r), _tput(r),
                _vs_teacher(r),
            ])
    return _table(["dataset", "model", "target", "params", "size", "F1", "accuracy",
                   "p50 µs (min–max)", "flows/s b256 (min–max)",
                   "latency vs teacher"], rows)


def _all_models(results: dict[str, Any], name: str) -> list[str]:
    rows = []
    for r in results["records"]:
        if r["dataset"] != name:
            continue
        rows.append([
            r["model"], r["target"], str(r.get("runtime") or "–"),
            _f(r.get("params"), ","), _size(r.get("size_bytes")),
            _f(r.get("accuracy")), _f(r.get("precision")), _f(r.get("recall")),
            _f(r.get("f1")), _f(r.get("roc_auc")), _f(r.get("fpr")), _lat(r),
            _f(r.get("latency_us_p99"), ".1f"), _tput(r), str(r.get("repeats", 0)),
        ])
    return _table(["model", "target", "runtime", "params", "size", "acc", "prec",
                   "rec", "F1", "ROC-AUC", "FPR", "p50 µs", "p99 µs", "flows/s b256",
                   "rep"], rows)


def _research(results: dict[str, Any]) -> list[str]:
    lines = []
    for label, title, names, why in RESEARCH_TABLES:
        name = next((n for n in names if n in _datasets(results)), None)
        lines += ["", f"### {label}: {title}", ""]
        if name is None:
            lines.append("Not measured in this run (dataset not included).")
            continue
        pub = PUBLISHED.get(names[0], {})
        head = ["model", "accuracy", "precision", "recall", "F1", "FPR", "ROC-AUC"]
        rows = []
        for r in results["records"]:
            if r["dataset"] != name:
                continue
            rows.append([f"ours: {r['model']} {r['target']}"] + [
                _f(r.get(k)) for k in ("accuracy", "precision", "recall", "f1",
                                       "fpr", "roc_auc")])
        if pub:
            rows.append(["research CNN-BiLSTM (**as published, not reproduced**)"] + [
                _f(pub.get(k)) for k in ("accuracy", "precision", "recall", "f1",
                                         "fpr", "roc_auc")])
        lines += _table(head, rows)
        part = " (its 20 % subset)" if name == "nsl-kdd-20" else ""
        text = why.format(pub=_f(pub.get("accuracy"), ".1%"), part=part)
        ours = next((r for r in results["records"] if r["dataset"] == name
                     and (r["model"], r["target"]) == ("teacher", "torch-fp32")), None)
        mine = (f" Our teacher (torch fp32): accuracy {_f(ours.get('accuracy'), '.1%')}"
                f", F1 {_f(ours.get('f1'), '.3f')}." if ours else "")
        lines += ["", f"Dataset run: `{name}`.{mine} Why the numbers differ: {text}"]
    return lines


def _rng(stats: Any, fmt: str) -> str:
    if not stats or stats.get("median") is None:
        return "–"
    if stats["min"] == stats["max"]:
        return format(stats["median"], fmt)
    return (f"{format(stats['median'], fmt)} ({format(stats['min'], fmt)}–"
            f"{format(stats['max'], fmt)})")


def _meter(meter: dict[str, Any]) -> list[str]:
    cap = meter.get("capture", {})
    rows = []
    for tool, label in (("meter", "gatewatch flows.meter (child, one core)"),
                        ("tshark", "tshark -q -z conv,tcp"),
                        ("nfstream", "NFStream")):
        r = meter.get(tool)
        if not r:
            continue
        rows.append([label, _rng(r.get("packets_s"), ",.0f"),
                     _rng(r.get("packets_per_cpu_s"), ",.0f"), str(r.get("flows")),
                     _rng(r.get("peak_rss_mib"), ".0f")])
    return [
        f"**Flow meter vs tshark** on one capture built by "
        f"`benchmarks.bench_meter` ({cap.get('packets', 0):,} packets, "
        f"{cap.get('bytes', 0) / 1e6:.1f} MB, {cap.get('repetitions')} repetitions "
        f"of {len(cap.get('sources', []))} shared captures), tools in turn:", "",
        *_table(["tool", "packets/s (wall)", "packets per CPU s", "flows",
                 "peak RSS MiB"], rows), "",
        f"Meter / tshark packets/s per paired repeat: wall "
        f"{_ratio(meter.get('meter_over_tshark'))}, CPU "
        f"{_ratio(meter.get('meter_over_tshark_cpu'))}"
        + (f"; meter / NFStream (one run): {_ratio(meter['meter_over_nfstream'])}"
           if meter.get("meter_over_nfstream") else "")
        + f". tshark counts TCP conversations only. "
        f"{meter.get('nfstream_note', '')}", "",
        *([] if meter.get("tshark") else [
            "tshark was not installed on this machine (or did not run), so it has "
            "no row and the meter / tshark ratios are –.", ""]),
    ]


def _bench_agent(ba: dict[str, Any]) -> list[str]:
    """bench_agent.py's JSON as a table (its keys read defensively)."""
    rows = []
    for key, label in (("throughput_artifact_thresholds", "artifact thresholds"),
                       ("throughput", "site thresholds (edge-agent calibrate)"),
                       ("throughput_benign_flows", "benign flows only")):
        tp = ba.get(key)
        if isinstance(tp, dict):
            rows.append([f"flows/s, whole path, no broker, {label}",
                         f"{_f(tp.get('flows_per_s'), ',')} "
                         f"({_f(tp.get('escalations'), ',')} escalations; "
                         f"encode / window / score alone, best of "
                         f"{tp.get('repeats', 1)} as the whole path: "
                         f"{_f(tp.get('encode_flows_per_s'), ',')} / "
                         f"{_f(tp.get('window_flows_per_s'), ',')} / "
                         f"{_f(tp.get('score_flows_per_s'), ',')})"])
    lat = ba.get("latency")
    if isinstance(lat, dict):
        rate = _f(lat.get("rate_flows_per_s"), ",.0f")
        rows.append([f"decision latency paced at {rate} flows/s (max wait "
                     f"{lat.get('max_wait_ms')} ms), p50 / p99 ms",
                     f"{_f(lat.get('decision_ms_p50'), '.2f')} / "
                     f"{_f(lat.get('decision_ms_p99'), '.2f')}"])
        rows.append(["batch of one, p50 / p99 ms",
                     f"{_f(lat.get('batch_of_one_ms_p50'), '.3f')} / "
                     f"{_f(lat.get('batch_of_one_ms_p99'), '.3f')}"])
    rts = ba.get("round_trip")
    for rt in rts if isinstance(rts, list) else [rts] if rts else []:
        rows.append([f"escalation → verdict via {rt.get('broker')} + teacher serve at "
                     f"{_f(rt.get('rate_target_per_s'), ',.0f')}/s, p50 / p99 ms",
                     f"{_f(rt.get('round_trip_ms_p50'), '.2f')} / "
                     f"{_f(rt.get('round_trip_ms_p99'), '.2f')} "
                     f"({rt.get('verdicts')} verdicts of {rt.get('escalations')}, "
                     f"achieved {_f(rt.get('rate_achieved_per_s'), ',')}/s)"])
    rss = ba.get("rss")
    if isinstance(rss, dict):
        parts = rss.items() if "peak_rss_mb" not in rss else [("run", rss)]
        for name, r in parts:
            if isinstance(r, dict):
                note = (f" (exit {r.get('exit_code')}: {str(r.get('summary'))[:80]})"
                        if r.get("exit_code") else "")
                rows.append([f"edge-agent run peak RSS (VmHWM), source {name}, MiB",
                             _f(r.get("peak_rss_mb"), ".1f") + note])
    return [
        f"**Agent, via `benchmarks/bench_agent.py`** (artifact "
        f"`{str(ba.get('artifact', '?')).rsplit('/', 1)[-1]}`; one run each, many "
        "samples):", "", *_table(["measure", "value"], rows), "",
    ]


def _pipeline(results: dict[str, Any]) -> list[str]:
    pipe = results.get("pipeline", {})
    lines = []
    if pipe.get("meter"):
        lines += _meter(pipe["meter"])
    if pipe.get("bench_agent"):
        lines += _bench_agent(pipe["bench_agent"])
    agent = pipe.get("agent")
    if agent:
        fs, paced = agent.get("flows_s") or {}, agent.get("paced") or {}
        bf = agent.get("benign_flows_s") or {}
        lines += [
            f"**Agent, repeated here** (`{agent['artifact'].rsplit('/', 1)[-1]}` "
            f"artifact, {agent['flows']:,} records of `{agent['input']}`, no broker, "
            f"median (min–max) of repeats): "
            f"{_rng(fs, ',.0f')} flows/s scoring, deciding and storing escalations "
            f"in the outbox; decisions {agent.get('decisions')}. On its "
            f"{agent.get('benign_flows'):,} benign flows only: {_rng(bf, ',.0f')} "
            f"flows/s. Paced at {paced.get('rate_flows_s'):,.0f} flows/s "
            f"({paced.get('input')}): decision latency p50 "
            f"{_f(paced.get('decision_ms_p50'), '.2f')} ms, p99 "
            f"{_f(paced.get('decision_ms_p99'), '.2f')} ms.", "",
        ]
    proc = pipe.get("agent_process")
    if proc:
        lines += [
            f"**Agent process** (`edge-agent run`, {proc.get('runs')} runs on "
            f"{proc.get('flows_per_run')} flows, an escalation sink subscribed): "
            f"start to retained online status "
            f"{_rng(proc.get('startup_to_online_s'), '.2f')} s; peak RSS (VmHWM) "
            f"{_rng(proc.get('peak_rss_mib'), '.0f')} MiB; wall per run "
            f"{_rng(proc.get('wall_s'), '.2f')} s.", "",
        ]
    broker = pipe.get("broker")
    if broker:
        rt = broker.get("round_trip_ms") or {}
        proc = broker.get("agent_process") or {}
        lines += [
            f"**Escalation → verdict** through {broker['broker']} with `teacher serve`"
            f": p50 {_f(rt.get('p50'), '.2f')} ms, p99 {_f(rt.get('p99'), '.2f')} ms "
            f"over {rt.get('n')} sequential escalations ({rt.get('lost')} "
            f"unanswered). **Agent process**: start to online status "
            f"{_rng(proc.get('startup_to_online_s'), '.2f')} s, peak RSS "
            f"{_rng(proc.get('peak_rss_mib'), '.0f')} MiB.", "",
        ]
    if pipe.get("agent_note"):
        lines += [pipe["agent_note"], ""]
    return lines or ["Not measured in this run."]


def _candidates(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, rows in results.get("candidates", {}).items():
        if not rows:
            continue
        lines += ["", f"`{name}`:", ""]
        lines += _table(
            ["target", "student", "prune", "quant", "params", "bytes", "val F1",
             "test F1", "passed", "note"],
            [[r["target"], r["student"], _f(r.get("prune"), ".2f"), r.get("quant") or
              "–", _f(r.get("params"), ","), _f(r.get("size_bytes"), ","),
              _f(r.get("val_f1")), _f(r.get("test_f1")),
              "yes" if r.get("passed") else "no", r.get("note") or ""]
             for r in rows])
    return lines


def headline(results: dict[str, Any], prefix: str = "") -> str:
    """The headline table and the size-vs-F1 plot, for the README (``prefix``:
    the path from the README to the run's folder)."""
    lines = ["Measured by `python -m benchmarks run` "
             f"({results.get('started')}; test splits; one CPU thread):", "",
             *_headline(results), ""]
    if "size_vs_f1" in results.get("plots", {}):
        lines += [f"![Size vs F1]({prefix}{results['plots']['size_vs_f1']})", ""]
    return "\n".join(lines)


def _default_command(results: dict[str, Any]) -> str:
    """The command line of a run whose results do not record theirs (older runs)."""
    return f"python -m benchmarks run{' --quick' if results.get('quick') else ''}"


def _gate_note(settings: dict[str, Any]) -> list[str]:
    """A line saying the quality gate was off (quick mode lets every student pass:
    max_f1_drop 1.0), so nobody reads a listed student as one that met it."""
    drop = settings.get("max_f1_drop")
    if not isinstance(drop, (int, float)) or drop < 1.0:
        return []
    return [f"**The quality gate was off in this run** (`max_f1_drop` {drop}"
            f"{', quick mode' if settings.get('quick') else ''}): every student is "
            "listed whatever its F1 drop from the teacher; a full run keeps only "
            "students within 0.01 of it.", ""]


def render(results: dict[str, Any]) -> str:
    """The whole report as Markdown text."""
    s = results.get("settings", {})
    name = "quick" if results.get("quick") else "full"
    lines = [
        f"# gatewatch benchmarks ({name} run)", "",
        f"Started {results.get('started')}, {results.get('wall_s', 0) / 60:.1f} min, "
        f"git `{(results.get('git_commit') or '?')[:12]}`. Reproduce with "
        f"`{s.get('command') or _default_command(results)}`. "
        "Every number below was measured in this run; timings are the median of "
        f"{s.get('repeats')} repeats (min–max in brackets), the repeats of all "
        "models taking turns, on one thread; ratios are taken per repeat within the "
        "run. Accuracy figures are on each dataset's test split, with decision "
        "thresholds chosen on validation. Student timings are of what the edge agent "
        "runs, `Scorer.score()`: the runtime's call plus numpy's input quantization "
        "and output scaling (several µs of a tflite-int8 student's p50), not the "
        "runtime's bare invoke; a TFLite graph that cannot be resized (the CNN "
        "students' batch-1 reshape) is scored one window per call at b256.", "",
        "## Headline", "",
        *_gate_note(s),
        *_headline(results), "",
    ]
    plots = results.get("plots", {})
    for key, title in (("size_vs_f1", "Size vs F1"),
                       ("latency_vs_f1", "Latency vs F1")):
        if key in plots:
            lines += [f"![{title}]({plots[key]})", ""]
    lines += ["## Every model, target and dataset (test split)", ""]
    for ds in _datasets(results):
        info = results.get("datasets", {}).get(ds, {})
        lines += [f"### {ds}", "",
                  f"Rows {info.get('rows')}, window {info.get('window')}, "
                  f"{info.get('n_features')} features, test share malicious "
                  f"{_f(info.get('test_positive_share'), '.3f')}.", "",
                  *_all_models(results, ds), ""]
        if f"latency_{ds}" in plots:
            lines += [f"![latency distributions {ds}]({plots[f'latency_{ds}']})", ""]
    lines += ["## The research's tables side by side", *_research(results), ""]
    lines += ["## Pipeline", "", *_pipeline(results)]
    lines += ["## Compression search (every candidate `compress` tried)",
              *_candidates(results), ""]
    for ds, gate in results.get("compress_gate", {}).items():
        if gate.get("relaxed"):
            lines += [f"**`{ds}`: no student passed the default gate (validation F1 "
                      "within 0.01 of the teacher); the search was run again with "
                      f"`--max-f1-drop {gate['max_f1_drop']}`**, so its students are "
                      f"up to that much below the teacher. First attempt: "
                      f"{gate.get('first_attempt', '')}", ""]
    failed = results.get("compress_failed")
    if failed:
        lines += [f"Targets not made: {failed}", ""]
    lines += ["## Machine and versions", "",
              f"Machine: {results.get('machine')}", "",
              f"Versions: {results.get('versions')}", "",
              f"Settings: {s}", "", "## Steps", ""]
    lines += _table(["step", "status", "wall s", "error"], [
        [e["step"], e["status"], _f(e.get("wall_s"), ".1f"),
         (e.get("error") or "").replace("|", "/").replace("\n", " ")[:200]]
        for e in results.get("steps", [])])
    lines += ["", "## Caveats", "",
              "- Baselines: `teacher baselines` reports neither parameter count nor "
              "model size, and times each baseline once (no repeats); the SVM and "
              "kNN train on capped samples (see `cap` in results.json).",
              "- Detection metrics come from one training seed per model; their "
              "spread over seeds is not measured.",
              "- The machine is shared; absolute timings move with its load, the "
              "ratios measured in the same run less so.",
              f"- Teachers train for at most {s.get('teacher_minutes')} min per "
              "dataset here (epochs run: see each dataset's `teacher_epochs_run` in "
              "results.json when present), so a teacher trained without that cap "
              "may score higher.", ""]
    for merged in results.get("merged", []):
        lines.insert(-1, f"- {', '.join(merged['datasets'])} was measured again in a "
                     f"second invocation ({merged['at']}, git "
                     f"`{(merged.get('git_commit') or '?')[:12]}`) and merged in; its "
                     "ratios are within that invocation.")
    return "\n".join(lines)
