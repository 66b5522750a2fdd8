"""fuse_attention on hand-built graphs: the variants exporters emit fuse into one Attention node
and agree with onnxruntime; computations that only look like attention stay as they are (and
still agree with onnxruntime).

The real exports (legacy TorchScript and dynamo, static and dynamic shapes, BERT / DistilBERT /
RoBERTa / ViT / MiniLM) are covered by tests/models.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.frontend.onnx_import import import_onnx
from sparsednn.passes.pipeline import run_pipeline

ort = pytest.importorskip("onnxruntime")

H, D = 4, 8
F32 = np.float32


class Builder:
    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def const(self, value, dtype=None):
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op, inputs, **attrs):
        self.count += 1
        out = f"{op.lower()}{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x, n, zeros=0.0):
        w = (self.rng.standard_normal((n, n)) * 0.3).astype(F32)
        w[self.rng.random(w.shape) < zeros] = 0
        b = (self.rng.standard_normal(n) * 0.1).astype(F32)
        return self.op("Add", [self.op("MatMul", [x, self.const(w)]), self.const(b)])

    def shape_of(self, x, how, dims):
        """A Reshape target: constants, or read off x's shape as the exporters do."""
        if how == "const":
            return self.const(np.array([0 if d in ("b", "s") else d for d in dims], np.int64))
        parts = []
        for d in dims:
            if d in ("b", "s"):
                i = 0 if d == "b" else 1
                if how == "gather":  # legacy: Unsqueeze(Gather(Shape(x), i))
                    g = self.op("Gather", [self.op("Shape", [x]), self.const(np.int64(i))], axis=0)
                    parts.append(self.op("Unsqueeze", [g, self.const(np.array([0], np.int64))]))
                else:  # dynamo: Shape(x, start, end)
                    parts.append(self.op("Shape", ["ids"], start=i, end=i + 1))
            else:
                parts.append(self.const(np.array([d], np.int64)))
        return self.op("Concat", parts, axis=0)


