"""InferenceSession's API and its checks of run()'s inputs."""

import threading
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.errors import InvalidInputError

rng = np.random.default_rng(0)
W = rng.standard_normal((16, 24)).astype(np.float32)
W[rng.random(W.shape) < 0.9] = 0
B = rng.standard_normal(24).astype(np.float32)


def two_input_model():
    """y = relu(a @ W + B) + c, with a symbolic batch shared by both inputs."""
    nodes = [
        helper.make_node("MatMul", ["a", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Add", ["r", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 16]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 24]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 24])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def session():
    return sparsednn.InferenceSession(two_input_model().SerializeToString())


def feed(batch=3):
    return {
        "a": rng.standard_normal((batch, 16)).astype(np.float32),
        "c": rng.standard_normal((batch, 24)).astype(np.float32),
    }


def reference(f):
    return np.maximum(f["a"].astype(np.float64) @ W + B, 0) + f["c"]


def test_inputs_and_outputs_are_described_like_onnxruntime(session):
    (a, c), (y,) = session.get_inputs(), session.get_outputs()
    assert c.name == "c" and c.shape == ["batch", 24]
    assert (a.name, a.shape, a.type) == ("a", ["batch", 16], "tensor(float)")
    assert (y.name, y.shape) == ("y", ["batch", 24])


@pytest.mark.parametrize("batch", [0, 1, 5, 130])
def test_run_matches_numpy_at_any_batch(session, batch):
    f = feed(batch)
    (y,) = session.run(None, f)
    assert y.shape == (batch, 24) and y.dtype == np.float32
    np.testing.assert_allclose(y, reference(f), rtol=1e-5, atol=1e-5)


def test_output_names_select_outputs(session):
    f = feed()
    (y,) = session.run(["y"], f)
    np.testing.assert_allclose(y, reference(f), rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="no output named 'z'"):
        session.run(["z"], f)


def test_non_contiguous_and_read_only_inputs(session):
    f = feed(4)
    a = np.asfortranarray(f["a"])
    c = f["c"].copy()
    c.flags.writeable = False
    (y,) = session.run(None, {"a": a, "c": c})
    np.testing.assert_allclose(y, reference(f), rtol=1e-5, atol=1e-5)
    strided = np.repeat(f["a"], 2, axis=0)[::2]
    (y2,) = session.run(None, {"a": strided, "c": f["c"]})
    np.testing.assert_allclose(y2, reference(f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"a": np.zeros((2, 16), np.float32)}, "missing input.*'c'"),
        ({**feed(2), "extra": np.zeros(1)}, "unknown input.*'extra'"),
        (
            {"a": np.zeros((2, 16), np.float64), "c": np.zeros((2, 24), np.float32)},
            "'a' must be float32, got float64",
        ),
        (
            {"a": np.zeros((2, 16, 1), np.float32), "c": np.zeros((2, 24), np.float32)},
            "'a' must have rank 2",
        ),
        (
            {"a": np.zeros((2, 15), np.float32), "c": np.zeros((2, 24), np.float32)},
            "'a' axis 1 must be 16",
        ),
        (
            {"a": np.zeros((2, 16), np.float32), "c": np.zeros((3, 24), np.float32)},
            "dimension 'batch' is 2 in input 'a' but 3 in input 'c'",
        ),
    ],
)
def test_bad_inputs_are_named(session, bad, match):
    with pytest.raises(InvalidInputError, match=match):
        session.run(None, bad)


def test_nan_and_inf_propagate(session):
    f = feed(2)
    f["c"][0, 0], f["c"][1, 1] = np.nan, np.inf
    (y,) = session.run(None, f)
    assert np.isnan(y[0, 0]) and np.isinf(y[1, 1])


def test_run_is_reentrant_across_threads(session):
    feeds = [feed(7) for _ in range(8)]
    expected = [session.run(None, f)[0] for f in feeds]
    results = [None] * 8

    def worker(i):
        for _ in range(5):
            results[i] = session.run(None, feeds[i])[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_compile_and_session_options(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(two_input_model().SerializeToString())
    s = sparsednn.compile(str(path), intra_op_num_threads=1)
    assert s.options.num_threads == 1
    f = feed(3)
    np.testing.assert_allclose(s.run(None, f)[0], reference(f), rtol=1e-5, atol=1e-5)
    dense = sparsednn.InferenceSession(str(path), sparsednn.SessionOptions(sparse_threshold=1.1))
    assert dense.graph.nodes[0].attrs["kernel"].startswith("f32_gemm")
    np.testing.assert_allclose(dense.run(None, f)[0], reference(f), rtol=1e-5, atol=1e-5)


def test_profiling_reports_time_per_node():
    s = sparsednn.InferenceSession(
        two_input_model(), sparsednn.SessionOptions(enable_profiling=True)
    )
    s.run(None, feed())
    s.run(None, feed())
    profile = s.profile()
    assert {p.op for p in profile} == {"Linear", "Add"}
    assert all(p.calls == 2 and p.seconds > 0 for p in profile)
    (linear,) = [p for p in profile if p.op == "Linear"]
    assert linear.useful_flops == 2 * 2 * np.count_nonzero(W) * 3


def feed_forward_model(k=32, n_mid=128, n=24, seed=1, sparsity=(0.9, 0.9)):
    """y = relu(x @ W1 + B1) @ W2 + B2, the weights 90% zeros unless told: a chain of sparse
    Linears."""
    r = np.random.default_rng(seed)
    w1, w2 = r.standard_normal((k, n_mid)), r.standard_normal((n_mid, n))
    w1[r.random(w1.shape) < sparsity[0]] = 0
    w2[r.random(w2.shape) < sparsity[1]] = 0
    consts = {"W1": w1, "B1": r.standard_normal(n_mid), "W2": w2, "B2": r.standard_normal(n)}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "B1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"]),
        helper.make_node("Add", ["h2", "B2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(v.astype(np.float32), name) for name, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, consts


def test_chained_sparse_linears_match_the_steps_apart():
    model, c = feed_forward_model()
    bytes_ = model.SerializeToString()
    chained = sparsednn.InferenceSession(bytes_, sparsednn.SessionOptions(intra_op_num_threads=2))
    apart = sparsednn.InferenceSession(
        bytes_, sparsednn.SessionOptions(intra_op_num_threads=2, chain_sparse_linears=False)
    )
    assert len(chained._steps) == len(apart._steps) - 1
    for batch in (1, 5, 64, 127, 128, 300):
        x = rng.standard_normal((batch, 32)).astype(np.float32)
        y = chained.run(None, {"x": x})[0]
        np.testing.assert_array_equal(y, apart.run(None, {"x": x})[0])
        ref = np.maximum(x @ c["W1"] + c["B1"], 0) @ c["W2"] + c["B2"]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    x[7, 3], x[150, 0] = np.nan, np.inf  # a dense product's NaN * 0: whole rows of NaN
    y = chained.run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, apart.run(None, {"x": x})[0])
    assert (
        np.isnan(y[7]).all()
        and np.isnan(y[150]).all()
        and np.isfinite(np.delete(y, [7, 150], 0)).all()
    )


def test_sparse_linears_of_different_panel_widths_run_apart():
    """A 99% layer (32-token panels on AVX-512) before a 90% one (64): not chained, since
    their panel layouts differ; the run still matches the reference."""
    model, c = feed_forward_model(k=600, n_mid=256, n=40, sparsity=(0.99, 0.9))
    session = sparsednn.InferenceSession(model.SerializeToString(),
                                         sparsednn.SessionOptions(intra_op_num_threads=2))  # fmt: skip
    first, second = (session.kernels[n.name] for n in session.graph.nodes if n.op == "Linear")
    chained = any(len(step.inputs) == 1 and step.node.op == "Linear" and step.inputs[0] ==
                  session._input_slots["x"] and step.outputs[0] == session._output_slots_by_name["y"]
                  for step in session._steps)  # fmt: skip
    assert chained == (first.tile_tokens == second.tile_tokens)
    for batch in (1, 70, 300):
        x = rng.standard_normal((batch, 600)).astype(np.float32)
        y = session.run(None, {"x": x})[0]
        ref = np.maximum(x @ c["W1"] + c["B1"], 0) @ c["W2"] + c["B2"]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def residual_norm_model(two=True, k=32, seed=2):
    """y = LayerNorm(x + f(x)), f feed_forward_model's two sparse Linears (or one, x @ W + B,
    90% zeros): transformer blocks' residual layer norm after sparse Linears."""
    r = np.random.default_rng(seed)
    if two:
        model, _ = feed_forward_model(k=k, n=k, seed=seed)
        graph = model.graph
    else:
        w = r.standard_normal((k, k))
        w[r.random(w.shape) < 0.9] = 0
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Add", ["h", "B"], ["y"])],
            "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])],
            [numpy_helper.from_array(w.astype(np.float32), "W"),
             numpy_helper.from_array(r.standard_normal(k).astype(np.float32), "B")],
        )  # fmt: skip
    graph.node[-1].output[0] = "f"  # the block's output becomes the norm's input
    graph.node.extend([
        helper.make_node("Add", ["x", "f"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "G", "Be"], ["y"], axis=-1, epsilon=1e-5),
    ])  # fmt: skip
    for name in ("G", "Be"):
        graph.initializer.append(
            numpy_helper.from_array(r.standard_normal(k).astype(np.float32), name)
        )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("two", [True, False])
def test_layer_norm_after_sparse_linears_runs_fused_and_matches(two):
    from onnx.reference import ReferenceEvaluator

    model = residual_norm_model(two=two)
    bytes_ = model.SerializeToString()
    fused = sparsednn.InferenceSession(bytes_, sparsednn.SessionOptions(intra_op_num_threads=2))
    apart = sparsednn.InferenceSession(
        bytes_, sparsednn.SessionOptions(intra_op_num_threads=2, chain_sparse_linears=False)
    )
    assert "AddLayerNorm" in {s.node.op for s in apart._steps}
    assert "AddLayerNorm" not in {s.node.op for s in fused._steps}  # inside the Linear's step
    assert len(fused._steps) == len(apart._steps) - (2 if two else 1)
    reference = ReferenceEvaluator(model)
    for batch in (1, 5, 64, 127, 128, 300):
        x = rng.standard_normal((batch, 32)).astype(np.float32)
        y = fused.run(None, {"x": x})[0]
        np.testing.assert_array_equal(y, apart.run(None, {"x": x})[0])
        np.testing.assert_allclose(y, reference.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    x[7, 3] = np.nan  # the dense product's NaN row, through the norm
    y = fused.run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, apart.run(None, {"x": x})[0])
    assert np.isnan(y[7]).all() and np.isfinite(np.delete(y, 7, 0)).all()


def deep_model(layers=6, k=48, seed=3):
    """x -> `layers` sparse Linears (90% zeros) with ReLUs between: several layers to compile."""
    r = np.random.default_rng(seed)
    nodes, inits, x, weights = [], [], "x", []
    for i in range(layers):
        w = r.standard_normal((k, k)).astype(np.float32)
        w[r.random(w.shape) < 0.9] = 0
        weights.append(w)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"]))
        x = f"h{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", k])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


