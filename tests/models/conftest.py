"""Fixtures of the model tests: exported models, pruned copies and sessions, made once each.

`zoo` (session scope) hands out, for a ModelSpec and a sparsity:
    zoo.export(spec)           the cached export (skips a dynamo variant that cannot export)
    zoo.model(spec, sparsity)  the onnx.ModelProto, magnitude-pruned per layer (weights inline)
    zoo.ort(spec, sparsity)    an onnxruntime session on it (the reference)
    zoo.session(spec, sparsity) a sparsednn session on it; a failure to create one is kept
                                and raised again, so every test that needs it reports it
Everything is kept for the whole test session so that a session serves many tests and shapes.
"""

from __future__ import annotations

import time

import pytest

from sparsednn.models import hf
from sparsednn.models.hf import ExportFailed, ModelSpec

from model_checks import ORT_PROVIDERS


class Zoo:
    def __init__(self, observe):
        self.observe = observe
        self._exports: dict[ModelSpec, object] = {}
        self._models: dict = {}
        self._ort: dict = {}
        self._sessions: dict = {}
        self.reports: dict = {}
        self.create_seconds: dict = {}

    def export(self, spec: ModelSpec) -> hf.Exported:
        if spec not in self._exports:
            try:
                exported = hf.export(spec)
                m = exported.meta
                self.observe(
                    "exports",
                    f"{spec.name}: OK (opset {m['opset'].get('ai.onnx')}, "
                    f"inputs {m['inputs']}, outputs {m['outputs']}, external data "
                    f"{m['external_data'] or 'none'}) ops {m['ops']}",
                )
                self._exports[spec] = exported
            except ExportFailed as e:
                self.observe("exports", f"{spec.name}: FAILED: {e}")
                self._exports[spec] = e
        result = self._exports[spec]
        if isinstance(result, ExportFailed):
            if spec.exporter == "dynamo":
                pytest.skip(f"{spec.name}: the dynamo exporter fails here: {result}")
            pytest.fail(f"{spec.name}: export failed: {result}")
        return result

    def model(self, spec: ModelSpec, sparsity: float = 0.0):
        import onnx

        from sparsednn.prune import prune_model

        key = (spec, sparsity)
        if key not in self._models:
            dense = onnx.load(str(self.export(spec).path))  # loads external data too
            if sparsity == 0.0:
                self._models[key] = dense
            else:
                pruned, report = prune_model(dense, sparsity)
                self._models[key] = pruned
                self.reports[key] = report
        return self._models[key]

    def ort(self, spec: ModelSpec, sparsity: float = 0.0):
        import onnxruntime as ort

        key = (spec, sparsity)
        if key not in self._ort:
            self._ort[key] = ort.InferenceSession(
                self.model(spec, sparsity).SerializeToString(), providers=ORT_PROVIDERS
            )
        return self._ort[key]

    def session(self, spec: ModelSpec, sparsity: float = 0.0):
        import sparsednn

        key = (spec, sparsity)
        if key not in self._sessions:
            model = self.model(spec, sparsity)
            start = time.perf_counter()
            try:
                self._sessions[key] = sparsednn.InferenceSession(model)
                self.create_seconds[key] = time.perf_counter() - start
            except Exception as e:  # keep it: the tests that need this session all report it
                self._sessions[key] = e
        result = self._sessions[key]
        if isinstance(result, Exception):
            raise result
        return result

    def drop(self, spec: ModelSpec) -> None:
        """Forget everything about `spec` (big models: free the memory once done)."""
        for cache in (self._models, self._ort, self._sessions, self.reports):
            for key in [k for k in cache if k[0] == spec]:
                del cache[key]


@pytest.fixture(scope="session")
def zoo(observe):
    return Zoo(observe)
