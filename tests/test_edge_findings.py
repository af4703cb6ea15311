"""Findings of a tester against ``edge-agent``, each reproduced and fixed.

1. A manifest's ``model_version`` (not in its own sha256 list) edited to text the
   re-scorer refuses was loaded, and every escalation was then rejected: the agent,
   bundle, pack-update and model updates refuse it at load (exit 3).
2. Escalations dropped by ``--outbox-max`` exited 0: they are lost, exit 6.
3. A benign verdict on a local alert left no line in the alerts output.
4. calibrate's "no flows" / "too few benign flows" exited 2 (usage); a --config
   file's problems exited 2 or 3 depending on the problem.
5. pack-update signed an artifact that fails its own health check, and had no
   description or exit codes in its help.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edge_agent import protocol as proto
from edge_agent import signing
from edge_agent.agent import Agent
from edge_agent.cli import main
from edge_agent.outbox import Outbox
from edge_agent.runtime import load_artifact
from flows.errors import BadInputError
from tests.conftest import wait_for
from tests.test_agent_fixtures import tiny

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tests.test_ota_artifacts import make_artifact  # noqa: E402

# The gateway the updates here are signed for, and the updater's own ids.
TARGET = {"site": "plant-3", "gateways": ["gw-17"]}
HERE = {"site": "plant-3", "gateway": "gw-17"}

# pack-update's flags naming the gateways an update is for.
PACK = ["pack-update", "--site", "plant-3", "--gateway", "gw-17"]

FIVE = ("ts", "src_ip", "src_port", "dst_ip", "dst_port", "proto")


@pytest.fixture(scope="module")
def tm(data_dir, tmp_path_factory):
    return tiny(data_dir, tmp_path_factory)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return signing.generate_keypair(tmp_path / "keys")


def _main(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _run(tm, tmp_path: Path, *extra: str, artifact: Path | None = None) -> list[str]:
    return [
        "run", "--artifact", str(artifact or tm.artifact), "--source",
        f"zeek:{tm.conn_log}", "--site", "s1", "--gateway", "g1",
        "--outbox", str(tmp_path / "o.db"), "--alerts", "", *extra,
    ]


def _edit_manifest(folder: Path, **changes) -> Path:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return path


# ------------------------------------------------ 1. model_version of the manifest

# Each is refused by the re-scorer's own rule (edge_agent.protocol.text_problem).
BAD_TEXT = {
    "escape sequence": "v1\x1b[31m/../#+",
    "lone surrogate": "v1\ud800",
    "bidi control": "v1\u202egnp.exe",
}


@pytest.mark.parametrize("case", list(BAD_TEXT))
def test_run_refuses_a_model_version_the_rescorer_would_refuse(
    tm, tmp_path, capsys, case
) -> None:
    """Found: the agent loaded 'v1\\x1b[31m/../#+', sent it in every escalation, the
    re-scorer rejected them all as bad_value, and the run exited 0."""
    value = BAD_TEXT[case]
    problem = proto.text_problem(value)
    assert problem is not None  # the rule the re-scorer applies
    art = tmp_path / "art"
    shutil.copytree(tm.artifact, art)
    manifest = _edit_manifest(art, model_version=value)

    rc, err = _main(_run(tm, tmp_path, artifact=art), capsys)

    assert rc == 3, err
    assert f"error: {manifest}: manifest field 'model_version' " in err
    assert problem in err
    assert not (tmp_path / "o.db").exists()  # refused before anything started
    with pytest.raises(BadInputError, match="model_version"):
        load_artifact(art)


@pytest.mark.parametrize(
    ("value", "problem"),
    [(3, "is a JSON number, not a string"), ("v" * 257, "is 257 characters long")],
)
def test_a_model_version_that_is_no_short_text_is_refused(
    tmp_path, value, problem
) -> None:
    art = make_artifact(tmp_path / "art", version="v1")
    _edit_manifest(art, model_version=value)

    with pytest.raises(BadInputError) as info:
        load_artifact(art)

    assert problem in str(info.value) and info.value.exit_code == 3


def test_a_model_version_with_slashes_and_signs_still_loads(tmp_path) -> None:
    """The re-scorer takes printable text of any kind; so does the agent."""
    art = make_artifact(tmp_path / "art", version="student/v1+2#../x")
    assert proto.text_problem("student/v1+2#../x") is None

    assert load_artifact(art).model_version == "student/v1+2#../x"


def test_pack_update_and_bundle_refuse_the_edited_model_version(
    tmp_path, capsys, keys
) -> None:
    art = make_artifact(tmp_path / "art", version="v1")
    manifest = _edit_manifest(art, model_version=BAD_TEXT["escape sequence"])
    config = tmp_path / "gateway.toml"
    config.write_text('artifact = "/opt/gatewatch/models/current"\n')
    out = tmp_path / "update.json"

    rc, err = _main(
        [*PACK, "--artifact", str(art), "--key", str(keys[0]), "-o", str(out)],
        capsys,
    )
    assert rc == 3, err
    assert f"error: {manifest}: manifest field 'model_version' " in err
    assert not out.exists()

    bundle = tmp_path / "gw.tar.gz"
    rc, err = _main(
        ["bundle", "--artifact", str(art), "--config", str(config), "--key",
         str(keys[0]), "-o", str(bundle)],
        capsys,
    )
    assert rc == 3, err
    assert f"error: {manifest}: manifest field 'model_version' " in err
    assert not bundle.exists()


def test_a_signed_update_with_the_edited_model_version_is_refused(
    tmp_path, keys
) -> None:
    """Signed by the right key (packed by hand, as pack-update refuses it): the
    gateway's own load refuses it and keeps the running model."""
    from edge_agent.ota import ModelUpdater, pack_update, sign_archive

    updater = ModelUpdater(keys[1], tmp_path / "models", tolerance=1e-5, **HERE)
    v1 = pack_update(
        make_artifact(tmp_path / "v1", version="v1", seed=1), keys[0],
        **TARGET,
    )
    assert updater.handle(v1.message).ok
    art = make_artifact(tmp_path / "v2", version="v2", seed=2)
    _edit_manifest(art, model_version=BAD_TEXT["escape sequence"])
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for path in sorted(art.iterdir()):
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            tar.addfile(info, io.BytesIO(path.read_bytes()))

    message = sign_archive(archive.getvalue(), "v2", keys[0], **TARGET).message
    result = updater.handle(message)

    assert not result.ok
    assert "manifest field 'model_version'" in result.reason
    assert load_artifact(updater.slots.current_path).model_version == "v1"


