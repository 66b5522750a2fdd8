"""ONNX's own conformance suite (the backend node tests) run through sparsednn.

Only the node tests of the ops sparsednn implements are included; each exclusion below says
why. Run alone with `pytest tests/test_onnx_backend.py -q`.

Test models newer than the opsets sparsednn reads (onnx generates each node test at the op's
latest version, up to 28) are lowered to the newest opset sparsednn reads with onnx's version
converter: the ops concerned only gained element types in those versions. Test models older
than opset 13 are excluded, since sparsednn refuses them with ModelLoadError.
"""

from __future__ import annotations

import re
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


# One pattern per supported op; node test names are test_<op in snake_case>[_variant].
def _snake(op: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", op).lower()


_EXTRA_NAMES = {  # node test names that do not follow the op's snake_case name
    "BatchNormalization": ["batchnorm"], "ConstantOfShape": ["constantofshape"],
    "GlobalAveragePool": ["globalaveragepool"], "GlobalMaxPool": ["globalmaxpool"],
    "InstanceNormalization": ["instancenorm"], "LayerNormalization": ["layer_normalization"],
    "LogSoftmax": ["logsoftmax"], "MatMul": ["matmul"], "MaxPool": ["maxpool"],
    "AveragePool": ["averagepool"], "GatherElements": ["gather_elements"],
    "GatherND": ["gathernd"], "ScatterND": ["scatternd"], "ScatterElements": ["scatter_elements"],
    "CastLike": ["castlike"], "Reshape": ["reshape"], "TopK": ["top_k"], "ArgMax": ["argmax"],
    "ArgMin": ["argmin"], "ReduceLogSumExp": ["reduce_log_sum_exp"], "IsNaN": ["isnan"],
    "IsInf": ["isinf"], "PRelu": ["prelu"], "LeakyRelu": ["leakyrelu"], "NonZero": ["nonzero"],
    "OneHot": ["onehot"], "HardSigmoid": ["hardsigmoid"], "HardSwish": ["hardswish"],
    "Hardmax": ["hardmax"], "CumSum": ["cumsum"], "Softplus": ["softplus"],
    "Softsign": ["softsign"], "Trilu": ["tril", "triu"], "Einsum": ["einsum"],
    "Dropout": ["dropout"], "Gelu": ["gelu"],
}

backend_test = onnx.backend.test.BackendTest(SparseDNNBackend, __name__)
INCLUDE = [re.compile(rf"^test_{name}(_|$)") for op in supported_ops()
           for name in sorted({_snake(op), *_EXTRA_NAMES.get(op, [])})]
for _pattern in INCLUDE:
    backend_test.include(_pattern.pattern)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _NODE_TESTS = {t.name: t for t in load_model_tests(kind="node")}


def exclude(name: str) -> None:
    backend_test.exclude(rf"^{name}_cpu$")


# opset < 13: sparsednn reads opsets 13..23 only and refuses these with ModelLoadError.
for _name, _t in _NODE_TESTS.items():
    if opset_version(_t.model) < MIN_OPSET:
        exclude(_name)

# Expanded (function-body) variants that use an op sparsednn does not implement.
_SUPPORTED = set(supported_ops())
for _name, _t in _NODE_TESTS.items():
    if "_expanded" in _name and not {n.op_type for n in _t.model.graph.node} <= _SUPPORTED:
        exclude(_name)

EXCLUDE_PATTERNS = {
    # Element types sparsednn does not have.
    r"(?i)string": "string tensors are not supported",
    r"(?i)bfloat16": "bfloat16 is not supported",
    r"(?i)float8|float4|e4m3|e5m2|e8m0": "float8/float4 types are not supported",
    r"(?i)_u?int4(?!\d)|_u?int2(?!\d)": "4-bit and 2-bit integer types are not supported",
}
for _pattern in EXCLUDE_PATTERNS:
    backend_test.exclude(_pattern)

# Known failures, each with its reason.
KNOWN_FAILURES = {
    "test_batchnorm_epsilon_training_mode": "training mode (sparsednn is inference-only)",
    "test_batchnorm_example_training_mode": "training mode (sparsednn is inference-only)",
    "test_identity_opt": "optional types are not supported",
    "test_identity_sequence": "sequence types are not supported",
    "test_split_to_sequence_1": "SplitToSequence (sequence types) is not supported",
    "test_split_to_sequence_2": "SplitToSequence (sequence types) is not supported",
    "test_split_to_sequence_nokeepdims": "SplitToSequence (sequence types) is not supported",
    "test_range_float16_type_positive_delta": "opset 27 (float16 Range) cannot be lowered to 23",
}
for _name in _NODE_TESTS:  # Mod-28 allows fmod=0 on floats; opsets 13..23 require fmod=1
    if _name.startswith("test_mod_") and "fmod_0" in _name and "float" in _name:
        KNOWN_FAILURES[_name] = "float Mod with fmod=0 exists from opset 28 only"
for _name in KNOWN_FAILURES:
    exclude(_name)


def _node_cases():
    """The node-test TestCase with only the CPU tests that the include patterns select."""
    cases = backend_test.enable_report().test_cases
    case = cases["OnnxBackendNodeModelTest"]
    for attr in list(vars(case)):
        if not attr.startswith("test_"):
            continue
        if attr.endswith("_cuda") or not any(p.search(attr) for p in INCLUDE):
            delattr(case, attr)
    return {"OnnxBackendNodeModelTest": case}


globals().update(_node_cases())

if __name__ == "__main__":
    unittest.main()
