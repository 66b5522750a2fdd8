"""ONNX ops (default domain, opsets 13 to 21), one numpy function each, named like the op.

To add an op: write `@register def OpName(inputs..., *, attributes=defaults)` returning the
output array(s), add a shape rule with `@shape_rule("OpName")` if its output shape is not
simply that of its first input, and add a case to tests/ops/test_onnx_ops.py.

Conventions kept by every op here:
- dtypes are preserved (float32 in, float32 out: no silent float64), following ONNX's type
  constraints; Python scalars from attributes never widen an array (numpy 2 promotion rules);
- axes may be negative; optional inputs arrive as None;
- an attribute value that is not implemented raises UnsupportedOpError naming op and value;
- ops never write into their inputs (constants and graph inputs may be shared or read-only).

Shape rules work on symbolic shapes (see sparsednn/passes/infer_shapes.py) and return None for
a shape they cannot tell.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from sparsednn.errors import UnsupportedOpError
from sparsednn.ir.shapes import broadcast_shapes
from sparsednn.ir.verify import check_allocation
from sparsednn.ops.fused_ops import erf as _erf
from sparsednn.ops.registry import register, shape_rule

INT64 = np.dtype(np.int64)
BOOL = np.dtype(np.bool_)

# ONNX TensorProto element types that sparsednn computes with.
_DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}


def onnx_dtype(to: int, op: str) -> np.dtype:
    """The numpy dtype of an ONNX element type, or UnsupportedOpError."""
    if to not in _DTYPES:
        try:
            import onnx

            name = onnx.TensorProto.DataType.Name(to)
        except Exception:  # an unknown enum value
            name = str(to)
        raise UnsupportedOpError(f"{op}: element type {name} ({to}) is not supported")
    return np.dtype(_DTYPES[to])


def _unsupported(op: str, attr: str, value) -> UnsupportedOpError:
    return UnsupportedOpError(f"{op}: {attr}={value!r} is not supported")


def _axis(axis: int, rank: int, op: str = "op") -> int:
    a = int(axis)
    if not -rank <= a < max(rank, 1):
        raise ValueError(f"{op}: axis {axis} is out of range for rank {rank}")
    return a + rank if a < 0 else a


def _ints(a) -> list[int]:
    return [int(v) for v in np.asarray(a).reshape(-1)]


def _scalar(a):
    return np.asarray(a).reshape(-1)[0]


# -- shape-rule helpers -------------------------------------------------------------------
def _const_ints(v) -> list[int] | None:
    """The constant integers a Value holds, or None when absent or not constant."""
    if v is None or v.const is None:
        return None
    return _ints(v.const)


def _known_ints(v) -> list[int | str] | None:
    """Like _const_ints, but also the symbolic contents of shape tensors ("batch", 128)."""
    ints = _const_ints(v)
    if ints is None and v is not None and v.symbolic_value is not None:
        return list(v.symbolic_value)
    return ints


def _same_as_input(node):
    x = node.inputs[0]
    return [(x.dtype, x.shape)]


def _broadcast_rule(dtype_of=None):
    def rule(node):
        ins = [v for v in node.inputs if v is not None]
        dtype = dtype_of if dtype_of is not None else ins[0].dtype
        return [(dtype, broadcast_shapes(*(v.shape for v in ins)))]

    return rule


def _unary_rules(*ops):
    for op in ops:
        shape_rule(op)(_same_as_input)


# -- elementwise binary -------------------------------------------------------------------
@register
def Add(a, b):
    return np.add(a, b)


@register
def Sub(a, b):
    return np.subtract(a, b)


@register
def Mul(a, b):
    return np.multiply(a, b)


@register
def Div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        # ONNX integer Div truncates toward zero; floor division corrected where signs differ
        # (exact for all int64 values, unlike a float round trip).
        with np.errstate(divide="ignore"):
            q = np.floor_divide(a, b)
            fix = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
        return np.where(fix, q + 1, q).astype(a.dtype, copy=False)
    return np.divide(a, b)


@register
def Pow(x, y):
    if y.size == 1 and y.ndim <= x.ndim and np.issubdtype(x.dtype, np.floating):
        e = float(_scalar(y))
        if e == 2.0:
            return np.multiply(x, x)
        if e == 0.5:
            return np.sqrt(x)
        if e == 1.0:
            return x.copy()
    if np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer):
        return np.power(x, y.astype(x.dtype), dtype=x.dtype)
    return np.power(x, y).astype(x.dtype, copy=False)


@register
def Mod(a, b, *, fmod=0):
    if np.issubdtype(a.dtype, np.floating) and not fmod:
        raise _unsupported("Mod", "fmod", fmod)  # ONNX requires fmod=1 for floats
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.fmod(a, b) if fmod else np.mod(a, b)).astype(a.dtype, copy=False)


@register
def PRelu(x, slope):
    return np.where(x < 0, x * slope, x).astype(x.dtype, copy=False)


for _op in ("Add", "Sub", "Mul", "Div", "Pow", "Mod", "PRelu"):
    shape_rule(_op)(_broadcast_rule())


# -- comparisons and logic ----------------------------------------------------------------
@register
def Equal(a, b):
    return np.equal(a, b)


@register
def Less(a, b):
    return np.less(a, b)


@register
def LessOrEqual(a, b):
    return np.less_equal(a, b)


@register
def Greater(a, b):
    return np.greater(a, b)


@register
def GreaterOrEqual(a, b):
    return np.greater_equal(a, b)


@register
def And(a, b):
    return np.logical_and(a, b)


@register
def Or(a, b):
    return np.logical_or(a, b)


@register
def Xor(a, b):
    return np.logical_xor(a, b)


@register
def Not(x):
    return np.logical_not(x)


@register
def IsNaN(x):
    return np.isnan(x)


@register
def IsInf(x, *, detect_negative=1, detect_positive=1):
    if detect_negative and detect_positive:
        return np.isinf(x)
    if detect_negative:
        return np.isneginf(x)
    if detect_positive:
        return np.isposinf(x)
    return np.zeros(x.shape, np.bool_)


for _op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor"):
    shape_rule(_op)(_broadcast_rule(BOOL))

for _op in ("Not", "IsNaN", "IsInf"):

    @shape_rule(_op)
    def _bool_like(node):
        return [(BOOL, node.inputs[0].shape)]


@register
def Where(condition, x, y):
    return np.where(condition, x, y)


@shape_rule("Where")
def _where_shape(node):
    c, x, y = node.inputs
    return [(x.dtype, broadcast_shapes(c.shape, x.shape, y.shape))]


# -- variadic elementwise -----------------------------------------------------------------
@register
def Min(*data):
    return functools.reduce(np.minimum, data)


@register
def Max(*data):
    return functools.reduce(np.maximum, data)


@register
def Sum(*data):
    return functools.reduce(np.add, data)


@register
def Mean(*data):
    total = functools.reduce(np.add, data)
    return (total / np.asarray(len(data), total.dtype)).astype(data[0].dtype, copy=False)


for _op in ("Min", "Max", "Sum", "Mean"):
    shape_rule(_op)(_broadcast_rule())


@register
def Clip(x, min=None, max=None):  # noqa: A002 (ONNX input names)
    y = x
    if min is not None:
        y = np.maximum(y, np.asarray(min, x.dtype))
    if max is not None:
        y = np.minimum(y, np.asarray(max, x.dtype))
    return y.copy() if y is x else y


# -- elementwise unary --------------------------------------------------------------------
@register
def Identity(x):
    return x


@register
def Relu(x):
    return np.maximum(x, np.zeros((), x.dtype))


@register
def Neg(x):
    return np.negative(x)


@register
def Abs(x):
    return np.abs(x)


@register
def Sign(x):
    return np.sign(x)


@register
def Sqrt(x):
    return np.sqrt(x)


@register
def Reciprocal(x):
    with np.errstate(divide="ignore"):
        return np.reciprocal(x)


@register
def Exp(x):
    with np.errstate(over="ignore"):
        return np.exp(x)


@register
def Log(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x)


@register
def Erf(x):
    return _erf(x)


@register
def Tanh(x):
    return np.tanh(x)


@register
def Sin(x):
    return np.sin(x)


@register
def Cos(x):
    return np.cos(x)


@register
def Floor(x):
    return np.floor(x)


@register
def Ceil(x):
    return np.ceil(x)


@register
def Round(x):
    return np.round(x)  # round half to even, as ONNX


@register
def Sigmoid(x):
    # 1 / (1 + exp(-x)) is accurate everywhere; exp overflowing to inf gives the right 0.
    y = np.negative(x)
    with np.errstate(over="ignore"):
        np.exp(y, out=y)
    y += 1
    return np.reciprocal(y, out=y)


@register
def HardSigmoid(x, *, alpha=0.2, beta=0.5):
    y = x * np.asarray(alpha, x.dtype) + np.asarray(beta, x.dtype)
    return np.clip(y, 0, 1, out=y)


@register
def HardSwish(x):
    y = x * np.asarray(1 / 6, x.dtype) + np.asarray(0.5, x.dtype)
    return x * np.clip(y, 0, 1, out=y)


@register
def LeakyRelu(x, *, alpha=0.01):
    return np.where(x < 0, x * np.asarray(alpha, x.dtype), x)


@register
def Elu(x, *, alpha=1.0):
    with np.errstate(over="ignore"):
        neg = np.asarray(alpha, x.dtype) * np.expm1(np.minimum(x, 0))
    return np.where(x < 0, neg, x)


@register
def Selu(x, *, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    neg = np.asarray(alpha, x.dtype) * np.expm1(np.minimum(x, 0))
    return np.where(x <= 0, neg, x) * np.asarray(gamma, x.dtype)


@register
def Softplus(x):
    return np.logaddexp(np.zeros((), x.dtype), x)


@register
def Softsign(x):
    return x / (1 + np.abs(x))


_unary_rules(
    "Identity",
    "Relu",
    "Neg",
    "Abs",
    "Sign",
    "Sqrt",
    "Reciprocal",
    "Exp",
    "Log",
    "Erf",
    "Tanh",
    "Sin",
    "Cos",
    "Floor",
    "Ceil",
    "Round",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Softplus",
    "Softsign",
    "Clip",
    "Gelu",
)


# -- normalisation and softmax ------------------------------------------------------------
@register
def Softmax(x, *, axis=-1):
    axis = _axis(axis, x.ndim, "Softmax")
    if x.size == 0:
        return x.copy()
    with np.errstate(invalid="ignore"):  # a row of -inf gives NaN, as in onnxruntime
        e = x - x.max(axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


@register
def LogSoftmax(x, *, axis=-1):
    axis = _axis(axis, x.ndim, "LogSoftmax")
    if x.size == 0:
        return x.copy()
    with np.errstate(invalid="ignore"):
        d = x - x.max(axis=axis, keepdims=True)
    d -= np.log(np.exp(d).sum(axis=axis, keepdims=True))
    return d


@register
def Hardmax(x, *, axis=-1):
    axis = _axis(axis, x.ndim, "Hardmax")
    if x.size == 0:
        return x.copy()
    idx = np.expand_dims(np.argmax(x, axis=axis), axis)
    y = np.zeros_like(x)
    np.put_along_axis(y, idx, 1, axis=axis)
    return y


_unary_rules("Softmax", "LogSoftmax", "Hardmax")


def _stash_dtype(x, stash_type: int, op: str) -> np.dtype:
    if stash_type == 1:
        return np.dtype(np.float32) if x.dtype != np.float64 else x.dtype
    if stash_type in (10, 11):
        return onnx_dtype(stash_type, op)
    raise _unsupported(op, "stash_type", stash_type)


@register
def LayerNormalization(x, scale, bias=None, *, axis=-1, epsilon=1e-05, stash_type=1):
    """Y, Mean and InvStdDev over the axes from `axis` to the last."""
    dt = _stash_dtype(x, stash_type, "LayerNormalization")
    axes = tuple(range(_axis(axis, x.ndim, "LayerNormalization"), x.ndim))
    xs = x.astype(dt, copy=False)
    mean = xs.mean(axis=axes, keepdims=True)
    d = xs - mean
    var = np.multiply(d, d).mean(axis=axes, keepdims=True)
    var += np.asarray(epsilon, dt)
    inv = np.sqrt(var, out=var)
    np.reciprocal(inv, out=inv)
    d *= inv
    d *= scale
    if bias is not None:
        d += bias
    return d.astype(x.dtype, copy=False), mean, inv


@shape_rule("LayerNormalization")
def _layer_norm_shape(node):
    x = node.inputs[0]
    dt = _stash_dtype(x, node.attrs.get("stash_type", 1), "LayerNormalization") if x.dtype else None
    if x.shape is None:
        return [(x.dtype, None), (dt, None), (dt, None)]
    a = _axis(node.attrs.get("axis", -1), len(x.shape))
    reduced = (*x.shape[:a], *([1] * (len(x.shape) - a)))
    return [(x.dtype, x.shape), (dt, reduced), (dt, reduced)]


def _channel_view(v, x):
    """A per-channel (axis 1) vector shaped to broadcast against x [N, C, ...]."""
    return np.asarray(v).reshape((1, -1) + (1,) * (x.ndim - 2))


@register
def BatchNormalization(x, scale, bias, mean, var, *, epsilon=1e-05, momentum=0.9, training_mode=0):
    if training_mode:
        raise _unsupported("BatchNormalization", "training_mode", training_mode)
    inv = (scale / np.sqrt(var + np.asarray(epsilon, var.dtype))).astype(x.dtype, copy=False)
    shift = (bias - mean * inv).astype(x.dtype, copy=False)
    return x * _channel_view(inv, x) + _channel_view(shift, x)


@shape_rule("BatchNormalization")
def _batch_norm_shape(node):
    if node.attrs.get("training_mode", 0):
        raise _unsupported("BatchNormalization", "training_mode", node.attrs["training_mode"])
    return _same_as_input(node)


@register
def InstanceNormalization(x, scale, bias, *, epsilon=1e-05):
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    d = x - mean
    var = np.multiply(d, d).mean(axis=axes, keepdims=True)
    d /= np.sqrt(var + np.asarray(epsilon, x.dtype))
    return d * _channel_view(scale, x) + _channel_view(bias, x)


_unary_rules("InstanceNormalization")


# -- linear algebra -----------------------------------------------------------------------
@register
def MatMul(a, b):
    return np.matmul(a, b)


@shape_rule("MatMul")
def _matmul_shape(node):
    a, b = node.inputs
    if a.shape is None or b.shape is None:
        return [(a.dtype, None)]
    sa, sb = tuple(a.shape), tuple(b.shape)
    a2 = sa if len(sa) > 1 else (1, *sa)
    b2 = sb if len(sb) > 1 else (*sb, 1)
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    out = (*batch, a2[-2], b2[-1])
    if len(sa) == 1:
        out = (*out[:-2], out[-1])
    if len(sb) == 1:
        out = out[:-1]
    return [(a.dtype, out)]


@register
def Gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = np.matmul(a.T if transA else a, b.T if transB else b)
    if alpha != 1.0:
        y *= np.asarray(alpha, y.dtype)
    if c is not None:
        y += c if beta == 1.0 else c * np.asarray(beta, c.dtype)
    return y


@shape_rule("Gemm")
def _gemm_shape(node):
    a, b = node.inputs[0], node.inputs[1]
    m = a.shape[1] if node.attrs.get("transA", 0) else a.shape[0]
    n = b.shape[0] if node.attrs.get("transB", 0) else b.shape[1]
    return [(a.dtype, (m, n))]


@register
def Einsum(*inputs, equation):
    return np.einsum(equation, *inputs, optimize=len(inputs) > 1)


@shape_rule("Einsum")
def _einsum_shape(node):
    ins = node.inputs
    eq = node.attrs["equation"].replace(" ", "")
    if "..." in eq or "->" not in eq:
        return [(ins[0].dtype, None)]
    lhs, rhs = eq.split("->")
    dims: dict[str, object] = {}
    for term, v in zip(lhs.split(","), ins):
        for letter, d in zip(term, v.shape):
            if dims.get(letter) in (None, 1):  # a size > 1 or a symbol wins over 1
                dims[letter] = d
    return [(ins[0].dtype, tuple(dims.get(c) for c in rhs))]


# -- reductions ---------------------------------------------------------------------------
def _reduce(fn, noop, data, axes_input, axes, keepdims, noop_with_empty_axes):
    if axes_input is not None:
        axes = _ints(axes_input)
    with np.errstate(divide="ignore", over="ignore"):  # log(0) = -inf, as ONNX
        if not axes:
            if noop_with_empty_axes:  # only the pointwise part of the op's function body
                return noop(data).astype(data.dtype, copy=False)
            axes = None
        else:
            axes = tuple(_axis(a, data.ndim) for a in axes)
        return np.asarray(fn(data, axes, bool(keepdims))).astype(data.dtype, copy=False)


def _define_reduce(name, fn, noop=lambda x: x):
    def op(data, axes_input=None, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        return _reduce(fn, noop, data, axes_input, axes, keepdims, noop_with_empty_axes)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"ONNX {name}: axes as attribute (before opset 18) or as input."
    register(op)

    @shape_rule(name)
    def _rule(node):
        x = node.inputs[0]
        axes = _const_ints(node.input(1)) if node.input(1) is not None else node.attrs.get("axes")
        if node.input(1) is not None and axes is None:
            return [(x.dtype, None)]  # axes only known at run time
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                return [(x.dtype, x.shape)]
            axes = range(len(x.shape))
        axes = {_axis(a, len(x.shape)) for a in axes}
        keep = node.attrs.get("keepdims", 1)
        out = [1 if i in axes else d for i, d in enumerate(x.shape) if keep or i not in axes]
        return [(x.dtype, tuple(out))]

    return op


def _lowest(dtype):
    if dtype == BOOL:
        return False
    return -np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min


def _highest(dtype):
    if dtype == BOOL:
        return True
    return np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max


def _max(x, axes, keepdims):
    if x.size == 0:  # ONNX 18+: the identity of max over an empty set
        shape = np.amax(np.zeros(x.shape, np.int8), axis=axes, keepdims=keepdims, initial=0).shape
        return np.full(shape, _lowest(x.dtype), x.dtype)
    return np.amax(x, axis=axes, keepdims=keepdims)


def _min(x, axes, keepdims):
    if x.size == 0:
        shape = np.amin(np.zeros(x.shape, np.int8), axis=axes, keepdims=keepdims, initial=0).shape
        return np.full(shape, _highest(x.dtype), x.dtype)
    return np.amin(x, axis=axes, keepdims=keepdims)


def _sum(x, axes, keepdims):
    return np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)


def _log_sum_exp(x, axes, keepdims):
    if x.size == 0:
        return np.log(_sum(np.exp(x), axes, keepdims))
    m = np.amax(x, axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, np.zeros((), x.dtype))
    s = np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m
    return s if keepdims else np.squeeze(s, axis=axes)


ReduceMean = _define_reduce("ReduceMean", lambda x, a, k: np.mean(x, axis=a, keepdims=k))
ReduceSum = _define_reduce("ReduceSum", _sum)
ReduceMax = _define_reduce("ReduceMax", _max)
ReduceMin = _define_reduce("ReduceMin", _min)
ReduceProd = _define_reduce(
    "ReduceProd", lambda x, a, k: np.prod(x, axis=a, keepdims=k, dtype=x.dtype)
)
ReduceSumSquare = _define_reduce(
    "ReduceSumSquare", lambda x, a, k: _sum(x * x, a, k), lambda x: x * x
)
ReduceL1 = _define_reduce("ReduceL1", lambda x, a, k: _sum(np.abs(x), a, k), np.abs)
ReduceL2 = _define_reduce(
    "ReduceL2",
    lambda x, a, k: np.sqrt(_sum(x * x, a, k).astype(np.float64)).astype(x.dtype),
    np.abs,
)
ReduceLogSum = _define_reduce("ReduceLogSum", lambda x, a, k: np.log(_sum(x, a, k)), np.log)
ReduceLogSumExp = _define_reduce("ReduceLogSumExp", _log_sum_exp)


def _arg(fn, data, axis, keepdims, select_last_index):
    axis = _axis(axis, data.ndim)
    if select_last_index:
        flipped = np.flip(data, axis)
        idx = data.shape[axis] - 1 - fn(flipped, axis=axis)
    else:
        idx = fn(data, axis=axis)
    idx = idx.astype(np.int64, copy=False)
    return np.expand_dims(idx, axis) if keepdims else idx


@register
def ArgMax(data, *, axis=0, keepdims=1, select_last_index=0):
    return _arg(np.argmax, data, axis, keepdims, select_last_index)


@register
def ArgMin(data, *, axis=0, keepdims=1, select_last_index=0):
    return _arg(np.argmin, data, axis, keepdims, select_last_index)


for _op in ("ArgMax", "ArgMin"):

    @shape_rule(_op)
    def _arg_shape(node):
        x = node.inputs[0]
        a = _axis(node.attrs.get("axis", 0), len(x.shape))
        keep = node.attrs.get("keepdims", 1)
        out = [1 if i == a else d for i, d in enumerate(x.shape) if keep or i != a]
        return [(INT64, tuple(out))]


@register
def TopK(x, k, *, axis=-1, largest=1, sorted=1):  # noqa: A002 (ONNX attribute name)
    axis = _axis(axis, x.ndim)
    k = int(_scalar(k))
    key = x
    if largest:
        key = -(x.astype(np.int64) if np.issubdtype(x.dtype, np.unsignedinteger) else x)
    # A stable sort keeps the lower index first among equal values, as ONNX asks.
    idx = np.argsort(key, axis=axis, kind="stable")
    idx = np.take(idx, np.arange(k), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64, copy=False)


@shape_rule("TopK")
def _topk_shape(node):
    x = node.inputs[0]
    k = _const_ints(node.inputs[1])
    a = _axis(node.attrs.get("axis", -1), len(x.shape))
    out = tuple((k[0] if k else None) if i == a else d for i, d in enumerate(x.shape))
    return [(x.dtype, out), (INT64, out)]


@register
def CumSum(x, axis, *, exclusive=0, reverse=0):
    a = _axis(int(_scalar(axis)), x.ndim)
    y = np.flip(x, a) if reverse else x
    out = np.cumsum(y, axis=a, dtype=x.dtype)
    if exclusive:  # shift by one along the axis, a zero first
        shifted = np.zeros_like(out)
        dst, src = [slice(None)] * x.ndim, [slice(None)] * x.ndim
        dst[a], src[a] = slice(1, None), slice(None, -1)
        shifted[tuple(dst)] = out[tuple(src)]
        out = shifted
    return np.flip(out, a).copy() if reverse else out


_unary_rules("CumSum")


# -- shape manipulation -------------------------------------------------------------------
def _reshape_target(in_shape, shape, allowzero):
    out = list(shape)
    if not allowzero:
        out = [in_shape[i] if d == 0 else d for i, d in enumerate(out)]
    return out


@register
def Reshape(data, shape, *, allowzero=0):
    return np.reshape(data, _reshape_target(data.shape, _ints(shape), allowzero))


@shape_rule("Reshape")
def _reshape_shape(node):
    x, s = node.inputs
    shape = _known_ints(s)
    if shape is None:
        return [(x.dtype, None)]
    if x.shape is None and (0 in shape and not node.attrs.get("allowzero", 0)):
        return [(x.dtype, None)]
    if shape.count(-1) > 1 or any(isinstance(d, int) and d < -1 for d in shape):
        raise ValueError(f"Reshape: target shape {shape} has more than one -1 or a negative size")
    out = _reshape_target(x.shape, shape, node.attrs.get("allowzero", 0))
    if -1 in out:
        out[out.index(-1)] = _solve_dim(x.shape, [d for d in out if d != -1])
    return [(x.dtype, tuple(out))]


def _solve_dim(in_shape, known_out):
    """The size of the one -1 dim of a Reshape: an int, a symbol, or None."""
    if in_shape is None:
        return None
    num, den = 1, 1
    syms = [d for d in in_shape if not isinstance(d, int)]
    for d in in_shape:
        if isinstance(d, int):
            num *= d
    for d in known_out:
        if isinstance(d, int):
            den *= d
        elif d in syms and d is not None:
            syms.remove(d)
        else:
            return None
    if den == 0 or num % den:
        return None
    if not syms:
        return num // den
    if len(syms) == 1 and num == den and syms[0] is not None:
        return syms[0]
    return None


@register
def Flatten(x, *, axis=1):
    a = axis + x.ndim if axis < 0 else axis
    if not 0 <= a <= x.ndim:
        raise ValueError(f"Flatten: axis {axis} is out of range for rank {x.ndim}")
    outer = math.prod(x.shape[:a])
    return np.reshape(x, (outer, math.prod(x.shape[a:])))


@shape_rule("Flatten")
def _flatten_shape(node):
    x = node.inputs[0]
    r = len(x.shape)
    a = node.attrs.get("axis", 1)
    a = a + r if a < 0 else a

    def prod(dims):
        if all(isinstance(d, int) for d in dims):
            return math.prod(dims)
        return dims[0] if len(dims) == 1 else None

    return [(x.dtype, (prod(x.shape[:a]), prod(x.shape[a:])))]


@register
def Transpose(data, *, perm=None):
    return np.transpose(data, perm)


@shape_rule("Transpose")
def _transpose_shape(node):
    x = node.inputs[0]
    perm = node.attrs.get("perm") or list(range(len(x.shape)))[::-1]
    return [(x.dtype, tuple(x.shape[p] for p in perm))]


@register
def Squeeze(data, axes=None):
    if axes is None:
        return np.squeeze(data)
    return np.squeeze(data, axis=tuple(_axis(a, data.ndim, "Squeeze") for a in _ints(axes)))


@shape_rule("Squeeze")
def _squeeze_shape(node):
    x = node.inputs[0]
    if node.input(1) is None:
        if not all(isinstance(d, int) for d in x.shape):
            return [(x.dtype, None)]
        return [(x.dtype, tuple(d for d in x.shape if d != 1))]
    axes = _const_ints(node.inputs[1])
    if axes is None:
        return [(x.dtype, None)]
    axes = {_axis(a, len(x.shape)) for a in axes}
    for a in axes:
        if isinstance(x.shape[a], int) and x.shape[a] != 1:
            raise ValueError(f"cannot squeeze axis {a} of size {x.shape[a]}")
    return [(x.dtype, tuple(d for i, d in enumerate(x.shape) if i not in axes))]


@register
def Unsqueeze(data, axes):
    axes = _ints(axes)
    r = data.ndim + len(axes)
    return np.expand_dims(data, tuple(_axis(a, r, "Unsqueeze") for a in axes))


@shape_rule("Unsqueeze")
def _unsqueeze_shape(node):
    x = node.inputs[0]
    axes = _const_ints(node.inputs[1])
    if axes is None or x.shape is None:
        return [(x.dtype, None)]
    r = len(x.shape) + len(axes)
    unique = {_axis(a, r) for a in axes}
    if len(unique) != len(axes):
        raise ValueError(f"Unsqueeze: axes {axes} repeat an axis")
    axes = unique
    rest = iter(x.shape)
    return [(x.dtype, tuple(1 if i in axes else next(rest) for i in range(r)))]


@register
def Expand(x, shape):
    out = np.broadcast_shapes(x.shape, tuple(_ints(shape)))
    check_allocation(out, x.dtype, "Expand's output")
    return np.array(np.broadcast_to(x, out))


@shape_rule("Expand")
def _expand_shape(node):
    x, s = node.inputs
    shape = _known_ints(s)
    return [(x.dtype, None if shape is None else broadcast_shapes(x.shape, tuple(shape)))]


@register
def Tile(x, repeats):
    reps = _ints(repeats)
    if len(reps) != x.ndim or any(r < 0 for r in reps):
        raise ValueError(f"Tile: repeats {reps} must be {x.ndim} non-negative counts")
    check_allocation([d * r for d, r in zip(x.shape, reps)], x.dtype, "Tile's output")
    return np.tile(x, reps)


@shape_rule("Tile")
def _tile_shape(node):
    x = node.inputs[0]
    reps = _const_ints(node.inputs[1])
    if reps is None:
        return [(x.dtype, None)]
    return [
        (
            x.dtype,
            tuple(
                d * r if isinstance(d, int) else (d if r == 1 else None)
                for d, r in zip(x.shape, reps)
            ),
        )
    ]


@register
def Concat(*inputs, axis):
    return np.concatenate(inputs, axis=_axis(axis, inputs[0].ndim, "Concat"))


@shape_rule("Concat")
def _concat_shape(node):
    ins = [v for v in node.inputs if v is not None]
    if any(v.shape is None for v in ins):
        return [(ins[0].dtype, None)]
    r = len(ins[0].shape)
    a = _axis(node.attrs["axis"], r)
    out = []
    for i in range(r):
        dims = [v.shape[i] for v in ins]
        if i == a:
            nonempty = [d for d in dims if d != 0]
            if all(isinstance(d, int) for d in dims):
                out.append(sum(dims))
            else:
                out.append(nonempty[0] if len(nonempty) == 1 else None)
        else:  # equal in every input: any concrete size, else any symbol
            out.append(
                next(
                    (d for d in dims if isinstance(d, int)),
                    next((d for d in dims if d is not None), None),
                )
            )
    return [(ins[0].dtype, tuple(out))]


def _split_sizes(dim, split, num_outputs):
    if split is not None:
        sizes = _ints(split)
        if sum(sizes) != dim:
            raise ValueError(f"Split: sizes {sizes} do not add up to the dimension {dim}")
        return sizes
    if not num_outputs:
        raise ValueError("Split: neither the split input nor num_outputs is given")
    chunk = -(-dim // num_outputs)  # the last chunk is smaller when dim does not divide
    return [max(min(chunk, dim - i * chunk), 0) for i in range(num_outputs)]


@register
def Split(x, split=None, *, axis=0, num_outputs=None):
    a = _axis(axis, x.ndim, "Split")
    sizes = _split_sizes(x.shape[a], split, num_outputs)
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=a))


@shape_rule("Split")
def _split_shape(node):
    # Before opset 18 Split without `split` divides into as many parts as it has outputs: the
    # op function does not see its outputs, so the node is normalised to the opset-18 form.
    if node.input(1) is None and not node.attrs.get("num_outputs"):
        node.attrs["num_outputs"] = len(node.outputs)
    x = node.inputs[0]
    a = _axis(node.attrs.get("axis", 0), len(x.shape))
    split = None if node.input(1) is None else node.inputs[1]
    if split is not None and split.const is None:
        return [(x.dtype, None)] * len(node.outputs)
    dim = x.shape[a]
    if not isinstance(dim, int):
        if split is None:
            return [(x.dtype, None)] * len(node.outputs)
        sizes = _ints(split.const)
    else:
        sizes = _split_sizes(
            dim, None if split is None else split.const, node.attrs.get("num_outputs")
        )
    return [(x.dtype, (*x.shape[:a], s, *x.shape[a + 1 :])) for s in sizes]


def _slices(shape, starts, ends, axes, steps):
    """Python slices equivalent to ONNX Slice's clamping rules."""
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else _ints(axes)
    steps = [1] * len(starts) if steps is None else _ints(steps)
    index = [slice(None)] * len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, len(shape), "Slice")
        dim = shape[a]
        if st == 0:
            raise ValueError("Slice: step 0")
        if s < 0:
            s += dim
        if e < 0:
            e += dim
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
        index[a] = slice(s, e if e >= 0 else None, st)
    return tuple(index)


