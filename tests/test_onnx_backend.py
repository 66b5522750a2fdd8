"""ONNX's own conformance suite (the backend node tests) run through sparsednn.

Only the node tests of the ops sparsednn implements are included; each exclusion below says
why. Run alone with `pytest tests/test_onnx_backend.py -q`.

Test models newer than the opsets sparsednn reads (onnx generates each node test at the op's
latest version, up to 28) are lowered to the newest opset sparsednn reads with onnx's version
converter: the ops concerned only gained element types in those versions. Test models older
than opset 13 are excluded, since sparsednn refuses them with ModelLoadError.
"""

from __future__ import annotations

import unittest
import warnings

import onnx
import onnx.backend.test
import onnx.version_converter
from onnx.backend.base import Backend, BackendRep
from onnx.backend.test.loader import load_model_tests

import sparsednn
from sparsednn.errors import ModelLoadError
from sparsednn.frontend.onnx_import import MAX_OPSET, MIN_OPSET, opset_version
from sparsednn.ops import supported_ops


class SparseDNNRep(BackendRep):
    def __init__(self, session: sparsednn.InferenceSession):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    def run(self, inputs, **kwargs):
        if isinstance(inputs, dict):
            feed = dict(inputs)
        else:
            inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
            feed = dict(zip(self.input_names, inputs))
        return tuple(self.session.run(None, feed))


class SparseDNNBackend(Backend):
    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> bool:
        return device == "CPU" and opset_version(model) >= MIN_OPSET

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> SparseDNNRep:
        if not cls.supports_device(device):
            raise ModelLoadError(f"device {device!r} is not supported (CPU only)")
        if opset_version(model) > MAX_OPSET:
            model = onnx.version_converter.convert_version(model, MAX_OPSET)
        return SparseDNNRep(sparsednn.InferenceSession(model))

    @classmethod
    def run_model(cls, model, inputs, device="CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


with warnings.catch_warnings():  # onnx's test generators warn about their own casts
    warnings.simplefilter("ignore")
    backend_test = onnx.backend.test.BackendTest(SparseDNNBackend, __name__)
    _NODE_TESTS = {t.name: t for t in load_model_tests(kind="node")}

# Included: every node test whose model uses only ops sparsednn implements. Besides each op's
# own tests this takes the "_expanded" tests of other ops (Attention, RMSNormalization,
# NegativeLogLikelihoodLoss, ...) whose function bodies decompose into supported ops.
_SUPPORTED = set(supported_ops())
INCLUDED = sorted(
    name for name, t in _NODE_TESTS.items() if {n.op_type for n in t.model.graph.node} <= _SUPPORTED
)
for _name in INCLUDED:
    backend_test.include(rf"^{_name}_cpu$")
_INCLUDED_SET = set(INCLUDED)


def exclude(pattern: str, reason: str) -> None:
    """Skip the tests matching `pattern`; the reason shows in pytest's skip message."""
    backend_test.exclude(f"{pattern}(?#{reason})")


# Test models older than opset 13: sparsednn refuses them with ModelLoadError (unsupported).
for _name, _t in _NODE_TESTS.items():
    if opset_version(_t.model) < MIN_OPSET:
        exclude(rf"^{_name}_cpu$", "opset < 13")

# Element types sparsednn does not have.
exclude(r"(?i)string", "string tensors are not supported")
exclude(r"(?i)bfloat16|bf16", "bfloat16 is not supported")
exclude(r"(?i)float8|float4|e4m3|e5m2|e8m0", "float8/float4 types are not supported")
exclude(r"(?i)_u?int4(?!\d)|_u?int2(?!\d)", "4-bit and 2-bit integer types are not supported")
exclude(r"^test_identity_opt_", "optional types are not supported")
exclude(r"^test_identity_sequence_", "sequence types are not supported")
# Training mode: sparsednn is inference-only (Dropout with ratio 0 still runs).
exclude(r"^test_batchnorm_.*training_mode_", "BatchNormalization training mode")
exclude(r"^test_training_dropout(_default)?(_mask)?_cpu$", "Dropout training mode")
# Versions after 23 that onnx's version converter cannot lower to the opsets sparsednn reads.
exclude(r"^test_mod_.*float.*fmod_0", "float Mod with fmod=0 is opset 28 only")
exclude(r"^test_range_float16_type_", "float16 Range is opset 27 only")


def _node_cases():
    """The node-test TestCase with only the CPU tests that the include patterns select."""
    cases = backend_test.test_cases
    case = cases["OnnxBackendNodeModelTest"]
    for attr in list(vars(case)):
        if not attr.startswith("test_"):
            continue
        if attr.endswith("_cuda") or attr[: -len("_cpu")] not in _INCLUDED_SET:
            delattr(case, attr)
    return {"OnnxBackendNodeModelTest": case}


globals().update(_node_cases())

if __name__ == "__main__":
    unittest.main()
