"""Small helpers for the fusion passes' pattern matching."""

from __future__ import annotations

import numpy as np

from sparsednn.ir import Graph, Node, Value


class Uses:
    """Who reads each value, so that a fusion only swallows values nobody else needs."""

    def __init__(self, graph: Graph):
        self.readers = graph.consumers()
        self.outputs = {id(v) for v in graph.outputs}

    def sole_reader(self, value: Value) -> Node | None:
        """The one node reading `value`, if exactly one does and it is not a graph output."""
        readers = self.readers.get(id(value), [])
        if len(readers) != 1 or id(value) in self.outputs:
            return None
        return readers[0]


def const_scalar(value: Value | None) -> float | None:
    """The value of a constant holding a single number, else None."""
    if value is None or not value.is_const or value.const.size != 1:
        return None
    return float(value.const.reshape(()))


def is_close(x: float | None, target: float, rtol: float = 1e-3) -> bool:
    return x is not None and abs(x - target) <= rtol * abs(target)


def other_input(node: Node, value: Value) -> Value | None:
    """For a binary node reading `value`, its other input."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def as_row_vector(value: Value | None, n: int) -> np.ndarray | None:
    """A constant that broadcasts as a [n] bias over the last axis, as float32, else None."""
    if value is None or not value.is_const:
        return None
    c = value.const
    if c.ndim == 0 or c.shape[-1] not in (1, n) or any(d != 1 for d in c.shape[:-1]):
        return None
    return np.broadcast_to(c.reshape(-1), (n,)).astype(np.float32)


class Rewrite:
    """The bookkeeping of a fusion pass: matched nodes are replaced by one new node, which
    takes the place of the match's last node (so the graph stays topologically sorted), and
    the graph is rebuilt once at the end."""

    def __init__(self):
        self._removed: set[int] = set()
        self._replacement: dict[int, Node] = {}

    def taken(self, node: Node) -> bool:
        """Whether an earlier match already swallowed or replaced `node`."""
        return id(node) in self._removed or id(node) in self._replacement

    def replace(self, swallowed: list[Node], by: Node, at: Node) -> None:
        """Drop the `swallowed` nodes; `by` (whose outputs it now produces) stands at `at`."""
        for out in by.outputs:
            out.producer = by
        self._removed.update(id(n) for n in swallowed)
        self._replacement[id(at)] = by

    def apply(self, graph: Graph) -> Graph:
        graph.nodes = [
            self._replacement.get(id(n), n)
            for n in graph.nodes
            if id(n) not in self._removed or id(n) in self._replacement
        ]
        return graph
