"""Headline: BERT-base (hidden 768, 12 layers, 12 heads, intermediate 3072), seeded random
weights, exported by the TorchScript exporter with dynamic batch and sequence, magnitude-pruned
to 90% per layer; one sparsednn session runs batch 1 and 8 at sequence 128 and must agree
with onnxruntime within 1e-4 (max-abs on last_hidden_state). The session creation time is
printed and reported."""

from __future__ import annotations

import time

import numpy as np
import pytest

from model_checks import TOLERANCE, max_abs_diff, no_recompilation
from model_zoo import ModelSpec, make_inputs

SPEC = ModelSpec("bert", size="base", exporter="legacy")
SPARSITY = 0.9
SEQ = 128


@pytest.fixture(scope="module")
def bert_base(zoo):
    yield zoo
    zoo.drop(SPEC)  # ~2 GB of protos and sessions: free them for the rest of the suite


def test_bert_base_pruned_90_matches_onnxruntime(bert_base, observe):
    zoo = bert_base
    exported = zoo.export(SPEC)
    observe("BERT-base", f"export ({SPEC.exporter}): {exported.meta.get('export_seconds', 'cached')} s"
            f" when exported; ops {exported.ops}")
    start = time.perf_counter()
    model = zoo.model(SPEC, SPARSITY)
    report = zoo.reports[(SPEC, SPARSITY)]
    observe("BERT-base", f"load + prune to 90%: {time.perf_counter() - start:.1f} s, "
            f"{len(report)} weights pruned")
    assert len(report) == 72 and all(abs(r["sparsity"] - 0.9) < 1e-3 for r in report)

    start = time.perf_counter()
    session = zoo.session(SPEC, SPARSITY)
    created = time.perf_counter() - start
    print(f"\nBERT-base 90% sparsednn session creation: {created:.2f} s")
    observe("BERT-base", f"sparsednn session creation (90% pruned): {created:.2f} s "
            f"(session.compile_seconds {getattr(session, 'compile_seconds', float('nan')):.2f})")
    linears = [n for n in session.graph.nodes if n.op == "Linear"]
    assert len(linears) == 72
    assert sum(n.attrs.get("activation") == "gelu" for n in linears) == 12

    reference = zoo.ort(SPEC, SPARSITY)
    diffs = {}
    with no_recompilation(session):
        for batch in (1, 8):
            feed = make_inputs(SPEC, batch, SEQ, seed=batch)
            (expected,) = reference.run(["last_hidden_state"], feed)
            t0 = time.perf_counter()
            (got,) = session.run(["last_hidden_state"], feed)
            seconds = time.perf_counter() - t0
            diffs[batch] = max_abs_diff(got, expected)
            observe("BERT-base", f"90%, batch {batch} x seq {SEQ}: max-abs {diffs[batch]:.2e}, "
                    f"sparsednn run {seconds * 1000:.0f} ms, |out| max "
                    f"{np.abs(expected).max():.2f}")
    assert all(d <= TOLERANCE for d in diffs.values()), diffs
