"""Inputs to run(): correct results or clear InvalidInputErrors, checked before any native code
runs; arrays of any layout; lists; empty batches; 0-d arrays. Compared with onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.errors import InvalidInputError, SparseDNNError
from sparsednn.models import ARCHITECTURES, build_encoder, example_inputs

rng = np.random.default_rng(0)
W = rng.standard_normal((16, 24)).astype(np.float32)
W[rng.random(W.shape) < 0.9] = 0
B = rng.standard_normal(24).astype(np.float32)
TINY = ARCHITECTURES["bert-tiny"]


def two_input_model():
    """y = relu(a @ W + B) * s + c: a sparse Linear with a ReLU epilogue, a scalar input."""
    nodes = [
        helper.make_node("MatMul", ["a", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Mul", ["r", "s"], ["rs"]),
        helper.make_node("Add", ["rs", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 16]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 24]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 24])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def session():
    s = sparsednn.InferenceSession(two_input_model())
    assert s.graph.nodes[0].op == "Linear" and "spmm" in s.graph.nodes[0].attrs["kernel"]
    return s


@pytest.fixture(scope="module")
def bert():
    m = build_encoder(TINY, 0.9)
    return (
        sparsednn.InferenceSession(m),
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]),
    )


def feed(batch=3):
    return {
        "a": rng.standard_normal((batch, 16)).astype(np.float32),
        "c": rng.standard_normal((batch, 24)).astype(np.float32),
        "s": np.array(1.5, np.float32),
    }


def reference(f):
    a, c, s = (np.asarray(f[k], np.float64) for k in "acs")
    return np.maximum(a @ W + B, 0) * s + c


@pytest.fixture
def no_native_run(session, monkeypatch):
    """Fails the test if the plan starts executing: checks must come first."""

    def refuse(env):
        raise AssertionError("the plan ran: inputs were not checked first")

    monkeypatch.setattr(session, "_execute", refuse)


# -- clear errors, before anything runs ---------------------------------------------------
def bad_feeds():
    f = feed(2)
    return {
        "unknown name": ({**f, "extra": f["a"]}, "unknown input.*'extra'"),
        "wrong case": ({"A": f["a"], "c": f["c"], "s": f["s"]}, "unknown input.*'A'"),
        "missing": ({"a": f["a"], "s": f["s"]}, "missing input.*'c'"),
        "float64": ({**f, "a": f["a"].astype(np.float64)}, "'a' must be float32, got float64"),
        "float16": ({**f, "a": f["a"].astype(np.float16)}, "'a' must be float32, got float16"),
        "int32": ({**f, "a": f["a"].astype(np.int32)}, "'a' must be float32, got int32"),
        "complex": ({**f, "a": f["a"].astype(np.complex64)}, "must be float32"),
        "object": ({**f, "a": f["a"].astype(object)}, "must be float32, got object"),
        "strings": ({**f, "a": np.full((2, 16), "x")}, "must be float32"),
        "None": ({**f, "a": None}, "must be float32, got object"),
        "rank 1": ({**f, "a": f["a"][0]}, "'a' must have rank 2"),
        "rank 3": ({**f, "a": f["a"][None]}, "'a' must have rank 2"),
        "0-d for rank 2": ({**f, "a": np.float32(1)}, "'a' must have rank 2"),
        "rank 1 for scalar": ({**f, "s": np.ones(1, np.float32)}, "'s' must have rank 0"),
        "static dim": ({**f, "a": np.zeros((2, 15), np.float32)}, "'a' axis 1 must be 16"),
        "symbol mismatch": (
            {**f, "c": np.zeros((3, 24), np.float32)},
            "'batch' is 2 in input 'a' but 3 in input 'c'",
        ),
        "ragged list": ({**f, "a": [[1.0] * 16, [1.0] * 15]}, "'a' cannot be made an array"),
    }


@pytest.mark.parametrize("case", list(bad_feeds()))
def test_bad_inputs_are_clear_errors_before_running(session, no_native_run, case):
    f, match = bad_feeds()[case]
    with pytest.raises(InvalidInputError, match=match):
        session.run(None, f)


@pytest.mark.parametrize("feed_value", [None, [], ("a",), "a", 3])
def test_feed_that_is_not_a_dict(session, no_native_run, feed_value):
    with pytest.raises(InvalidInputError, match="must be a dict"):
        session.run(None, feed_value)


def test_unknown_output_name(session, no_native_run):
    with pytest.raises(InvalidInputError, match="no output named 'nope'"):
        session.run(["nope"], feed())


# -- any layout gives the same answer -----------------------------------------------------
def layouts(x):
    big_endian = x.astype(x.dtype.newbyteorder(">"))
    raw = np.zeros(x.nbytes + 1, np.uint8)
    unaligned = raw[1:].view(x.dtype).reshape(x.shape)
    unaligned[...] = x
    read_only = x.copy()
    read_only.flags.writeable = False
    return {
        "fortran": np.asfortranarray(x),
        "strided": np.repeat(x, 2, axis=0)[::2],
        "reversed twice": x[::-1][::-1],
        "negative strides": np.ascontiguousarray(x[::-1])[::-1],
        "transposed view": np.ascontiguousarray(x.T).T,
        "read-only": read_only,
        "unaligned": unaligned,
        "big-endian": big_endian,
        "masked array": np.ma.masked_array(x, mask=np.zeros_like(x, bool)),
        "list": x.tolist(),
    }


@pytest.mark.parametrize("layout", list(layouts(np.zeros((1, 1), np.float32))))
def test_every_layout_gives_the_same_answer(session, layout):
    f = feed(5)
    want = reference(f)
    (y,) = session.run(None, {**f, "a": layouts(f["a"])[layout], "c": layouts(f["c"])[layout]})
    assert y.dtype == np.float32 and y.shape == (5, 24)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_inputs_are_not_modified(session):
    f = feed(4)
    copies = {k: v.copy() for k, v in f.items()}
    session.run(None, f)
    for k in f:
        np.testing.assert_array_equal(f[k], copies[k])


def test_output_does_not_alias_the_input():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "id",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    s = sparsednn.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    x = np.arange(3, dtype=np.float32)
    (y,) = s.run(None, {"x": x})
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("scalar", [np.array(2.0, np.float32), np.float32(2.0), 2.0, 2, [2.0][0]])
def test_zero_d_and_python_scalars(session, scalar):
    f = {**feed(3), "s": scalar}
    (y,) = session.run(None, f)
    np.testing.assert_allclose(y, reference({**f, "s": 2.0}), rtol=1e-5, atol=1e-5)


def test_python_lists_of_ints_for_a_float_input(session):
    f = feed(2)
    ints = np.arange(32).reshape(2, 16) % 5 - 2
    (y,) = session.run(None, {**f, "a": ints.tolist()})
    np.testing.assert_allclose(y, reference({**f, "a": ints}), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [0, 1, 2, 17, 64, 257])
def test_any_batch_including_empty(session, batch):
    f = feed(batch)
    (y,) = session.run(None, f)
    assert y.shape == (batch, 24)
    np.testing.assert_allclose(y, reference(f), rtol=1e-5, atol=1e-5)


def test_an_empty_list_has_no_shape_to_give(session):
    """[] is shape (0,): a rank error for a [batch, 24] input, not a guess."""
    with pytest.raises(InvalidInputError, match="'c' must have rank 2"):
        session.run(None, {"a": np.zeros((0, 16), np.float32), "c": [], "s": 1.0})


# -- a whole BERT-like model --------------------------------------------------------------
@pytest.mark.parametrize("batch, sequence", [(0, 8), (1, 0), (0, 0), (1, 1), (3, 17)])
def test_bert_edge_shapes_match_onnxruntime(bert, batch, sequence):
    ours, theirs = bert
    f = example_inputs(TINY, batch, sequence, seed=batch * 31 + sequence)
    (want,) = theirs.run(None, f)
    (got,) = ours.run(None, f)
    assert got.shape == want.shape == (batch, sequence, TINY.hidden)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_bert_inputs_as_lists_and_int32_lists(bert):
    ours, theirs = bert
    f = example_inputs(TINY, 2, 6)
    (want,) = theirs.run(None, f)
    (got,) = ours.run(None, {k: v.tolist() for k, v in f.items()})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_bert_wrong_id_dtypes(bert):
    ours, _ = bert
    f = example_inputs(TINY, 2, 6)
    for bad, got in [
        (f["input_ids"].astype(np.int32), "int32"),
        (f["input_ids"].astype(np.float32), "float32"),
        (f["input_ids"].astype(np.float64).tolist(), "float64"),
    ]:
        with pytest.raises(InvalidInputError, match=f"'input_ids' must be int64, got {got}"):
            ours.run(None, {**f, "input_ids": bad})


def test_bert_sequence_mismatch_between_inputs(bert):
    ours, _ = bert
    f = example_inputs(TINY, 2, 6)
    f["attention_mask"] = np.ones((2, 7), np.int64)
    with pytest.raises(InvalidInputError, match="'sequence' is 6 in input 'input_ids' but 7"):
        ours.run(None, f)


@pytest.mark.parametrize("token", [TINY.vocab, 10**12, -TINY.vocab - 1])
def test_bert_token_ids_out_of_range_are_errors(bert, token):
    ours, _ = bert
    f = example_inputs(TINY, 2, 6)
    f["input_ids"][1, 3] = token
    with pytest.raises(SparseDNNError, match="Gather"):
        ours.run(None, f)


def test_bert_negative_token_ids_count_from_the_end_like_onnxruntime(bert):
    ours, theirs = bert
    f = example_inputs(TINY, 2, 6)
    f["input_ids"][0, :3] = [-1, -5, -TINY.vocab]
    np.testing.assert_allclose(ours.run(None, f)[0], theirs.run(None, f)[0], rtol=0, atol=1e-4)
