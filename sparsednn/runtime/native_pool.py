"""A native, low-latency worker pool for the generated kernels.

The Python pool (threads.parallel_for) costs ~50 us per hand-off (futex wake-up plus the GIL).
Here each worker is a Python thread that calls, through ctypes, a JIT-compiled `worker_loop`
that only returns at shutdown (the GIL is released for its whole life): it spins on a
generation counter (with `pause`) for SPIN_US after its last task, then sleeps on a futex. The
dispatcher, `pool_run` (also native, called with the GIL released), publishes the task,
wakes sleeping workers, runs its own share and spins until the workers are done. Tasks are
`void task(i8* ctx, i64 index)`; generated trampolines (codegen/pool.py) turn a row of i64
arguments per task into a call of an existing kernel.

    ok = run_kernel(fn_addr, "iiif", rows, scratch_col=5, scratch_floats=n)

runs kernel(rows[i]) for every row i (in parallel) and returns True, or returns False without
running anything (pool disabled or busy): the caller then uses threads.parallel_for.

Concurrency: one dispatch at a time. A second Python thread that wants the pool while it is
in use does not wait: run_kernel returns False and that caller runs its tasks through the
Python pool (no deadlock, no convoy behind a long kernel). All validation happens in Python
before the dispatch (exceptions cannot cross native code). Python's dispatches hold
_dispatch_lock while they set up, and the pool's own lock word (pool_try_lock, in pool_run)
while they run; the kernels' native entry points (codegen/pyentry.py) take only the latter.

Scratch: kernels that take a per-thread scratch buffer get, in column `scratch_col`, the
address of the pool's buffer for the task's slot (task i uses slot i); slots are only used
while the pool's lock is held, and a buffer a slot outgrows is kept (an entry point's plan may
still point at it).

Enabled on x86-64 Linux unless SPARSEDNN_NATIVE_POOL=0; any failure to start leaves it off.
Workers stop at interpreter exit (atexit: stop flag, futex wake, join).
"""

from __future__ import annotations

import array
import atexit
import ctypes
import itertools
import os
import platform
import struct
import sys
import threading
import time

import numpy as np

from sparsednn.runtime.threads import aligned_floats

# a worker spins this long after its last task before sleeping on a futex (so does the
# dispatcher waiting for its workers). bert-base-90, batch 1, 2 threads: 100 us gave 18.7 ms
# on a quiet machine but 37.5 ms beside a CPU-bound process (parallel_for: 33 ms); 20 us
# gave 19.4 ms quiet and 25.5-27.4 ms beside it.
SPIN_US = float(os.environ.get("SPARSEDNN_POOL_SPIN_US", "20"))
# ... and this long while a session runs (see running()): the gaps between a run's kernels
# (Python between nodes, numpy ops) are tens of microseconds, and a worker that has fallen
# asleep costs ~30 us to wake (measured: 768x768 at M=128, 2 threads, 72 -> 101 us with a 50 us
# gap). bert-base-90 batch 1, 2 threads, alternating in one process: 24.6 ms at 20 us,
# 21.1 ms at 100, 300 or 1000 us.
RUN_SPIN_US = float(os.environ.get("SPARSEDNN_POOL_RUN_SPIN_US", "300"))

_init_lock = threading.Lock()
_dispatch_lock = threading.Lock()
_pool: _NativePool | None = None
_failed = False
_pack_f32 = struct.Struct("<f").pack
_unpack_u32 = struct.Struct("<I").unpack


def enabled_by_env() -> bool:
    return os.environ.get("SPARSEDNN_NATIVE_POOL", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
        "",
    )


def supported() -> bool:
    return sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


