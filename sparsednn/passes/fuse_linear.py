"""Fuse MatMul/Gemm with a constant weight, its bias Add and its activation into one Linear.

The Linear node owns its weight (a [K, N] float32 array, as in ONNX MatMul), its bias and its
activation, so that the backend can generate one kernel with the epilogue fused in.
"""

from __future__ import annotations

import numpy as np

from sparsednn.ir import Graph, Node, Value
from sparsednn.ops.fused_ops import DOMAIN
from sparsednn.passes.matching import Rewrite, Uses, as_row_vector, other_input

ACTIVATION_OF_OP = {"Relu": "relu", "Gelu": "gelu"}


def _linear_core(node: Node) -> tuple[Value, np.ndarray, np.ndarray | None] | None:
    """(x, weight [K, N], bias or None) when `node` is a MatMul or Gemm by a constant."""
    if node.op == "MatMul":
        x, w = node.inputs
        if w is None or not w.is_const or w.const.ndim != 2 or w.const.dtype != np.float32:
            return None
        if x.dtype is not None and x.dtype != np.float32:
            return None
        return x, w.const, None
    if node.op == "Gemm":
        a, b = node.inputs[0], node.inputs[1]
        c = node.input(2)
        attrs = node.attrs
        if attrs.get("transA", 0) or b is None or not b.is_const or b.const.dtype != np.float32:
            return None
        weight = b.const.T if attrs.get("transB", 0) else b.const
        weight = (np.float32(attrs.get("alpha", 1.0)) * weight).astype(np.float32)
        bias = None
        if c is not None:
            bias = as_row_vector(c, weight.shape[1])
            if bias is None:
                return None
            bias = np.float32(attrs.get("beta", 1.0)) * bias
        return a, weight, bias
    return None


def fuse_linear(graph: Graph) -> Graph:
    uses = Uses(graph)
    rewrite = Rewrite()
    for node in graph.nodes:
        core = None if rewrite.taken(node) else _linear_core(node)
        if core is None:
            continue
        x, weight, bias = core
        n = weight.shape[1]
        swallowed = [node]
        last = node
        reader = uses.sole_reader(last.outputs[0])
        if reader is not None and reader.op == "Add":
            b = other_input(reader, last.outputs[0])
            row = as_row_vector(b, n)
            if row is not None and (b.const.ndim == 1 or b.const.ndim <= (x.rank or 0)):
                bias = row if bias is None else bias + row
                swallowed.append(reader)
                last = reader
                reader = uses.sole_reader(last.outputs[0])
        activation = "none"
        if (
            reader is not None
            and reader.op in ACTIVATION_OF_OP
            and not reader.attrs.get("approximate", "none") == "tanh"
        ):
            activation = ACTIVATION_OF_OP[reader.op]
            swallowed.append(reader)
            last = reader
        attrs = {
            "weight": np.ascontiguousarray(weight, dtype=np.float32),
            "bias": None if bias is None else np.ascontiguousarray(bias, dtype=np.float32),
            "activation": activation,
        }
        linear = Node("Linear", node.name, [x], last.outputs, attrs, domain=DOMAIN)
        rewrite.replace(swallowed, linear, at=last)
    return rewrite.apply(graph)
