"""Recognise exported GELU decompositions and replace them with one Gelu node.

torch exports exact GELU as x * 0.5 * (1 + erf(x / sqrt(2))), with the multiplications in
varying orders and x / sqrt(2) sometimes as x * (1 / sqrt(2)).
"""

from __future__ import annotations

import math

from sparsednn.ir import Graph, Node
from sparsednn.passes.matching import Rewrite, Uses, const_scalar, is_close, other_input

SQRT2 = math.sqrt(2.0)


def _erf_argument(scale: Node):
    """x when `scale` computes x / sqrt(2) or x * (1/sqrt(2)), else None."""
    if scale.op == "Div" and is_close(const_scalar(scale.inputs[1]), SQRT2):
        return scale.inputs[0]
    if scale.op == "Mul":
        for x, c in (scale.inputs, scale.inputs[::-1]):
            if is_close(const_scalar(c), 1.0 / SQRT2):
                return x
    return None


def _match(erf: Node, uses: Uses):
    """(x, nodes to remove, final node) when `erf` is the heart of a GELU, else None."""
    scale = erf.inputs[0].producer
    if scale is None or uses.sole_reader(scale.outputs[0]) is not erf:
        return None
    x = _erf_argument(scale)
    add = uses.sole_reader(erf.outputs[0])
    if x is None or add is None or add.op != "Add":
        return None
    if not is_close(const_scalar(other_input(add, erf.outputs[0])), 1.0):
        return None
    # Two multiplications remain: by x and by 0.5, in either order, possibly with x * 0.5 first.
    half_x = None
    for reader in uses.readers.get(id(x), []):
        if reader.op == "Mul" and is_close(const_scalar(other_input(reader, x)), 0.5):
            half_x = reader
    mul1 = uses.sole_reader(add.outputs[0])
    if mul1 is None or mul1.op != "Mul":
        return None
    factor = other_input(mul1, add.outputs[0])
    if factor is x:
        mul2 = uses.sole_reader(mul1.outputs[0])
        if mul2 is None or mul2.op != "Mul":
            return None
        if not is_close(const_scalar(other_input(mul2, mul1.outputs[0])), 0.5):
            return None
        return x, [scale, erf, add, mul1, mul2], mul2
    if is_close(const_scalar(factor), 0.5):
        mul2 = uses.sole_reader(mul1.outputs[0])
        if mul2 is None or mul2.op != "Mul" or other_input(mul2, mul1.outputs[0]) is not x:
            return None
        return x, [scale, erf, add, mul1, mul2], mul2
    if half_x is not None and factor is half_x.outputs[0]:
        if uses.sole_reader(half_x.outputs[0]) is not mul1:
            return None
        return x, [scale, erf, add, half_x, mul1], mul1
    return None


def fuse_gelu(graph: Graph) -> Graph:
    uses = Uses(graph)
    rewrite = Rewrite()
    for node in graph.nodes:
        if node.op != "Erf" or rewrite.taken(node):
            continue
        match = _match(node, uses)
        if match is None:
            continue
        x, nodes, last = match
        rewrite.replace(nodes, Node("Gelu", f"{last.name}_gelu", [x], last.outputs, {}), at=last)
    return rewrite.apply(graph)
