"""fuse_layer_norm on hand-built graphs: LayerNormalization and its opset<17 decomposition, with
and without the residual Add before it, fuse and agree with onnxruntime; what must not fuse
does not (and still agrees)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.frontend.onnx_import import import_onnx
from sparsednn.passes.pipeline import run_pipeline

ort = pytest.importorskip("onnxruntime")
F32 = np.float32
N = 24


def model(nodes, inits, inputs, outputs, opset=17):
    graph = helper.make_graph(
        nodes,
        "ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


rng = np.random.default_rng(0)
GAMMA = (1 + 0.2 * rng.standard_normal(N)).astype(F32)
BETA = rng.standard_normal(N).astype(F32)
INPUTS = [("a", ["b", "s", N]), ("r", ["b", "s", N])]


def layer_norm(x, out, *, axis=-1, bias=True, extra_outputs=()):
    inputs = [x, "gamma", "beta"] if bias else [x, "gamma"]
    return [
        helper.make_node(
            "LayerNormalization", inputs, [out, *extra_outputs], axis=axis, epsilon=1e-5
        )
    ]


def decomposed(x, out, *, square="Pow", scale=True, bias=True, axes_as_input=False):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul][/Add], as opset<17 exports emit it."""

    def mean(inp, o):
        if axes_as_input:
            return helper.make_node("ReduceMean", [inp, "axes"], [o])
        return helper.make_node("ReduceMean", [inp], [o], axes=[-1])

    nodes = [mean(x, "mu"), helper.make_node("Sub", [x, "mu"], ["d"])]
    if square == "Pow":
        nodes.append(helper.make_node("Pow", ["d", "two"], ["d2"]))
    else:
        nodes.append(helper.make_node("Mul", ["d", "d"], ["d2"]))
    nodes += [
        mean("d2", "var"),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
    ]
    last = "normed"
    nodes.append(helper.make_node("Div", ["d", "sd"], [last]))
    if scale:
        nodes.append(helper.make_node("Mul", [last, "gamma"], ["scaled"]))
        last = "scaled"
    if bias:
        nodes.append(helper.make_node("Add", ["beta", last], ["biased"]))
        last = "biased"
    nodes.append(helper.make_node("Identity", [last], [out]))
    return nodes


CONSTS = {
    "gamma": GAMMA,
    "beta": BETA,
    "two": F32(2.0),
    "eps": F32(1e-5),
    "axes": np.array([-1], np.int64),
}


def run_both(m, shapes=((1, 1), (2, 7), (3, 5))):
    graph = run_pipeline(import_onnx(m))
    reference = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    session = sparsednn.InferenceSession(m)
    for i, (b, s) in enumerate(shapes):
        r = np.random.default_rng(i)
        feed = {vi.name: (r.standard_normal((b, s, N)) * 2 + 1).astype(F32) for vi in m.graph.input}
        for e, g in zip(reference.run(None, feed), session.run(None, feed)):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    return graph.op_counts()


def test_residual_add_and_layer_norm_fuse():
    nodes = [helper.make_node("Add", ["a", "r"], ["x"]), *layer_norm("x", "y")]
    counts = run_both(model(nodes, CONSTS, INPUTS, ["y"]))
    assert counts == {"AddLayerNorm": 1}, counts


def test_residual_broadcast_over_batch_fuses():
    """The embeddings: word [B, S, N] + positions [1, S, N]."""
    nodes = [helper.make_node("Add", ["a", "r"], ["x"]), *layer_norm("x", "y")]
    m = model(nodes, CONSTS, [("a", ["b", 5, N]), ("r", [1, 5, N])], ["y"])
    graph = run_pipeline(import_onnx(m))
    assert graph.op_counts() == {"AddLayerNorm": 1}
    feed = {
        "a": rng.standard_normal((3, 5, N)).astype(F32),
        "r": rng.standard_normal((1, 5, N)).astype(F32),
    }
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feed
    )[0]
    np.testing.assert_allclose(
        sparsednn.InferenceSession(m).run(None, feed)[0], expected, rtol=1e-5, atol=1e-5
    )


