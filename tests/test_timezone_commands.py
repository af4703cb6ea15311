"""``--timezone`` on the teacher and compress commands that read flow files.

Argus binetflow start times carry no zone; these commands read them in the zone
``--timezone`` names (as ``flows inspect``/``convert`` do), checkpoints and
artifacts record it, and the commands that read a teacher's own data again read it
in the recorded zone. The expected times are worked out here with fixed offsets:
Prague is UTC+1 in January and UTC+2 in August.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

PRAGUE = "Europe/Prague"
HEAD = (
    "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,"
    "TotPkts,TotBytes,SrcBytes,SrcPkts,Label"
)
# (month, Prague's offset from UTC in hours) of each half of the file.
HALVES = ((1, 1), (8, 2))
ROWS = 80
UNKNOWN = (
    "error: argument --timezone: unknown time zone 'Mars/Tharsis': expected an "
    "IANA name such as Europe/Prague or America/New_York, or UTC"
)

NO_ZONE_OF_ITS_OWN = (
    "it names no zone of its own (a link to this machine's zone, or a "
    "placeholder); "
)



def _when(i: int) -> tuple[int, ...]:
    """Local date and time of row ``i``: the first half in January, then August."""
    month = HALVES[0][0] if i < ROWS // 2 else HALVES[1][0]
    return (2011, month, 10, 9, i // 60, i % 60)


def _expected_ts(prague: bool) -> list[float]:
    """Epoch seconds of every row's start time (the .25 s included), read as
    Prague time (by the fixed offsets of :data:`HALVES`) or as UTC."""
    offsets = dict(HALVES)
    out = []
    for i in range(ROWS):
        when = _when(i)
        zone = timezone(timedelta(hours=offsets[when[1]])) if prague else UTC
        out.append(datetime(*when, tzinfo=zone).timestamp() + 0.25)
    return out


@pytest.fixture(scope="module")
def argus(tmp_path_factory) -> Path:
    """A labeled binetflow file, normal and botnet rows taking turns: web flows
    from four hosts, and connection attempts from four others."""
    lines = [HEAD]
    for i in range(ROWS):
        start = "{:04d}/{:02d}/{:02d} {:02d}:{:02d}:{:02d}.25".format(*_when(i))
        if i % 2 == 0:
            src, dport, state = f"10.0.0.{1 + i % 4}", 443, "CON"
            pkts, total, sent, label = 12 + i % 5, 9000 + 37 * i, 1500, "Normal-V42"
        else:
            src, dport, state = f"10.0.1.{1 + i % 4}", 1000 + 7 * i, "S_RA"
            pkts, total, sent, label = 2, 120, 60, "Botnet-V42-TCP-Attempt"
        lines.append(
            f"{start},{0.5 + i % 3},tcp,{src},{40000 + i},   ->,192.168.0.9,{dport},"
            f"{state},0,0,{pkts},{total},{sent},{pkts // 2},flow=From-{label}"
        )
    path = tmp_path_factory.mktemp("argus") / "capture.binetflow"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def reads(monkeypatch) -> list[dict]:
    """Every flow file ``flows.readers.read`` reads from here on: its path, the
    zone asked for and the ``ts`` it gave."""
    import flows.readers

    seen: list[dict] = []
    real = flows.readers.read

    def spy(path, *args, **kwargs):
        result = real(path, *args, **kwargs)
        seen.append({"path": str(path), "timezone": kwargs.get("timezone", "UTC"),
                     "ts": result.table.column("ts").to_pylist()})
        return result

    monkeypatch.setattr(flows.readers, "read", spy)
    return seen


SMALL = ["--epochs", "1", "--members", "1", "--conv-filters", "4", "--lstm-hidden",
         "4", "--dense", "4", "--batch-size", "16", "--samples-per-epoch", "64",
         "--replay-size", "20", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def checkpoint(argus, tmp_path_factory) -> Path:
    """A tiny teacher trained on the file read in Prague time."""
    from teacher.cli import main

    out = tmp_path_factory.mktemp("ck") / "teacher"
    assert main(["train", "--data", str(argus), "--timezone", PRAGUE,
                 "--out", str(out), *SMALL]) == 0
    return out


def test_prepare_reads_binetflow_start_times_in_the_zone_given(argus, reads):
    from teacher.data import prepare

    default = prepare(str(argus), need_split=True)
    prague = prepare(str(argus), need_split=True, timezone=PRAGUE)
    assert (default.timezone, prague.timezone) == ("UTC", PRAGUE)
    assert [r["timezone"] for r in reads] == ["UTC", PRAGUE]
    assert reads[0]["ts"] == _expected_ts(prague=False)
    assert reads[1]["ts"] == _expected_ts(prague=True)


def test_prepare_refuses_an_unknown_zone_with_a_dataset_name_too(monkeypatch):
    """A registered dataset carries epoch times, but a zone that is no zone is
    still refused (as flows.readers.read refuses it whatever the format)."""
    from flows.errors import UsageError
    from teacher.data import prepare

    def load_dataset(*args, **kwargs):
        raise AssertionError("dataset loaded with a zone that is no zone")

    monkeypatch.setattr("flows.datasets.load_dataset", load_dataset)
    with pytest.raises(UsageError) as info:
        prepare("nsl-kdd", timezone="Mars/Tharsis")
    assert str(info.value) == UNKNOWN.split("--timezone: ")[1]
    assert info.value.exit_code == 2


def test_teacher_eval_reads_the_data_file_in_the_zone_given(
    checkpoint, argus, reads, capsys
):
    from teacher.cli import main

    base = ["eval", "--checkpoint", str(checkpoint), "--data", str(argus),
            "--json", "--no-timing", "-q"]
    assert main([*base, "--timezone", PRAGUE]) == 0
    assert main(base) == 0
    capsys.readouterr()
    assert [(r["path"], r["timezone"]) for r in reads] == [
        (str(argus), PRAGUE), (str(argus), "UTC")]
    prague, utc = reads[0]["ts"], reads[1]["ts"]
    assert prague == _expected_ts(prague=True)
    assert utc == _expected_ts(prague=False)
    # Earlier by Prague's offset: an hour in January, two in August.
    shifts = [u - p for u, p in zip(utc, prague, strict=True)]
    assert shifts == [3600.0] * (ROWS // 2) + [7200.0] * (ROWS // 2)


def test_train_records_the_zone_in_the_checkpoints_provenance(checkpoint):
    prov = json.loads((checkpoint / "provenance.json").read_text())
    assert prov["timezone"] == PRAGUE


@pytest.mark.parametrize("command", ["baselines", "tune"])
def test_baselines_and_tune_pass_the_zone_on(command, argus, tmp_path, monkeypatch,
                                             capsys):
    """Both stop at the data here: what matters is the zone it was asked in."""
    from flows.errors import BadInputError
    from teacher.cli import main

    asked = []

    def prepare(source, **kwargs):
        asked.append((source, kwargs.get("timezone")))
        raise BadInputError("stopped by the test")

    monkeypatch.setattr("teacher.data.prepare", prepare)
    more = ["--budget", "1", "--out", str(tmp_path / "t")] if command == "tune" else []
    argv = [command, "--data", str(argus), *more, "-q"]
    assert main([*argv, "--timezone", PRAGUE]) == 3
    assert main(argv) == 3
    assert asked == [(str(argus), PRAGUE), (str(argus), "UTC")]
    assert capsys.readouterr().err.count("error: stopped by the test") == 2


def test_update_reads_the_checkpoints_own_data_in_its_recorded_zone(
    checkpoint, argus, reads, tmp_path, capsys
):
    """--timezone is the zone of --data (and --old-data); without --old-data the
    checkpoint's data is read in the zone its provenance records."""
    from teacher.cli import main

    out = tmp_path / "updated"
    assert main(["update", "--checkpoint", str(checkpoint), "--data", str(argus),
                 "--timezone", "America/New_York", "--out", str(out), "--epochs",
                 "1", "--batch-size", "16", "--samples-per-epoch", "64", "--json",
                 "-q"]) == 0
    capsys.readouterr()
    assert [r["timezone"] for r in reads] == ["America/New_York", PRAGUE]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["timezone"] == "America/New_York"

    reads.clear()
    assert main(["update", "--checkpoint", str(checkpoint), "--data", str(argus),
                 "--old-data", str(argus), "--out", str(tmp_path / "again"),
                 "--epochs", "1", "--batch-size", "16", "--samples-per-epoch", "64",
                 "--json", "-q"]) == 0
    capsys.readouterr()
    assert [r["timezone"] for r in reads] == ["UTC", "UTC"]


