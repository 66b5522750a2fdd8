"""Fuse a transformer's embeddings into the layer norm after them: EmbedLayerNorm.

Recognised: a LayerNorm or AddLayerNorm (fuse_layer_norm) whose input sum is made only of
Gathers of rows of constant float32 tables [V, N] (axis 0, N the norm's features), through
Adds that nothing else reads, e.g. BERT's

    LayerNorm(Gather(word, input_ids) + Gather(token_type, token_type_ids)
              + Gather(position, position_ids))

becomes EmbedLayerNorm(input_ids, token_type_ids, position_ids) {tables, term_shapes,
gathers (their names, for errors), scale, bias, epsilon}: one pass over the rows on every
thread (runtime: codegen/norm.py's gathered variant), where the Gathers, the Adds and the
norm each made and read the whole [tokens, N] array in numpy, on one thread (BERT-base 90% at
batch 16 x 128, 2 threads: the steps before the encoder 3.1 -> 1.6 ms a run). A constant term
[..., N] (static exports fold their position embeddings) is a table whose rows are its own
positions: term_shapes holds its leading shape (None for a Gather's table, whose rows the
node's next input indexes).
"""

from __future__ import annotations

import numpy as np

from sparsednn.ir import Graph, Node, Value
from sparsednn.ops.fused_ops import DOMAIN
from sparsednn.passes.matching import Rewrite, Uses

MAX_TABLES = 4  # terms of the generated kernel's sum (codegen/norm.py)


def _table_rows(node: Node | None, n: int) -> Value | None:
    """The indices of a Gather of rows of a constant float32 [V, n] table, else None."""
    if node is None or node.op != "Gather" or len(node.inputs) != 2:
        return None
    table, idx = node.inputs
    if not table.is_const or table.const.dtype != np.float32 or table.const.ndim != 2:
        return None
    if table.const.shape[1] != n or table.const.shape[0] == 0 or node.attrs.get("axis", 0) != 0:
        return None
    if idx is None or idx.is_const or idx.dtype is None or np.dtype(idx.dtype).kind not in "iu":
        return None
    return idx


def _terms(value: Value, n: int, uses: Uses, reader: Node, swallowed: list[Node]):
    """The terms summed into `value` (read only by `reader`) as [(indices, table, shape, the
    Gather's name)], or None: Gathers of table rows (shape None), and constants [..., n] (a static export's
    position embeddings, folded: indices None, table their rows, shape their leading shape);
    the nodes of the Gathers and of the Adds between them appended to `swallowed`."""
    c = value.const
    if c is not None:
        if c.dtype != np.float32 or c.ndim < 1 or c.shape[-1] != n or c.size == 0:
            return None
        return [(None, np.ascontiguousarray(c).reshape(-1, n), tuple(c.shape[:-1]), None)]
    node = value.producer
    if node is None or uses.sole_reader(value) is not reader:
        return None
    idx = _table_rows(node, n)
    if idx is not None:
        swallowed.append(node)
        return [(idx, node.inputs[0].const, None, node.name)]
    if node.op != "Add" or len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    terms = []
    for v in node.inputs:
        t = _terms(v, n, uses, node, swallowed)
        if t is None:
            return None
        terms += t
    swallowed.append(node)
    return terms


def fuse_embeddings(graph: Graph) -> Graph:
    uses = Uses(graph)
    rewrite = Rewrite()
    for node in graph.nodes:
        if node.op not in ("LayerNorm", "AddLayerNorm") or node.domain != DOMAIN:
            continue
        n = int(node.attrs["scale"].shape[0])
        swallowed: list[Node] = []
        terms = []
        for v in node.inputs:
            t = _terms(v, n, uses, node, swallowed)
            if t is None:
                break
            terms += t
        else:
            gathered = [t[0] for t in terms if t[0] is not None]
            if not gathered or len(terms) > MAX_TABLES or any(rewrite.taken(s) for s in swallowed):
                continue
            fused = Node(
                "EmbedLayerNorm",
                f"{node.name}_embeddings",
                gathered,
                node.outputs[:1],
                {
                    **node.attrs,
                    "tables": [t[1] for t in terms],
                    "term_shapes": [t[2] for t in terms],
                    "gathers": [t[3] for t in terms],
                },
                domain=DOMAIN,
            )
            rewrite.replace([*swallowed, node], fused, at=node)
    return rewrite.apply(graph)
