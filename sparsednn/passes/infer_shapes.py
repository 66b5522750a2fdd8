"""Shape inference with symbolic dimensions ("batch", "sequence").

Each op's rule (registered with `shape_rule`) maps input types to output types. Ops without a
rule keep what the ONNX importer recorded (onnx's own inference), or take the type of their
first input when they are elementwise.
"""

from __future__ import annotations

from sparsednn.errors import InvalidGraphError
from sparsednn.ir import Graph
from sparsednn.ops import lookup


def infer_shapes(graph: Graph) -> Graph:
    for node in graph.nodes:
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
