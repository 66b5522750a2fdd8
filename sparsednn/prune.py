"""Magnitude pruning of an ONNX model's linear weights.

    import onnx
    from sparsednn.prune import prune_model
    pruned, report = prune_model(onnx.load("model.onnx"), 0.9)
    onnx.save(pruned, "model-90.onnx")

What is pruned: float initializers (or Constant tensors) that are the weight of a MatMul (its
B input, rank 2), of a Gemm (its B input) or of a Conv (its W input, rank 3 to 5), also when an
exporter puts a Transpose between the weight and the MatMul. A tensor is pruned only if *every*
reader of it is such a weight position: an embedding table that a Gather reads (even when a
tied MatMul reads it too), biases, layer-norm scales and tensors with fewer than `min_size`
elements are left alone.

Each weight is seen as the [K, N] matrix its op multiplies by (as sparsednn's Linear node holds
it): MatMul B as stored, Gemm B transposed when transB=1, Transpose → MatMul through the
Transpose, and a Conv weight [O, I, kh, kw] as [I*kh*kw, O]. A `block` of (bk, bn) groups bk
consecutive rows (K) and bn consecutive columns (N) of that matrix; blocks are ranked by their
L2 norm (the absolute value for 1x1 blocks) and the smallest are set to zero, all of a block at
once. Edge blocks of a matrix whose sides are not multiples of the block are partial.

`scope="layer"` zeroes the same fraction of blocks in each weight; `scope="global"` ranks every
block of every weight together, so some layers end sparser than others. Exactly
round(sparsity * number of blocks) blocks are zeroed (ties are broken in a fixed order), so
the achieved sparsity matches the target up to rounding; zeros already in a weight count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from sparsednn.ir.storage import zero_fraction

__all__ = ["prune_model", "weight_sparsity"]

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
SCOPES = ("layer", "global")


@dataclass
class _Weight:
    """A prunable tensor, with the map from its stored layout to the [K, N] matrix."""

    name: str
    tensor: onnx.TensorProto
    op: str  # MatMul, Gemm or Conv
    nodes: list[str] = field(default_factory=list)
    to_kn: Callable[[np.ndarray], np.ndarray] | None = None  # stored -> [K, N] (a view)
    from_kn: Callable[[np.ndarray], np.ndarray] | None = None  # [K, N] -> stored shape


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


def _conv_views(shape: tuple[int, ...]):
    o = shape[0]

    def to_kn(a: np.ndarray) -> np.ndarray:
        return a.reshape(o, -1).T

    def from_kn(m: np.ndarray) -> np.ndarray:
        return m.T.reshape(shape)

    return to_kn, from_kn


def _is_float_tensor(t: onnx.TensorProto) -> bool:
    return t.data_type in FLOAT_TYPES


def _tensor_size(t: onnx.TensorProto) -> int:
    return int(np.prod(list(t.dims), dtype=np.int64)) if len(t.dims) else 1


def _find_weights(graph: onnx.GraphProto, min_size: int) -> list[_Weight]:
    tensors: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    for node in graph.node:  # weights an exporter put in Constant nodes
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t

    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                readers.setdefault(name, []).append((node, i))
    graph_outputs = {o.name for o in graph.output}

    def weight_use(node: onnx.NodeProto, i: int, rank: int, transposed: bool = False):
        """(op, to_kn, from_kn, node names) when input i of node is a weight position.

        Follows Identity (the TorchScript exporter shares equal initializers through them)
        and one 2-D Transpose in front of MatMul B inputs.
        """
        if node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op == "MatMul" and i == 1 and rank == 2:
            views = (_transpose, _transpose) if transposed else (_identity, _identity)
            return ("MatMul", *views, [node.name])
        if op == "Gemm" and i == 1 and rank == 2:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            views = (_transpose, _transpose) if trans_b != transposed else (_identity, _identity)
            return ("Gemm", *views, [node.name])
        if op == "Conv" and i == 1 and 3 <= rank <= 5 and not transposed:
            return "Conv", None, None, [node.name]
        if op in ("Identity", "Transpose") and i == 0:
            if op == "Transpose":
                perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
                if transposed or rank != 2 or (perm and perm[0] != [1, 0]):
                    return None
                transposed = True
            out = node.output[0]
            users = readers.get(out, [])
            if not users or out in graph_outputs:
                return None
            uses = [weight_use(user, j, rank, transposed) for user, j in users]
            if any(u is None for u in uses) or len({u[0] for u in uses}) != 1:
                return None
            names = [node.name] + [n for u in uses for n in u[3]]
            return (*uses[0][:3], names)
        return None

    weights: list[_Weight] = []
    seen: set[str] = set()
    for node in graph.node:  # graph order, so the report follows the model
        for i, name in enumerate(node.input):
            if not name or name in seen or name not in tensors:
                continue
            tensor = tensors[name]
            rank = len(tensor.dims)
            if weight_use(node, i, rank) is None:
                continue
            seen.add(name)
            if (
                not _is_float_tensor(tensor)
                or _tensor_size(tensor) < min_size
                or name in graph_outputs
            ):
                continue
            uses = [weight_use(n, j, rank) for n, j in readers.get(name, [])]
            if any(u is None for u in uses):
                continue  # also read as something else: an embedding table, say
            op, to_kn, from_kn, _ = uses[0]
            if op == "Conv":
                to_kn, from_kn = _conv_views(tuple(tensor.dims))
            # A tensor read in two orientations (rare) is ranked in that of its first reader.
            node_names = [n for u in uses for n in u[3]]
            weights.append(_Weight(name, tensor, op, node_names, to_kn, from_kn))
    return weights


def _block_scores(matrix: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """L2 norm of each (bk, bn) block of a [K, N] matrix, as a [ceil(K/bk), ceil(N/bn)] array."""
    bk, bn = block
    if (bk, bn) == (1, 1):  # |w| ranks exactly in the weight's own precision
        return np.abs(matrix.astype(np.float32) if matrix.dtype == np.float16 else matrix)
    m = np.asarray(matrix, dtype=np.float64)
    k, n = m.shape
    gk, gn = -(-k // bk), -(-n // bn)
    padded = np.zeros((gk * bk, gn * bn), dtype=np.float64)
    padded[:k, :n] = m
    return np.sqrt(np.square(padded).reshape(gk, bk, gn, bn).sum(axis=(1, 3)))


def _expand_block_mask(
    keep: np.ndarray, block: tuple[int, int], shape: tuple[int, int]
) -> np.ndarray:
    bk, bn = block
    if (bk, bn) == (1, 1):
        return keep
    full = np.repeat(np.repeat(keep, bk, axis=0), bn, axis=1)
    return full[: shape[0], : shape[1]]


def _prune_masks(scores: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Keep-masks zeroing exactly round(sparsity * total) of the lowest scores overall."""
    total = sum(s.size for s in scores)
    count = int(round(sparsity * total))
    if count <= 0:
        return [np.ones(s.shape, dtype=bool) for s in scores]
    if count >= total:
        return [np.zeros(s.shape, dtype=bool) for s in scores]
    flat = np.concatenate([s.ravel() for s in scores]) if len(scores) > 1 else scores[0].ravel()
    threshold = np.partition(flat, count - 1)[count - 1]
    del flat
    below = [s < threshold for s in scores]
    ties_needed = count - sum(int(b.sum()) for b in below)
    keeps = []
    for s, b in zip(scores, below):
        prune = b
        if ties_needed > 0:
            tie = s == threshold
            n_tie = int(tie.sum())
            if n_tie:
                take = min(n_tie, ties_needed)
                if take < n_tie:  # the first `take` ties, in row-major order
                    idx = np.flatnonzero(tie)[take:]
                    tie.ravel()[idx] = False
                prune = prune | tie
                ties_needed -= take
        keeps.append(~prune)
    return keeps


