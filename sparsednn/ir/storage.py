"""Where constants keep their bytes: in memory of their own, or in a memory-mapped model file.

The importer hands constants over as read-only views of the mapped model file, so that a
model's weights are never all in memory at once: a page of the file costs memory (it counts in
the process's resident set) only once something reads it, and `release` gives it back when
its reader is done. The session turns every view it keeps into a copy of its own (`own`,
`own_constants`) and compresses sparse weights straight from the file: nothing outlives the
session's creation on the mapping, so a model file rewritten later cannot change or break a
session.
"""

from __future__ import annotations

import mmap
import operator
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np

from sparsednn.ir.graph import Graph, Node

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    byte_bounds = np.byte_bounds

_CAN_RELEASE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


class MappedFile(mmap.mmap):
    """A read-only mapping of a whole file, which knows its own address."""

    address: int = 0
    path: str = ""
    identity: tuple = ()  # the file's device, inode, size and mtime when it was mapped

    @classmethod
    def open(cls, path: str | os.PathLike) -> MappedFile:
        """Map `path` (OSError if it cannot be, ValueError if it is empty)."""
        with open(path, "rb") as f:
            mapped = cls(f.fileno(), 0, access=mmap.ACCESS_READ)
            mapped.address = np.frombuffer(mapped, np.uint8, count=1).ctypes.data
            mapped.path, mapped.identity = os.fspath(path), _identity(os.fstat(f.fileno()))
        return mapped

    def read_into(self, array: np.ndarray, view: np.ndarray) -> bool:
        """Fill `array` with the bytes of `view`, a contiguous view of this mapping, by reading
        the file: the bytes pass through the page cache, never this process's resident set.
        False if the file cannot be read so (the caller copies from the mapping instead)."""
        try:
            with open(self.path, "rb") as f:
                if _identity(os.fstat(f.fileno())) != self.identity:
                    return False  # the path names another file now
                f.seek(byte_bounds(view)[0] - self.address)
                return f.readinto(memoryview(array).cast("B")) == array.nbytes
        except (OSError, ValueError, TypeError):
            return False

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Drop this process's resident pages of bytes [start, stop): the next read of them
        reads the file again. Safe for any range, since the mapping is never written."""
        if self.closed or not _CAN_RELEASE:
            return
        stop = len(self) if stop is None else min(stop, len(self))
        start = max(start, 0) // mmap.PAGESIZE * mmap.PAGESIZE
        if stop > start:
            self.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def mapping_of(array: Any) -> MappedFile | None:
    """The mapped file `array` is a view of, if any."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, MappedFile) else None


def nonzero_count(array: Any) -> int:
    """The number of entries of an array that are not (±0.0) zero.

    Counts `array != 0`: numpy counts a float32 array's nonzeros ~2x slower than a bool's."""
    return int(np.count_nonzero(np.asarray(array) != 0))


def zero_fraction(array: Any) -> float:
    """The fraction of exact zeros (±0.0) in an array (1.0 if it is empty)."""
    a = np.asarray(array)
    return 1.0 - nonzero_count(a) / max(a.size, 1)


def release(array: Any) -> None:
    """Give back the memory of the pages a mapped array was read from (no-op otherwise)."""
    mapped = mapping_of(array)
    if mapped is not None and array.size:
        lo, hi = byte_bounds(array)
        mapped.release(lo - mapped.address, hi - mapped.address)


def own(array: np.ndarray, chunk_bytes: int = 4 << 20) -> np.ndarray:
    """`array` itself, or a read-only copy of it if it is a view of a mapped file. A large
    contiguous view is read from the file straight into the copy; any other view is copied a
    few MB at a time, each chunk's pages given back once copied. Either way the file's pages
    and the copy of an embedding table are not in memory together."""
    mapped = mapping_of(array)
    if mapped is None:
        return array
    copy = np.empty_like(array, order="K")
    read = array.nbytes >= chunk_bytes and array.flags.c_contiguous
    if read and mapped.read_into(copy, array):
        pass  # (read from the file)
    elif array.ndim == 0 or array.size == 0:
        copy[...] = array
    else:
        rows = max(1, chunk_bytes // max(array[0].nbytes, 1))
        for start in range(0, array.shape[0], rows):
            copy[start : start + rows] = array[start : start + rows]
            release(array[start : start + rows])
    copy.flags.writeable = False  # as constants read from the model always were
    return copy


def _constant_slots(graph: Graph) -> Iterator[tuple[Node | None, str, np.ndarray, Callable]]:
    """(node or None, attribute name, array, setter) of every array a graph holds: values'
    constants, then node attributes (lists of arrays included)."""
    for v in graph.values():
        if v.is_const:
            yield None, "", v.const, partial(setattr, v, "const")
    for node in graph.nodes:
        for key, a in node.attrs.items():
            if isinstance(a, np.ndarray):
                yield node, key, a, partial(operator.setitem, node.attrs, key)
            elif isinstance(a, list):
                for i, item in enumerate(a):
                    if isinstance(item, np.ndarray):
                        yield node, key, item, partial(operator.setitem, a, i)


def own_constants(
    graph: Graph, keep: Callable[[Node, str], bool] = lambda node, key: False
) -> None:
    """Replace every view of a mapped file in `graph` by a copy of its own, one at a time,
    except the node attributes `keep(node, key)` names (their reader consumes the view)."""
    copies: dict[int, np.ndarray] = {}  # an array held in two places is copied once
    for node, key, array, put in list(_constant_slots(graph)):
        if mapping_of(array) is None or (node is not None and keep(node, key)):
            continue
        if id(array) not in copies:
            copies[id(array)] = own(array)
        put(copies[id(array)])


def mapped_files(graph: Graph) -> list[MappedFile]:
    """The files the graph's constants are views of."""
    found: dict[int, MappedFile] = {}
    for _, _, array, _ in _constant_slots(graph):
        mapped = mapping_of(array)
        if mapped is not None:
            found.setdefault(id(mapped), mapped)
    return list(found.values())


def release_graph(graph: Graph) -> None:
    """Give back every resident page of the files the graph's constants are mapped from."""
    for mapped in mapped_files(graph):
        mapped.release()