def build(
    k_form="perm0231",
    scale_form="div",
    mask_form="pad",
    shape_form="const",
    out_form="flat",
    softmax_axis=-1,
    q_split=None,
    k_split=None,
    k_perm=None,
    probs_output=False,
    scale_v=False,
    mask_then_scale=False,
    seed=0,
    heads=H,
    head_size=D,
    k_zeros=0.0,
    k_output=False,
):
    """One attention layer on x [b, s, heads·head_size]; mask inputs as the variants need."""
    bld = Builder(seed)
    x = "x"
    n, d_ = heads * head_size, head_size
    q, k, v = bld.linear(x, n), bld.linear(x, n, zeros=k_zeros), bld.linear(x, n)
    q_split = q_split or (heads, head_size)
    k_split = k_split or q_split
    standard = q_split == (heads, head_size)

    def split(t, heads, perm):
        shape = bld.shape_of(x, shape_form, ["b", "s", *heads])
        return bld.op("Transpose", [bld.op("Reshape", [t, shape])], perm=perm)

    qt = split(q, q_split, [0, 2, 1, 3] if standard else [0, 3, 1, 2])
    vt = split(v, q_split, [0, 2, 1, 3] if standard else [0, 3, 1, 2])
    if k_form == "perm0231":
        kt = split(k, k_split, k_perm or [0, 2, 3, 1])
    elif k_form == "two":
        kt = bld.op("Transpose", [split(k, k_split, [0, 2, 1, 3])], perm=[0, 1, 3, 2])
    elif k_form == "dynamo":
        k4 = split(k, k_split, [0, 2, 1, 3])
        sh = bld.op("Shape", [k4])
        last2 = bld.op(
            "Slice", [sh, bld.const(np.array([-2], np.int64)), bld.const(np.array([4], np.int64))]
        )
        k3 = bld.op(
            "Reshape", [k4, bld.op("Concat", [bld.const(np.array([-1], np.int64)), last2], axis=0)]
        )
        k3t = bld.op("Transpose", [k3], perm=[0, 2, 1])
        lead = bld.op(
            "Slice", [sh, bld.const(np.array([0], np.int64)), bld.const(np.array([2], np.int64))]
        )
        tail = bld.op("Concat", [lead, bld.const(np.array([d_, -1], np.int64))], axis=0)
        kt = bld.op("Reshape", [k3t, tail])
    if scale_form == "qk":
        c = bld.const(F32(d_**-0.25))
        qt, kt = bld.op("Mul", [qt, c]), bld.op("Mul", [c, kt])
    if scale_v:
        vt = bld.op("Mul", [vt, bld.const(F32(2.0))])
    scores = bld.op("MatMul", [qt, kt])

    def scale(s):
        if scale_form == "div":
            return bld.op("Div", [s, bld.const(F32(np.sqrt(d_)))])
        if scale_form == "mul":
            return bld.op("Mul", [bld.const(F32(1 / np.sqrt(d_))), s])
        return s

    inputs = [("x", TensorProto.FLOAT, ["batch", "sequence", n])]
    if not mask_then_scale:
        scores = scale(scores)
    guarded = False
    if mask_form == "pad":  # the built-in encoders: (1 - mask) * float32 min, [B, 1, 1, S]
        m = bld.op(
            "Cast",
            [bld.op("Unsqueeze", ["mask", bld.const(np.array([1, 2], np.int64))])],
            to=TensorProto.FLOAT,
        )
        m = bld.op(
            "Mul", [bld.op("Sub", [bld.const(F32(1)), m]), bld.const(F32(np.finfo(F32).min))]
        )
        scores = bld.op("Add", [m, scores])
        inputs.append(("mask", TensorProto.INT64, ["batch", "sequence"]))
    elif mask_form == "where":  # torch SDPA exports: bool mask -> 0 / -inf, NaN guard after
        cond = bld.op(
            "Cast",
            [bld.op("Unsqueeze", ["mask", bld.const(np.array([1, 2], np.int64))])],
            to=TensorProto.BOOL,
        )
        m = bld.op(
            "Where", [cond, bld.const(np.array([0], F32)), bld.const(np.array([-np.inf], F32))]
        )
        scores = bld.op("Add", [scores, m])
        inputs.append(("mask", TensorProto.INT64, ["batch", "sequence"]))
        guarded = True
    elif mask_form == "full":  # a float [B, 1, S, S] mask input
        scores = bld.op("Add", [scores, "fmask"])
        inputs.append(("fmask", TensorProto.FLOAT, ["batch", 1, "sequence", "sequence"]))
    if mask_then_scale:
        scores = scale(scores)
    probs = bld.op("Softmax", [scores], axis=softmax_axis)
    if guarded:
        probs = bld.op("Where", [bld.op("IsNaN", [probs]), bld.const(np.array([0], F32)), probs])
    ctx = bld.op("MatMul", [probs, vt])
    if out_form == "identity_first":  # legacy exports: a [B, H, S, D] -> same Reshape first
        ctx = bld.op("Reshape", [ctx, bld.const(np.array([0, heads, -1, d_], np.int64))])
    ctx = bld.op("Transpose", [ctx], perm=[0, 2, 1, 3])
    if out_form != "4d":
        ctx = bld.op("Reshape", [ctx, bld.shape_of(x, shape_form, ["b", "s", -1])])
    out = bld.op("Identity", [ctx])
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    if probs_output:
        outputs.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, None))
    if k_output:
        outputs.append(helper.make_tensor_value_info(k, TensorProto.FLOAT, None))
    if shape_form == "slices":
        inputs.append(("ids", TensorProto.INT64, ["batch", "sequence"]))
    graph = helper.make_graph(
        bld.nodes,
        "attention",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        outputs,
        bld.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feed_for(model, b, s, seed=0):
    rng = np.random.default_rng(seed)
    feed = {}
    for vi in model.graph.input:
        name = vi.name
        if name == "x":
            n = vi.type.tensor_type.shape.dim[2].dim_value
            feed[name] = rng.standard_normal((b, s, n)).astype(F32)
        elif name == "mask":
            m = np.ones((b, s), np.int64)
            for i in range(1, b):
                m[i, int(rng.integers(1, s + 1)) :] = 0
            feed[name] = m
        elif name == "fmask":
            feed[name] = rng.standard_normal((b, 1, s, s)).astype(F32)
        elif name == "ids":
            feed[name] = np.zeros((b, s), np.int64)
    return feed


def check_against_onnxruntime(model, fused: bool):
    graph = run_pipeline(import_onnx(model))
    counts = graph.op_counts()
    if fused:
        assert counts.get("Attention") == 1, counts
        for op in ("Softmax", "MatMul", "Transpose"):
            assert op not in counts, counts
    else:
        assert "Attention" not in counts, counts
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session = sparsednn.InferenceSession(model)
    for i, (b, s) in enumerate([(1, 1), (2, 7), (3, 16), (1, 33)]):
        feed = feed_for(model, b, s, seed=i)
        expected = reference.run(None, feed)
        got = session.run(None, feed)
        for e, g in zip(expected, got):
            assert g.shape == e.shape
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=2e-5)
    return graph


