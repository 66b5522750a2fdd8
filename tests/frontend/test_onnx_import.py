"""ONNX import: bad files and models give clear sparsednn errors, never a crash."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.errors import InvalidGraphError, ModelLoadError, UnsupportedOpError
from sparsednn.frontend.onnx_import import import_onnx


def relu_model(opset=17, op="Relu"):
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], name="the_node")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_truncated_file_is_a_load_error(tmp_path):
    data = relu_model().SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="m.onnx"):
        sparsednn.InferenceSession(str(path))


def test_random_bytes_are_a_load_error():
    with pytest.raises(ModelLoadError):
        sparsednn.InferenceSession(os.urandom(1000))


def test_missing_file_names_the_path():
    with pytest.raises(ModelLoadError, match="nope.onnx"):
        sparsednn.InferenceSession("nope.onnx")


def test_unsupported_op_names_op_node_and_supported_list():
    with pytest.raises(UnsupportedOpError) as info:
        import_onnx(relu_model(op="NotARealOp"))
    message = str(info.value)
    assert "NotARealOp" in message and "the_node" in message and "Relu" in message


def test_old_opset_is_refused_with_the_remedy():
    with pytest.raises(ModelLoadError, match="opset 9"):
        import_onnx(relu_model(opset=9))


def test_dangling_input_is_an_invalid_graph():
    m = relu_model()
    m.graph.node[0].input[0] = "nowhere"
    with pytest.raises(InvalidGraphError, match="nowhere"):
        import_onnx(m)


def test_initializer_whose_size_disagrees_with_its_dims():
    m = relu_model(op="Add")
    m.graph.node[0].input.append("c")
    t = numpy_helper.from_array(np.ones(4, np.float32), "c")
    t.dims[:] = [5]
    m.graph.initializer.append(t)
    with pytest.raises(InvalidGraphError, match="'c'"):
        import_onnx(m)


def external_model(tmp_path, location):
    m = relu_model(op="Add")
    m.graph.node[0].input.append("c")
    t = numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    for k, v in {"location": location, "offset": "0", "length": "16"}.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    m.graph.initializer.append(t)
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save(m, path, save_as_external_data=False)
    return path


def test_external_data_beside_the_model_loads(tmp_path):
    path = external_model(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    graph = import_onnx(str(path))
    (add,) = graph.nodes
    np.testing.assert_array_equal(add.inputs[1].const, np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = external_model(tmp_path, location)
    with pytest.raises(ModelLoadError, match="outside"):
        import_onnx(str(path))


def test_external_data_symlink_leaving_the_folder_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = external_model(tmp_path, "link.bin")
    os.symlink(tmp_path / "secret.bin", path.parent / "link.bin")
    with pytest.raises(ModelLoadError, match="outside"):
        import_onnx(str(path))


def test_short_external_file_is_a_clear_error(tmp_path):
    path = external_model(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="8 bytes"):
        import_onnx(str(path))
