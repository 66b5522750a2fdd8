"""Headline: BERT-base (hidden 768, 12 layers, 12 heads, intermediate 3072), seeded random
weights, exported with dynamic batch and sequence by the TorchScript exporter (and by the
dynamo exporter, skipped with the reason if it cannot export), magnitude-pruned to 90% per
layer; one sparsednn session runs batch 1 and 8 at sequence 128 and must agree with
onnxruntime within 1e-4 (max-abs on last_hidden_state). The session creation time is printed
and reported."""

from __future__ import annotations

import time

import numpy as np
import pytest

from model_checks import TOLERANCE, linear_projections, max_abs_diff, no_recompilation
from sparsednn.models.hf import ModelSpec, make_inputs

SPARSITY = 0.9
SEQ = 128


@pytest.fixture(params=["legacy", "dynamo"])
def spec(request, zoo):
    spec = ModelSpec("bert", size="base", exporter=request.param)
    yield spec
    zoo.drop(spec)  # ~2 GB of protos and sessions: free them for the rest of the suite


def test_bert_base_pruned_90_matches_onnxruntime(zoo, spec, observe):
    name = f"BERT-base {spec.exporter}"

    def note(line: str) -> None:
        observe("BERT-base", f"{name}: {line}")

    exported = zoo.export(spec)
    note(
        f"export took {exported.meta.get('export_seconds')} s (when first exported); "
        f"ops {exported.ops}"
    )
    start = time.perf_counter()
    zoo.model(spec, SPARSITY)
    report = zoo.reports[(spec, SPARSITY)]
    note(f"load + prune to 90%: {time.perf_counter() - start:.1f} s, {len(report)} weights")
    assert len(report) == 72 and all(abs(r["sparsity"] - SPARSITY) < 1e-3 for r in report)

    start = time.perf_counter()
    session = zoo.session(spec, SPARSITY)
    created = time.perf_counter() - start
    print(f"\n{name} 90%: sparsednn session creation {created:.2f} s")
    note(f"sparsednn session creation (90% pruned): {created:.2f} s")
    linears = [n for n in session.graph.nodes if n.op == "Linear"]
    assert linear_projections(session.graph) == 72
    assert sum(n.attrs.get("activation") == "gelu" for n in linears) == 12

    reference = zoo.ort(spec, SPARSITY)
    diffs = {}
    with no_recompilation(session):
        for batch in (1, 8):
            feed = make_inputs(spec, batch, SEQ, seed=batch)
            (expected,) = reference.run(["last_hidden_state"], feed)
            t0 = time.perf_counter()
            (got,) = session.run(["last_hidden_state"], feed)
            seconds = time.perf_counter() - t0
            diffs[batch] = max_abs_diff(got, expected)
            note(
                f"batch {batch} x seq {SEQ}: max-abs {diffs[batch]:.2e} "
                f"(|out| up to {np.abs(expected).max():.1f}), "
                f"sparsednn run {seconds * 1e3:.0f} ms"
            )
    assert all(d <= TOLERANCE for d in diffs.values()), diffs
