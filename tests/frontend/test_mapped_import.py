"""A model file's weights are mapped, not read (frontend/onnx_wire.py, ir/storage.py): they equal
onnx's own reading, a damaged file is still a clear error, external data is still confined to
the model's folder, and no session keeps the file mapped."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.errors import InvalidGraphError, ModelLoadError
from sparsednn.frontend.onnx_import import _read_model, import_onnx, to_array
from sparsednn.frontend.onnx_wire import WireFormatError, strip_raw_data
from sparsednn.ir.storage import mapping_of, own, release, zero_fraction

K, N = 64, 48  # a 12 KB weight: above the 4 KB from which raw_data is mapped


def linear_model(weights=None, small=True):
    rng = np.random.default_rng(0)
    if weights is None:  # 90% zeros: a sparse kernel
        weights = rng.standard_normal((K, N)).astype(np.float32)
        weights[rng.random(weights.shape) < 0.9] = 0
    w = weights
    inits = [numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"])]
    if small:  # a tensor left in the proto beside the mapped one
        inits.append(numpy_helper.from_array(np.arange(N, dtype=np.float32), "b"))
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["h"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "lin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, np.float64, np.int64, np.int32, np.uint8, np.bool_]
)
def test_mapped_weights_equal_onnx_numpy_helper(tmp_path, dtype):
    array = (np.arange(3 * 2000) % 7).astype(dtype).reshape(3, 2000)
    model = linear_model()
    model.graph.initializer.append(numpy_helper.from_array(array, "extra"))
    proto, _, data = _read_model(save(tmp_path, model))
    assert sorted(data) == [0, 2]  # the weight and `extra`, not the small bias
    for i, tensor in enumerate(model.graph.initializer):
        got = to_array(proto.graph.initializer[i], "m", data.get(i))
        want = numpy_helper.to_array(tensor)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert (mapping_of(got) is not None) == (i in data)
        assert not got.flags.writeable  # constants were never writable


def test_stripped_proto_keeps_everything_but_the_payloads():
    model = linear_model()
    data = model.SerializeToString()
    stripped, spans = strip_raw_data(data)
    assert len(stripped) < len(data) - K * N * 4 + 100
    proto = onnx.ModelProto.FromString(stripped)
    assert [t.name for t in proto.graph.initializer] == ["w", "b"]
    assert proto.graph.initializer[0].HasField("raw_data")  # still says where its data is
    assert proto.graph.initializer[0].raw_data == b""
    assert proto.graph.initializer[1].raw_data == model.graph.initializer[1].raw_data
    offset, length = spans[0]
    assert data[offset : offset + length] == model.graph.initializer[0].raw_data
    assert spans[1] is None
    assert proto.graph.node == model.graph.node


def test_repeated_graph_and_raw_data_follow_protobuf():
    """Two graph fields merge (initializers concatenate); a tensor's last raw_data wins."""
    first, second = linear_model(), linear_model()
    second.graph.initializer[0].name = "w2"
    second.graph.initializer[0].raw_data = np.ones(K * N, np.float32).tobytes()
    data = first.SerializeToString() + second.SerializeToString()
    tensor = numpy_helper.from_array(np.full((K, N), 2, np.float32), "t")
    tensor_bytes = tensor.SerializeToString()
    stripped, spans = strip_raw_data(data)
    merged = onnx.ModelProto.FromString(data)
    proto = onnx.ModelProto.FromString(stripped)
    assert [t.name for t in proto.graph.initializer] == [t.name for t in merged.graph.initializer]
    for tensor_proto, span in zip(merged.graph.initializer, spans):
        if span is not None:
            assert data[span[0] : span[0] + span[1]] == tensor_proto.raw_data
    twice = onnx.TensorProto.FromString(tensor_bytes + tensor_bytes[-(K * N * 4 + 3) :])
    assert twice.raw_data == tensor.raw_data


@pytest.mark.parametrize("cut", [1, 7, 100, K * N * 2, -200, -3, -1])
def test_truncated_files_are_load_errors(tmp_path, cut):
    data = linear_model().SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match="m.onnx"):
        sparsednn.InferenceSession(str(path))


def test_wire_reader_gives_up_on_what_it_cannot_follow():
    data = linear_model().SerializeToString()
    for bad in (data[:-1], b"\x00" + data, bytes([7 << 3 | 3]) + data, b"\xff" * 11):
        with pytest.raises(WireFormatError):
            strip_raw_data(bad)


def test_corrupted_files_are_clear_errors_never_crashes(tmp_path):
    data = bytearray(linear_model().SerializeToString())
    rng = np.random.default_rng(1)
    path = tmp_path / "m.onnx"
    for _ in range(60):
        mutated = bytearray(data)
        for pos in rng.integers(0, 200, 3):  # the headers, not the float payload
            mutated[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(mutated))
        try:
            sparsednn.InferenceSession(str(path))
        except sparsednn.SparseDNNError:
            pass