@register
def Slice(data, starts, ends, axes=None, steps=None):
    return data[_slices(data.shape, starts, ends, axes, steps)]


def _slice_to_symbols(shape, params):
    """Slices [0:symbol] with step 1 (the position ids [:, :sequence] of exports) end at the
    symbol; whatever else has a symbolic end is unknown."""
    starts, ends, axes, steps = params
    if starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    out = list(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if not isinstance(axis, int):
            return None
        if start == 0 and step == 1 and isinstance(end, str):
            out[_axis(axis, len(shape))] = end
        elif not all(isinstance(p, int) for p in (start, end, step)):
            out[_axis(axis, len(shape))] = None
        else:
            return None
    return tuple(out)


@shape_rule("Slice")
def _slice_shape(node):
    x = node.inputs[0]
    params = [node.input(i) for i in range(1, 5)]
    if x.shape is not None and params[1] is not None and params[1].const is None:
        return [(x.dtype, _slice_to_symbols(x.shape, [_known_ints(p) for p in params]))]
    if any(p is not None and p.const is None for p in params) or x.shape is None:
        return [(x.dtype, None)]
    starts, ends, axes, steps = [None if p is None else p.const for p in params]
    axes_list = list(range(len(_ints(starts)))) if axes is None else _ints(axes)
    touched = {_axis(a, len(x.shape)) for a in axes_list}
    probe = [d if isinstance(d, int) else 1 << 62 for d in x.shape]
    index = _slices(probe, starts, ends, axes, steps)
    out = []
    for i, (d, sl) in enumerate(zip(x.shape, index)):
        if i not in touched or isinstance(d, int):
            out.append(d if i not in touched else len(range(*sl.indices(d))))
        elif sl.indices(probe[i]) == (0, probe[i], 1):
            out.append(d)  # the whole symbolic dim
        else:
            out.append(None)
    return [(x.dtype, tuple(out))]


def _indices(indices, n: int, op: str) -> np.ndarray:
    """Indices into an axis of size n, negative ones counted from the end; IndexError for
    any outside [-n, n) (numpy would wrap a second time instead)."""
    idx = np.asarray(indices).astype(np.int64, copy=False)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = idx[(idx < -n) | (idx >= n)].reshape(-1)[0]
        raise IndexError(f"{op}: index {bad} is out of range for an axis of size {n}")
    return np.where(idx < 0, idx + n, idx)


@register
def Gather(data, indices, *, axis=0):
    a = _axis(axis, data.ndim, "Gather")
    return np.take(data, _indices(indices, data.shape[a], "Gather"), axis=a)


@shape_rule("Gather")
def _gather_shape(node):
    x, i = node.inputs
    a = _axis(node.attrs.get("axis", 0), len(x.shape))
    return [(x.dtype, (*x.shape[:a], *i.shape, *x.shape[a + 1 :]))]


@register
def GatherElements(data, indices, *, axis=0):
    a = _axis(axis, data.ndim, "GatherElements")
    idx = _indices(indices, data.shape[a], "GatherElements")
    return np.take_along_axis(data, idx, axis=a)


@shape_rule("GatherElements")
def _gather_elements_shape(node):
    return [(node.inputs[0].dtype, node.inputs[1].shape)]


@register
def GatherND(data, indices, *, batch_dims=0):
    b = batch_dims
    k = indices.shape[-1]
    batch = data.shape[:b]
    nb = math.prod(batch)
    d = data.reshape((nb, *data.shape[b:]))
    idx = indices.reshape((nb, -1, k)).astype(np.int64, copy=False)
    rows = np.arange(nb)[:, None]
    out = d[(rows, *(idx[..., j] for j in range(k)))]
    return out.reshape((*batch, *indices.shape[b:-1], *data.shape[b + k :]))


@shape_rule("GatherND")
def _gather_nd_shape(node):
    x, i = node.inputs
    b = node.attrs.get("batch_dims", 0)
    k = i.shape[-1]
    if not isinstance(k, int):
        return [(x.dtype, None)]
    return [(x.dtype, (*i.shape[:-1], *x.shape[b + k :]))]


_REDUCTIONS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter(out, index, updates, reduction, op):
    if reduction == "none":
        out[index] = updates
    elif reduction in _REDUCTIONS:
        _REDUCTIONS[reduction].at(out, index, updates)
    else:
        raise _unsupported(op, "reduction", reduction)
    return out


@register
def ScatterND(data, indices, updates, *, reduction="none"):
    k = indices.shape[-1]
    index = tuple(np.asarray(indices[..., j], np.int64) for j in range(k))
    return _scatter(data.copy(), index, updates, reduction, "ScatterND")


@register
def ScatterElements(data, indices, updates, *, axis=0, reduction="none"):
    a = _axis(axis, data.ndim, "ScatterElements")
    index = list(np.indices(indices.shape, sparse=True))
    index[a] = _indices(indices, data.shape[a], "ScatterElements")
    return _scatter(data.copy(), tuple(index), updates, reduction, "ScatterElements")


_unary_rules("ScatterND", "ScatterElements")


@register
def Trilu(x, k=None, *, upper=1):
    k = 0 if k is None else int(_scalar(k))
    return np.triu(x, k) if upper else np.tril(x, k)


_unary_rules("Trilu")


@register
def Pad(data, pads, constant_value=None, axes=None, *, mode="constant"):
    r = data.ndim
    pads = _ints(pads)
    axes = list(range(r)) if axes is None else [_axis(a, r, "Pad") for a in _ints(axes)]
    n = len(axes)
    width = [[0, 0] for _ in range(r)]
    for i, a in enumerate(axes):
        width[a] = [pads[i], pads[i + n]]
    grow = [(max(lo, 0), max(hi, 0)) for lo, hi in width]
    check_allocation(
        [s + lo + hi for s, (lo, hi) in zip(data.shape, grow)], data.dtype, "Pad's output"
    )
    if mode == "constant":
        value = 0 if constant_value is None or constant_value.size == 0 else _scalar(constant_value)
        out = np.pad(data, grow, mode="constant", constant_values=value)
    elif mode in ("reflect", "edge", "wrap"):
        out = np.pad(data, grow, mode=mode)
    else:
        raise _unsupported("Pad", "mode", mode)
    crop = tuple(
        slice(-lo if lo < 0 else 0, (out.shape[i] + hi) if hi < 0 else None)
        for i, (lo, hi) in enumerate(width)
    )
    return out[crop]


@shape_rule("Pad")
def _pad_shape(node):
    mode = node.attrs.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise _unsupported("Pad", "mode", mode)
    x = node.inputs[0]
    pads = _const_ints(node.inputs[1])
    axes_v = node.input(3)
    axes = list(range(len(x.shape))) if axes_v is None else _const_ints(axes_v)
    if pads is None or axes is None:
        return [(x.dtype, None)]
    out = list(x.shape)
    n = len(axes)
    for i, a in enumerate(axes):
        a = _axis(a, len(x.shape))
        total = pads[i] + pads[i + n]
        out[a] = out[a] + total if isinstance(out[a], int) else (out[a] if total == 0 else None)
    return [(x.dtype, tuple(out))]


# -- shapes, constants, types -------------------------------------------------------------
@register
def Shape(data, *, start=0, end=None):
    return np.array(data.shape[start:end], dtype=np.int64)


@shape_rule("Shape")
def _shape_shape(node):
    x = node.inputs[0]
    if x.shape is None:
        return [(INT64, None)]
    n = len(range(len(x.shape))[node.attrs.get("start", 0) : node.attrs.get("end")])
    return [(INT64, (n,))]


@register
def Size(data):
    return np.array(data.size, dtype=np.int64)


@shape_rule("Size")
def _size_shape(node):
    return [(INT64, ())]


@register
def Constant(
    *,
    value=None,
    value_float=None,
    value_floats=None,
    value_int=None,
    value_ints=None,
    sparse_value=None,
    value_string=None,
    value_strings=None,
):
    if value is not None:
        return value
    if value_float is not None:
        return np.array(value_float, np.float32)
    if value_floats is not None:
        return np.array(value_floats, np.float32)
    if value_int is not None:
        return np.array(value_int, np.int64)
    if value_ints is not None:
        return np.array(value_ints, np.int64)
    if value_string is not None or value_strings is not None:
        raise _unsupported("Constant", "value_string(s)", value_string or value_strings)
    raise ValueError("Constant has no supported value attribute")


@shape_rule("Constant")
def _constant_shape(node):
    c = np.asarray(Constant(**node.attrs))
    return [(c.dtype, c.shape)]


@register
def ConstantOfShape(shape, *, value=None):
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value)
    dims = tuple(_ints(shape))
    if any(d < 0 for d in dims):
        raise ValueError(f"ConstantOfShape: shape {list(dims)} has a negative size")
    check_allocation(dims, fill.dtype, "ConstantOfShape's output")
    return np.full(dims, fill.reshape(-1)[0], dtype=fill.dtype)


