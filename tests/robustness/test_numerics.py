"""NaN and Inf propagate as in onnxruntime: through the sparse and dense linear kernels, their
ReLU and GELU epilogues, and a whole BERT-like model."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import sparsednn
from sparsednn.models import ARCHITECTURES, build_encoder, example_inputs

K, N = 64, 48


def linear_model(activation, sparsity, seed=0):
    """y = act(x @ w + b) as an exporter writes it (GELU as its erf decomposition); w has a
    zero row and zero columns, so that NaN * 0 and Inf * 0 matter."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    w[:, :3] = 0
    w[5, :] = 0
    b = rng.standard_normal(N).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["h"]),
    ]
    if activation == "relu":
        nodes.append(helper.make_node("Relu", ["h"], ["y"]))
    elif activation == "gelu":
        nodes += [
            helper.make_node("Div", ["h", "sqrt2"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["e1"]),
            helper.make_node("Mul", ["h", "e1"], ["m1"]),
            helper.make_node("Mul", ["m1", "half"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["h"], ["y"]))
    consts = {
        "w": w,
        "b": b,
        "sqrt2": np.float32(np.sqrt(2)),
        "one": np.float32(1),
        "half": np.float32(0.5),
    }
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes,
        f"linear_{activation}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items() if k in used],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def special_rows(seed=1):
    x = np.random.default_rng(seed).standard_normal((12, K)).astype(np.float32)
    x[0, 0] = np.nan  # a NaN meeting nonzero weights
    x[1, 1] = np.inf  # +Inf against weights of both signs (and zero ones: NaN)
    x[2, 2] = -np.inf
    x[3, 5] = np.nan  # in the all-zero row of w: the sparse kernel never reads it
    x[4, 5] = np.inf
    x[5, 7] = 1e30  # large but finite: products overflow to +-Inf in some columns
    x[6, 9] = -1e30
    x[7, :] = np.inf  # +Inf + -Inf: NaN
    x[8, :] = 0.0
    x[9, 10:20] = np.nan
    x[10, 5] = -np.inf
    return x  # row 11: plain finite values


def assert_same_specials(got, want, atol=1e-4):
    """Same NaN positions, same infinities (with sign), finite values close."""
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN positions differ")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg="+Inf differs")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg="-Inf differs")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=atol)


def ort_run(m, feed):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feed)[0]


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_linear_kernels_propagate_nan_and_inf_like_onnxruntime(activation, sparsity):
    m = linear_model(activation, sparsity)
    session = sparsednn.InferenceSession(m)
    (linear,) = [n for n in session.graph.nodes if n.op == "Linear"]
    assert linear.attrs["activation"] == activation
    assert ("spmm" in linear.attrs["kernel"]) == (sparsity > 0.5)
    x = special_rows()
    (got,) = session.run(None, {"x": x})
    assert_same_specials(got, ort_run(m, {"x": x}))


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_sparse_kernel_agrees_with_onnx_reference(activation):
    """onnx.reference agrees with onnxruntime here (not for GELU near float32's max, where its
    unfused decomposition overflows in x * (1 + erf) before the * 0.5)."""
    m = linear_model(activation, 0.9)
    x = special_rows()
    (got,) = sparsednn.InferenceSession(m).run(None, {"x": x})
    assert_same_specials(got, ReferenceEvaluator(m).run(None, {"x": x})[0])


def test_threaded_sparse_kernel_propagates_like_onnxruntime():
    m = linear_model("gelu", 0.9)
    session = sparsednn.InferenceSession(m, sparsednn.SessionOptions(intra_op_num_threads=2))
    x = np.tile(special_rows(), (40, 1))
    (got,) = session.run(None, {"x": x})
    assert_same_specials(got, ort_run(m, {"x": x}))


@pytest.fixture(scope="module")
def poisoned_bert():
    """bert-tiny at 90% sparsity whose embedding rows 7, 8 and 9 hold a NaN, +Inf and -Inf."""
    cfg = ARCHITECTURES["bert-tiny"]
    m = build_encoder(cfg, 0.9)
    (emb,) = [t for t in m.graph.initializer if t.name.startswith("word_embeddings")]
    table = numpy_helper.to_array(emb).copy()
    table[7, 3], table[8, 5], table[9, 0] = np.nan, np.inf, -np.inf
    emb.CopyFrom(numpy_helper.from_array(table, emb.name))
    return cfg, m, sparsednn.InferenceSession(m)


@pytest.mark.parametrize("token", [7, 8, 9])
def test_nan_and_inf_through_a_whole_bert_like_model(poisoned_bert, token):
    cfg, m, session = poisoned_bert
    feed = example_inputs(cfg, 3, 10, seed=token)
    feed["input_ids"][feed["input_ids"] < 10] = 11
    feed["input_ids"][0, 4] = token  # one poisoned token in the first sequence
    (got,) = session.run(None, feed)
    want = ort_run(m, feed)
    assert np.isnan(want[0]).any() and not np.isnan(want[1:]).any()
    assert_same_specials(got, want)


def test_masked_positions_and_large_values_stay_finite(poisoned_bert):
    cfg, m, session = poisoned_bert
    feed = example_inputs(cfg, 4, 12, seed=3)
    feed["input_ids"][feed["input_ids"] < 10] = 11
    feed["attention_mask"][2] = 0  # a fully masked row: softmax of equal -3.4e38s
    (got,) = session.run(None, feed)
    want = ort_run(m, feed)
    assert np.isfinite(want).all()
    assert_same_specials(got, want)