def test_concat_names_the_zones_of_its_parts(argus):
    from teacher.data import concat, prepare

    prague = prepare(str(argus), need_split=True, timezone=PRAGUE)
    utc = prepare(str(argus), encoder=prague.encoder, need_split=True)
    assert concat([prague, prague]).timezone == PRAGUE
    assert concat([prague, utc]).timezone == f"{PRAGUE}+UTC"


def test_compress_eval_reads_the_data_file_in_the_zone_given(
    argus, reads, tmp_path, capsys
):
    from compress.cli import main
    from flows.encoder import Encoder
    from flows.readers import read
    from flows.record import table_to_columns
    from tests.test_agent_fixtures import make_artifact

    columns = table_to_columns(read(argus).table)
    enc = Encoder.fit(columns, "conn", window=2, group_by="src_ip")
    artifact = make_artifact(tmp_path / "artifact", enc,
                             {"decision": 0.5, "escalate_low": 0.3, "alert": 0.9})
    reads.clear()
    base = ["eval", "--artifact", str(artifact), "--data", str(argus),
            "--no-timing", "--json"]
    assert main([*base, "--timezone", PRAGUE]) == 0
    assert main(base) == 0
    capsys.readouterr()
    assert [r["timezone"] for r in reads] == [PRAGUE, "UTC"]
    assert reads[0]["ts"] == _expected_ts(prague=True)
    assert reads[1]["ts"] == _expected_ts(prague=False)


