"""A readable text form of the IR, one node per line (what `sparsednn dump` prints)."""

from __future__ import annotations

import numpy as np

from sparsednn.ir.graph import Graph, Node, Value
from sparsednn.ir.storage import zero_fraction


def format_array(array: np.ndarray) -> str:
    array = np.asarray(array)
    if array.size <= 8:
        body = ", ".join(f"{x:.4g}" if array.dtype.kind == "f" else str(x) for x in array.flat)
        return f"{array.dtype.name}{list(array.shape)}{{{body}}}"
    text = f"{array.dtype.name}{list(array.shape)}"
    if array.dtype.kind == "f":
        text += f" {100.0 * zero_fraction(array):.1f}% zeros"
    return text


def format_value(value: Value | None) -> str:
    if value is None:
        return "_"
    if value.is_const:
        return f"${value.name}"
    return f"%{value.name}"


def format_attr(value) -> str:
    if isinstance(value, np.ndarray):
        return format_array(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, np.ndarray) for v in value):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def format_node(node: Node) -> str:
    outs = ", ".join(format_value(v) for v in node.outputs)
    args = ", ".join(format_value(v) for v in node.inputs)
    attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in node.attrs.items() if v is not None)
    types = ", ".join(
        v.type_str()
        + ("" if v.symbolic_value is None else " = (" + ", ".join(map(str, v.symbolic_value)) + ")")
        for v in node.outputs
    )
    line = f"  {outs} = {node.op}({args})"
    if attrs:
        line += f" {{{attrs}}}"
    return f"{line}  # {types}"


def format_graph(graph: Graph) -> str:
    ins = ", ".join(f"%{v.name}: {v.type_str()}" for v in graph.inputs)
    outs = ", ".join(f"%{v.name}: {v.type_str()}" for v in graph.outputs)
    lines = [f"graph {graph.name}({ins}) -> ({outs}) {{"]
    consts = {}
    for node in graph.nodes:
        for v in node.inputs:
            if v is not None and v.is_const:
                consts[id(v)] = v
    for v in consts.values():
        lines.append(f"  ${v.name} = {format_array(v.const)}")
    lines.extend(format_node(n) for n in graph.nodes)
    lines.append("}")
    return "\n".join(lines)
