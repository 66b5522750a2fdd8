"""The graph IR: values, nodes and graphs.

A `Value` is an edge: a name, a dtype and a shape whose dimensions are ints, symbols (strings
such as "batch") or None when unknown. A value may hold a constant (a numpy array). A `Node` is
an op applied to input values, producing output values, with plain-Python attributes. A `Graph`
keeps its nodes in topological order. Nothing here is specific to transformers: convolutions,
layouts and other ops are just other op names with other attributes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

Dim = int | str | None
Shape = tuple[Dim, ...]


@dataclass(eq=False)
class Value:
    name: str
    dtype: np.dtype | None = None
    shape: Shape | None = None
    const: np.ndarray | None = None
    # The contents of a small integer tensor computed from shapes, when known symbolically:
    # Shape(x) of an x shaped [batch, 128] holds ("batch", 128). Lets shape rules see through
    # the Shape -> Gather -> Concat -> Reshape chains of dynamic-shape exports.
    symbolic_value: tuple[Dim, ...] | None = None
    producer: Node | None = field(default=None, repr=False)

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def type_str(self) -> str:
        dtype = "?" if self.dtype is None else np.dtype(self.dtype).name
        if self.shape is None:
            return f"{dtype}[*]"
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{dtype}[{dims}]"

    @classmethod
    def constant(cls, name: str, array: np.ndarray) -> Value:
        array = np.asarray(array)
        return cls(name, array.dtype, tuple(array.shape), array)


@dataclass(eq=False)
class Node:
    op: str
    name: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""

    def input(self, i: int) -> Value | None:
        """The i-th input, or None when it is absent (optional inputs)."""
        return self.inputs[i] if i < len(self.inputs) else None

    def __repr__(self) -> str:
        return f"Node({self.op} {self.name!r})"


class Graph:
    def __init__(self, name: str = "graph"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.opset: int | None = None
        self._names = itertools.count()

    # -- construction --------------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        return f"{hint}__{next(self._names)}"

    def add_node(
        self,
        op: str,
        inputs: Iterable[Value | None],
        num_outputs: int = 1,
        attrs: dict[str, Any] | None = None,
        name: str | None = None,
        output_names: list[str] | None = None,
        domain: str = "",
    ) -> Node:
        """Append a node (the caller keeps the list topologically sorted)."""
        name = name or self.fresh_name(op)
        names = output_names or [f"{name}_out{i}" for i in range(num_outputs)]
        outputs = [Value(n) for n in names]
        node = Node(op, name, list(inputs), outputs, dict(attrs or {}), domain)
        for v in outputs:
            v.producer = node
        self.nodes.append(node)
        return node

    # -- queries -------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        """Every value reachable from the inputs and nodes, once each."""
        seen: set[int] = set()
        for v in itertools.chain(
            self.inputs,
            (i for n in self.nodes for i in n.inputs if i is not None),
            (o for n in self.nodes for o in n.outputs),
            self.outputs,
        ):
            if id(v) not in seen:
                seen.add(id(v))
                yield v

    def consumers(self) -> dict[int, list[Node]]:
        """Map id(value) -> nodes that read it."""
        users: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    users.setdefault(id(v), []).append(n)
        return users

    def replace_all_uses(self, old: Value, new: Value) -> None:
        for n in self.nodes:
            n.inputs = [new if v is old else v for v in n.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def __str__(self) -> str:
        from sparsednn.ir.printer import format_graph

        return format_graph(self)
