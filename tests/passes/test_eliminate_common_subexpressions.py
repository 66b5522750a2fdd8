"""Common-subexpression elimination: repeats merge, anything that differs stays apart, and the
results do not change."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import sparsednn
from sparsednn.frontend.onnx_import import import_onnx
from sparsednn.ir import Graph, Value
from sparsednn.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from sparsednn.passes.pipeline import run_pipeline


def per_layer_masks(layers=3):
    """A mask turned into additive form once per layer (as transformers' exports do), each
    layer with its own copies of the constants, then added to that layer's scores."""
    nodes, inits = [], []
    h = "x"
    for i in range(layers):
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), f"zero{i}"),
                  numpy_helper.from_array(np.array(-np.inf, np.float32), f"ninf{i}")]  # fmt: skip
        nodes += [
            helper.make_node("Where", ["keep", f"zero{i}", f"ninf{i}"], [f"mask{i}"]),
            helper.make_node("Add", [h, f"mask{i}"], [f"s{i}"]),
            helper.make_node("Softmax", [f"s{i}"], [f"p{i}"], axis=-1),
        ]
        h = f"p{i}"
    # the same Softmax with another axis: not the same computation
    nodes.append(helper.make_node("Softmax", ["s0"], ["q"], axis=0))
    nodes.append(helper.make_node("Add", [h, "q"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "masks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_per_layer_masks_become_one_and_results_stay():
    model = per_layer_masks()
    g = run_pipeline(import_onnx(model))
    ops = [n.op for n in g.nodes]
    assert ops.count("Where") == 1
    assert ops.count("Softmax") == 4  # three layers and the other axis
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    keep = rng.random((5, 8)) < 0.7
    keep[:, 0] = True
    (want,) = ReferenceEvaluator(model).run(None, {"x": x, "keep": keep})
    (got,) = sparsednn.InferenceSession(model.SerializeToString()).run(None, {"x": x, "keep": keep})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _graph_with_two(op, attrs_a, attrs_b, inputs_b=None, outputs=("a", "b")):
    g = Graph()
    x = Value("x", np.dtype(np.float32), (4,))
    g.inputs = [x]
    a = g.add_node(op, [x], attrs=attrs_a, output_names=["a"])
    b = g.add_node(op, inputs_b or [x], attrs=attrs_b, output_names=["b"])
    s = g.add_node("Add", [a.outputs[0], b.outputs[0]], output_names=["s"])
    g.outputs = [s.outputs[0]] + [v for v in (a.outputs[0], b.outputs[0]) if v.name in outputs]
    return g, s


def test_equal_nodes_merge_and_readers_follow():
    g, s = _graph_with_two("Softmax", {"axis": -1}, {"axis": -1}, outputs=("a",))
    eliminate_common_subexpressions(g)
    assert s.inputs[0] is s.inputs[1] and s.inputs[0].name == "a"


@pytest.mark.parametrize(
    "attrs_b",
    [{"axis": 0}, {"axis": -1, "extra": np.array([1, 2])}],
)
def test_different_attributes_stay_apart(attrs_b):
    g, s = _graph_with_two("Softmax", {"axis": -1, "extra": np.array([1, 3])}, attrs_b,
                           outputs=())  # fmt: skip
    eliminate_common_subexpressions(g)
    assert s.inputs[0] is not s.inputs[1]


def test_array_attributes_compare_by_value():
    g, s = _graph_with_two("Softmax", {"extra": np.array([1.0, np.nan])},
                           {"extra": np.array([1.0, np.nan])}, outputs=())  # fmt: skip
    eliminate_common_subexpressions(g)
    assert s.inputs[0] is s.inputs[1]


def test_graph_outputs_keep_their_nodes():
    g, s = _graph_with_two("Softmax", {"axis": -1}, {"axis": -1}, outputs=("a", "b"))
    eliminate_common_subexpressions(g)
    assert s.inputs[0] is not s.inputs[1]
    assert [v.name for v in g.outputs] == ["s", "a", "b"]


def test_random_ops_never_merge():
    g, s = _graph_with_two("RandomUniformLike", {"seed": 1.0}, {"seed": 1.0}, outputs=())
    eliminate_common_subexpressions(g)
    assert s.inputs[0] is not s.inputs[1]


def test_large_constants_match_by_identity_only():
    g = Graph()
    x = Value("x", np.dtype(np.float32), (4, 512))
    g.inputs = [x]
    w1 = Value.constant("w1", np.ones((512, 4), np.float32))
    w2 = Value.constant("w2", np.ones((512, 4), np.float32))  # equal, but 8 KB: not compared
    a = g.add_node("MatMul", [x, w1], output_names=["a"])
    b = g.add_node("MatMul", [x, w2], output_names=["b"])
    c = g.add_node("MatMul", [x, w1], output_names=["c"])
    s = g.add_node("Sum", [a.outputs[0], b.outputs[0], c.outputs[0]], output_names=["s"])
    g.outputs = [s.outputs[0]]
    eliminate_common_subexpressions(g)
    assert s.inputs[0] is s.inputs[2] and s.inputs[1] is not s.inputs[0]


def test_large_array_attributes_are_compared_by_identity_not_copied():
    """A Linear's weight is an attribute: comparing it by value would copy every weight of
    the model once more (a BERT-base session peaked 500 MB higher)."""
    from sparsednn.passes.eliminate_common_subexpressions import _frozen

    weight = np.ones((512, 4), np.float32)
    assert len(repr(_frozen({"weight": weight}))) < 200
    g, s = _graph_with_two("Softmax", {"w": weight}, {"w": weight.copy()}, outputs=())
    eliminate_common_subexpressions(g)
    assert s.inputs[0] is not s.inputs[1]
    g, s = _graph_with_two("Softmax", {"w": weight}, {"w": weight}, outputs=())
    eliminate_common_subexpressions(g)
    assert s.inputs[0] is s.inputs[1]
