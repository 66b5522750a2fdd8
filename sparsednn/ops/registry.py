"""The one registry of ops: ONNX ops and sparsednn's own fused ops.

Each op is one short function named exactly like the op. Its positional parameters are the
node's inputs (numpy arrays, or None for an absent optional input) and its keyword-only
parameters are the node's attributes, with the ONNX defaults as Python defaults. It returns
one array or a tuple of arrays. The same function serves constant folding, the runtime's
fallback path and the reference for tests.

An op may also register a shape rule, `infer(node) -> list[(dtype, shape)]`, that works on
symbolic shapes; see sparsednn/passes/infer_shapes.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from sparsednn.errors import UnsupportedOpError


@dataclass
class OpDef:
    name: str
    compute: Callable[..., Any]
    attributes: frozenset[str]
    accepts_any_attribute: bool
    infer: Callable[..., Any] | None = None
    domain: str = ""


OPS: dict[str, OpDef] = {}


def register(fn: Callable | None = None, *, name: str | None = None, domain: str = ""):
    """Register `fn` as the op of the same name (decorator)."""

    def wrap(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters.values()
        attributes = frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        any_attr = any(p.kind is p.VAR_KEYWORD for p in params)
        op_name = name or fn.__name__
        OPS[op_name] = OpDef(op_name, fn, attributes, any_attr, domain=domain)
        return fn

    return wrap(fn) if fn is not None else wrap


def shape_rule(op_name: str):
    """Register the symbolic shape rule of an already registered op (decorator)."""

    def wrap(fn: Callable) -> Callable:
        OPS[op_name].infer = fn
        return fn

    return wrap


def supported_ops() -> list[str]:
    return sorted(n for n, d in OPS.items() if d.domain == "")


def lookup(op: str, node_name: str = "?", attrs: dict | None = None) -> OpDef:
    """The definition of `op`, or an UnsupportedOpError naming the node and what is supported."""
    opdef = OPS.get(op)
    if opdef is None:
        raise UnsupportedOpError(
            f"op {op!r} (node {node_name!r}) is not supported; supported ops: "
            + ", ".join(supported_ops())
        )
    if attrs and not opdef.accepts_any_attribute:
        unknown = sorted(set(attrs) - opdef.attributes)
        if unknown:
            raise UnsupportedOpError(
                f"op {op!r} (node {node_name!r}): attribute(s) {', '.join(unknown)} not "
                f"supported (known: {', '.join(sorted(opdef.attributes)) or 'none'})"
            )
    return opdef