@shape_rule("ConstantOfShape")
def _constant_of_shape_shape(node):
    value = node.attrs.get("value")
    dtype = np.dtype(np.float32) if value is None else np.asarray(value).dtype
    shape = _known_ints(node.inputs[0])
    return [(dtype, None if shape is None else tuple(shape))]


def _range_count(start, limit, delta) -> int:
    s, l, d = _scalar(start), _scalar(limit), _scalar(delta)
    if np.issubdtype(np.asarray(start).dtype, np.integer):
        if int(d) == 0:
            raise ValueError("Range: delta is 0")
        return max(-(-(int(l) - int(s)) // int(d)), 0)
    steps = (float(l) - float(s)) / float(d) if float(d) else float("nan")
    if not math.isfinite(steps):
        raise ValueError(f"Range: ({s}, {l}, {d}) has no finite number of elements")
    return max(int(math.ceil(steps)), 0)


@register
def Range(start, limit, delta):
    s, d = _scalar(start), _scalar(delta)
    n = _range_count(start, limit, delta)
    check_allocation((n,), np.asarray(start).dtype, "Range's output")
    return (s + np.arange(n, dtype=np.asarray(start).dtype) * d).astype(np.asarray(start).dtype)


@shape_rule("Range")
def _range_shape(node):
    consts = [v.const for v in node.inputs]
    dtype = node.inputs[0].dtype
    if any(c is None for c in consts):
        start, limit, delta = (_known_ints(v) for v in node.inputs)
        if start == [0] and delta == [1] and limit is not None and isinstance(limit[0], str):
            return [(dtype, (limit[0],))]  # range(0, sequence)
        return [(dtype, (None,))]
    return [(dtype, (_range_count(*consts),))]  # counted, not computed: it may be huge


@register
def Cast(x, *, to, saturate=1):
    return x.astype(onnx_dtype(to, "Cast"), copy=False)


@shape_rule("Cast")
def _cast_shape(node):
    return [(onnx_dtype(node.attrs["to"], "Cast"), node.inputs[0].shape)]


@register
def CastLike(x, target_type, *, saturate=1):
    return x.astype(target_type.dtype, copy=False)


@shape_rule("CastLike")
def _cast_like_shape(node):
    return [(node.inputs[1].dtype, node.inputs[0].shape)]


@register
def Dropout(data, ratio=None, training_mode=None, *, seed=None):
    if training_mode is not None and bool(_scalar(training_mode)):
        if ratio is None or float(_scalar(ratio)) != 0.0:
            raise _unsupported("Dropout", "training_mode", True)
    return data, np.ones(data.shape, np.bool_)


@shape_rule("Dropout")
def _dropout_shape(node):
    x = node.inputs[0]
    return [(x.dtype, x.shape), (BOOL, x.shape)]


@register
def NonZero(x):
    if x.ndim == 0:
        return np.zeros((0, int(bool(x))), np.int64)
    return np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1)


@shape_rule("NonZero")
def _nonzero_shape(node):
    return [(INT64, (len(node.inputs[0].shape), None))]


@register
def OneHot(indices, depth, values, *, axis=-1):
    d = int(_scalar(depth))
    if d < 0:
        raise ValueError(f"OneHot: depth {d} is negative")
    check_allocation((*np.shape(indices), d), np.asarray(values).dtype, "OneHot's output")
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + d, idx)
    a = _axis(axis, idx.ndim + 1, "OneHot")
    hot = np.expand_dims(idx, a) == np.arange(d).reshape((-1,) + (1,) * (idx.ndim - a))
    off, on = np.asarray(values).reshape(-1)[:2]
    return np.where(hot, on, off).astype(np.asarray(values).dtype)