def test_compress_run_passes_the_zone_to_the_pipeline(checkpoint, argus, tmp_path,
                                                      monkeypatch):
    import compress.pipeline
    from compress.cli import main
    from flows.errors import BadInputError

    given = []

    def run(cfg, progress=None):
        given.append((cfg.dataset, cfg.timezone))
        raise BadInputError("stopped by the test")

    monkeypatch.setattr(compress.pipeline, "run", run)
    base = ["run", "--target", "onnx-fp32", "--teacher", str(checkpoint),
            "--out", str(tmp_path / "art"), "-q"]
    assert main([*base, "--data", str(argus), "--timezone", PRAGUE]) == 3
    assert main(base) == 3
    assert given == [(str(argus), PRAGUE), (None, None)]


@pytest.mark.parametrize(
    ("cfg", "zone"),
    [
        ({}, PRAGUE),  # the teacher's own data: the zone its provenance records
        ({"timezone": "America/New_York"}, "America/New_York"),
        ({"dataset": "DATA"}, "UTC"),  # other data: UTC unless told
        ({"dataset": "DATA", "timezone": PRAGUE}, PRAGUE),
    ],
)
def test_compress_run_reads_its_data_in_the_zone(cfg, zone, checkpoint, argus,
                                                 tmp_path, monkeypatch):
    from compress.pipeline import RunConfig, _context
    from flows.errors import BadInputError

    asked = []

    def prepare(source, **kwargs):
        asked.append((source, kwargs.get("timezone")))
        raise BadInputError("stopped by the test")

    monkeypatch.setattr("teacher.data.prepare", prepare)
    # The teacher's provenance names its data file resolved.
    source = str(argus) if "dataset" in cfg else str(argus.resolve())
    if "dataset" in cfg:
        cfg = {**cfg, "dataset": source}
    config = RunConfig(target="onnx-fp32", teacher=checkpoint, out=tmp_path / "a",
                       **cfg)
    with pytest.raises(BadInputError, match="stopped by the test"):
        _context(config, lambda msg: None)
    assert asked == [(source, zone)]


