"""The IR verifier: checks the invariants every pass must keep."""

from __future__ import annotations

from sparsednn.errors import InvalidGraphError
from sparsednn.ir.graph import Graph


def verify(graph: Graph) -> None:
    """Raise InvalidGraphError unless the graph is well formed and topologically sorted."""
    defined: set[int] = {id(v) for v in graph.inputs}
    names: dict[str, str] = {}
    for v in graph.inputs:
        if v.name in names:
            raise InvalidGraphError(f"graph {graph.name!r}: input name {v.name!r} is duplicated")
        names[v.name] = "graph input"
    for node in graph.nodes:
        for v in node.inputs:
            if v is None or v.is_const:
                continue
            if id(v) not in defined:
                raise InvalidGraphError(
                    f"graph {graph.name!r}: node {node.name!r} ({node.op}) reads {v.name!r} "
                    "before anything defines it (a dangling input or a cycle)"
                )
        for v in node.outputs:
            if v.name in names:
                raise InvalidGraphError(
                    f"graph {graph.name!r}: value {v.name!r} is defined twice "
                    f"(by {names[v.name]} and by node {node.name!r})"
                )
            if v.producer is not node:
                raise InvalidGraphError(
                    f"graph {graph.name!r}: value {v.name!r} does not point back to its "
                    f"producer {node.name!r}"
                )
            names[v.name] = f"node {node.name!r}"
            defined.add(id(v))
    for v in graph.outputs:
        if not v.is_const and id(v) not in defined:
            raise InvalidGraphError(f"graph {graph.name!r}: output {v.name!r} is never computed")
