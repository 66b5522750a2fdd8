"""Constant folding: evaluate every node whose inputs are all known at compile time.

Shape of a statically shaped value is known too, so the Shape → Gather → Concat → Reshape
chains that exporters emit fold away whenever the shapes are static.
"""

from __future__ import annotations

import numpy as np

from sparsednn.ir import Graph, Node, Value
from sparsednn.ops import lookup

# Folding must not blow up the model: an op like Expand or ConstantOfShape could materialise
# a huge tensor from a tiny one. Outputs larger than this stay as run-time ops.
MAX_FOLDED_BYTES = 64 << 20
NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}


def _foldable_inputs(node: Node) -> list[np.ndarray | None] | None:
    if node.op == "Shape":
        x = node.inputs[0]
        if x is not None and x.is_static:
            # A zero-strided stand-in: Shape reads only the shape, so nothing is allocated.
            return [np.broadcast_to(np.zeros((), x.dtype or np.float32), x.shape)]
        return None
    arrays = []
    for v in node.inputs:
        if v is None:
            arrays.append(None)
        elif v.is_const:
            arrays.append(v.const)
        else:
            return None
    return arrays


def fold_constants(graph: Graph) -> Graph:
    kept: list[Node] = []
    for node in graph.nodes:
        arrays = None if node.op in NEVER_FOLD else _foldable_inputs(node)
        if arrays is None:
            kept.append(node)
            continue
        results = lookup(node.op, node.name).compute(*arrays, **node.attrs)
        results = results if isinstance(results, tuple) else (results,)
        if sum(np.asarray(r).nbytes for r in results) > MAX_FOLDED_BYTES:
            kept.append(node)
            continue
        for out, result in zip(node.outputs, results):
            const = Value.constant(out.name, np.asarray(result))
            graph.replace_all_uses(out, const)
    graph.nodes = kept
    return graph