@shape_rule("OneHot")
def _one_hot_shape(node):
    i, depth, values = node.inputs
    d = _const_ints(depth)
    r = len(i.shape) + 1
    a = _axis(node.attrs.get("axis", -1), r)
    out = list(i.shape)
    out.insert(a, d[0] if d else None)
    return [(values.dtype, tuple(out))]


# -- convolution and pooling --------------------------------------------------------------
def _pool_geometry(op, spatial, kernel, auto_pad, pads, strides, dilations, ceil_mode=0):
    """Output sizes and (begin, end) padding per spatial axis, end padding including the
    extra room ceil_mode needs."""
    n = len(spatial)
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-s // st) for s, st in zip(spatial, strides)]
        total = [max((o - 1) * st + e - s, 0) for o, st, e, s in zip(out, strides, eff, spatial)]
        lo = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        hi = [t - l for t, l in zip(total, lo)]
    elif auto_pad in ("NOTSET", "VALID", ""):
        p = [0] * (2 * n) if auto_pad == "VALID" or not pads else list(pads)
        lo, hi = p[:n], p[n:]
        out = []
        for s, l, h, e, st in zip(spatial, lo, hi, eff, strides):
            span = s + l + h - e
            o = (-(-span // st) if ceil_mode else span // st) + 1
            if ceil_mode and (o - 1) * st >= s + l:
                o -= 1  # the last window must start inside the input or its begin padding
            out.append(max(o, 0))
    else:
        raise _unsupported(op, "auto_pad", auto_pad)
    extra = [
        max((o - 1) * st + e - (s + l + h), 0)
        for o, st, e, s, l, h in zip(out, strides, eff, spatial, lo, hi)
    ]
    return out, lo, hi, extra, strides, dilations


def _windows(xp, out, strides, dilations, kernel):
    """A strided view [N, C, *out, *kernel] of the padded input xp [N, C, *spatial]."""
    n = len(out)
    s = xp.strides
    shape = (*xp.shape[:2], *out, *kernel)
    view_strides = (
        *s[:2],
        *(s[2 + i] * strides[i] for i in range(n)),
        *(s[2 + i] * dilations[i] for i in range(n)),
    )
    return np.lib.stride_tricks.as_strided(xp, shape, view_strides, writeable=False)


@register
def Conv(
    x,
    w,
    b=None,
    *,
    auto_pad="NOTSET",
    dilations=None,
    group=1,
    kernel_shape=None,
    pads=None,
    strides=None,
):
    kernel = list(kernel_shape or w.shape[2:])
    out, lo, hi, _, strides, dilations = _pool_geometry(
        "Conv", x.shape[2:], kernel, auto_pad, pads, strides, dilations
    )
    xp = np.pad(x, [(0, 0), (0, 0), *zip(lo, hi)])
    n, c = x.shape[:2]
    m = w.shape[0]
    g = group
    cols = _windows(xp, out, strides, dilations, kernel)  # [N, C, *out, *k]
    nd = len(out)
    # [N, G, C/G, *out, *k] -> [N, G, *out, C/G, *k] -> [N, G, P, C/G*K]
    cols = cols.reshape((n, g, c // g, *out, *kernel))
    cols = cols.transpose((0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd)))
    p = math.prod(out)
    cols = cols.reshape((n, g, p, -1))
    wg = w.reshape((g, m // g, -1)).transpose(0, 2, 1)  # [G, C/G*K, M/G]
    y = np.matmul(cols, wg)  # [N, G, P, M/G]
    y = y.transpose(0, 1, 3, 2).reshape((n, m, *out))
    if b is not None:
        y += b.reshape((1, -1) + (1,) * nd)
    return y.astype(x.dtype, copy=False)


def _pool(op, x, kernel, auto_pad, pads, strides, dilations, ceil_mode, fill):
    """The padded input and, per kernel offset, the strided slice of it that offset sees
    (a loop over the kernel's few offsets, each step vectorised over the whole output)."""
    out, lo, hi, extra, strides, dilations = _pool_geometry(
        op, x.shape[2:], kernel, auto_pad, pads, strides, dilations, ceil_mode
    )
    width = [(0, 0), (0, 0), *((l, h + e) for l, h, e in zip(lo, hi, extra))]
    xp = np.pad(x, width, constant_values=fill)
    return xp, _offset_slices(out, strides, dilations, kernel), (out, lo, hi, extra)


def _offset_slices(out, strides, dilations, kernel):
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        slices.append(
            (
                Ellipsis,
                *(
                    slice(o * d, o * d + (n - 1) * s + 1, s)
                    for o, d, n, s in zip(offset, dilations, out, strides)
                ),
            )
        )
    return slices


@register
def MaxPool(
    x,
    *,
    auto_pad="NOTSET",
    ceil_mode=0,
    dilations=None,
    kernel_shape,
    pads=None,
    storage_order=0,
    strides=None,
):
    """Y, and the Indices output: flat positions in x (row-major, or column-major over the
    spatial axes when storage_order=1)."""
    nd = len(kernel_shape)
    strides, dilations = list(strides or [1] * nd), list(dilations or [1] * nd)
    xp, slices, (out, lo, _, _) = _pool(
        "MaxPool", x, kernel_shape, auto_pad, pads, strides, dilations, ceil_mode, _lowest(x.dtype)
    )
    y = xp[slices[0]].copy()
    arg = np.zeros(y.shape, np.int32)  # the first maximum's kernel offset, flattened
    step = np.empty_like(arg)
    for k, sl in enumerate(slices[1:], 1):
        better = xp[sl] > y
        np.maximum(y, xp[sl], out=y)
        np.subtract(k, arg, out=step)  # arg += better * (k - arg): cheaper than a masked copy
        step *= better
        arg += step
    n, c, *spatial = x.shape
    # Flat index into x: the window's start plus the offset, row- or column-major over space.
    within = np.zeros(arg.shape, np.int64)
    order = range(nd - 1, -1, -1) if storage_order else range(nd)
    for i in order:
        offset = (arg // math.prod(kernel_shape[i + 1 :])) % kernel_shape[i]
        o = np.arange(out[i]).reshape((-1,) + (1,) * (nd - 1 - i))
        coord = np.clip(o * strides[i] + offset * dilations[i] - lo[i], 0, spatial[i] - 1)
        within *= spatial[i]
        within += coord
    base = (np.arange(n)[:, None] * c + np.arange(c)[None, :]) * math.prod(spatial)
    within += base.reshape((n, c) + (1,) * nd)
    return y, within


@register
def AveragePool(
    x,
    *,
    auto_pad="NOTSET",
    ceil_mode=0,
    count_include_pad=0,
    dilations=None,
    kernel_shape,
    pads=None,
    strides=None,
):
    nd = len(kernel_shape)
    strides, dilations = list(strides or [1] * nd), list(dilations or [1] * nd)
    xp, slices, (out, lo, hi, extra) = _pool(
        "AveragePool", x, kernel_shape, auto_pad, pads, strides, dilations, ceil_mode, 0
    )
    # How many elements each window averages: the input's (or with count_include_pad, the
    # explicitly padded input's) elements it covers, never ceil_mode's extra room.
    if count_include_pad:
        mask = np.pad(
            np.ones((1, 1, *(s + l + h for s, l, h in zip(x.shape[2:], lo, hi))), x.dtype),
            [(0, 0), (0, 0), *((0, e) for e in extra)],
        )
    else:
        mask = np.pad(
            np.ones((1, 1, *x.shape[2:]), x.dtype),
            [(0, 0), (0, 0), *((l, h + e) for l, h, e in zip(lo, hi, extra))],
        )
    total = xp[slices[0]].copy()
    counts = mask[slices[0]].copy()
    for sl in slices[1:]:
        total += xp[sl]
        counts += mask[sl]
    total /= counts
    return total


@register
def GlobalAveragePool(x):
    return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)


@register
def GlobalMaxPool(x):
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


for _op in ("GlobalAveragePool", "GlobalMaxPool"):

    @shape_rule(_op)
    def _global_pool_shape(node):
        x = node.inputs[0]
        return [(x.dtype, (*x.shape[:2], *([1] * (len(x.shape) - 2))))]


for _op in ("Conv", "MaxPool", "AveragePool"):

    @shape_rule(_op)
    def _conv_pool_shape(node):
        y = _conv_pool_out(node)
        return [y, (INT64, y[1])] if node.op == "MaxPool" else [y]


def _conv_pool_out(node):
    x = node.inputs[0]
    a = node.attrs
    if node.op == "Conv":
        w = node.inputs[1]
        kernel = a.get("kernel_shape") or (w.shape[2:] if w.shape is not None else None)
        channels = w.shape[0] if w.shape is not None else None
    else:
        kernel, channels = a["kernel_shape"], x.shape[1]
    spatial = x.shape[2:]
    if kernel is None or not all(isinstance(d, int) for d in (*spatial, *kernel)):
        return (x.dtype, (x.shape[0], channels, *([None] * (len(x.shape) - 2))))
    out = _pool_geometry(
        node.op,
        spatial,
        kernel,
        a.get("auto_pad", "NOTSET"),
        a.get("pads"),
        a.get("strides"),
        a.get("dilations"),
        a.get("ceil_mode", 0),
    )[0]
    return (x.dtype, (x.shape[0], channels, *out))
