"""Fuse layer normalisation, and the residual Add before it, into one LayerNorm/AddLayerNorm node.

Recognised:

* LayerNormalization(x, scale, bias) over the last axis with constant scale and bias, whose
  Mean/InvStdDev outputs nobody reads (float32, stash_type 1);
* the decomposition older exporters (opset < 17) produce:
      mean = ReduceMean(x, [-1]); d = Sub(x, mean)
      var = ReduceMean(Pow(d, 2) or Mul(d, d), [-1])
      y = Div(d, Sqrt(Add(var, eps)))  [· scale]  [+ bias]

and, when x = Add(a, b) is read by nothing else (a residual connection: the sum is not needed
past the norm), the Add too: AddLayerNorm(a, b) {scale, bias, epsilon}. The nodes own their
scale and bias as [N] float32 arrays, like Linear owns its weight.
"""

from __future__ import annotations

import numpy as np

from sparsednn.ir import Graph, Node, Value
from sparsednn.ops.fused_ops import DOMAIN
from sparsednn.passes.matching import Rewrite, Uses, as_row_vector, const_scalar, other_input


def _last_axis(axes, rank) -> bool:
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _reduce_mean_last(node: Node | None, x: Value) -> bool:
    """node is ReduceMean(x) over the last axis, keeping dims."""
    if node is None or node.op != "ReduceMean" or node.inputs[0] is not x:
        return False
    if not node.attrs.get("keepdims", 1):
        return False
    axes = node.attrs.get("axes")
    if axes is None:
        a = node.input(1)
        if a is None or not a.is_const:
            return False
        axes = a.const
    return _last_axis(axes, x.rank)


def _features(x: Value) -> int | None:
    if x.shape is None or not x.shape or not isinstance(x.shape[-1], (int, np.integer)):
        return None
    return int(x.shape[-1])


def _match_onnx(node: Node, uses: Uses):
    """(x, scale, bias, epsilon, matched nodes, last first) for a LayerNormalization node."""
    x, s, b = node.inputs[0], node.input(1), node.input(2)
    n = _features(x)
    if n is None or x.dtype != np.float32 or node.attrs.get("stash_type", 1) != 1:
        return None
    if not _last_axis(node.attrs.get("axis", -1), x.rank):
        return None
    for extra in node.outputs[1:]:
        if uses.readers.get(id(extra)) or id(extra) in uses.outputs:
            return None
    scale = as_row_vector(s, n)
    bias = as_row_vector(b, n) if b is not None else None
    if scale is None or (b is not None and bias is None):
        return None
    if s.const.ndim > 1 or (b is not None and b.const.ndim > 1):
        return None  # a scale of higher rank could broadcast the output to a higher rank
    return x, scale, bias, float(node.attrs.get("epsilon", 1e-5)), [node]


def _match_decomposed(sub: Node, uses: Uses):
    """(x, scale, bias, epsilon, matched nodes, last first) for the decomposition rooted at
    Sub(x, mean)."""
    x, mean = sub.inputs
    if x is None or mean is None or not _reduce_mean_last(mean.producer, x):
        return None
    n = _features(x)
    if n is None or x.dtype != np.float32 or uses.sole_reader(mean) is not sub:
        return None
    d = sub.outputs[0]
    readers = list({id(r): r for r in uses.readers.get(id(d), [])}.values())  # Mul(d, d): once
    if len(readers) != 2 or id(d) in uses.outputs:
        return None
    square = next((r for r in readers if r.op in ("Pow", "Mul")), None)
    div = next((r for r in readers if r.op == "Div"), None)
    if square is None or div is None or div.inputs[0] is not d:
        return None
    if square.op == "Pow" and not (square.inputs[0] is d and const_scalar(square.inputs[1]) == 2.0):
        return None
    if square.op == "Mul" and not (square.inputs[0] is d and square.inputs[1] is d):
        return None
    var = uses.sole_reader(square.outputs[0])
    if not _reduce_mean_last(var, square.outputs[0]):
        return None
    add_eps = uses.sole_reader(var.outputs[0])
    if add_eps is None or add_eps.op != "Add":
        return None
    eps = const_scalar(other_input(add_eps, var.outputs[0]))
    sqrt = uses.sole_reader(add_eps.outputs[0])
    if (
        eps is None
        or sqrt is None
        or sqrt.op != "Sqrt"
        or uses.sole_reader(sqrt.outputs[0]) is not div
    ):
        return None
    if div.inputs[1] is not sqrt.outputs[0]:
        return None
    matched = [mean.producer, sub, square, var, add_eps, sqrt, div]
    last, scale, bias = div, np.ones(n, np.float32), None
    nxt = uses.sole_reader(last.outputs[0])
    if nxt is not None and nxt.op == "Mul":
        s = as_row_vector(other_input(nxt, last.outputs[0]), n)
        if s is not None and other_input(nxt, last.outputs[0]).const.ndim <= 1:
            scale, last = s, nxt
            matched.append(nxt)
            nxt = uses.sole_reader(last.outputs[0])
    if nxt is not None and nxt.op == "Add":
        c = other_input(nxt, last.outputs[0])
        bvec = as_row_vector(c, n)
        if bvec is not None and c.const.ndim <= 1:
            bias, last = bvec, nxt
            matched.append(nxt)
    return x, scale, bias, float(eps), matched[::-1]


def fuse_layer_norm(graph: Graph) -> Graph:
    uses = Uses(graph)
    rewrite = Rewrite()
    for node in graph.nodes:
        if rewrite.taken(node):
            continue
        if node.op == "LayerNormalization":
            m = _match_onnx(node, uses)
        elif node.op == "Sub":
            m = _match_decomposed(node, uses)
        else:
            continue
        if m is None:
            continue
        x, scale, bias, eps, matched = m
        if any(rewrite.taken(n) for n in matched):
            continue
        last = matched[0]
        attrs = {
            "scale": np.ascontiguousarray(scale, np.float32),
            "bias": None if bias is None else np.ascontiguousarray(bias, np.float32),
            "epsilon": eps,
        }
        add = x.producer
        inside = {id(n) for n in matched}
        x_readers = uses.readers.get(id(x), [])
        if (
            add is not None
            and add.op == "Add"
            and id(x) not in uses.outputs
            and all(id(r) in inside for r in x_readers)
            and all(v is not None and v.dtype == np.float32 for v in add.inputs)
            and not rewrite.taken(add)
        ):
            fused = Node(
                "AddLayerNorm",
                f"{last.name}_add_layer_norm",
                list(add.inputs),
                last.outputs[:1],
                attrs,
                domain=DOMAIN,
            )
            matched = [*matched, add]
        else:
            fused = Node(
                "LayerNorm", f"{last.name}_layer_norm", [x], last.outputs[:1], attrs, domain=DOMAIN
            )
        rewrite.replace(matched, fused, at=last)
    return rewrite.apply(graph)
