"""External data: locations that escape the model's folder are refused, bad offsets, lengths
and files are clear errors.

A model given as bytes or as a ModelProto has no folder of its own: like onnxruntime, sparsednn
reads its external data relative to the current working directory, under the same rules (no
'..', no absolute path, no symlink leading out of it)."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.errors import InvalidGraphError, ModelLoadError

WEIGHTS = np.arange(4, dtype=np.float32)


def model_with_external(location, offset="0", length="16", extra=None):
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    t = numpy_helper.from_array(WEIGHTS, "c")
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    info = {"location": location, "offset": offset, "length": length, **(extra or {})}
    for k, v in info.items():
        if v is not None:
            e = t.external_data.add()
            e.key, e.value = k, v
    graph.initializer.append(t)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def saved(tmp_path, m):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    path = folder / "m.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def run(session):
    (y,) = session.run(None, {"x": np.zeros((1, 4), np.float32)})
    return y[0]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"\0" * 8 + WEIGHTS.tobytes())
    (tmp_path / "secret.bin").write_bytes(WEIGHTS.tobytes())
    return tmp_path


def test_offset_and_length_within_the_file(folder):
    path = saved(folder, model_with_external("w.bin", offset="8", length="16"))
    np.testing.assert_array_equal(run(sparsednn.InferenceSession(str(path))), WEIGHTS)


def test_no_length_reads_to_the_end(folder):
    path = saved(folder, model_with_external("w.bin", offset="8", length=None))
    np.testing.assert_array_equal(run(sparsednn.InferenceSession(str(path))), WEIGHTS)


def test_symlink_inside_the_folder_is_fine(folder):
    os.symlink(folder / "model" / "w.bin", folder / "model" / "alias.bin")
    path = saved(folder, model_with_external("alias.bin", offset="8"))
    np.testing.assert_array_equal(run(sparsednn.InferenceSession(str(path))), WEIGHTS)


@pytest.mark.parametrize(
    "location",
    [
        "../secret.bin",
        "sub/../../secret.bin",
        "/etc/passwd",
        "//etc/passwd",
        "./../secret.bin",
    ],
)
def test_escaping_locations_are_refused(folder, location):
    (folder / "model" / "sub").mkdir()
    path = saved(folder, model_with_external(location))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        sparsednn.InferenceSession(str(path))


def test_symlinked_folder_leading_out_is_refused(folder):
    os.symlink(folder, folder / "model" / "up")
    path = saved(folder, model_with_external("up/secret.bin"))
    with pytest.raises(ModelLoadError, match="outside"):
        sparsednn.InferenceSession(str(path))


def test_symlink_loop_is_a_clear_error(folder):
    os.symlink(folder / "model" / "b", folder / "model" / "a")
    os.symlink(folder / "model" / "a", folder / "model" / "b")
    path = saved(folder, model_with_external("a"))
    with pytest.raises(ModelLoadError, match="'a'|a'"):
        sparsednn.InferenceSession(str(path))


@pytest.mark.parametrize(
    "offset, length, match",
    [
        ("-1", "16", "offset -1"),
        ("0", "-16", "-16 bytes"),
        ("8", "100", "24 bytes.*100 bytes at offset 8"),
        ("1000", "16", "offset 1000"),
        ("abc", "16", "must be integers"),
        ("0", "1e3", "must be integers"),
        ("0", str(2**70), "bytes"),
    ],
)
def test_bad_offsets_and_lengths(folder, offset, length, match):
    path = saved(folder, model_with_external("w.bin", offset=offset, length=length))
    with pytest.raises(ModelLoadError, match=match):
        sparsednn.InferenceSession(str(path))


def test_length_that_disagrees_with_the_tensor_dims(folder):
    path = saved(folder, model_with_external("w.bin", offset="0", length="12"))
    with pytest.raises(InvalidGraphError, match="holds 12 bytes.*16 bytes"):
        sparsednn.InferenceSession(str(path))


@pytest.mark.parametrize(
    "location, match",
    [
        ("missing.bin", "is missing"),
        (".", "not a regular file"),
        ("sub", "not a regular file"),
        ("", "no usable location"),
        (None, "no usable location"),
        ("w.bin\x00.txt", "no usable location"),
    ],
)
def test_missing_or_unusable_locations(folder, location, match):
    (folder / "model" / "sub").mkdir()
    path = saved(folder, model_with_external(location))
    with pytest.raises(ModelLoadError, match=match):
        sparsednn.InferenceSession(str(path))


def test_fifo_is_not_read(folder):
    os.mkfifo(folder / "model" / "pipe")
    path = saved(folder, model_with_external("pipe"))
    with pytest.raises(ModelLoadError, match="not a regular file"):
        sparsednn.InferenceSession(str(path))  # (reading it would block forever)


def test_device_is_not_read(folder):
    os.symlink("/dev/zero", folder / "model" / "zero")
    path = saved(folder, model_with_external("zero"))
    with pytest.raises(ModelLoadError):
        sparsednn.InferenceSession(str(path))


# -- a model without a folder: bytes or a ModelProto --------------------------------------
@pytest.mark.parametrize("as_bytes", [True, False])
def test_bytes_and_protos_read_relative_to_the_working_directory(folder, monkeypatch, as_bytes):
    monkeypatch.chdir(folder / "model")
    m = model_with_external("w.bin", offset="8")
    session = sparsednn.InferenceSession(m.SerializeToString() if as_bytes else m)
    np.testing.assert_array_equal(run(session), WEIGHTS)


@pytest.mark.parametrize("as_bytes", [True, False])
@pytest.mark.parametrize("location", ["../secret.bin", str("/etc/passwd")])
def test_bytes_and_protos_cannot_escape_the_working_directory(
    folder, monkeypatch, as_bytes, location
):
    monkeypatch.chdir(folder / "model")
    m = model_with_external(location)
    with pytest.raises(ModelLoadError, match="outside"):
        sparsednn.InferenceSession(m.SerializeToString() if as_bytes else m)


def test_bytes_with_missing_external_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="w.bin.*is missing"):
        sparsednn.InferenceSession(model_with_external("w.bin").SerializeToString())


def test_onnx_saved_external_data_round_trip(tmp_path):
    """What onnx.save writes (external data beside the model) loads and matches."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(w, "w")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "big.onnx"
    onnx.save(m, path, save_as_external_data=True, location="big.data", size_threshold=0)
    assert (tmp_path / "big.data").exists()
    x = rng.standard_normal((3, 64)).astype(np.float32)
    (y,) = sparsednn.InferenceSession(str(path)).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
