"""Constant folding and dead-code removal."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sparsednn.frontend.onnx_import import import_onnx
from sparsednn.passes.pipeline import run_pipeline


def reshape_by_shape_chain(x_shape):
    """x -> Reshape(x, Concat(Shape(x)[0], [-1])): the chain exporters emit for flatten."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0),
        helper.make_node("Unsqueeze", ["d0", "axes0"], ["d0v"]),
        helper.make_node("Concat", ["d0v", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
        helper.make_node("Mul", ["shape", "shape"], ["unused"]),  # dead: nothing reads it
    ]
    inits = {
        "zero": np.array(0, np.int64),
        "axes0": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shape_chain_folds_away_for_static_shapes():
    g = run_pipeline(import_onnx(reshape_by_shape_chain([2, 3, 4])))
    assert [n.op for n in g.nodes] == ["Reshape"]
    np.testing.assert_array_equal(g.nodes[0].inputs[1].const, [2, -1])
    assert g.outputs[0].shape == (2, 12)


def test_shape_chain_stays_for_symbolic_shapes_and_dead_code_goes():
    g = run_pipeline(import_onnx(reshape_by_shape_chain(["batch", 3, 4])))
    ops = [n.op for n in g.nodes]
    assert "Shape" in ops and "Reshape" in ops
    assert "Mul" not in ops


def test_folded_chains_reach_every_reader_and_the_graph_outputs():
    """A chain of foldable nodes folds in one walk: each constant reaches the next node of the
    chain, a node reading it twice, and a graph output that is one of them."""
    nodes = [
        helper.make_node("Add", ["c", "c"], ["c2"]),
        helper.make_node("Mul", ["c2", "c2"], ["c4"]),  # reads the folded c2 twice
        helper.make_node("Add", ["x", "c4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("c2", TensorProto.FLOAT, [3]),
        ],
        [numpy_helper.from_array(np.array([1, 2, 3], np.float32), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = run_pipeline(import_onnx(model))
    assert [n.op for n in g.nodes] == ["Add"]
    np.testing.assert_array_equal(g.nodes[0].inputs[1].const, [4, 16, 36])
    np.testing.assert_array_equal(g.outputs[1].const, [2, 4, 6])
