"""ONNX files of an IR or opset version gatewatch does not load are refused by name."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.runtime import (
    ONNX_IR_VERSIONS,
    ONNX_OPSETS,
    check_onnx_versions,
    load_artifact,
    onnx_versions,
)
from flows.errors import ModelError
from tests.test_runtime import F, W, _float_model, write_artifact

OLD_IR = ONNX_IR_VERSIONS.start - 1


def _model(ir_version: int, opsets: dict[str, int]) -> bytes:
    """A one-node model whose header carries the given IR version and opsets."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "versions",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, W, F])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, W, F])],
        [helper.make_tensor("unused", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])],
        doc_string="padding " * 50,
    )
    ids = [helper.make_opsetid(domain, version) for domain, version in opsets.items()]
    model = helper.make_model(graph, opset_imports=ids, producer_name="test")
    model.ir_version = ir_version
    return model.SerializeToString()


@pytest.mark.parametrize(
    "ir_version, opsets",
    [
        (8, {"": 17}),
        (10, {"": 21, "com.microsoft": 1, "ai.onnx.ml": 5}),
        (12, {"": 25}),
        (3, {"ai.onnx": 6}),
    ],
)
def test_versions_read_as_the_onnx_package_reads_them(ir_version, opsets) -> None:
    data = _model(ir_version, opsets)
    parsed = onnx.load_from_string(data)
    expected = {op.domain: op.version for op in parsed.opset_import}

    assert onnx_versions(data) == (parsed.ir_version, expected)


def test_supported_versions_pass(tmp_path: Path) -> None:
    path = tmp_path / "ok.onnx"
    path.write_bytes(_model(ONNX_IR_VERSIONS.start, {"": ONNX_OPSETS.stop - 1}))

    check_onnx_versions(path)


@pytest.mark.parametrize(
    "ir_version, opsets, named",
    [
        (ONNX_IR_VERSIONS.stop, {"": 17}, f"IR version {ONNX_IR_VERSIONS.stop}"),
        (OLD_IR, {"": 17}, f"IR version {OLD_IR}"),
        (8, {"": ONNX_OPSETS.stop}, f"opset {ONNX_OPSETS.stop}"),
        (8, {"": ONNX_OPSETS.start - 1}, f"opset {ONNX_OPSETS.start - 1}"),
        (8, {"com.microsoft": 1}, "opset None"),
    ],
)
def test_unsupported_versions_are_refused_by_name(
    tmp_path: Path, ir_version, opsets, named
) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(_model(ir_version, opsets))

    with pytest.raises(ModelError, match=named) as caught:
        check_onnx_versions(path)
    assert str(path) in str(caught.value)


def test_an_artifact_with_a_too_new_model_is_refused_before_loading(
    tmp_path: Path,
) -> None:
    model = onnx.load_from_string(_float_model())
    model.ir_version = ONNX_IR_VERSIONS.stop
    folder = write_artifact(tmp_path / "art", model.SerializeToString())

    with pytest.raises(ModelError, match=f"IR version {ONNX_IR_VERSIONS.stop}"):
        load_artifact(folder)


@pytest.mark.parametrize("data", [b"", b"\x0a\xff", b"\x08" + b"\xff" * 12, b"\x0f"])
def test_bytes_that_are_not_onnx_are_a_model_error(data: bytes) -> None:
    if data == b"":
        assert onnx_versions(data) == (None, {})
        return
    with pytest.raises(ModelError, match="not an ONNX file"):
        onnx_versions(data)