# ------------------------------------------------------------- 2. the outbox's cap


def test_escalations_dropped_by_the_outbox_cap_exit_6(tm, tmp_path, capsys) -> None:
    """Found: --outbox-max 2 dropped escalations and the run exited 0, while the
    help lists exit 6 for escalations the outbox could not store."""
    alerts = tmp_path / "alerts.jsonl"
    argv = _run(tm, tmp_path, "--outbox-max", "2", "--summary-json",
                str(tmp_path / "s.json"))
    argv[argv.index("--alerts") + 1] = str(alerts)
    expected = tm.expected()

    rc, err = _main(argv, capsys)

    assert rc == 6, err
    dropped = len(expected) - 2
    assert (
        f"error: {dropped} escalations were dropped by the outbox cap (outbox_max "
        f"2) in this run and are lost; 2 stay in the outbox {tmp_path / 'o.db'}"
    ) in err
    # What was read is not lost with them: every local alert line is written.
    lines = [json.loads(x) for x in alerts.read_text().splitlines()]
    n_alerts = sum(1 for d in expected.values() if d == "alert")
    assert sum(1 for x in lines if x["kind"] == "alert") == n_alerts
    assert len(Outbox(tmp_path / "o.db")) == 2


def test_the_run_help_lists_the_cap_under_exit_6(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    exit6 = " ".join(text[text.index("\n  6 "): text.index("\n  130")].split())
    assert "by its cap" in exit6 and "--outbox-max" in exit6


# -------------------------------------------------------- 3. verdicts in the alerts


def _verdict(esc_id: str, verdict: str, score: float) -> bytes:
    return proto.encode(
        proto.build_verdict(
            escalation_id=esc_id,
            verdict=verdict,
            score=score,
            threshold=0.5,
            teacher_version="t1",
        )
    )


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in stream.getvalue().splitlines()]