def test_sparse_layers_compile_on_the_session_threads_alike():
    model, weights = deep_model()
    bytes_ = model.SerializeToString()
    one, two = (sparsednn.InferenceSession(bytes_, sparsednn.SessionOptions(
        intra_op_num_threads=t, chain_sparse_linears=False)) for t in (1, 2))  # fmt: skip
    assert not [t for t in threading.enumerate() if t.name.startswith("sparsednn-compile")]
    assert sorted(one.kernels) == sorted(two.kernels) and len(one.kernels) == len(weights)
    for name, kernel in one.kernels.items():
        assert (kernel.name, kernel.nnz) == (two.kernels[name].name, two.kernels[name].nnz)
    x = rng.standard_normal((37, 48)).astype(np.float32)
    ref = x.astype(np.float64)
    for i, w in enumerate(weights):
        ref = ref @ w if i == len(weights) - 1 else np.maximum(ref @ w, 0)
    y = two.run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, one.run(None, {"x": x})[0])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_a_layer_failing_to_compile_stops_the_others(monkeypatch):
    from sparsednn.codegen import spmm
    from sparsednn.errors import CompileError

    compiled = []
    real = spmm.compile_sparse_linear

    def third_fails(weight, *args, **kwargs):
        compiled.append(weight.shape)
        if len(compiled) == 3:
            raise CompileError("the third layer does not compile")
        if len(compiled) > 3:  # (slow enough for the session to see the error first)
            time.sleep(0.3)
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(spmm, "compile_sparse_linear", third_fails)
    model, _ = deep_model(layers=12)
    with pytest.raises(CompileError, match="third layer"):
        sparsednn.InferenceSession(model.SerializeToString(),
                                   sparsednn.SessionOptions(intra_op_num_threads=2))  # fmt: skip
    assert 3 <= len(compiled) <= 5  # the failing one, and at most those already running