def test_sum_needed_elsewhere_keeps_the_add():
    """Pre-LN blocks (ViT): the residual sum is read again later, so only the norm fuses."""
    nodes = [
        helper.make_node("Add", ["a", "r"], ["x"]),
        *layer_norm("x", "n"),
        helper.make_node("Add", ["n", "x"], ["y"]),
    ]
    counts = run_both(model(nodes, CONSTS, INPUTS, ["y"]))
    assert counts == {"Add": 2, "LayerNorm": 1}, counts


def test_layer_norm_without_bias():
    counts = run_both(model(layer_norm("a", "y", bias=False), CONSTS, INPUTS[:1], ["y"]))
    assert counts == {"LayerNorm": 1}, counts


@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("scale,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("residual", [False, True])
def test_decomposition_fuses(square, scale, bias, residual):
    x = "x" if residual else "a"
    nodes = ([helper.make_node("Add", ["a", "r"], ["x"])] if residual else []) + decomposed(
        x, "y", square=square, scale=scale, bias=bias
    )
    counts = run_both(model(nodes, CONSTS, INPUTS if residual else INPUTS[:1], ["y"]))
    assert counts == {"AddLayerNorm" if residual else "LayerNorm": 1, "Identity": 1}, counts


def test_decomposition_with_axes_as_input_fuses():
    m = model(decomposed("a", "y", axes_as_input=True), CONSTS, INPUTS[:1], ["y"], opset=18)
    assert run_both(m) == {"LayerNorm": 1, "Identity": 1}


@pytest.mark.parametrize(
    "case",
    [
        "axis_1",
        "mean_output_used",
        "scale_not_constant",
        "reduce_other_axis",
        "centred_used_elsewhere",
    ],
)
def test_lookalikes_do_not_fuse(case):
    if case == "axis_1":  # normalising over [S, N], not the features alone
        nodes, outs = layer_norm("a", "y", axis=1), ["y"]
        inits, inputs = (
            {"gamma": np.ones((5, N), F32), "beta": np.zeros((5, N), F32)},
            [("a", ["b", 5, N])],
        )
        m = model(nodes, inits, inputs, outs)
        graph = run_pipeline(import_onnx(m))
        assert "LayerNorm" not in graph.op_counts()
        feed = {"a": rng.standard_normal((2, 5, N)).astype(F32)}
        expected = ort.InferenceSession(
            m.SerializeToString(), providers=["CPUExecutionProvider"]
        ).run(None, feed)[0]
        np.testing.assert_allclose(
            sparsednn.InferenceSession(m).run(None, feed)[0], expected, rtol=1e-5, atol=1e-5
        )
        return
    if case == "mean_output_used":
        nodes, outs = layer_norm("a", "y", extra_outputs=["mean"]), ["y", "mean"]
    elif case == "scale_not_constant":
        nodes = [helper.make_node("LayerNormalization", ["a", "r", "beta"], ["y"], axis=-1)]
        outs = ["y"]
        return _check_unfused(
            model(nodes, CONSTS, [("a", ["b", "s", N]), ("r", [N])], outs),
            {"a": (2, 3, N), "r": (N,)},
        )
    elif case == "reduce_other_axis":
        nodes = decomposed("a", "y")
        nodes[0] = helper.make_node("ReduceMean", ["a"], ["mu"], axes=[1])
        outs = ["y"]
    else:  # d = x - mean also feeds another output
        nodes = [*decomposed("a", "y"), helper.make_node("Identity", ["d"], ["d_out"])]
        outs = ["y", "d_out"]
    counts = run_both(model(nodes, CONSTS, INPUTS[:1], outs))
    assert "LayerNorm" not in counts and "AddLayerNorm" not in counts, counts


def _check_unfused(m, shapes):
    graph = run_pipeline(import_onnx(m))
    assert "LayerNorm" not in graph.op_counts() and "AddLayerNorm" not in graph.op_counts()
    feed = {k: rng.standard_normal(s).astype(F32) for k, s in shapes.items()}
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feed
    )[0]
    np.testing.assert_allclose(
        sparsednn.InferenceSession(m).run(None, feed)[0], expected, rtol=1e-5, atol=1e-5
    )
