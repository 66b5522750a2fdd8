"""Fusion passes on hand-built graphs: the patterns exporters emit, and what must not fuse."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsednn.frontend.onnx_import import import_onnx
from sparsednn.passes.pipeline import run_pipeline

rng = np.random.default_rng(0)


def model(nodes, inits, inputs=(("x", ["n", 16]),), outputs=(("y", None),)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def compiled(m):
    return run_pipeline(import_onnx(m))


W = rng.standard_normal((16, 8)).astype(np.float32)
B = rng.standard_normal(8).astype(np.float32)
F32 = np.float32


def gelu_nodes(x, out, order):
    """The decompositions of exact GELU that exporters produce."""
    div = [helper.make_node("Div", [x, "sqrt2"], ["s"])]
    mul = [helper.make_node("Mul", [x, "inv_sqrt2"], ["s"])]
    core = [helper.make_node("Erf", ["s"], ["e"]), helper.make_node("Add", ["e", "one"], ["e1"])]
    tails = {
        "x_first": [
            helper.make_node("Mul", [x, "e1"], ["m"]),
            helper.make_node("Mul", ["m", "half"], [out]),
        ],
        "half_first": [
            helper.make_node("Mul", ["e1", "half"], ["m"]),
            helper.make_node("Mul", ["m", x], [out]),
        ],
        "half_x": [
            helper.make_node("Mul", [x, "half"], ["m"]),
            helper.make_node("Mul", ["m", "e1"], [out]),
        ],
    }
    return (mul if order == "half_x" else div) + core + tails[order]


GELU_CONSTS = {
    "sqrt2": F32(np.sqrt(2)),
    "inv_sqrt2": F32(1 / np.sqrt(2)),
    "one": F32(1),
    "half": F32(0.5),
}


@pytest.mark.parametrize("order", ["x_first", "half_first", "half_x"])
def test_matmul_bias_gelu_fuse_into_one_linear(order):
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["h"]),
        *gelu_nodes("h", "y", order),
    ]
    g = compiled(model(nodes, {"W": W, "B": B, **GELU_CONSTS}))
    assert [n.op for n in g.nodes] == ["Linear"]
    attrs = g.nodes[0].attrs
    assert attrs["activation"] == "gelu"
    np.testing.assert_array_equal(attrs["weight"], W)
    np.testing.assert_array_equal(attrs["bias"], B)


def test_bias_add_with_bias_first_and_relu():
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Add", ["B", "mm"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    g = compiled(model(nodes, {"W": W, "B": B}))
    assert [n.op for n in g.nodes] == ["Linear"]
    assert g.nodes[0].attrs["activation"] == "relu"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_alpha_beta_and_transposed_weight(trans_b):
    weight = W.T.copy() if trans_b else W
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], alpha=0.5, beta=2.0, transB=trans_b)]
    g = compiled(model(nodes, {"W": weight, "B": B}))
    (linear,) = g.nodes
    np.testing.assert_allclose(linear.attrs["weight"], 0.5 * W, rtol=1e-6)
    np.testing.assert_allclose(linear.attrs["bias"], 2.0 * B, rtol=1e-6)


def test_intermediate_used_elsewhere_is_not_swallowed():
    # mm feeds both the bias Add and a graph output: the Add must stay a separate node.
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["y"]),
    ]
    m = model(nodes, {"W": W, "B": B}, outputs=(("y", None), ("mm", None)))
    g = compiled(m)
    assert [n.op for n in g.nodes] == ["Linear", "Add"]
    assert g.nodes[0].attrs["bias"] is None


def test_matmul_of_two_activations_is_not_a_linear():
    nodes = [helper.make_node("MatMul", ["x", "z"], ["y"])]
    m = model(nodes, {}, inputs=(("x", ["n", 16]), ("z", [16, 8])))
    assert [n.op for n in compiled(m).nodes] == ["MatMul"]


def test_kernel_choice_follows_sparsity():
    sparse_w = rng.standard_normal((16, 16)).astype(F32)
    sparse_w[rng.random((16, 16)) < 0.9] = 0
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y"]),
    ]
    g = compiled(model(nodes, {"W1": sparse_w, "W2": W}))
    assert [n.attrs["kernel"] for n in g.nodes] == ["sparse", "dense"]
    assert g.nodes[0].attrs["sparsity"] > 0.8 and g.nodes[1].attrs["sparsity"] == 0.0
