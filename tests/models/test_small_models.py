"""Small transformers models, exported by both exporters and pruned, against onnxruntime.

For each architecture (BERT, DistilBERT, RoBERTa, ViT: hidden 128, 2 layers, 4 heads,
intermediate 512), exporter (legacy TorchScript, dynamo) and sparsity (0, 50, 90, 97%), one
sparsednn session runs every shape, batch 1, 3, 8 by sequence 1, 7, 64, 128, on fresh random
tokens with padding at the end of some rows, without compiling anything again, and must agree
with onnxruntime on the same pruned model within 1e-4 (max-abs on last_hidden_state).
"""

from __future__ import annotations

import numpy as np
import pytest

from model_checks import TOLERANCE, linear_projections, max_abs_diff, no_recompilation
from sparsednn.models.hf import ModelSpec, make_inputs, num_layers

ARCHS = ["bert", "distilbert", "roberta", "vit"]
EXPORTERS = ["legacy", "dynamo"]
SPARSITIES = [0.0, 0.5, 0.9, 0.97]
BATCHES = [1, 3, 8]
SEQUENCES = [1, 7, 64, 128]


def shapes_of(spec: ModelSpec) -> list[tuple[int, int | None]]:
    return [(b, s) for b in BATCHES for s in (SEQUENCES if spec.is_text else [None])]


def _fmt(shape) -> str:
    b, s = shape
    return f"{b}x{s}" if s is not None else f"{b}"


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"{round(100 * s)}pct")
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_onnxruntime_on_every_shape(zoo, observe, arch, exporter, sparsity):
    spec = ModelSpec(arch, exporter=exporter)
    reference = zoo.ort(spec, sparsity)
    session = zoo.session(spec, sparsity)

    # The pruned weights reached the Linear nodes.
    linears = [n for n in session.graph.nodes if n.op == "Linear"]
    assert linear_projections(session.graph) == 6 * num_layers(spec)
    for node in linears:
        weight = np.asarray(node.attrs["weight"])
        got = 1.0 - np.count_nonzero(weight) / weight.size
        assert got == pytest.approx(sparsity, abs=2e-3), node.name

    diffs: dict = {}
    errors: dict = {}
    with no_recompilation(session):
        for i, shape in enumerate(shapes_of(spec)):
            batch, seq = shape
            feed = make_inputs(spec, batch, seq or 0, seed=1000 + i)
            (expected,) = reference.run(["last_hidden_state"], feed)
            try:
                (out,) = session.run(["last_hidden_state"], feed)
                diffs[shape] = max_abs_diff(out, expected)
            except AssertionError:
                raise
            except Exception as e:  # keep going: the other shapes tell more
                errors[shape] = f"{type(e).__name__}: {e}"
    name = f"{spec.name} @ {sparsity:.0%}"
    if diffs:
        worst = max(diffs, key=diffs.get)
        observe(
            "max-abs vs onnxruntime, small models",
            f"{name}: max {diffs[worst]:.2e} (at {_fmt(worst)}) over {len(diffs)} shapes",
        )
    bad = {_fmt(k): f"{v:.2e}" for k, v in diffs.items() if not v <= TOLERANCE}
    by_message: dict[str, list[str]] = {}
    for shape, message in errors.items():
        by_message.setdefault(message, []).append(_fmt(shape))
    assert not errors, f"{name}: run failed: " + "; ".join(
        f"at {', '.join(shapes)}: {message}" for message, shapes in by_message.items()
    )
    assert not bad, f"{name}: max-abs > {TOLERANCE} at {bad}"


@pytest.mark.parametrize(
    "scope,block",
    [("global", (1, 1)), ("layer", (4, 1)), ("global", (1, 4))],
    ids=["global", "layer-4x1", "global-1x4"],
)
def test_global_and_block_pruned_model_matches_onnxruntime(zoo, observe, scope, block):
    import onnxruntime as ort

    import sparsednn
    from model_checks import ORT_PROVIDERS
    from sparsednn.prune import prune_model

    spec = ModelSpec("bert", exporter="legacy")
    pruned, report = prune_model(zoo.model(spec, 0.0), 0.9, scope=scope, block=block)
    reference = ort.InferenceSession(pruned.SerializeToString(), providers=ORT_PROVIDERS)
    session = sparsednn.InferenceSession(pruned)
    diffs = {}
    with no_recompilation(session):
        for i, (batch, seq) in enumerate([(1, 128), (3, 7), (8, 64)]):
            feed = make_inputs(spec, batch, seq, seed=2000 + i)
            (expected,) = reference.run(["last_hidden_state"], feed)
            (got,) = session.run(["last_hidden_state"], feed)
            diffs[f"{batch}x{seq}"] = max_abs_diff(got, expected)
    sparsities = sorted(round(r["sparsity"], 3) for r in report)
    observe(
        "max-abs vs onnxruntime, small models",
        f"{spec.name} @ 90% {scope} {block[0]}x{block[1]} blocks (layers "
        f"{sparsities[0]:.1%}..{sparsities[-1]:.1%}): max {max(diffs.values()):.2e}",
    )
    assert all(v <= TOLERANCE for v in diffs.values()), diffs
