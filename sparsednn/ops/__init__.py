"""Every op sparsednn runs, one function each; importing this package registers them all."""

from sparsednn.ops import onnx_ops, fused_ops  # noqa: F401  (registration side effects)
from sparsednn.ops.registry import OPS, OpDef, lookup, register, shape_rule, supported_ops

__all__ = ["OPS", "OpDef", "lookup", "register", "shape_rule", "supported_ops"]
