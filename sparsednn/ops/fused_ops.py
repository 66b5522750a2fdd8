"""sparsednn's own ops, produced by the fusion passes (domain "sparsednn")."""

from __future__ import annotations

import numpy as np

from sparsednn.errors import SparseDNNError
from sparsednn.ops.registry import register, shape_rule

DOMAIN = "sparsednn"
ACTIVATIONS = ("none", "relu", "gelu")


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise erf in the dtype of x; numpy has none.

    Abramowitz & Stegun 7.1.26 evaluated in float64: max error 1.5e-7, below float32's ulp
    near 1, where erf's outputs live.
    """
    x64 = np.asarray(x, dtype=np.float64)
    a = np.abs(x64)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    y = np.copysign(1.0 - poly * np.exp(-a * a), x64)
    return y.astype(np.asarray(x).dtype, copy=False)


def gelu(x: np.ndarray) -> np.ndarray:
    return (x * 0.5 * (1.0 + erf(x / np.sqrt(2.0).astype(x.dtype)))).astype(x.dtype)


def apply_activation(y: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(y, 0, out=y)
    if activation == "gelu":
        return gelu(y)
    return y


@register(domain=DOMAIN)
def Linear(x, *, weight, bias=None, activation="none", kernel=None, sparsity=None):
    """y = act(x @ weight + bias); weight is [K, N] as in ONNX MatMul."""
    y = np.matmul(x, weight)
    if bias is not None:
        y = y + bias
    return apply_activation(y.astype(x.dtype, copy=False), activation)


@shape_rule("Linear")
def _linear_shape(node):
    x = node.inputs[0]
    n = node.attrs["weight"].shape[1]
    return [(x.dtype, None if x.shape is None else (*x.shape[:-1], n))]


@register
def Gelu(x, *, approximate="none"):
    if approximate == "tanh":
        c = np.sqrt(2.0 / np.pi).astype(x.dtype)
        return (0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3)))).astype(x.dtype)
    return gelu(x)


def _split_heads(x: np.ndarray, num_heads: int, head_size: int) -> np.ndarray:
    """[B, S, H·D] or [B, S, H, D] -> [B, H, S, D]."""
    return x.reshape(x.shape[0], x.shape[1], num_heads, head_size).transpose(0, 2, 1, 3)


@register(domain=DOMAIN)
def Attention(q, k=None, v=None, mask=None, *, num_heads, head_size, scale, fully_masked="nan"):
    """Multi-head attention as exported graphs compute it, on the Linear layers' layout:
    softmax(q·kᵀ·scale + mask)·v per head, q [B, Sq, H·D] (or [B, Sq, H, D]), k and v
    [B, Skv, H·D] (or 4-D), mask broadcasting to [B, H, Sq, Skv]; output [B, Sq, H·D].
    With k and v absent, q is [B, S, 3·H·D]: q | k | v along the last axis (one Linear).

    A row whose scores are all -inf gives NaN (Softmax's answer), or 0 when fully_masked is
    "zero" (graphs that replace the softmax's NaN by 0, as torch's SDPA exports do)."""
    if k is None and v is None:
        n = num_heads * head_size
        q, k, v = q[..., :n], q[..., n : 2 * n], q[..., 2 * n :]
    qh, kh, vh = (_split_heads(x, num_heads, head_size) for x in (q, k, v))
    scores = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * np.float32(scale)
    if mask is not None:
        scores = scores + mask
    with np.errstate(invalid="ignore"):
        e = scores - scores.max(axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    if fully_masked == "zero":
        e[np.isnan(e)] = 0.0
    out = np.matmul(e, vh).astype(q.dtype, copy=False)
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(
        q.shape[0], q.shape[1], num_heads * head_size
    )


@shape_rule("Attention")
def _attention_shape(node):
    q = node.inputs[0]
    n = node.attrs["num_heads"] * node.attrs["head_size"]
    return [(q.dtype, None if q.shape is None else (q.shape[0], q.shape[1], n))]


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, epsilon: float):
    """Normalise over the last axis in float32, then ·scale + bias."""
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    d = x - mean
    var = np.multiply(d, d).mean(axis=-1, keepdims=True, dtype=np.float32)
    d *= 1.0 / np.sqrt(var + np.float32(epsilon))
    d *= scale
    if bias is not None:
        d += bias
    return d.astype(x.dtype, copy=False)


@register(domain=DOMAIN)
def LayerNorm(x, *, scale, bias=None, epsilon=1e-5):
    """LayerNormalization over the last axis, with its scale and bias owned by the node."""
    return _layer_norm(x, scale, bias, epsilon)


@register(domain=DOMAIN)
def AddLayerNorm(a, b, *, scale, bias=None, epsilon=1e-5):
    """LayerNorm(a + b): a residual connection and the layer norm after it."""
    return _layer_norm(np.add(a, b), scale, bias, epsilon)


@register(domain=DOMAIN)
def EmbedLayerNorm(*indices, tables, term_shapes=None, gathers=None, scale, bias=None,
                   epsilon=1e-5):  # fmt: skip
    """LayerNorm(tables[0][i_0] + tables[1][i_1] + ...): a transformer's embeddings (word,
    token type, position: Gathers of rows of constant tables, summed) and the layer norm after
    them. The index arrays are the inputs, in order, for the terms whose term_shapes entry is
    None; a term with a shape there is a constant of that shape (its rows in order). All
    broadcast against each other."""
    rows = embedding_rows(indices, tables, term_shapes, gathers)
    total = None
    for idx, table in zip(rows, tables):
        x = np.take(table, idx, axis=0)
        total = x if total is None else total + x
    return _layer_norm(total, scale, bias, epsilon)


def embedding_rows(indices, tables, term_shapes=None, gathers=None) -> list[np.ndarray]:
    """The row index arrays of EmbedLayerNorm's terms, checked and broadcast to one shape
    (gathers: the fused Gathers' names, for errors)."""
    indices = iter(indices)
    rows = []
    for j, (table, shape) in enumerate(zip(tables, term_shapes or [None] * len(tables))):
        if shape is None:
            name = gathers[j] if gathers and gathers[j] else f"term {j}"
            rows.append(_row_indices(next(indices), len(table), f"Gather {name!r}"))
        else:
            rows.append(np.arange(len(table)).reshape(shape))
    shape = np.broadcast_shapes(*(r.shape for r in rows))
    return [np.broadcast_to(r, shape) for r in rows]


def _row_indices(idx, rows: int, what: str) -> np.ndarray:
    """ONNX Gather's indices into `rows` rows (negative ones count from the end), checked."""
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise SparseDNNError(f"{what}: indices must be integers, got {idx.dtype}")
    if idx.size and (idx.min() < -rows or idx.max() >= rows):
        bad = idx[(idx < -rows) | (idx >= rows)].reshape(-1)[0]
        raise SparseDNNError(
            f"{what}: index {int(bad)} is out of range for its table of {rows} rows"
        )
    return np.where(idx < 0, idx + rows, idx).astype(np.int64, copy=False)


@shape_rule("EmbedLayerNorm")
def _embed_layer_norm_shape(node):
    from sparsednn.ir.shapes import broadcast_shapes

    inputs = iter(node.inputs)
    shapes = [next(inputs).shape if shape is None else tuple(shape)
              for shape in node.attrs.get("term_shapes") or [None] * len(node.inputs)]  # fmt: skip
    n = node.attrs["tables"][0].shape[1]
    shape = broadcast_shapes(*shapes)
    return [(np.dtype(np.float32), None if shape is None else (*shape, n))]


@shape_rule("LayerNorm")
def _layer_norm_shape(node):
    x = node.inputs[0]
    return [(x.dtype, x.shape)]


@shape_rule("AddLayerNorm")
def _add_layer_norm_shape(node):
    from sparsednn.ir.shapes import broadcast_shapes

    a, b = node.inputs
    return [(a.dtype, broadcast_shapes(a.shape, b.shape))]