def test_compress_run_records_the_zone_in_the_artifacts_provenance(
    checkpoint, tmp_path, capsys
):
    from compress.cli import main

    out = tmp_path / "art"
    code = main(["run", "--target", "onnx-fp32", "--teacher", str(checkpoint),
                 "--out", str(out), "--student", "mlp", "--widths", "4",
                 "--epochs", "1", "--no-prune", "--qat", "off", "--max-f1-drop", "1",
                 "--no-timing", "-q"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["data"]["timezone"] == PRAGUE


COMMANDS = {
    "teacher": [
        ["train", "--data", "F", "--out", "O"],
        ["eval", "--checkpoint", "C", "--data", "F"],
        ["baselines", "--data", "F"],
        ["tune", "--data", "F", "--budget", "1"],
        ["update", "--checkpoint", "C", "--data", "F", "--out", "O"],
    ],
    "compress": [
        ["run", "--target", "onnx-fp32", "--teacher", "C", "--out", "O",
         "--data", "F"],
        ["eval", "--artifact", "A", "--data", "F"],
    ],
}


@pytest.mark.parametrize(
    ("tool", "argv"), [(t, a) for t, cases in COMMANDS.items() for a in cases],
    ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_an_unknown_zone_is_a_usage_error_naming_it(tool, argv, tmp_path, capsys,
                                                    monkeypatch):
    from flows.errors import EXIT_USAGE

    def prepare(*args, **kwargs):
        raise AssertionError("data loaded with a zone that is no zone")

    monkeypatch.setattr("teacher.data.prepare", prepare)
    main = __import__(f"{tool}.cli", fromlist=["main"]).main
    argv = [str(tmp_path / a) if a in ("F", "O", "C", "A") else a for a in argv]
    assert main([*argv, "--timezone", "Mars/Tharsis"]) == EXIT_USAGE == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"usage: {tool} {argv[0]} ")
    assert err.rstrip().splitlines()[-1] == f"{tool} {argv[0]}: {UNKNOWN}"
    assert "Traceback" not in err and not (tmp_path / "O").exists()


@pytest.mark.parametrize(
    ("zone", "why"),
    [
        ("localtime", NO_ZONE_OF_ITS_OWN),
        ("posixrules", NO_ZONE_OF_ITS_OWN),
        ("Factory", NO_ZONE_OF_ITS_OWN),
        ("posix/Europe/Prague", ""),
        ("right/UTC", ""),
    ],
)
@pytest.mark.parametrize("tool", ["flows", "teacher", "compress"])
def test_files_of_the_zone_folder_that_are_no_iana_zone_are_refused(
    zone, why, tool, argus, tmp_path, capsys, monkeypatch
):
    """Found: ``--timezone localtime`` (this machine's zone, whatever it is),
    ``Factory`` and the ``posix/``/``right/`` copies were taken, because zoneinfo
    opens them; only names of the IANA list are zones."""
    from flows.errors import EXIT_USAGE

    def prepare(*args, **kwargs):
        raise AssertionError("data loaded with a zone that is no zone")

    monkeypatch.setattr("teacher.data.prepare", prepare)
    main = __import__(f"{tool}.cli", fromlist=["main"]).main
    argv = {"flows": ["inspect", str(argus)],
            "teacher": ["eval", "--checkpoint", "C", "--data", str(argus)],
            "compress": ["eval", "--artifact", "A", "--data", str(argus)]}[tool]
    assert main([*argv, "--timezone", zone]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == (
        f"{tool} {argv[0]}: error: argument --timezone: unknown time zone "
        f"{zone!r}: {why}expected an IANA name such as Europe/Prague or "
        "America/New_York, or UTC")


@pytest.mark.parametrize("zone", ["Etc/UTC", "GMT", "US/Eastern", "Etc/GMT+5"])
def test_iana_zones_and_their_aliases_are_taken(zone):
    from flows.argtypes import zone_name

    assert zone_name(zone) == zone


@pytest.mark.parametrize(
    ("tool", "command"),
    [(t, a[0]) for t, cases in COMMANDS.items() for a in cases],
)
def test_help_says_what_timezone_is_for_and_where_it_cannot_matter(tool, command,
                                                                   capsys):
    main = __import__(f"{tool}.cli", fromlist=["main"]).main
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--timezone ZONE the time zone an Argus binetflow file's StartTime" in text
    assert "IANA name such as Europe/Prague" in text
    assert ("other formats carry epoch times and ignore it, as do the registered "
            "datasets, whose files all carry epoch times") in text