class _NativePool:
    def __init__(self, n_workers: int):
        from sparsednn.codegen import jit
        from sparsednn.codegen import pool as P
        from sparsednn.codegen.target import host_target

        self.P = P
        self._tramps_init: dict = {}
        self.target = host_target()
        self.jm = self._compile(jit, P)
        addr = self.jm.function_address
        self.state_buf = np.zeros(P.STATE_WORDS + 16, np.int64)
        base = self.state_buf.ctypes.data
        off = (-base) % 64 // 8
        self.state = self.state_buf[off : off + P.STATE_WORDS]
        self.state_addr = self.state.ctypes.data
        self.syscall_addr = ctypes.cast(ctypes.CDLL(None).syscall, ctypes.c_void_p).value
        self.read_tsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr("read_tsc"))
        self.n_workers = n_workers
        self.state[P.NWORKERS] = n_workers
        self.state[P.SYSCALL] = self.syscall_addr
        self._hz = self._tsc_hz()
        self.set_spin_us(SPIN_US)
        self._run = ctypes.CFUNCTYPE(
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64
        )(addr("pool_run"))
        # for native callers that hold the pool across their own steps (codegen/pyentry.py)
        self.try_lock_addr = addr("pool_try_lock")
        self.dispatch_addr = addr("pool_dispatch")
        self.unlock_addr = addr("pool_unlock")
        self._try_lock = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(self.try_lock_addr)
        self._stop = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addr("pool_stop"))
        self._loop = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(addr("worker_loop"))
        self.noop_task = addr("noop_task")
        self.gettid_task = addr("gettid_task")
        self._tramps: dict = dict(self._tramps_init)
        self._scratch: list = []
        # buffers a slot outgrew: native entry points may still hold their addresses (their
        # plans are built once), so they stay allocated
        self._retired: list = []
        self.scratch_generation = 0  # counts reallocations of the slots' buffers
        self.threads = [
            threading.Thread(
                target=self._loop,
                args=(self.state_addr, w),
                daemon=True,
                name=f"sparsednn-native-{w}",
            )  # fmt: skip
            for w in range(n_workers)
        ]
        for t in self.threads:
            t.start()
        self.stopped = False

    def _compile(self, jit, P):
        """The pool's module with the trampolines of the known kernels, through the kernel
        cache (so a process whose kernels all come from the cache runs no LLVM for it)."""
        from pathlib import Path

        from sparsednn.codegen import cache

        kinds = known_kinds()

        def emit():
            mod = jit.new_module("sparsednn_pool", self.target)
            P.emit_pool(mod)
            for k in kinds:
                P.emit_trampoline(mod, k)
            return mod

        t = self.target
        try:
            src = Path(P.__file__).read_bytes().hex()
        except OSError:  # pragma: no cover
            src = "pool"
        key = cache.digest("code", cache.code_version(), "native_pool", src, kinds,
                           t.cpu_name, t.features, t.isa, t.vector_width, t.triple)  # fmt: skip
        jm = jit.cached_module(key, t, emit, opt=2)
        for k in kinds:
            self._tramps_init[k] = (jm.function_address(f"tramp_{k}"), jm)
        return jm

    def _tsc_hz(self) -> float:
        t0, c0 = time.perf_counter(), self.read_tsc()
        time.sleep(0.005)
        t1, c1 = time.perf_counter(), self.read_tsc()
        hz = (c1 - c0) / max(t1 - t0, 1e-6)
        return hz if 1e8 < hz < 1e11 else 3e9

    def set_spin_us(self, us: float) -> None:
        """How long workers (and the dispatcher) spin before sleeping; read on every spin."""
        self.state[self.P.SPIN] = int(max(0.0, us) * 1e-6 * self._hz)

    def trampoline(self, kinds: str) -> int:
        a = self._tramps.get(kinds)
        if a is None:
            from sparsednn.codegen import jit

            mod = jit.new_module(f"sparsednn_tramp_{kinds}", self.target)
            name = self.P.emit_trampoline(mod, kinds)
            jm = jit.compile_module(mod, self.target, opt=2)
            a = (jm.function_address(name), jm)
            self._tramps[kinds] = a
        return a[0]

    def scratch(self, slot: int, n_floats: int) -> int:
        while len(self._scratch) <= slot:
            self._scratch.append(None)
        s = self._scratch[slot]
        if s is None or s[1] < n_floats:
            if s is not None:
                self._retired.append(s)
            s = self._scratch[slot] = aligned_floats(n_floats)
            self.scratch_generation += 1
        return s[0]

    def run(self, task_addr: int, ctx_addr: int, n: int) -> bool:
        """task(ctx, i) for i in [0, n) on the pool; False (nothing run) while a native entry
        point's dispatch owns it."""
        return bool(self._run(self.state_addr, task_addr, ctx_addr, n))

    def shutdown(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        deadline = time.monotonic() + 5.0  # let a native dispatch in flight finish first
        while not self._try_lock(self.state_addr) and time.monotonic() < deadline:
            time.sleep(0.0005)
        # (the lock, if taken, stays held; and pool_try_lock fails from now on either way:
        # no dispatch starts after this, and one still running finishes its own tasks)
        self._stop(self.state_addr)
        for t in self.threads:
            t.join(timeout=5.0)


def known_kinds() -> tuple:
    """Argument kinds of the kernels dispatched through the pool (their trampolines are
    compiled with the pool, so that a run compiles none): sparse panel kernel, SpMV variant,
    attention, layer norm, dense GEMM, chained sparse kernels."""
    from sparsednn.codegen import attention, chain, gemm, norm, spmm

    kinds = (spmm._KERNEL_KINDS, spmm._SPMV_KINDS, attention._KINDS, norm._KINDS, gemm.GEMM_ARGS,
             chain._KINDS)  # fmt: skip
    return tuple(dict.fromkeys(kinds))  # one trampoline per signature (two may share one)


class _Running:
    """`with running():` keeps the workers spinning for RUN_SPIN_US (not SPIN_US) between
    tasks while any session runs; the last run to end sets the short budget back, so idle
    workers sleep again within SPIN_US of it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0

    def __enter__(self) -> None:
        p = _pool
        if p is None:
            return
        with self._lock:
            self._active += 1
            if self._active == 1:
                p.set_spin_us(RUN_SPIN_US)

    def __exit__(self, *exc) -> None:
        p = _pool
        if p is None:
            return
        with self._lock:
            self._active = max(0, self._active - 1)
            if self._active == 0:
                p.set_spin_us(SPIN_US)


running = _Running()


def prepare() -> None:
    """Start the pool now (sessions call this when they are created, so running one compiles
    nothing; kernels used on their own start it on first use); errors leave the pool off."""
    try:
        get_pool()
    except Exception:  # pragma: no cover
        pass


def get_pool() -> _NativePool | None:
    """The process's native pool (started on first use), or None when disabled/unsupported."""
    global _pool, _failed
    if _pool is not None:
        return _pool
    if _failed or not supported() or not enabled_by_env():
        return None
    with _init_lock:
        if _pool is None and not _failed:
            try:
                from sparsednn.runtime.threads import default_num_threads

                _pool = _NativePool(max(1, default_num_threads() - 1))
                atexit.register(shutdown)
            except Exception:  # any failure: the Python pool stays in charge
                _failed = True
                return None
    return _pool


def shutdown() -> None:
    """Stop and join the workers (at exit; the pool is not restarted afterwards)."""
    global _pool, _failed
    with _init_lock:
        p = _pool
        if p is not None:
            with _dispatch_lock:
                p.shutdown()
            _pool = None
            _failed = True


def _acquire(n: int) -> _NativePool | None:
    """The pool with the dispatch lock held, for a dispatch of n tasks (the caller releases
    the lock); None, holding nothing, when the pool is disabled, stopped or busy, or n is out
    of range."""
    p = _pool or get_pool()
    if p is None or not 1 <= n <= 255 or not _dispatch_lock.acquire(blocking=False):
        return None
    if p.stopped:
        _dispatch_lock.release()
        return None
    return p


def _argument_block(p: _NativePool, head, width: int, scratch_col: int,
                    scratch_floats: int) -> array.array:
    """ctx of a dispatch: [kernel address, row 0, row 1, ...] as i64 (array.array: ~1 us for
    a few rows), with column scratch_col (if >= 0) of each row set to its task's scratch
    buffer of at least scratch_floats floats."""
    ctx = array.array("q", head)
    if scratch_col >= 0:
        for i in range((len(ctx) - 1) // width):
            ctx[1 + i * width + scratch_col] = p.scratch(i, scratch_floats)
    return ctx


class PreparedDispatch:
    """run_kernel for rows of arguments that repeat from call to call but for a few columns
    (buffer addresses): the argument block, trampoline and scratch addresses are set up once
    (again only if the pool or its scratch buffers change), and a call writes those columns
    and dispatches. A two-thread 768x768 kernel call at 128 tokens spent ~5.7 us in Python
    with run_kernel, a third of a one-thread call's time; see SparseLinearKernel._run."""

    def __init__(self, fn_addr: int, kinds: str, rows, scratch_col: int = -1,
                 scratch_floats: int = 0, varying: tuple = ()):  # fmt: skip
        self.n = len(rows)
        if any(len(r) != len(kinds) for r in rows):
            raise ValueError(f"PreparedDispatch: rows must have {len(kinds)} arguments each")
        self._head = [fn_addr, *itertools.chain.from_iterable(rows)]
        self._kinds, self._scratch_col, self._scratch_floats = kinds, scratch_col, scratch_floats
        # ctx positions written by each call, task by task, column by column of `varying`
        self.positions = [1 + i * len(kinds) + c for i in range(self.n) for c in varying]
        self._pool = None
        self._generation = -1

    def _build(self, p: _NativePool) -> None:
        ctx = _argument_block(p, self._head, len(self._kinds), self._scratch_col,
                              self._scratch_floats)  # fmt: skip
        self._ctx, self._ctx_addr = ctx, ctx.buffer_info()[0]
        self._tramp = p.trampoline(self._kinds)
        self._pool, self._generation = p, p.scratch_generation

    def native_copy(self):
        """(pool, trampoline address, a new argument block of these rows) for a native caller
        that dispatches them itself (codegen/pyentry.py: it owns the pool through
        pool_try_lock while it writes the varying columns and runs), or None: the pool is off
        or busy now."""
        p = _acquire(self.n)
        if p is None:
            return None
        try:
            ctx = _argument_block(p, self._head, len(self._kinds), self._scratch_col,
                                  self._scratch_floats)  # fmt: skip
            return p, p.trampoline(self._kinds), ctx
        finally:
            _dispatch_lock.release()

    def run(self, values) -> bool:
        """The kernel over every row, the varying columns set to `values` (task by task);
        False (nothing run) if the pool is disabled or busy."""
        p = _acquire(self.n)
        if p is None:
            return False
        try:
            if p is not self._pool or p.scratch_generation != self._generation:
                self._build(p)
            ctx = self._ctx
            for i, v in zip(self.positions, values):
                ctx[i] = v
            return p.run(self._tramp, self._ctx_addr, self.n)
        finally:
            _dispatch_lock.release()


def run_tasks(task_addr: int, ctx_addr: int, n: int) -> bool:
    """Run native task(ctx, i) for i in [0, n) on the pool; False if disabled or busy."""
    p = _acquire(n)
    if p is None:
        return False
    try:
        return p.run(task_addr, ctx_addr, n)
    finally:
        _dispatch_lock.release()


def float_bits(x: float) -> int:
    """A float32 argument as stored in an argument row (its bits in the low 32 bits)."""
    return _unpack_u32(_pack_f32(x))[0]


def run_kernel(fn_addr: int, kinds: str, rows, scratch_col: int = -1,
               scratch_floats: int = 0) -> bool:  # fmt: skip
    """kernel(*rows[i]) for every row, in parallel on the pool; False (nothing run) if the
    pool is disabled or busy. kinds: one letter per argument, 'i' (pointer or integer) or 'f'
    (float32: float_bits in the row). scratch_col >= 0: that column is set to the task's
    scratch buffer of at least scratch_floats floats."""
    n = len(rows)
    p = _acquire(n)
    if p is None:
        return False
    try:
        tramp = p.trampoline(kinds)
        ctx = _argument_block(p, itertools.chain([fn_addr], *rows), len(kinds), scratch_col,
                              scratch_floats)  # fmt: skip
        if len(ctx) != 1 + n * len(kinds):
            raise ValueError(f"run_kernel: rows must have {len(kinds)} arguments each")
        return p.run(tramp, ctx.buffer_info()[0], n)
    finally:
        _dispatch_lock.release()
