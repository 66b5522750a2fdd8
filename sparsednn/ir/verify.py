"""The IR verifier: checks the invariants every pass must keep."""

from __future__ import annotations

import functools
import os

import numpy as np

from sparsednn.errors import InvalidGraphError
from sparsednn.ir.graph import Graph


@functools.cache
def _machine_memory() -> int:
    """Physical memory, or the cgroup's limit when that is lower (containers)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 1 << 40
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def memory_limit() -> int:
    """The most bytes one tensor may take: the machine's memory, or the environment variable
    SPARSEDNN_MEMORY_LIMIT (bytes) when set. Models and inputs whose tensors would need more
    are refused before anything is allocated."""
    env = os.environ.get("SPARSEDNN_MEMORY_LIMIT", "")
    if env.strip().isdigit():
        return int(env)
    return _machine_memory()


def describe_memory_limit() -> str:
    """memory_limit() in words, for error messages."""
    where = (
        "SPARSEDNN_MEMORY_LIMIT"
        if os.environ.get("SPARSEDNN_MEMORY_LIMIT", "").strip().isdigit()
        else "this machine's memory"
    )
    return f"{where}, {format_bytes(memory_limit())}"


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_allocation(shape, dtype, what: str) -> None:
    """MemoryError, before allocating, if a tensor of `shape` would exceed memory_limit()."""
    count = 1
    for d in shape:
        count *= int(d)
    nbytes = count * np.dtype(dtype if dtype is not None else np.float32).itemsize
    if nbytes > memory_limit():
        raise MemoryError(
            f"{what} of shape {list(shape)} would need {format_bytes(nbytes)}, more than "
            f"{describe_memory_limit()}; refused before allocating"
        )


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
            _check_shape(graph, v, node)
    for v in graph.outputs:
        if not v.is_const and id(v) not in defined:
            raise InvalidGraphError(f"graph {graph.name!r}: output {v.name!r} is never computed")


def _check_shape(graph: Graph, v, node) -> None:
    """Known dimensions are sizes (not negative), and a fully known shape fits in memory."""
    if v.shape is None:
        return
    static = True
    for d in v.shape:
        if isinstance(d, (int, np.integer)):
            if d < 0:
                raise InvalidGraphError(
                    f"graph {graph.name!r}: node {node.name!r} ({node.op}) makes {v.name!r} "
                    f"with a negative dimension: shape {list(v.shape)}"
                )
        else:
            static = False
    if static:
        try:
            check_allocation(v.shape, v.dtype, f"value {v.name!r}")
        except MemoryError as e:
            raise InvalidGraphError(
                f"graph {graph.name!r}: node {node.name!r} ({node.op}): {e}"
            ) from None