def weight_sparsity(array: np.ndarray) -> float:
    """Fraction of exact zeros in an array."""
    return zero_fraction(array)


def _copy_model(model, base_dir) -> onnx.ModelProto:
    """A copy of the model (path, bytes or ModelProto) with its external data loaded inline."""
    from sparsednn.frontend.onnx_import import load_model

    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # load_model fills external data in place: work on a copy
        model = copy
    proto, _ = load_model(model, None if isinstance(model, (str, os.PathLike)) else base_dir)
    return proto


def prune_model(
    model: onnx.ModelProto,
    sparsity: float,
    scope: str = "layer",
    block: tuple[int, int] = (1, 1),
    min_size: int = 4096,
    base_dir: str | os.PathLike | None = None,
) -> tuple[onnx.ModelProto, list[dict]]:
    """Zero the smallest-magnitude weights (or weight blocks) of the model's linear layers.

    model: an onnx.ModelProto (also a path or bytes). Weights stored as external data are read
        from `base_dir` (default: the model file's folder for a path, else the current
        directory); the returned model holds every tensor inline.
    sparsity: target fraction of zeros, in [0, 1].
    scope: "layer" (each weight to `sparsity`) or "global" (one threshold over all weights).
    block: (rows along K, columns along N) of the [K, N] weight matrix pruned as one unit.
    min_size: weights with fewer elements are left dense.

    Returns (new model, report); the input model is not modified. The report has one dict per
    pruned weight, in graph order: name, op, nodes (the readers), shape (as stored), size,
    target and sparsity (the fraction of zeros reached).
    """
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    block = tuple(int(b) for b in block)
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"block must be two positive ints (rows, columns), got {block!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size!r}")

    pruned = _copy_model(model, base_dir)

    weights = _find_weights(pruned.graph, min_size)
    arrays = [numpy_helper.to_array(w.tensor) for w in weights]
    matrices = [w.to_kn(a) for w, a in zip(weights, arrays)]

    if scope == "global":
        scores = [_block_scores(m, block) for m in matrices]
        keeps = _prune_masks(scores, float(sparsity))
        del scores
    else:
        keeps = [_prune_masks([_block_scores(m, block)], float(sparsity))[0] for m in matrices]

    report = []
    for w, array, matrix, keep in zip(weights, arrays, matrices, keeps):
        mask_kn = _expand_block_mask(keep, block, matrix.shape)
        mask = w.from_kn(mask_kn)
        new = np.where(mask, array, np.zeros((), array.dtype)).astype(array.dtype, copy=False)
        w.tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), w.tensor.name))
        report.append(
            {
                "name": w.name,
                "op": w.op,
                "nodes": w.nodes,
                "shape": tuple(int(d) for d in array.shape),
                "size": int(array.size),
                "target": float(sparsity),
                "sparsity": float(weight_sparsity(new)),
            }
        )
    return pruned, report