def test_every_verdict_on_a_local_alert_has_a_line(tm, tmp_path) -> None:
    """Found: only malicious verdicts were written, so a reader of the alerts file
    could not tell which alerts the teacher rejected (568 alerts, 564 verdicts)."""
    alerts = io.StringIO()
    agent = Agent(
        load_artifact(tm.artifact), site="s1", gateway="g1",
        outbox=Outbox(tmp_path / "o.db"), alerts=alerts,
    )
    topic = agent.topics[proto.Channel.VERDICTS]
    agent.process(tm.records)
    alert_lines = {x["escalation_id"]: x for x in _lines(alerts)}
    expected = tm.expected()
    alert_ids = [i for i, d in expected.items() if d == "alert"]
    escalate_ids = [i for i, d in expected.items() if d == "escalate"]
    assert set(alert_lines) == set(alert_ids) and len(alert_ids) >= 2
    before = len(alerts.getvalue().splitlines())

    # The teacher rejects every other alert, confirms the rest; of the uncertain
    # escalations it confirms one and rejects one.
    for n, esc_id in enumerate(alert_ids):
        verdict = "benign" if n % 2 == 0 else "malicious"
        agent._on_message(topic, _verdict(esc_id, verdict, 0.1 + 0.8 * (n % 2)))
    agent._on_message(topic, _verdict(escalate_ids[0], "malicious", 0.95))
    agent._on_message(topic, _verdict(escalate_ids[1], "benign", 0.05))
    agent._on_message(topic, _verdict(alert_ids[0], "benign", 0.1))  # a copy

    verdicts = [x for x in _lines(alerts)[before:] if x["kind"] == "verdict"]
    by_id = {x["escalation_id"]: x for x in verdicts}
    assert len(verdicts) == len(alert_ids) + 1  # the copy and the rejected uncertain
    assert set(alert_ids) <= set(by_id)  # every alert has its verdict line
    assert escalate_ids[1] not in by_id
    overruled = by_id[alert_ids[0]]
    assert overruled["verdict"] == "benign" and overruled["overrules_alert"] is True
    assert overruled["score"] == pytest.approx(0.1)
    assert overruled["teacher_version"] == "t1"
    assert {k: overruled[k] for k in FIVE} == {
        k: alert_lines[alert_ids[0]][k] for k in FIVE
    }
    confirmed = by_id[alert_ids[1]]
    assert confirmed["verdict"] == "malicious" and "overrules_alert" not in confirmed
    assert by_id[escalate_ids[0]]["verdict"] == "malicious"
    assert agent.counters.alerts_overruled == (len(alert_ids) + 1) // 2
    assert agent.summary()["alerts_overruled"] == (len(alert_ids) + 1) // 2
    agent.outbox.close()


class _Delivery:
    lost = False
    unrouted = False

    def acked(self) -> bool:
        return True

    def forget(self) -> None:
        pass


class _Link:
    """A connected broker link that takes every publish at once."""

    connected = True
    generation = 1
    max_inflight = 50

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def connect(self, timeout: float) -> None:
        pass

    def subscribe(self, topic: str, qos: int = 1, timeout: float | None = None):
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain=False):
        self.published.append((topic, payload))
        return _Delivery()

    def close(self, final=None) -> None:
        pass


