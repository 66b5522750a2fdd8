"""A batch run in parts, one per thread (runtime/batch_parts.py): the same bits as whole
steps, and parts only where every step's row independence is shown."""

from types import SimpleNamespace

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.runtime import batch_parts
from sparsednn.runtime import session as session_module
from sparsednn.runtime.batch_parts import SLICE, WHOLE, Region

H, SEQ = 32, 64
rng = np.random.default_rng(3)


def sparse(shape, r):
    w = r.standard_normal(shape).astype(np.float32)
    w[r.random(shape) < 0.9] = 0
    return w


def block_model(residual_shape):
    """y = (LayerNorm(relu(x @ W1 + B1) @ W2 + r) * C) @ W3 + x, x [batch, seq, H], r an
    input of residual_shape (broadcast against [batch, seq, H]), the Linears 90% sparse: a
    chained pair, a layer norm fused after it, an elementwise Mul and Add."""
    r = np.random.default_rng(4)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"]),
        helper.make_node("Add", ["m1", "B1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "W2"], ["h2"]),
        helper.make_node("Add", ["h2", "r"], ["t"]),
        helper.make_node("LayerNormalization", ["t", "G", "Be"], ["n"], axis=-1),
        helper.make_node("Mul", ["n", "C"], ["u"]),
        helper.make_node("MatMul", ["u", "W3"], ["v"]),
        helper.make_node("Add", ["v", "x"], ["y"]),
    ]
    inits = {"W1": sparse((H, 4 * H), r), "B1": r.standard_normal(4 * H).astype(np.float32),
             "W2": sparse((4 * H, H), r), "W3": sparse((H, H), r),
             "G": r.standard_normal(H).astype(np.float32),
             "Be": r.standard_normal(H).astype(np.float32),
             "C": r.standard_normal(H).astype(np.float32)}  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, residual_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def spy(monkeypatch):
    """The parts of each run's region (None: it ran whole); whole() makes runs whole."""
    seen = []
    real = session_module.region_parts

    def recording(*args):
        parts = real(*args)
        seen.append(None if parts is None else parts[0])
        return parts

    monkeypatch.setattr(session_module, "region_parts", recording)
    spy = SimpleNamespace(seen=seen)
    spy.whole = lambda: monkeypatch.setattr(session_module, "region_parts", lambda *a: None)
    spy.parts = lambda: monkeypatch.setattr(session_module, "region_parts", recording)
    return spy


def run_both(session, spy, feed):
    """(output in parts, output with whole steps) of one feed."""
    spy.parts()
    y = session.run(None, feed)[0]
    spy.whole()
    whole = session.run(None, feed)[0]
    spy.parts()
    return y, whole


@pytest.mark.parametrize("residual", [("batch", "seq", H), (1, "seq", H), ("seq", H), (H,)],
                         ids=["per-row", "broadcast-1", "rank-2", "rank-1"])  # fmt: skip
def test_parts_give_the_bits_of_whole_steps(spy, residual):
    from onnx.reference import ReferenceEvaluator

    model = block_model(list(residual))
    session = sparsednn.InferenceSession(
        model.SerializeToString(), sparsednn.SessionOptions(intra_op_num_threads=2)
    )
    # every step: the chained pair with the norm fused after it (x and r), the Mul, W3, the Add
    assert session._region.start == 0
    assert [(s.node.op, len(s.inputs)) for s in session._steps] == [
        ("Linear", 2), ("Mul", 2), ("Linear", 1), ("Add", 2)
    ]
    reference = ReferenceEvaluator(model)
    # (batch 64 = seq: a rank-2 residual [seq, H] must not be taken for per-row data; 3 parts
    # too unevenly, 5, 2 and 1 have too few rows for parts)
    for batch, seq, parts in ((64, SEQ, [(0, 32), (32, 64)]), (19, SEQ, [(0, 10), (10, 19)]),
                              (3, 512, None), (5, SEQ, None), (1, SEQ, None), (2, SEQ, None)):  # fmt: skip
        x = rng.standard_normal((batch, seq, H)).astype(np.float32)
        shape = [{"batch": batch, "seq": seq}.get(d, d) for d in residual]
        feed = {"x": x, "r": rng.standard_normal(shape).astype(np.float32)}
        spy.seen.clear()
        y, whole = run_both(session, spy, feed)
        assert spy.seen == [parts], batch
        np.testing.assert_array_equal(y, whole)
        np.testing.assert_allclose(y, reference.run(None, feed)[0], rtol=1e-4, atol=1e-4)


def test_one_thread_runs_no_parts(spy):
    session = sparsednn.InferenceSession(
        block_model(["batch", "seq", H]).SerializeToString(),
        sparsednn.SessionOptions(intra_op_num_threads=1),
    )
    assert session._region is None
    x = rng.standard_normal((64, SEQ, H)).astype(np.float32)
    session.run(None, {"x": x, "r": x})
    assert spy.seen == []


def test_non_finite_rows_and_profiles_in_parts(spy):
    session = sparsednn.InferenceSession(
        block_model(["batch", "seq", H]).SerializeToString(),
        sparsednn.SessionOptions(intra_op_num_threads=2, enable_profiling=True),
    )
    x = rng.standard_normal((32, SEQ, H)).astype(np.float32)
    x[3, 5, 0] = np.nan  # in the first part
    x[20, 7, 1] = np.inf  # in the second
    feed = {"x": x, "r": rng.standard_normal(x.shape).astype(np.float32)}
    y, whole = run_both(session, spy, feed)
    assert spy.seen[0] == [(0, 16), (16, 32)]
    np.testing.assert_array_equal(y, whole)
    assert np.isnan(y[3, 5]).all() and np.isnan(y[20, 7]).all()
    assert np.isfinite(np.delete(y.reshape(-1, H), [3 * SEQ + 5, 20 * SEQ + 7], 0)).all()
    ops = {p.op for p in session.profile()}
    assert {"Linear"} <= ops and all(p.seconds > 0 for p in session.profile())


def test_region_is_the_row_steps_that_feed_only_row_steps():
    def step(op, inputs, outputs):
        return SimpleNamespace(node=SimpleNamespace(op=op), inputs=inputs, outputs=outputs)

    steps = [
        step("Linear", [0], [1]),  # read by Shape: stays before the region
        step("Shape", [1], [2]),
        step("Where", [2], [3]),  # a mask made from it
        step("Linear", [1], [4]),
        step("Attention", [4, None, None, 3], [5]),
        step("AddLayerNorm", [5, 1], [6]),
    ]
    ordered, start = batch_parts.order_for_region(steps)
    assert [s.node.op for s in ordered[:start]] == ["Linear", "Shape", "Where"]
    assert [s.node.op for s in ordered[start:]] == ["Linear", "Attention", "AddLayerNorm"]
    region = batch_parts.describe_region(ordered, start, {4: 3, 5: 3, 6: 3})
    assert region.external == [1, 3] and region.made == {4, 5, 6}


@pytest.mark.parametrize("mask_shape, mode", [
    ((8, 1, 1, 16), SLICE), ((8, 4, 16, 16), SLICE), ((1, 1, 16, 16), WHOLE), ((16, 16), WHOLE),
    ((16,), WHOLE), ((4, 1, 1, 16), None), ((8, 1, 1, 1, 16), None),
])  # fmt: skip
def test_attention_mask_follows_the_batch_only_when_it_is_per_row(mask_shape, mode):
    """The mask broadcasts to [B, H, Sq, Skv]: its axis 0 is the batch only at rank 4."""
    region = Region(start=0, external=[0, 1], made={2}, ranks={2: 3})
    env = [np.zeros((8, 16, 96), np.float32), np.zeros(mask_shape, np.float32), None]
    attention = SimpleNamespace(node=SimpleNamespace(op="Attention"), inputs=[0, None, None, 1],
                                outputs=[2])  # fmt: skip
    modes = batch_parts._modes(attention, env, region, batch=8)
    assert modes == (None if mode is None else [SLICE, None, None, mode])


def test_runs_in_parts_from_several_threads_at_once(spy):
    """Concurrent run() calls each split their own batch (the parts of both share the worker
    pool without waiting on each other)."""
    import threading

    session = sparsednn.InferenceSession(
        block_model(["batch", "seq", H]).SerializeToString(),
        sparsednn.SessionOptions(intra_op_num_threads=2),
    )
    feeds = []
    for i in range(4):
        x = rng.standard_normal((16 + 2 * i, SEQ, H)).astype(np.float32)
        feeds.append({"x": x, "r": rng.standard_normal(x.shape).astype(np.float32)})
    expected = [session.run(None, f)[0] for f in feeds]
    results: dict = {}

    def worker(i):
        for _ in range(3):
            results.setdefault(i, []).append(session.run(None, feeds[i])[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert all(parts is not None for parts in spy.seen)
    for i, outs in results.items():
        assert len(outs) == 3
        for y in outs:
            np.testing.assert_array_equal(y, expected[i])


def test_outputs_made_before_and_inside_the_region(spy):
    """A model output made before the region (read by a non-row op) stays whole; outputs made
    in the region, also one that a later region step reads, are the parts joined."""
    r = np.random.default_rng(6)
    w1, w2 = sparse((H, H), r), sparse((H, H), r)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),  # an output, read by the next MatMul
        helper.make_node("MatMul", ["h", "W2"], ["y"]),
        helper.make_node("Shape", ["x"], ["shape"]),  # made before the region
    ]
    graph = helper.make_graph(
        nodes,
        "outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", H]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = sparsednn.InferenceSession(
        model.SerializeToString(), sparsednn.SessionOptions(intra_op_num_threads=2)
    )
    x = rng.standard_normal((32, SEQ, H)).astype(np.float32)
    spy.parts()
    y, h, shape = session.run(None, {"x": x})
    assert spy.seen == [[(0, 16), (16, 32)]]
    spy.whole()
    expected = session.run(None, {"x": x})
    for got, want in zip((y, h, shape), expected):
        np.testing.assert_array_equal(got, want)
    assert shape.tolist() == [32, SEQ, H]
    np.testing.assert_allclose(h, x @ w1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, (x @ w1) @ w2, rtol=1e-4, atol=1e-4)
