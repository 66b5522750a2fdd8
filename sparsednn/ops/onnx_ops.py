"""ONNX ops (default domain, opsets 13 to 21), one numpy function each, named like the op.

To add an op: write `@register def OpName(inputs..., *, attributes=defaults)` returning the
output array(s), add a shape rule with `@shape_rule("OpName")` if its output shape is not
simply that of its first input, and add a case to tests/ops/test_onnx_ops.py.
"""

from __future__ import annotations

import numpy as np

from sparsednn.ops.registry import register, shape_rule
from sparsednn.ir.shapes import broadcast_shapes


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
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer Div truncates toward zero
    return np.divide(a, b)


for _op in ("Add", "Sub", "Mul", "Div"):

    @shape_rule(_op)
    def _binary_shape(node):
        a, b = node.inputs
        return [(a.dtype, broadcast_shapes(a.shape, b.shape))]


# -- elementwise unary --------------------------------------------------------------------
@register
def Identity(x):
    return x


@register
def Relu(x):
    return np.maximum(x, np.zeros((), x.dtype))


# -- linear algebra -----------------------------------------------------------------------
@register
def MatMul(a, b):
    return np.matmul(a, b)


# -- constants ----------------------------------------------------------------------------
@register
def Constant(*, value=None, value_float=None, value_floats=None, value_int=None,
             value_ints=None, sparse_value=None, value_string=None, value_strings=None):
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
    raise ValueError("Constant has no supported value attribute")
