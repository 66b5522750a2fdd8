"""sparsednn's own ops, produced by the fusion passes (domain "sparsednn")."""

from __future__ import annotations

import numpy as np

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
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
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
