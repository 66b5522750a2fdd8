"""The worker threads that run native kernels in parallel.

Native kernels are called through ctypes, which releases the GIL for the length of the call,
so plain Python threads run them truly in parallel. One pool per process, grown on demand.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


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