def test_wrong_raw_data_size_is_an_invalid_graph(tmp_path):
    model = linear_model()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    with pytest.raises(InvalidGraphError, match="'w' holds 12284 bytes"):
        sparsednn.InferenceSession(str(save(tmp_path, model)))


def test_session_matches_the_model_and_keeps_no_mapping(tmp_path):
    model = linear_model()
    path = save(tmp_path, model)
    session = sparsednn.InferenceSession(str(path))
    x = np.random.default_rng(2).standard_normal((3, K)).astype(np.float32)
    w, b = (numpy_helper.to_array(t) for t in model.graph.initializer)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ w + b, rtol=1e-5, atol=1e-5)
    assert str(path) not in Path("/proc/self/maps").read_text()
    path.write_bytes(b"")  # a file rewritten later changes nothing
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ w + b, rtol=1e-5, atol=1e-5)


def test_dense_weights_get_memory_of_their_own(tmp_path):
    weights = np.random.default_rng(3).standard_normal((K, N)).astype(np.float32) + 10
    path = save(tmp_path, linear_model(weights, small=False))
    graph = import_onnx(str(path))  # not mapped: every constant is a copy
    (w,) = [v.const for v in graph.values() if v.is_const]
    assert mapping_of(w) is None and not w.flags.writeable
    session = sparsednn.InferenceSession(str(path))
    (linear,) = [n for n in session.graph.nodes if n.op == "Linear"]
    assert type(session.kernels[linear.name]).__name__ == "DenseLinearKernel"
    assert mapping_of(linear.attrs["weight"]) is None
    x = np.ones((2, K), np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weights, rtol=1e-5)


def test_own_and_release_of_mapped_views(tmp_path):
    model = linear_model()
    _, _, data = _read_model(save(tmp_path, model))
    view = np.frombuffer(data[0], np.float32).reshape(K, N)
    want = numpy_helper.to_array(model.graph.initializer[0])
    release(view.T[::3])  # any view: its pages are read again from the file
    np.testing.assert_array_equal(view, want)
    copy = own(view.T, chunk_bytes=100)
    assert mapping_of(copy) is None
    np.testing.assert_array_equal(copy, want.T)
    plain = np.zeros(3)
    assert own(plain) is plain
    release(plain)  # a no-op


def test_own_reads_large_views_from_the_file_and_copies_if_it_was_replaced(tmp_path):
    model = linear_model()
    path = save(tmp_path, model)
    _, _, data = _read_model(path)
    view = np.frombuffer(data[0], np.float32).reshape(K, N)
    want = numpy_helper.to_array(model.graph.initializer[0])
    out = np.empty_like(view)
    assert mapping_of(view).read_into(out, view)  # read from the file, not the mapping
    np.testing.assert_array_equal(out, want)
    read = own(view, chunk_bytes=16)
    assert mapping_of(read) is None and not read.flags.writeable
    np.testing.assert_array_equal(read, want)
    path.unlink()
    save(tmp_path, linear_model(np.full((K, N), 7.0, np.float32)))  # another file, same path
    assert not mapping_of(view).read_into(out, view)
    np.testing.assert_array_equal(own(view, chunk_bytes=16), want)  # from the mapping


def test_external_data_is_mapped_and_equal(tmp_path):
    model = linear_model()
    w, b = (numpy_helper.to_array(t) for t in model.graph.initializer)
    onnx.save_model(  # (moves the weight out of `model` too)
        model,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        location="m.data",
        size_threshold=1024,
    )
    proto, _, data = _read_model(tmp_path / "m.onnx")
    assert list(data) == [0]
    got = to_array(proto.graph.initializer[0], "m", data[0])
    np.testing.assert_array_equal(got, w)
    assert mapping_of(got) is not None
    del got, data
    session = sparsednn.InferenceSession(str(tmp_path / "m.onnx"))
    x = np.ones((1, K), np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ w + b, rtol=1e-5, atol=1e-5)
    assert "m.data" not in Path("/proc/self/maps").read_text()


def test_mapped_external_data_stays_in_the_models_folder(tmp_path):
    model = linear_model()
    tensor = model.graph.initializer[0]
    (tmp_path / "secret.bin").write_bytes(tensor.raw_data)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    (tmp_path / "model").mkdir()
    path = save(tmp_path / "model", model)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        _read_model(path)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        sparsednn.InferenceSession(str(path))


def test_zero_fraction_counts_signed_zeros_not_nans():
    a = np.array([0.0, -0.0, np.nan, 1.0, -np.inf, 0.0, 2.0, -0.0], np.float32)
    assert zero_fraction(a) == 0.5
    assert zero_fraction(np.zeros((0, 4), np.float32)) == 1.0
    assert zero_fraction(np.arange(6, dtype=np.int64).reshape(2, 3)) == pytest.approx(1 / 6)
