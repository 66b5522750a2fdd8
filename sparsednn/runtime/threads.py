"""The worker threads that run native kernels in parallel.

Native kernels are called through ctypes, which releases the GIL for the length of the call,
so plain Python threads run them truly in parallel. One pool per process, grown on demand.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_tls = threading.local()


def aligned_floats(n_floats: int) -> tuple[int, int, np.ndarray]:
    """(address, size, owner) of a new 64-byte aligned float32 buffer of size >= n_floats
    (at least 16 K floats, so that small requests do not reallocate)."""
    size = max(int(n_floats), 1 << 14)
    buf = np.empty(size + 16, np.float32)
    return (buf.ctypes.data + 63) & ~63, size, buf


def thread_scratch(n_floats: int) -> int:
    """Address of a 64-byte aligned scratch buffer of >= n_floats floats owned by the calling
    thread (kernels' per-thread scratch: grown on demand, kept for the thread's life)."""
    s = getattr(_tls, "scratch", None)
    if s is None or s[1] < n_floats:
        s = _tls.scratch = aligned_floats(n_floats)
    return s[0]


def step_threads(num_threads: int) -> int:
    """Threads a step may use: the session's num_threads, or one while this thread runs a
    part of a batch (runtime/batch_parts.py: the parts already use every core)."""
    return 1 if getattr(_tls, "in_part", False) else num_threads


class running_part:
    """Marks the calling thread as running one part of a batch (see step_threads)."""

    def __enter__(self) -> None:
        _tls.in_part = True

    def __exit__(self, *exc) -> None:
        _tls.in_part = False


def default_num_threads() -> int:
    """Cores this process may use (respects CPU affinity, as in containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _get_pool(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < size:
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="sparsednn")
            _pool_size = size
        return _pool


def parallel_for(tasks: Sequence[Callable[[], None]]) -> None:
    """Run the tasks, the first on the calling thread and the rest on the pool; re-raise errors."""
    if len(tasks) == 1:
        tasks[0]()
        return
    pool = _get_pool(len(tasks) - 1)
    futures = [pool.submit(t) for t in tasks[1:]]
    tasks[0]()
    for f in futures:
        f.result()


class SingleThreadedBlas:
    """While any run() is active, numpy's BLAS uses one thread.

    sparsednn parallelises inside its own kernels with its own pool; BLAS threads spinning
    beside them would oversubscribe the cores (measured: a 2-thread BERT run went from 40 ms
    to 1.4 s). The first run to enter sets BLAS to one thread, the last to leave restores it,
    so numpy keeps its own setting outside of sparsednn's runs.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._saved: list[tuple[object, int]] = []
        self._controllers: list[object] | None = None

    def _blas(self) -> list[object]:
        if self._controllers is None:
            try:
                from threadpoolctl import ThreadpoolController

                self._controllers = ThreadpoolController().select(user_api="blas").lib_controllers
            except Exception:  # no threadpoolctl, or a BLAS it does not know: nothing to pin
                self._controllers = []
        return self._controllers

    def __enter__(self) -> None:
        with self._lock:
            self._active += 1
            if self._active == 1:
                self._saved = [(c, c.num_threads) for c in self._blas()]
                for c, n in self._saved:
                    if n != 1:
                        c.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                for c, n in self._saved:
                    if n != 1:
                        c.set_num_threads(n)


single_threaded_blas = SingleThreadedBlas()


def parallel_native(fn_addr: int, kinds: str, rows, scratch_col: int = -1,
                    scratch_floats: int = 0) -> bool:  # fmt: skip
    """Run the native kernel at fn_addr once per argument row, in parallel on the native pool
    (runtime.native_pool: ~1 us per dispatch against ~50 us for parallel_for). kinds: one
    letter per argument, 'i' (pointer / integer) or 'f' (float32, as native_pool.float_bits).
    scratch_col >= 0: that column of each row is replaced by a per-task scratch buffer of
    scratch_floats floats. Returns False, having run nothing, when the native pool is disabled
    (SPARSEDNN_NATIVE_POOL=0, not x86-64 Linux, failed to start) or in use by another thread:
    the caller then runs its tasks with parallel_for."""
    return _native_pool().run_kernel(fn_addr, kinds, rows, scratch_col, scratch_floats)


def native_pool_active() -> bool:
    """Whether parallel_native dispatches through the native pool (~1 us per hand-off instead
    of parallel_for's ~50 us): kernels then use their lower "worth another thread"
    thresholds."""
    return _native_pool().get_pool() is not None


def _native_pool():
    """runtime.native_pool, imported on first use (it imports this module), then kept: these
    helpers run on every kernel call."""
    global _NATIVE_POOL
    if _NATIVE_POOL is None:
        from sparsednn.runtime import native_pool

        _NATIVE_POOL = native_pool
    return _NATIVE_POOL


_NATIVE_POOL = None