def test_a_replayed_alert_overruled_after_a_restart_has_a_line(tm, tmp_path) -> None:
    """An alert written by a run without a broker, replayed from the outbox by
    the next run: its benign verdict is written by the run that sent it."""
    first = io.StringIO()
    agent = Agent(
        load_artifact(tm.artifact), site="s1", gateway="g1",
        outbox=Outbox(tmp_path / "o.db"), alerts=first,
    )
    agent.process(tm.records)
    agent.close()
    alert = next(x for x in _lines(first) if x["kind"] == "alert")

    second = io.StringIO()
    link = _Link()
    agent = Agent(
        load_artifact(tm.artifact), site="s1", gateway="g1",
        outbox=Outbox(tmp_path / "o.db"), alerts=second,
    )
    agent.link = link
    agent.start(1.0)
    try:
        escalations = agent.topics[proto.Channel.ESCALATIONS]
        wait_for(
            lambda: any(
                t == escalations and json.loads(p)["id"] == alert["escalation_id"]
                for t, p in list(link.published)
            ),
            20,
            "the replayed alert to be published",
        )
        agent._on_message(
            agent.topics[proto.Channel.VERDICTS],
            _verdict(alert["escalation_id"], "benign", 0.2),
        )
    finally:
        agent.close()

    lines = _lines(second)
    assert len(lines) == 1
    line = lines[0]
    assert (line["kind"], line["verdict"], line["overrules_alert"]) == (
        "verdict", "benign", True
    )
    assert line["escalation_id"] == alert["escalation_id"]
    assert {k: line[k] for k in FIVE} == {k: alert[k] for k in FIVE}


@pytest.mark.broker
def test_alerts_file_shows_every_verdict_on_its_alerts_end_to_end(
    tm, mosquitto, tmp_path
) -> None:
    """``edge-agent run`` -> mosquitto -> ``teacher serve``: each local alert line
    has one verdict line, benign ones marked as overruling it, as the store says."""
    from teacher.store import AlertStore
    from tests.test_agent_fixtures import make_teacher

    ckpt, _ = make_teacher(tm, tm.artifact.parent / "teacher")
    bin_dir = Path(sys.executable).parent
    serve_log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [
            str(bin_dir / "teacher"), "serve", "--checkpoint", str(ckpt),
            "--broker", mosquitto.url, "--store", str(tmp_path / "alerts.sqlite"),
        ],
        stdout=open(serve_log, "w"),
        stderr=subprocess.STDOUT,
    )
    alerts = tmp_path / "alerts.jsonl"
    argv = _run(tm, tmp_path, "--broker", mosquitto.url, "--drain-timeout", "60",
                "--summary-json", str(tmp_path / "s.json"))
    argv[argv.index("--alerts") + 1] = str(alerts)
    try:
        wait_for(
            lambda: "serving" in serve_log.read_text() or serve.poll() is not None,
            90,
            "teacher serve",
        )
        assert serve.poll() is None, serve_log.read_text()
        done = subprocess.run(
            [str(bin_dir / "edge-agent"), *argv],
            capture_output=True, text=True, timeout=180,
        )
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
    assert done.returncode == 0, done.stderr
    rows = AlertStore(tmp_path / "alerts.sqlite").query(gateway="s1/g1")
    teacher_says = {r["id"]: r["verdict"] for r in rows}
    lines = [json.loads(x) for x in alerts.read_text().splitlines()]
    alert_ids = [x["escalation_id"] for x in lines if x["kind"] == "alert"]
    verdicts = {}
    for x in lines:
        if x["kind"] == "verdict":
            assert x["escalation_id"] not in verdicts  # one line per escalation
            verdicts[x["escalation_id"]] = x
    overruled = [i for i in alert_ids if teacher_says[i] == "benign"]
    assert overruled, "the teacher rejects none of the alerts: nothing is tested"
    for esc_id in alert_ids:
        assert esc_id in verdicts, f"alert {esc_id} has no verdict line"
        line = verdicts[esc_id]
        assert line["verdict"] == teacher_says[esc_id]
        assert line.get("overrules_alert", False) is (esc_id in overruled)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["alerts_overruled"] == len(overruled)
    assert f"local alerts overruled as benign by the re-scorer {len(overruled)}" in (
        done.stderr
    )


# ------------------------------------------------------------ 4. exit codes


