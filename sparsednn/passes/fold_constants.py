"""Constant folding: evaluate every node whose inputs are all known at compile time.

Shape of a statically shaped value is known too, so the Shape → Gather → Concat → Reshape
chains that exporters emit fold away whenever the shapes are static.
"""

from __future__ import annotations

import numpy as np

from sparsednn.errors import InvalidGraphError, SparseDNNError
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


def _creates_too_much(node: Node, arrays: list[np.ndarray | None]) -> bool:
    """Whether an op that makes data from shapes would make more than MAX_FOLDED_BYTES.

    Checked before computing, so that a model asking for an absurd tensor is never allocated.
    """
    try:
        if node.op == "ConstantOfShape":
            count = float(np.prod(arrays[0].astype(np.float64)))
        elif node.op == "Expand":
            target = np.broadcast_shapes(arrays[0].shape, tuple(int(d) for d in arrays[1]))
            count = float(np.prod(target, dtype=np.float64))
        elif node.op == "Tile":
            count = float(np.prod(arrays[0].shape, dtype=np.float64)) * float(
                np.prod(arrays[1].astype(np.float64))
            )
        elif node.op == "Range":
            start, limit, delta = (float(a) for a in arrays)
            count = abs((limit - start) / delta) if delta else float("inf")
        else:
            return False
    except (ValueError, TypeError, OverflowError):
        return True  # let the run-time op report the problem with its own message
    return count * 8 > MAX_FOLDED_BYTES


def fold_constants(graph: Graph) -> Graph:
    kept: list[Node] = []
    # folded outputs -> their constants, substituted as each reader comes up (the graph is
    # topologically sorted, ir/verify.py): one walk over the graph, not one per folded node
    # (BERT-base folds ~400, and replacing each over all nodes took ~0.16 s of a session's
    # creation)
    folded: dict[int, tuple[Value, Value]] = {}  # (the output kept alive: ids stay unique)

    def constant_for(v: Value | None) -> Value | None:
        return v if v is None else folded.get(id(v), (v, v))[1]

    for node in graph.nodes:
        if folded:
            node.inputs = [constant_for(v) for v in node.inputs]
        arrays = None if node.op in NEVER_FOLD else _foldable_inputs(node)
        if arrays is None or _creates_too_much(node, arrays):
            kept.append(node)
            continue
        try:
            results = lookup(node.op, node.name).compute(*arrays, **node.attrs)
        except SparseDNNError:
            raise
        except Exception as e:  # the model's constants contradict the op: say which node
            raise InvalidGraphError(
                f"graph {graph.name!r}: node {node.name!r} ({node.op}) fails on its constant "
                f"inputs {[None if a is None else list(a.shape) for a in arrays]}: {e}"
            ) from e
        results = results if isinstance(results, tuple) else (results,)
        if sum(np.asarray(r).nbytes for r in results) > MAX_FOLDED_BYTES:
            kept.append(node)
            continue
        for out, result in zip(node.outputs, results):
            folded[id(out)] = (out, Value.constant(out.name, np.asarray(result)))
    graph.nodes = kept
    graph.outputs = [constant_for(v) for v in graph.outputs]
    return graph