def test_compile_threads_stay_within_the_cores(monkeypatch):
    from sparsednn.runtime import session as session_module

    workers = []
    real = session_module.ThreadPoolExecutor

    def recording(max_workers, **kwargs):
        workers.append(max_workers)
        return real(max_workers, **kwargs)

    monkeypatch.setattr(session_module, "ThreadPoolExecutor", recording)
    monkeypatch.setattr(session_module, "default_num_threads", lambda: 2)
    model, _ = deep_model()
    sparsednn.InferenceSession(model.SerializeToString(),
                               sparsednn.SessionOptions(intra_op_num_threads=64))  # fmt: skip
    assert workers == [2]


def test_sparse_kernels_take_the_nonzeros_counted_by_choose_kernels(monkeypatch):
    from sparsednn.codegen import spmm

    def counted_again(weight):
        raise AssertionError("a sparse kernel counted its weight's nonzeros again")

    monkeypatch.setattr(spmm, "nonzero_count", counted_again)
    model, weights = deep_model(layers=2)
    session = sparsednn.InferenceSession(model.SerializeToString())
    nodes = [n for n in session.graph.nodes if n.op == "Linear"]
    assert [n.attrs["nonzeros"] for n in nodes] == [int(np.count_nonzero(w)) for w in weights]
    assert [session.kernels[n.name].nnz for n in nodes] == [n.attrs["nonzeros"] for n in nodes]