def _zeek_head(conn_log: Path, out: Path, rows: int) -> Path:
    lines = conn_log.read_text().splitlines()
    header = [x for x in lines if x.startswith("#") and not x.startswith("#close")]
    data = [x for x in lines if not x.startswith("#")][:rows]
    out.write_text("\n".join(header + data) + "\n")
    return out


@pytest.mark.parametrize("rows", [0, 22])
def test_calibrate_on_too_few_flows_is_bad_input(tm, tmp_path, capsys, rows) -> None:
    """Found: "holds no flows" and "only 22 benign flows" exited 2 (usage)."""
    log = _zeek_head(tm.conn_log, tmp_path / "conn.log", rows)
    out = tmp_path / "site.json"

    rc, err = _main(
        ["calibrate", "--artifact", str(tm.artifact), "--source", f"zeek:{log}",
         "--target-fpr", "0.01", "--out", str(out)],
        capsys,
    )

    assert rc == 3, err
    if rows:
        assert f"error: zeek:{log}: only " in err
        assert f"benign flows of the {rows} read; calibrate needs 100 or more" in err
    else:
        assert f"error: zeek:{log}: holds no flows to calibrate on" in err
    assert not out.exists()


def test_the_calibrate_help_says_too_few_flows_is_bad_input(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = capsys.readouterr().out
    exit3 = " ".join(text[text.index("\n  3 "): text.index("\n  4 ")].split())
    assert "fewer than 100 benign flows" in exit3 and "not usage" in exit3


@pytest.mark.parametrize("kind", ["missing", "invalid TOML", "folder", "not UTF-8"])
def test_every_config_file_problem_is_a_usage_error(
    tm, tmp_path, capsys, kind
) -> None:
    """Found: a missing or invalid config exited 2, a folder or non-UTF-8 one 3."""
    config = tmp_path / "gw.toml"
    if kind == "invalid TOML":
        config.write_text("site = [\n")
    elif kind == "folder":
        config.mkdir()
    elif kind == "not UTF-8":
        config.write_bytes(b'site = "\xff"\n')
    message = {
        "missing": "does not exist",
        "invalid TOML": "is not valid TOML (",
        "folder": "is a folder",
        "not UTF-8": "byte offset 8: is not UTF-8 text",
    }[kind]

    rc, err = _main([*_run(tm, tmp_path), "--config", str(config)], capsys)

    assert rc == 2, err
    assert f"error: config {config}: {message}" in err
    assert "expected a UTF-8 TOML file of edge-agent run settings" in err


def test_a_config_with_a_byte_order_mark_is_read(tm, tmp_path, capsys) -> None:
    """Found: a BOM some editors write made the config "not valid TOML (line 1,
    column 1)"; the settings in it are read as written."""
    config = tmp_path / "gw.toml"
    settings = {
        "artifact": str(tm.artifact), "source": f"zeek:{tm.conn_log}",
        "site": "s1", "gateway": "g1", "outbox": str(tmp_path / "o.db"),
        "alerts": "", "summary_json": str(tmp_path / "s.json"),
    }
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    config.write_bytes(b"\xef\xbb\xbf" + text.encode())
    rc, err = _main(["run", "--config", str(config)], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["flows"] > 0


def test_a_tls_file_that_is_no_pem_is_named(tm, tmp_path, capsys) -> None:
    """Found: --tls-cert on a text file gave "bad TLS settings: [SSL] PEM lib
    (_ssl.c:3905)", naming no file."""
    cert = tmp_path / "not-a-cert.pem"
    cert.write_text("hello\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("hello\n")
    rc, err = _main(
        [*_run(tm, tmp_path), "--broker", "mqtts://127.0.0.1:1", "--tls-ca", str(ca),
         "--tls-cert", str(cert), "--tls-key", str(cert), "--connect-timeout", "1"],
        capsys,
    )
    assert rc == 2, err
    assert f"certificate {cert}" in err and "expected PEM files" in err


# ------------------------------------------------------------ 5. pack-update


def test_pack_update_refuses_an_artifact_that_fails_its_health_check(
    tmp_path, capsys, keys
) -> None:
    """Found: an artifact whose manifest's output was edited (the scores change)
    was signed, exit 0: an update every gateway refuses."""
    art = make_artifact(tmp_path / "v2", version="v2", seed=2)
    manifest = json.loads((art / "manifest.json").read_text())
    _edit_manifest(art, output={**manifest["output"], "kind": "logit"})
    out = tmp_path / "update.json"

    rc, err = _main(
        [*PACK, "--artifact", str(art), "--key", str(keys[0]), "-o", str(out)],
        capsys,
    )

    assert rc == 1, err
    assert f"error: {art}: probe scores differ from the manifest" in err
    assert "not signed: every gateway's health check would refuse" in err
    assert not out.exists()


def test_pack_update_cannot_write_its_output_is_one_error(
    tmp_path, capsys, keys
) -> None:
    """Refused before anything is signed (exit 2), as flows convert -o is."""
    art = make_artifact(tmp_path / "v2", version="v2", seed=2)
    out = tmp_path / "missing" / "update.json"

    rc, err = _main(
        [*PACK, "--artifact", str(art), "--key", str(keys[0]), "-o", str(out)],
        capsys,
    )

    assert rc == 2, err
    assert err == (f"error: --out {out}: the folder {out.parent} does not exist; "
                   "make it first\n")


def test_pack_update_help_has_a_description_and_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["pack-update", "--help"])
    text = capsys.readouterr().out
    assert "health" in text.split("options:")[0]  # the description
    codes = text[text.index("exit codes:"):]
    for code in ("0", "1", "2", "3"):
        assert f"\n  {code}  " in codes
    assert "fails its health check" in codes



class _HeldDelivery(_Delivery):
    """A publish the broker acknowledges only once ``release`` is set."""

    def __init__(self, release) -> None:
        self.release = release

    def acked(self) -> bool:
        return self.release.is_set()


class _HeldLink(_Link):
    """A connected link whose publishes wait for one release, all together."""

    def __init__(self) -> None:
        import threading

        super().__init__()
        self.release = threading.Event()

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain=False):
        self.published.append((topic, payload))
        return _HeldDelivery(self.release)


def test_escalations_the_cap_dropped_in_flight_count_as_sent_not_lost(
    tm, tmp_path
) -> None:
    """Found by the second tester: with a broker up and --outbox-max 5 the run said
    "3 dropped ... and are lost" (exit 6) and "sent 5" while the store held all
    8: the cap had dropped rows the link was already sending. Now what the broker
    acknowledged counts as sent, and only the others as lost."""
    link = _HeldLink()
    outbox = Outbox(tmp_path / "o.db", 5)
    agent = Agent(
        load_artifact(tm.artifact), site="s1", gateway="g1", outbox=outbox,
    )
    agent.link = link
    agent.start(1.0)
    escalations = agent.topics[proto.Channel.ESCALATIONS]
    half = len(tm.records) // 2
    try:
        # The first half's escalations go out and wait for their PUBACK ...
        agent.process(tm.records[:half])
        wait_for(
            lambda: any(t == escalations for t, _ in list(link.published)),
            20,
            "publishes in flight",
        )
        # ... while the second half's make the cap drop them from the file.
        agent.process(tm.records[half:])
        link.release.set()
        assert agent.drain(20, wait_verdicts=False)
        summary = agent.summary()
    finally:
        agent.close()

    made = set(tm.expected())
    sent = {json.loads(p)["id"] for t, p in link.published if t == escalations}
    dropped = sum(summary["outbox_dropped"].values())
    assert summary["escalations_sent"] == len(sent)
    assert summary["outbox_pending"] == 0
    # Every escalation made was either acknowledged by the broker or lost.
    lost = dropped - summary["delivered_after_drop"]
    assert len(made) - len(sent & made) == lost
    assert summary["delivered_after_drop"] > 0, json.dumps(summary)  # the tester's case
