"""The layer-norm kernel (with and without the residual Add) against float64 and onnxruntime.

Every ISA this host runs; feature counts that are and are not multiples of the vector width
(1 .. 1000, BERT's 768); rows far from zero mean (where a naive one-pass variance cancels);
residuals broadcasting over leading dimensions; threads; bad inputs; no access past buffers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsednn.codegen.norm import compile_embed_layer_norm, compile_layer_norm
from sparsednn.codegen.target import available_isas, host_target
from sparsednn.errors import SparseDNNError
from sparsednn.ops.fused_ops import AddLayerNorm, LayerNorm
from sparsednn.testing import guarded_array

ISAS = available_isas()


def truth(x, scale, bias, eps):
    """Layer norm in float64."""
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * scale
    return y if bias is None else y + bias


def tolerance(x, scale, eps):
    """What float32 arithmetic allows: a few ulps of |x - mean| / σ · |γ|, more when the mean
    is large against σ (x itself is only known to half an ulp of |x|)."""
    x = np.asarray(x, np.float64)
    sigma = np.sqrt(x.var(-1, keepdims=True) + eps)
    rel = 8 * np.finfo(np.float32).eps * (1 + np.abs(x).max(-1, keepdims=True) / sigma)
    return rel * (1 + np.abs(x - x.mean(-1, keepdims=True)) / sigma) * np.abs(scale) + 1e-6


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    isa=st.sampled_from(ISAS),
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    n=st.sampled_from([1, 2, 3, 7, 16, 17, 63, 64, 100, 128, 384, 768, 1000]),
    residual=st.sampled_from(["none", "same", "row", "leading"]),
    offset=st.sampled_from([0.0, 3.0, 100.0]),
    spread=st.sampled_from([1e-3, 1.0, 30.0]),
    eps=st.sampled_from([1e-12, 1e-5]),
    has_bias=st.booleans(),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_matches_float64(isa, lead, n, residual, offset, spread, eps, has_bias, threads, seed):
    rng = np.random.default_rng(seed)
    shape = (*lead, n)
    a = (rng.standard_normal(shape) * spread + offset).astype(np.float32)
    scale = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    kern = compile_layer_norm(n, residual != "none", host_target(isa))
    if residual == "none":
        x, got = a, kern(a, scale=scale, bias=bias, epsilon=eps, num_threads=threads)
    else:
        bshape = {"same": shape, "row": (n,), "leading": (1, *shape[1:])}[residual]
        b = (rng.standard_normal(bshape) * spread).astype(np.float32)
        x = a + b  # (float32, as the graph's Add computes it)
        got = kern(a, b, scale=scale, bias=bias, epsilon=eps, num_threads=threads)
    assert got.shape == x.shape and got.dtype == np.float32
    err = np.abs(got - truth(x, scale, bias, eps))
    assert (err <= tolerance(x, scale, eps)).all(), err.max()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    isa=st.sampled_from(ISAS),
    terms=st.integers(1, 4),
    n=st.sampled_from([1, 3, 16, 17, 100, 768]),
    rows=st.integers(0, 70),
    has_bias=st.booleans(),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_gathered_rows_match_float64(isa, terms, n, rows, has_bias, threads, seed):
    """EmbedLayerNorm's variant: row r normalises the sum of the terms' rows at the given
    addresses (rows of tables in any order, repeated), into a given output."""
    rng = np.random.default_rng(seed)
    tables = [(rng.standard_normal((int(rng.integers(1, 9)), n)) * 3).astype(np.float32)
              for _ in range(terms)]  # fmt: skip
    picks = [rng.integers(0, len(t), rows) for t in tables]
    addresses = np.array([t.ctypes.data + 4 * n * p for t, p in zip(tables, picks)], np.int64)
    addresses = addresses.reshape(terms, rows)
    scale = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    kern = compile_embed_layer_norm(n, terms, host_target(isa))
    out = np.full((rows, n), np.nan, np.float32)
    assert kern.gathered(addresses, scale=scale, bias=bias, epsilon=1e-12, num_threads=threads,
                         out=out) is out  # fmt: skip
    x = np.zeros((rows, n), np.float32)
    for t, p in zip(tables, picks):
        x += t[p]  # (float32, in the kernel's order)
    err = np.abs(out - truth(x, scale, bias, 1e-12))
    assert (err <= tolerance(x, scale, 1e-12)).all(), err.max()


def test_gathered_rows_check_their_arguments():
    kern = compile_embed_layer_norm(8, 2)
    ones = np.ones(8, np.float32)
    with pytest.raises(SparseDNNError, match="inconsistent"):
        kern.gathered(np.zeros((3, 4), np.int64), scale=ones, bias=None, epsilon=1e-5,
                      out=np.empty((4, 8), np.float32))  # fmt: skip
    with pytest.raises(SparseDNNError, match="tables"):
        compile_embed_layer_norm(8, 5)


@pytest.mark.parametrize("isa", ISAS)
def test_as_accurate_as_onnxruntime(isa):
    """BERT-base rows, at zero and at large means: no worse than onnxruntime's own
    LayerNormalization against float64 (plus an ulp or so)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    n = 768
    rng = np.random.default_rng(0)
    scale = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-12)
    graph = helper.make_graph(
        [node],
        "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(scale, "g"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    kern = compile_layer_norm(n, False, host_target(isa))
    for offset in (0.0, 5.0, 100.0):
        x = (rng.standard_normal((256, n)) + offset).astype(np.float32)
        t = truth(x, scale, bias, 1e-12)
        ours = np.abs(kern(x, scale=scale, bias=bias, epsilon=1e-12) - t).max()
        theirs = np.abs(sess.run(None, {"x": x})[0] - t).max()
        assert ours <= 1.5 * theirs + 2e-7, (offset, ours, theirs)


@pytest.mark.parametrize("isa", ISAS)
def test_reference_ops_agree(isa):
    """The numpy reference ops (constant folding, fallbacks) and the kernel agree."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((3, 5, 40)).astype(np.float32) for _ in range(2))
    g, be = rng.standard_normal(40).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    np.testing.assert_allclose(
        compile_layer_norm(40, True, host_target(isa))(a, b, scale=g, bias=be, epsilon=1e-5),
        AddLayerNorm(a, b, scale=g, bias=be, epsilon=1e-5),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        compile_layer_norm(40, False, host_target(isa))(a, scale=g, epsilon=1e-5),
        LayerNorm(a, scale=g, epsilon=1e-5),
        rtol=1e-5,
        atol=1e-5,
    )


def test_other_broadcasts_add_first():
    """A residual broadcasting otherwise than over leading dimensions ([2, 1, N] against
    [2, 3, N], or along the features) is added first; the sum's shape wins either way round."""
    rng = np.random.default_rng(2)
    kern = compile_layer_norm(16, True)
    g = np.ones(16, np.float32)
    a = rng.standard_normal((2, 3, 16)).astype(np.float32)
    for bshape in ((2, 1, 16), (1,), (2, 3, 1), (1, 1, 1)):  # incl. along the features
        b = rng.standard_normal(bshape).astype(np.float32)
        for x, y in ((a, b), (b, a)):
            got = kern(x, y, scale=g, epsilon=1e-5)
            np.testing.assert_allclose(got, LayerNorm(a + b, scale=g, epsilon=1e-5), atol=2e-6)


def test_bad_inputs_raise():
    kern = compile_layer_norm(8, True)
    g = np.ones(8, np.float32)
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(SparseDNNError, match=r"node 'ln'.*\[\.\.\., 8\]"):
        kern(np.zeros((2, 7), np.float32), np.zeros((2, 7), np.float32), scale=g, where="node 'ln'")
    with pytest.raises(SparseDNNError, match=r"node 'ln'.*do not broadcast"):
        kern(np.zeros((2, 7), np.float32), x, scale=g, where="node 'ln'")
    with pytest.raises(SparseDNNError, match="node 'ln'.*float32"):
        kern(x.astype(np.float64), x, scale=g, where="node 'ln'")
    with pytest.raises(SparseDNNError, match="node .ln..*residual"):
        kern(x, None, scale=g, where="node 'ln'")
    with pytest.raises(SparseDNNError, match="node 'ln'.*broadcast"):
        kern(x, np.zeros((3, 8), np.float32), scale=g, where="node 'ln'")
    with pytest.raises(SparseDNNError, match="scale and bias"):
        kern(x, x, scale=np.ones(7, np.float32))
    with pytest.raises(SparseDNNError, match="out must be"):
        kern(x, x, scale=g, out=np.zeros((2, 9), np.float32))


def test_empty_rows():
    kern = compile_layer_norm(8, False)
    assert kern(np.zeros((0, 8), np.float32), scale=np.ones(8, np.float32)).shape == (0, 8)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 13, 768, 1000])
def test_no_access_past_the_buffers(isa, n):
    rng = np.random.default_rng(n)
    kern = compile_layer_norm(n, True, host_target(isa))
    guarded = [guarded_array(s) for s in ((5, n), (5, n), (5, n), (n,), (n,))]  # (keeps the maps)
    a, b, out, g, be = (arr for arr, _region in guarded)
    for arr in (a, b, g, be):
        arr[:] = rng.standard_normal(arr.shape)
    kern(a, b, scale=g, bias=be, epsilon=1e-5, num_threads=2, out=out)
    np.testing.assert_allclose(
        np.array(out),
        AddLayerNorm(np.array(a), np.array(b), scale=np.array(g), bias=np.array(be), epsilon=1e-5),
        rtol=1e-4,
        atol=1e-4,
    )
