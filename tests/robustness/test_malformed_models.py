"""Malformed models: every one gives a sparsednn error with a clear message, never a crash, a
hang or a huge allocation. Explicit cases first, then hypothesis-driven structured mutations
(bench/fuzz.py runs 10,000+ of the same mutations)."""

import time

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.errors import InvalidGraphError, ModelLoadError, SparseDNNError, UnsupportedOpError
from sparsednn.testing import (
    BASE_MODELS,
    MUTATORS,
    DrawChooser,
    run_model,
    shape_ops_model,
    small_mlp,
    structured_mutation,
    try_model,
    unguarded_allocation,
)

F = TensorProto.FLOAT


def model(nodes, inputs=None, outputs=None, inits=(), opset=17):
    inputs = inputs or [helper.make_tensor_value_info("x", F, ["n", 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", F, None)]
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def i64(name, *values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def fails(proto_or_bytes, error=SparseDNNError, match=None, feed=None):
    """The model fails cleanly, at load or at run, with `error` matching `match`."""
    t0 = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        session = sparsednn.InferenceSession(proto_or_bytes)
        session.run(None, feed if feed is not None else {"x": np.ones((2, 4), np.float32)})
    assert time.perf_counter() - t0 < 10, "took too long to fail"
    assert not unguarded_allocation(info.value), "an allocation failed before any check"
    return str(info.value)


# -- bytes --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\xff" * 64,
        b"\x08\x07" * 100,
        b"\x3a\xff\xff\xff\xff\x0f",
        b"not a model at all",
    ],
)
def test_garbage_bytes(data):
    fails(data, ModelLoadError)


def test_truncated_at_every_tenth_byte():
    data = small_mlp().SerializeToString()
    for cut in range(0, len(data), max(1, len(data) // 10)):
        assert try_model(data[:cut]) in ("ok", "error")


def test_valid_protobuf_without_a_graph():
    fails(onnx.ModelProto(ir_version=8).SerializeToString(), ModelLoadError, "no graph")


def test_names_that_are_not_utf8():
    m = small_mlp()
    m.graph.node[0].attribute.add(name="axis", type=onnx.AttributeProto.INT, i=1)
    data = m.SerializeToString().replace(b"axis", b"a\xf8is")
    fails(data, ModelLoadError, "not UTF-8")


# -- missing fields, wrong types ----------------------------------------------------------
def test_node_without_op_type():
    m = small_mlp()
    m.graph.node[2].ClearField("op_type")
    fails(m, UnsupportedOpError, "Relu_2|node")


def test_node_without_inputs():
    fails(
        model([helper.make_node("Relu", [], ["y"])]),
        InvalidGraphError,
        "lacks its required input 0",
    )


def test_too_many_inputs():
    fails(
        model([helper.make_node("Relu", ["x", "x"], ["y"])]), InvalidGraphError, "takes at most 1"
    )


def test_required_input_given_as_empty_name():
    fails(
        model([helper.make_node("Reshape", ["x", ""], ["y"])]),
        InvalidGraphError,
        "required input 1 \\('shape'\\)",
    )


def test_input_without_type():
    m = model([helper.make_node("Relu", ["x"], ["y"])])
    m.graph.input[0].ClearField("type")
    fails(m, UnsupportedOpError, "'x'")


@pytest.mark.parametrize("value", [1.5, "1", [1, 2], numpy_helper.from_array(np.ones(1))])
def test_attribute_of_the_wrong_type(value):
    m = model([helper.make_node("Softmax", ["x"], ["y"], axis=value)])
    fails(m, InvalidGraphError, "attribute 'axis' must be INT")


def test_attribute_given_twice():
    node = helper.make_node("Softmax", ["x"], ["y"], axis=1)
    node.attribute.append(helper.make_attribute("axis", 0))
    fails(model([node]), InvalidGraphError, "given twice")


def test_attribute_out_of_range():
    fails(model([helper.make_node("Softmax", ["x"], ["y"], axis=2**62)]), SparseDNNError, "axis")


def test_subgraph_attribute_is_unsupported():
    then = helper.make_graph([], "then", [], [helper.make_tensor_value_info("x", F, None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)
    fails(
        model([node], inputs=[helper.make_tensor_value_info("c", TensorProto.BOOL, [])]),
        UnsupportedOpError,
    )


@pytest.mark.parametrize(
    "data_type",
    [TensorProto.STRING, TensorProto.BFLOAT16, TensorProto.COMPLEX64, TensorProto.UNDEFINED, 99],
)
def test_initializer_of_an_unsupported_type(data_type):
    t = numpy_helper.from_array(np.ones(4, np.float32), "c")
    t.data_type = data_type
    fails(model([helper.make_node("Add", ["x", "c"], ["y"])], inits=[t]), SparseDNNError, "'c'")


@pytest.mark.parametrize("opset", [-1, 0, 7, 12, 10**6])
def test_unsupported_opsets(opset):
    fails(
        model([helper.make_node("Relu", ["x"], ["y"])], opset=opset),
        ModelLoadError,
        f"opset {opset}",
    )


# -- graph structure ----------------------------------------------------------------------
def test_cycle():
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Identity", ["b"], ["y"]),
    ]
    fails(model(nodes), InvalidGraphError, "'b'.*topological order")


def test_self_loop():
    fails(model([helper.make_node("Add", ["x", "y"], ["y"])]), InvalidGraphError, "'y'")


def test_dangling_input():
    fails(model([helper.make_node("Add", ["x", "nowhere"], ["y"])]), InvalidGraphError, "'nowhere'")


def test_output_never_computed():
    fails(
        model([helper.make_node("Relu", ["x"], ["r"])]),
        InvalidGraphError,
        "output 'y' is never computed",
    )


def test_two_nodes_produce_one_name():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]
    fails(model(nodes), InvalidGraphError, "'y' is produced twice")


def test_node_output_named_like_the_input():
    fails(
        model([helper.make_node("Relu", ["x"], ["x"]), helper.make_node("Neg", ["x"], ["y"])]),
        InvalidGraphError,
        "'x'",
    )


def test_duplicate_graph_inputs_count_once():
    x = helper.make_tensor_value_info("x", F, ["n", 4])
    session = sparsednn.InferenceSession(
        model([helper.make_node("Relu", ["x"], ["y"])], inputs=[x, x])
    )
    assert [a.name for a in session.get_inputs()] == ["x"]
    (y,) = session.run(None, {"x": -np.ones((2, 4), np.float32)})
    assert (y == 0).all()


def test_duplicate_initializers():
    fails(
        model(
            [helper.make_node("Add", ["x", "c"], ["y"])],
            inits=[numpy_helper.from_array(np.ones(4, np.float32), "c")] * 2,
        ),
        InvalidGraphError,
        "'c' is defined twice",
    )


def test_duplicate_graph_outputs_are_fine_or_clean():
    m = model([helper.make_node("Relu", ["x"], ["y"])])
    m.graph.output.append(m.graph.output[0])
    assert try_model(m.SerializeToString()) in ("ok", "error")


# -- absurd dimensions and sizes ----------------------------------------------------------
HUGE = [2**62, 2**40, 2**33, 65536 * 65536]


@pytest.mark.parametrize("dims", [[2**62], [2**31, 2**31], [-1], [3, -4], [0, 2**62]])
def test_initializer_dims_that_disagree_with_its_data(dims):
    t = numpy_helper.from_array(np.ones(4, np.float32), "c")
    t.dims[:] = dims
    fails(model([helper.make_node("Add", ["x", "c"], ["y"])], inits=[t]), InvalidGraphError, "'c'")


def test_initializer_with_short_raw_data():
    t = numpy_helper.from_array(np.ones(4, np.float32), "c")
    t.raw_data = t.raw_data[:10]
    fails(
        model([helper.make_node("Add", ["x", "c"], ["y"])], inits=[t]),
        InvalidGraphError,
        "holds 10 bytes.*16 bytes",
    )


def test_initializer_with_too_few_typed_values():
    t = onnx.TensorProto(name="c", data_type=F, dims=[2**40], float_data=[1.0, 2.0])
    fails(
        model([helper.make_node("Add", ["x", "c"], ["y"])], inits=[t]),
        InvalidGraphError,
        "holds 2 values",
    )


@pytest.mark.parametrize("n", HUGE)
def test_constant_of_shape_bigger_than_memory(n):
    msg = fails(
        model([helper.make_node("ConstantOfShape", ["s"], ["y"])], inits=[i64("s", n, 4)]),
        InvalidGraphError,
        "memory",
    )
    assert "GiB" in msg or "TiB" in msg or "PiB" in msg


@pytest.mark.parametrize("n", HUGE)
def test_expand_bigger_than_memory(n):
    fails(
        model([helper.make_node("Expand", ["x", "s"], ["y"])], inits=[i64("s", n, 1, 4)]),
        SparseDNNError,
        "memory",
    )


@pytest.mark.parametrize("n", HUGE)
def test_tile_bigger_than_memory(n):
    fails(
        model([helper.make_node("Tile", ["x", "r"], ["y"])], inits=[i64("r", n, n)]),
        SparseDNNError,
        "memory",
    )


@pytest.mark.parametrize("limit", HUGE)
def test_range_bigger_than_memory(limit):
    nodes = [helper.make_node("Range", ["a", "b", "c"], ["y"])]
    inits = [numpy_helper.from_array(np.int64(v), n) for v, n in ((0, "a"), (limit, "b"), (1, "c"))]
    fails(model(nodes, inits=inits), SparseDNNError, "memory")


def test_range_with_zero_delta():
    inits = [numpy_helper.from_array(np.int64(v), n) for v, n in ((0, "a"), (5, "b"), (0, "c"))]
    fails(
        model([helper.make_node("Range", ["a", "b", "c"], ["y"])], inits=inits),
        InvalidGraphError,
        "delta is 0",
    )


@pytest.mark.parametrize("shape", [[2**62, 2], [-1, -1], [-5, 2], [2**31, 2**31, 0]])
def test_reshape_to_absurd_shapes(shape):
    fails(
        model([helper.make_node("Reshape", ["x", "s"], ["y"])], inits=[i64("s", *shape)]),
        SparseDNNError,
    )


def test_shapes_computed_at_run_time_are_checked_before_allocating():
    """ConstantOfShape/Expand/Tile whose shape comes from an input: refused at run()."""
    nodes = [
        helper.make_node("ConstantOfShape", ["s"], ["c"]),
        helper.make_node("Expand", ["x", "s"], ["e"]),
        helper.make_node("Tile", ["x", "s"], ["t"]),
        helper.make_node("Concat", ["c", "e", "t"], ["y"], axis=0),
    ]
    s_in = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    x_in = helper.make_tensor_value_info("x", F, [1, 1])
    session = sparsednn.InferenceSession(model(nodes, inputs=[s_in, x_in]))
    (y,) = session.run(None, {"s": np.array([2, 3]), "x": np.ones((1, 1), np.float32)})
    assert y.shape == (6, 3)
    for huge in HUGE:
        with pytest.raises(SparseDNNError, match="memory") as info:
            session.run(None, {"s": np.array([huge, 3]), "x": np.ones((1, 1), np.float32)})
        assert not unguarded_allocation(info.value)


def test_declared_input_dims_negative():
    fails(
        model(
            [helper.make_node("Relu", ["x"], ["y"])],
            inputs=[helper.make_tensor_value_info("x", F, [-3, 4])],
        ),
        InvalidGraphError,
        "negative",
    )


def test_huge_declared_dims_load_fast():
    """onnx's data propagation walks a 'shape' as long as a declared dim: it is skipped."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "z", "o"], ["y"]),
    ]
    m = model(
        nodes,
        inits=[i64("z", 0), i64("o", 1)],
        outputs=[helper.make_tensor_value_info("y", TensorProto.INT64, None)],
    )
    m.graph.value_info.append(helper.make_tensor_value_info("s", TensorProto.INT64, [2**31]))
    t0 = time.perf_counter()
    assert try_model(m.SerializeToString()) in ("ok", "error")
    assert time.perf_counter() - t0 < 5


def test_constant_of_shape_of_huge_computed_shape_loads_fast():
    """onnx's data propagation would hold ConstantOfShape's 2**32 values as a shape (~600 GB)."""
    nodes = [
        helper.make_node("Mul", ["a", "a"], ["s"]),
        helper.make_node(
            "ConstantOfShape",
            ["s"],
            ["c"],
            value=numpy_helper.from_array(np.array([1], np.int64), "v"),
        ),
        helper.make_node("Add", ["c", "c"], ["y"]),
    ]
    m = model(
        nodes,
        inputs=[],
        inits=[i64("a", 65536)],
        outputs=[helper.make_tensor_value_info("y", TensorProto.INT64, None)],
    )
    t0 = time.perf_counter()
    with pytest.raises(SparseDNNError, match="memory"):
        sparsednn.InferenceSession(m)
    assert time.perf_counter() - t0 < 5


# -- structured mutations, drawn by hypothesis --------------------------------------------
@pytest.mark.parametrize("base", sorted(BASE_MODELS))
def test_base_models_run(base):
    assert len(run_model(BASE_MODELS[base]().SerializeToString())) == 1


@pytest.mark.parametrize("kind", sorted(MUTATORS))
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_structured_mutations_fail_cleanly(kind, data):
    model_bytes, done = structured_mutation(DrawChooser(data), kinds=[kind])
    try:
        run_model(model_bytes)
    except SparseDNNError as e:
        assert not unguarded_allocation(e), done
        assert str(e), done  # a message, not an empty error


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_mixed_structured_mutations_fail_cleanly(data):
    model_bytes, done = structured_mutation(DrawChooser(data))
    try:
        run_model(model_bytes)
    except SparseDNNError as e:
        assert not unguarded_allocation(e), done


def test_shape_ops_model_matches_onnxruntime():
    import onnxruntime as ort

    m = shape_ops_model()
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    (want,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    (got,) = sparsednn.InferenceSession(m).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