@pytest.mark.parametrize(
    "k_form,scale_form,mask_form,shape_form,out_form",
    [
        ("perm0231", "div", "pad", "const", "flat"),  # the built-in encoders
        ("perm0231", "qk", "where", "gather", "identity_first"),  # legacy SDPA, dynamic axes
        ("dynamo", "qk", "where", "slices", "flat"),  # dynamo SDPA
        ("two", "mul", "none", "const", "flat"),  # a separate Transpose of K; no mask (ViT)
        ("two", "div", "full", "gather", "4d"),  # [B,1,S,S] mask; output kept [B, S, H, D]
        ("dynamo", "none", "pad", "gather", "identity_first"),
    ],
)
def test_export_variants_fuse(k_form, scale_form, mask_form, shape_form, out_form):
    model = build(k_form, scale_form, mask_form, shape_form, out_form)
    graph = check_against_onnxruntime(model, fused=True)
    (attn,) = [n for n in graph.nodes if n.op == "Attention"]
    assert attn.attrs["num_heads"] == H and attn.attrs["head_size"] == D
    expected_scale = 1.0 if scale_form == "none" else 1 / np.sqrt(D)
    assert attn.attrs["scale"] == pytest.approx(expected_scale, rel=1e-6)
    assert attn.attrs["fully_masked"] == ("zero" if mask_form == "where" else "nan")
    assert len(attn.inputs) == (3 if mask_form == "none" else 4)
    # q, k and v come from one Linear with the three weights side by side
    qkv, k, v = attn.inputs[:3]
    assert k is None and v is None
    assert qkv.producer.op == "Linear" and qkv.producer.attrs["weight"].shape == (H * D, 3 * H * D)
    assert graph.op_counts()["Linear"] == 1


@pytest.mark.parametrize(
    "k_form,shape_form",
    list(itertools.product(["perm0231", "two", "dynamo"], ["const", "gather", "slices"])),
)
def test_every_k_form_and_shape_source(k_form, shape_form):
    check_against_onnxruntime(build(k_form, "qk", "where", shape_form), fused=True)


@pytest.mark.parametrize(
    "case",
    [
        "softmax_axis",
        "interleaved_heads",
        "k_heads_and_dims_swapped",
        "probs_output",
        "scaled_v",
        "mask_then_scale",
    ],
)
def test_lookalikes_do_not_fuse(case):
    """Graphs with the same ops that compute something else (or need the probabilities)."""
    kwargs = {
        "softmax_axis": {"softmax_axis": 2},
        # heads as the minor factor of the features: [B, S, D, H] -> [B, H, S, D]
        "interleaved_heads": {"q_split": (D, H), "k_perm": [0, 3, 2, 1]},
        # k split [B, S, D', H'] with D' = H' = 8: heads and dims of k swapped, still valid
        "k_heads_and_dims_swapped": {"heads": 8, "head_size": 8, "k_perm": [0, 3, 2, 1]},
        "probs_output": {"probs_output": True},
        "scaled_v": {"scale_v": True},
        "mask_then_scale": {"mask_then_scale": True, "mask_form": "full"},
    }[case]
    check_against_onnxruntime(build(**kwargs), fused=False)


def test_qkv_merge_keeps_other_readers_and_respects_sparsity():
    """K also a graph output: still merged, K read back as a Slice of the packed output. Q, K
    and V of very different sparsity: three Linears (each gets its own kernel choice)."""
    graph = check_against_onnxruntime(build(k_output=True), fused=True)
    counts = graph.op_counts()
    assert counts["Linear"] == 1 and counts["Slice"] == 1, counts
    graph = check_against_onnxruntime(build(k_zeros=0.9), fused=True)
    (attn,) = [n for n in graph.nodes if n.op == "Attention"]
    assert graph.op_counts()["Linear"] == 3 and attn.inputs[1] is not None


def test_fully_masked_rows_match_onnxruntime():
    """Every key of a row masked: NaN without the guard (Softmax's answer), 0 with it."""
    for mask_form, expect_nan in (("where", False), ("full", True)):
        model = build(mask_form=mask_form)
        feed = feed_for(model, 2, 5)
        if mask_form == "where":
            feed["mask"][1, :] = 0
        else:
            feed["fmask"][1, :, 2, :] = -np.inf
        expected = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        ).run(None, feed)[0]
        got = sparsednn.InferenceSession(model).run(None, feed)[0]
        assert np.isnan(expected).any() == expect_nan
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5, equal_nan=True)


def test_builtin_encoder_fuses_every_layer():
    from sparsednn.models import ARCHITECTURES, build_encoder
    from sparsednn.models.encoders import example_inputs

    config = ARCHITECTURES["bert-tiny"]
    model = build_encoder(config, sparsity=0.9)
    graph = run_pipeline(import_onnx(model))
    counts = graph.op_counts()
    assert counts.get("Attention") == config.layers and "Softmax" not in counts, counts
    assert "Transpose" not in counts and "Reshape" not in counts, counts
    feed = example_inputs(config, 3, 17)
    expected = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, feed)[0]
    got = sparsednn.InferenceSession(model).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
