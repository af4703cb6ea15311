"""Zeek JSON type errors quote the value as the JSON wrote it, not as Python shows it.

Found: ``"id.orig_p": true`` was refused with ``found True``, a list holding null
with ``found [None]``, and a label ``true`` as ``unknown label 'True'``. Text
values stay quoted as every reader quotes text (``'x'``).
"""

from __future__ import annotations

import json

import pytest

from flows.errors import BadInputError, PartialInputError
from flows.readers import iter_records, read
from flows.readers.stream import parse_json_line

GOOD = {
    "ts": 1.5,
    "uid": "C1",
    "id.orig_h": "10.0.0.1",
    "id.orig_p": 1,
    "id.resp_h": "10.0.0.2",
    "id.resp_p": 2,
    "proto": "tcp",
}

UNKNOWN = "(expected Malicious, Benign, Background or Unknown)"


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("id.orig_p", True, "expected an integer, found true"),
        ("ts", False, "expected a number, found false"),
        ("orig_bytes", [1, None, True], "expected an integer, found [1, null, true]"),
        ("duration", {"s": None}, 'expected a number, found {"s": null}'),
        ("orig_bytes", "12", "expected an integer, found '12'"),
        ("ts", "soon", "expected epoch seconds or ISO-8601, found 'soon'"),
        ("id.resp_h", True, "expected an IPv4 or IPv6 address, found true"),
        ("id.orig_h", 167772161, "expected an IPv4 or IPv6 address, found 167772161"),
        ("ts", None, "required key 'ts' is null"),
        ("label", True, f"unknown label true {UNKNOWN}"),
        ("label", [None], f"unknown label [null] {UNKNOWN}"),
        ("label", "evil", f"unknown label 'evil' {UNKNOWN}"),
    ],
)
def test_a_bad_json_value_is_quoted_as_written(tmp_path, key, value, problem):
    bad = dict(GOOD, **{key: value})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    expected = f"{path}, line 2, column {key!r}: {problem}"

    with pytest.raises(PartialInputError) as info:
        read(path)
    assert str(info.value) == expected
    with pytest.raises(PartialInputError) as info:
        list(iter_records(path))
    assert str(info.value) == expected
    with pytest.raises(BadInputError) as info:
        parse_json_line(json.dumps(bad), "<stdin>", 4)
    assert str(info.value) == f"<stdin>, line 4, column {key!r}: {problem}"


def test_a_missing_required_key_is_still_called_missing(tmp_path):
    bad = {k: v for k, v in GOOD.items() if k != "id.orig_p"}
    with pytest.raises(BadInputError, match="required key 'id.orig_p' is missing"):
        parse_json_line(json.dumps(bad))
    nested = {k: v for k, v in GOOD.items() if not k.startswith("id.")}
    nested["id"] = {"orig_h": "10.0.0.1", "orig_p": None, "resp_h": "10.0.0.2"}
    nested["id"]["resp_p"] = 2
    with pytest.raises(BadInputError, match="required key 'id.orig_p' is null"):
        parse_json_line(json.dumps(nested))


def test_a_long_value_is_cut_short_in_the_message():
    bad = dict(GOOD, duration=list(range(1000)))
    with pytest.raises(BadInputError) as info:
        parse_json_line(json.dumps(bad))
    assert "found [0, 1, 2, " in str(info.value) and str(info.value).endswith("...")
    assert len(str(info.value)) < 200


def test_text_fields_keep_json_spelling_of_other_values(tmp_path):
    odd = dict(GOOD, uid=True, service=53, **{"detailed-label": False})
    record = parse_json_line(json.dumps(odd))
    assert record["uid"] == "true" and record["service"] == "53"
    assert record["label_detail"] == "false"


def test_a_long_value_in_a_text_field_is_kept_whole():
    # A list or object in a text field is a bad row (tests/test_json_lines_found18);
    # the detailed label keeps any JSON value as its text, however long.
    odd = dict(GOOD, **{"detailed-label": {"name": "x" * 200}})
    record = parse_json_line(json.dumps(odd))
    assert record["label_detail"] == json.dumps({"name": "x" * 200})
