"""Shape inference with symbolic dimensions ("batch", "sequence").

Each op's rule (registered with `shape_rule`) maps input types to output types. Ops without a
rule keep what the ONNX importer recorded (onnx's own inference), or take the type of their
first input when they are elementwise.
"""

from __future__ import annotations

from sparsednn.errors import InvalidGraphError
from sparsednn.ir import Graph, Node, Value
from sparsednn.ops import lookup


def infer_shapes(graph: Graph) -> Graph:
    for node in graph.nodes:
        if len(node.outputs) == 1 and node.outputs[0].const is None:
            node.outputs[0].symbolic_value = _symbolic_value(node)
        rule = lookup(node.op, node.name).infer
        if rule is None:
            continue
        try:
            types = rule(node)
        except ValueError as e:
            raise InvalidGraphError(
                f"graph {graph.name!r}: node {node.name!r} ({node.op}): {e} "
                f"(input types: {', '.join(v.type_str() if v else '_' for v in node.inputs)})"
            ) from e
        except (TypeError, IndexError, KeyError, AttributeError):
            continue  # a rule that cannot decide (unknown rank, say) leaves the type alone
        for out, (dtype, shape) in zip(node.outputs, types):
            if dtype is not None:
                out.dtype = dtype
            if shape is not None:
                out.shape = _merge(out.shape, tuple(shape))
    return graph


def _rank(dim) -> int:
    """How much a dimension says: a size, a named symbol, onnx's anonymous unk__N, nothing."""
    if isinstance(dim, int):
        return 3
    if isinstance(dim, str):
        return 1 if dim.startswith("unk__") else 2
    return 0


def _merge(known, inferred):
    """Combine two views of one shape, dimension by dimension, keeping what says more."""
    if known is None or len(known) != len(inferred):
        return inferred
    return tuple(i if _rank(i) >= _rank(k) else k for k, i in zip(known, inferred))


def _ints_of(value: Value | None) -> tuple | None:
    """The contents of a small integer tensor: constant, or symbolic (from shapes)."""
    if value is None:
        return None
    if value.const is not None:
        c = value.const
        if c.dtype.kind in "iu" and c.ndim <= 1 and c.size <= 16:
            return tuple(int(x) for x in c.reshape(-1))
        return None
    return value.symbolic_value


def _symbolic_value(node: Node) -> tuple | None:
    """What a shape-computing node holds, in terms of dims and symbols, when that is known."""
    op, ins = node.op, node.inputs
    if op == "Shape":
        x = ins[0]
        if x.shape is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end")
        return tuple(x.shape[start:end])
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        inner = _ints_of(ins[0])
        return (
            inner if inner is not None and len(inner) <= 1 or op in ("Identity", "Cast") else None
        )
    if op == "Gather" and node.attrs.get("axis", 0) == 0:
        data, index = _ints_of(ins[0]), _ints_of(ins[1])
        if data is None or index is None or any(not isinstance(i, int) for i in index):
            return None
        if not all(-len(data) <= i < len(data) for i in index):
            return None
        return tuple(data[i] for i in index)
    if op == "Concat":
        parts = [_ints_of(v) for v in ins]
        return None if any(p is None for p in parts) else tuple(d for p in parts for d in p)
    return None
