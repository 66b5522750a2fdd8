"""The passes did their job on real exports: Linear fusion, GELU fusion, shape chains folded.

Static-shape variants (exported without dynamic axes, batch 2 x sequence 16, with the pooler
output for BERT and ViT) must come out of the pipeline with exactly 6 Linear nodes per layer
(+1 for the pooler), the FFN intermediate ones carrying activation="gelu", and nothing left of
the Shape -> Gather -> Concat -> Reshape chains the exporters emit: no Shape node, no node
computing on constants only, and constant shape arguments for Reshape, Expand, Slice and the
like. The dynamic-shape exports must show the same Linear and GELU fusion.
"""

from __future__ import annotations

import pytest

from model_checks import TOLERANCE, linear_projections, max_abs_diff
from sparsednn.models.hf import (
    EXAMPLE_BATCH,
    EXAMPLE_SEQ,
    ModelSpec,
    hidden_size,
    make_inputs,
    num_layers,
)

ARCHS = ["bert", "distilbert", "roberta", "vit"]
EXPORTERS = ["legacy", "dynamo"]

SHAPE_OPS = {"Shape", "Size"}
# Inputs that carry shapes, axes or indices: constant once shapes are static.
SHAPE_ARGUMENTS = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "Slice": (1, 2, 3, 4),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Split": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "Pad": (1, 2, 3),
}


def static_spec(arch: str, exporter: str) -> ModelSpec:
    return ModelSpec(arch, exporter=exporter, static=True, pooler=arch in ("bert", "vit"))


def shape_chain_leftovers(graph) -> list[str]:
    """Nodes that static shapes should have folded away, described."""
    left = []
    for node in graph.nodes:
        inputs = [v for v in node.inputs if v is not None]
        if node.op in SHAPE_OPS:
            left.append(f"{node.name} ({node.op})")
        elif all(v.is_const for v in inputs):
            left.append(f"{node.name} ({node.op} on constants only)")
        else:
            for i in SHAPE_ARGUMENTS.get(node.op, ()):
                v = node.input(i)
                if v is not None and not v.is_const:
                    left.append(f"{node.name} ({node.op}: input {i} {v.name!r} not constant)")
                    break
    return left


def check_linear_fusion(session, spec: ModelSpec) -> list:
    layers, hidden = num_layers(spec), hidden_size(spec)
    linears = [n for n in session.graph.nodes if n.op == "Linear"]
    expected = 6 * layers + (1 if spec.pooler else 0)
    counts = session.graph.op_counts()
    projections = linear_projections(session.graph)
    assert projections == expected, (
        f"{spec.name}: {projections} projections in Linear nodes, expected {expected} "
        f"(6 per layer x {layers}{' + pooler' if spec.pooler else ''}); ops: {counts}"
    )
    gelu = [n for n in linears if n.attrs.get("activation") == "gelu"]
    assert len(gelu) == layers, (
        f"{spec.name}: {len(gelu)} Linear nodes with activation gelu, expected {layers}; "
        f"activations: {[n.attrs.get('activation') for n in linears]}"
    )
    for node in gelu:  # the FFN intermediate: [hidden, intermediate], with its bias
        k, n = node.attrs["weight"].shape
        assert k == hidden and n == 4 * hidden, (node.name, node.attrs["weight"].shape)
        assert node.attrs.get("bias") is not None, node.name
    assert all(n.attrs.get("bias") is not None for n in linears), "a Linear lost its bias"
    for op in ("Erf", "Gelu", "Gemm"):
        assert op not in counts, f"{spec.name}: {counts[op]} {op} node(s) left unfused: {counts}"
    leftover_matmuls = [
        n
        for n in session.graph.nodes
        if n.op == "MatMul" and n.inputs[1] is not None and n.inputs[1].is_const
    ]
    assert not leftover_matmuls, f"MatMul by a constant left unfused: {leftover_matmuls}"
    return linears


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_static_export_is_fused_and_shape_free(zoo, observe, arch, exporter):
    spec = static_spec(arch, exporter)
    session = zoo.session(spec)
    counts = session.graph.op_counts()
    observe("ops after the passes (static exports)", f"{spec.name}: {counts}")
    check_linear_fusion(session, spec)
    left = shape_chain_leftovers(session.graph)
    assert not left, f"{spec.name}: shape computations left with static inputs: {left}"


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_static_export_matches_onnxruntime(zoo, observe, arch, exporter):
    spec = static_spec(arch, exporter)
    reference = zoo.ort(spec)
    session = zoo.session(spec)
    feed = make_inputs(spec, EXAMPLE_BATCH, EXAMPLE_SEQ, seed=5)
    expected = reference.run(spec.output_names, feed)
    got = session.run(spec.output_names, feed)
    diffs = {name: max_abs_diff(g, e) for name, g, e in zip(spec.output_names, got, expected)}
    observe(
        "max-abs vs onnxruntime, static exports",
        f"{spec.name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()),
    )
    assert all(v <= TOLERANCE for v in diffs.values()), diffs


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_export_is_fused(zoo, observe, arch, exporter):
    spec = ModelSpec(arch, exporter=exporter)
    session = zoo.session(spec)
    observe("ops after the passes (dynamic exports)", f"{spec.name}: {session.graph.op_counts()}")
    check_linear_fusion(session, spec)
