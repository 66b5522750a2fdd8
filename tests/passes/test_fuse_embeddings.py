"""fuse_embeddings on hand-built graphs: a transformer's embedding Gathers, the Adds summing
them and the layer norm after them become one EmbedLayerNorm that agrees with onnxruntime
(broadcast position ids, negative indices, one to four tables); what must not fuse does not;
an index out of range is a clear error naming the node."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.errors import SparseDNNError
from sparsednn.frontend.onnx_import import import_onnx
from sparsednn.passes.pipeline import run_pipeline

ort = pytest.importorskip("onnxruntime")
F32 = np.float32
N = 40  # not a multiple of the vector width
rng = np.random.default_rng(3)
TABLES = {
    "word": rng.standard_normal((50, N)).astype(F32),
    "type": rng.standard_normal((2, N)).astype(F32),
    "pos": rng.standard_normal((16, N)).astype(F32),
    "extra": rng.standard_normal((7, N)).astype(F32),
    "pos_folded": rng.standard_normal((1, 6, N)).astype(F32),  # a static export's positions
    "gamma": (1 + 0.2 * rng.standard_normal(N)).astype(F32),
    "beta": rng.standard_normal(N).astype(F32),
}
IDS = {"ids": ["b", "s"], "tt": ["b", "s"], "pos_ids": [1, "s"], "xt": ["b", "s"]}


def model(nodes, index_inputs, output="y"):
    graph = helper.make_graph(
        nodes,
        "embeddings",
        [helper.make_tensor_value_info(n, TensorProto.INT64, IDS[n]) for n in index_inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in TABLES.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def gather(table, idx, out, axis=0):
    return helper.make_node("Gather", [table, idx], [out], name=f"g_{table}", axis=axis)


def norm(x, out="y"):
    return helper.make_node("LayerNormalization", [x, "gamma", "beta"], [out], epsilon=1e-12)


BERT = [
    gather("word", "ids", "w"),
    gather("type", "tt", "t"),
    helper.make_node("Add", ["w", "t"], ["wt"]),
    gather("pos", "pos_ids", "p"),
    helper.make_node("Add", ["wt", "p"], ["x"]),
    norm("x"),
]


def feed_for(m, b, s, r, low=0):
    sizes = {"ids": 50, "tt": 2, "pos_ids": 16, "xt": 7}
    feed = {}
    for vi in m.graph.input:
        shape = (1 if vi.name == "pos_ids" else b, s)
        feed[vi.name] = r.integers(low * sizes[vi.name], sizes[vi.name], shape)
    return feed


def run_both(m, shapes=((1, 1), (2, 7), (3, 16)), low=0):
    counts = run_pipeline(import_onnx(m)).op_counts()
    reference = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for threads in (1, 2):
        session = sparsednn.InferenceSession(
            m, sparsednn.SessionOptions(intra_op_num_threads=threads)
        )
        for i, (b, s) in enumerate(shapes):
            feed = feed_for(m, b, s, np.random.default_rng(i), low)
            expected = reference.run(None, feed)[0]
            got = session.run(None, feed)[0]
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
    return counts


def test_bert_embeddings_fuse():
    assert run_both(model(BERT, ["ids", "tt", "pos_ids"])) == {"EmbedLayerNorm": 1}


def test_negative_indices_count_from_the_end():
    """ONNX Gather: -1 is the last row."""
    assert run_both(model(BERT, ["ids", "tt", "pos_ids"]), low=-1) == {"EmbedLayerNorm": 1}


def test_sums_of_other_shapes_fuse():
    """One table; two (no token types); four, added in another order."""
    one = [gather("word", "ids", "w"), norm("w")]
    assert run_both(model(one, ["ids"])) == {"EmbedLayerNorm": 1}
    two = [gather("word", "ids", "w"), gather("pos", "pos_ids", "p"),
           helper.make_node("Add", ["p", "w"], ["x"]), norm("x")]  # fmt: skip
    assert run_both(model(two, ["ids", "pos_ids"])) == {"EmbedLayerNorm": 1}
    four = [*BERT[:5], gather("extra", "xt", "e"), helper.make_node("Add", ["e", "x"], ["x2"]),
            norm("x2")]  # fmt: skip
    assert run_both(model(four, ["ids", "tt", "pos_ids", "xt"])) == {"EmbedLayerNorm": 1}


def test_a_constant_term_is_a_table_of_its_own_rows():
    """Static exports fold the position Gather: word + type + a constant [1, 6, N]."""
    static = [*BERT[:3], helper.make_node("Add", ["pos_folded", "wt"], ["x"]), norm("x")]
    m = model(static, ["ids", "tt"])
    assert run_both(m, shapes=((1, 6), (3, 6))) == {"EmbedLayerNorm": 1}
    session = sparsednn.InferenceSession(m)
    with pytest.raises(SparseDNNError, match="EmbedLayerNorm"):  # 5 tokens against 6 positions
        session.run(None, feed_for(m, 2, 5, np.random.default_rng(0)))


def test_what_must_not_fuse_does_not():
    # the sum is read again after the norm
    reused = [*BERT[:5], norm("x", "n"), helper.make_node("Add", ["n", "x"], ["y"])]
    counts = run_both(model(reused, ["ids", "tt", "pos_ids"]))
    assert "EmbedLayerNorm" not in counts and counts["LayerNorm"] == 1, counts
    # a gathered row read elsewhere too
    shared = [*BERT[:5], norm("x", "n"), helper.make_node("Add", ["n", "w"], ["y"])]
    counts = run_both(model(shared, ["ids", "tt", "pos_ids"]))
    assert "EmbedLayerNorm" not in counts, counts
    # a term that is not a Gather of a constant table: the input itself
    graph = helper.make_graph(
        [gather("word", "ids", "w"), helper.make_node("Add", ["w", "r"], ["x"]), norm("x")],
        "mixed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["b", "s", N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in TABLES.items()],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert "EmbedLayerNorm" not in run_pipeline(import_onnx(m)).op_counts()


def test_index_out_of_range_names_the_node():
    m = model(BERT, ["ids", "tt", "pos_ids"])
    session = sparsednn.InferenceSession(m)
    feed = feed_for(m, 2, 4, np.random.default_rng(0))
    feed["ids"][1, 2] = 50
    with pytest.raises(
        SparseDNNError, match=r"EmbedLayerNorm.*Gather 'g_word'.*index 50 is out of range.*50 rows"
    ):
        session.run(None, feed)
    feed["ids"][1, 2] = -51
    with pytest.raises(SparseDNNError, match="index -51 is out of range"):
        session.run(None, feed)
