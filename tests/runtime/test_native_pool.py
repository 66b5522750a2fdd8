"""The native worker pool (runtime.native_pool) and the kernels dispatched through it."""

import ctypes
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from sparsednn.runtime import native_pool

pool = native_pool.get_pool()
needs_pool = pytest.mark.skipif(pool is None, reason="native pool disabled or unsupported")


def _gettids(n):
    ctx = np.zeros(1 + n, np.int64)
    ctx[0] = pool.syscall_addr
    assert native_pool.run_tasks(pool.gettid_task, ctx.ctypes.data, n)
    return ctx[1:]


@needs_pool
def test_every_task_runs_once_for_many_counts():
    for n in list(range(1, 40)) + [100, 255]:
        tids = _gettids(n)
        assert (tids > 0).all(), n


@needs_pool
def test_tasks_run_on_several_os_threads():
    if pool.n_workers < 1:
        pytest.skip("one core")
    seen = set()
    for _ in range(200):
        seen |= set(_gettids(8).tolist())
        if len(seen) > 1:
            break
    assert len(seen) > 1


@needs_pool
def test_too_many_tasks_is_refused():
    assert not native_pool.run_tasks(pool.noop_task, 0, 256)
    assert not native_pool.run_kernel(0, "i", np.zeros((0, 1), np.int64))


@needs_pool
def test_a_dispatch_waits_for_nothing_while_the_pool_is_owned():
    """While a native caller owns the pool (pool_try_lock, as the kernels' entry points do),
    Python's dispatches run nothing and say so; once it lets go, they run again."""
    assert pool._try_lock(pool.state_addr) == 1
    try:
        assert pool._try_lock(pool.state_addr) == 0  # (one owner at a time)
        ctx = np.zeros(3, np.int64)
        ctx[0] = pool.syscall_addr
        assert not native_pool.run_tasks(pool.gettid_task, ctx.ctypes.data, 2)
        assert (ctx[1:] == 0).all()
    finally:
        ctypes.CFUNCTYPE(None, ctypes.c_void_p)(pool.unlock_addr)(pool.state_addr)
    assert (_gettids(2) > 0).all()


@needs_pool
def test_stress_100k_dispatches():
    t0 = time.perf_counter()
    for i in range(100_000):
        assert native_pool.run_tasks(pool.noop_task, 0, 1 + i % 3)
    assert time.perf_counter() - t0 < 60


@needs_pool
def test_concurrent_dispatchers():
    errors = []

    def work():
        try:
            for _ in range(300):
                n = 5
                ctx = np.zeros(1 + n, np.int64)
                ctx[0] = pool.syscall_addr
                if native_pool.run_tasks(pool.gettid_task, ctx.ctypes.data, n):
                    assert (ctx[1:] > 0).all()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)


def _cpu_seconds():
    f = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


@needs_pool
def test_idle_pool_uses_no_cpu():
    for _ in range(100):
        native_pool.run_tasks(pool.noop_task, 0, 2)
    time.sleep(0.1)
    c0 = _cpu_seconds()
    time.sleep(1.0)
    assert _cpu_seconds() - c0 < 0.1


def _kernels_outputs(num_threads):
    from sparsednn.codegen.attention import compile_attention
    from sparsednn.codegen.norm import compile_layer_norm
    from sparsednn.codegen.spmm import compile_sparse_linear

    rng = np.random.default_rng(1)
    outs = []
    w = rng.standard_normal((384, 512)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    b = rng.standard_normal(512).astype(np.float32)
    kern = compile_sparse_linear(w, b, "gelu")
    for m in (1, 4, 8, 17, 64, 200, 512):
        x = rng.standard_normal((m, 384)).astype(np.float32)
        outs.append(kern(x, num_threads=num_threads))
    att = compile_attention(4, 32)
    q = rng.standard_normal((3, 70, 128)).astype(np.float32)
    k = rng.standard_normal((3, 70, 128)).astype(np.float32)
    v = rng.standard_normal((3, 70, 128)).astype(np.float32)
    mask = np.where(rng.random((3, 1, 1, 70)) < 0.2, -1e4, 0).astype(np.float32)
    outs.append(att(q, k, v, mask, scale=0.17, num_threads=num_threads))
    ln = compile_layer_norm(256, residual=True)
    a = rng.standard_normal((300, 256)).astype(np.float32)
    r = rng.standard_normal((300, 256)).astype(np.float32)
    g = rng.standard_normal(256).astype(np.float32)
    be = rng.standard_normal(256).astype(np.float32)
    outs.append(ln(a, r, scale=g, bias=be, epsilon=1e-5, num_threads=num_threads))
    return outs


@needs_pool
def test_kernels_through_the_pool_match_serial(monkeypatch):
    from sparsednn.codegen import attention, norm, spmm

    serial = _kernels_outputs(1)
    # every split taken, however small the work
    monkeypatch.setattr(spmm.SparseLinearKernel, "_NS_PER_EXTRA_THREAD", 1)
    monkeypatch.setattr(attention, "_FLOPS_PER_EXTRA_THREAD", 1.0)
    monkeypatch.setattr(norm, "_ELEMENTS_PER_EXTRA_THREAD", 1)
    calls = []
    real = native_pool.run_kernel
    monkeypatch.setattr(
        native_pool, "run_kernel", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    real_prepared = native_pool.PreparedDispatch.run
    monkeypatch.setattr(native_pool.PreparedDispatch, "run",
                        lambda self, v: calls.append(self._kinds) or real_prepared(self, v))  # fmt: skip
    for threads in (2, 3, 5):
        for s, p in zip(serial, _kernels_outputs(threads)):
            np.testing.assert_array_equal(s, p)
    kinds = set(calls)
    assert spmm._KERNEL_KINDS in kinds and spmm._SPMV_KINDS in kinds and len(kinds) >= 4, kinds


@pytest.mark.skipif(
    not (native_pool.supported() and native_pool.enabled_by_env()) or (os.cpu_count() or 1) < 2,
    reason="the pool runs on x86-64 Linux with two or more cores unless switched off",
)
def test_pool_starts_where_supported():
    """Where it is supported the pool must start: a failure to start (e.g. two kernels' argument
    kinds making one trampoline twice) is swallowed at run time, and would only make every
    other test here skip while the kernels fall back to the slow Python pool."""
    assert pool is not None
    assert len(set(native_pool.known_kinds())) == len(native_pool.known_kinds())


def test_disabled_pool_falls_back():
    code = (
        "import numpy as np\n"
        "from sparsednn.runtime import native_pool, threads\n"
        "assert native_pool.get_pool() is None\n"
        "assert not threads.parallel_native(0, 'i', np.zeros((2, 1), np.int64))\n"
        "from sparsednn.codegen.spmm import compile_sparse_linear\n"
        "w = np.eye(64, dtype=np.float32)\n"
        "x = np.ones((256, 64), np.float32)\n"
        "assert (compile_sparse_linear(w)(x, num_threads=2) == x).all()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SPARSEDNN_NATIVE_POOL="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_interpreter_exits_with_the_pool_running():
    code = (
        "from sparsednn.runtime import native_pool\n"
        "p = native_pool.get_pool()\n"
        "print('ok' if p is None or native_pool.run_tasks(p.noop_task, 0, 3) else 'busy')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@needs_pool
def test_long_tasks_let_the_dispatcher_sleep():
    """A task longer than the spin budget: the dispatcher sleeps on a futex (little CPU) and
    is woken when the workers finish."""
    import ctypes

    usleep = ctypes.cast(ctypes.CDLL(None).usleep, ctypes.c_void_p).value
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(3):
        assert native_pool.run_kernel(usleep, "i", [(100,), (200_000,), (200_000,)])
    wall = time.perf_counter() - t0
    assert wall >= 0.4
    assert _cpu_seconds() - c0 < 0.25 * wall


@needs_pool
def test_workers_spin_longer_only_while_sessions_run():
    """native_pool.running raises the spin budget for as long as any run is inside it, and
    the last one out restores it (idle workers sleep again)."""
    hz = pool._hz
    short, long_ = (int(us * 1e-6 * hz) for us in (native_pool.SPIN_US, native_pool.RUN_SPIN_US))
    spin = pool.P.SPIN
    assert pool.state[spin] == short
    with native_pool.running:
        assert pool.state[spin] == long_
        with native_pool.running:  # a second session's run, or a nested one
            assert pool.state[spin] == long_
        assert pool.state[spin] == long_
    assert pool.state[spin] == short

    inside, release = threading.Barrier(3), threading.Event()

    def run():
        with native_pool.running:
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert pool.state[spin] == long_
    release.set()
    for t in threads:
        t.join()
    assert pool.state[spin] == short


@needs_pool
def test_prepared_dispatch_follows_scratch_reallocations():
    """A PreparedDispatch keeps its argument block between calls, scratch addresses included:
    when another dispatch grows the pool's scratch buffers (freeing the old ones), it must
    set the block up again, not hand kernels freed memory."""
    from sparsednn.codegen.spmm import _KERNEL_KINDS, compile_sparse_linear

    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    kern = compile_sparse_linear(w, None, "none")
    x = rng.standard_normal((128, 64)).astype(np.float32)
    want = kern(x)
    y = np.zeros((128, 48), np.float32)
    probe = np.zeros(2, np.float32)
    rows = [(0, 64, 0, 0, 48, *kern._ptrs, 0, 0, 0)] * 2
    d = native_pool.PreparedDispatch(kern._fn_addr, _KERNEL_KINDS, rows, 8, kern._scratch_full,
                                     varying=(0, 2, 9))  # fmt: skip

    def run():
        y[:] = 0
        values = [x.ctypes.data, y.ctypes.data, probe.ctypes.data,
                  x.ctypes.data + 64 * 64 * 4, y.ctypes.data + 64 * 48 * 4, probe.ctypes.data + 4]
        assert d.run(values)
        np.testing.assert_array_equal(y, want)

    run()
    generation = pool.scratch_generation
    assert native_pool.run_kernel(pool.noop_task, "i", [(0,)] * 2, 0, 1 << 20)  # grows both
    assert pool.scratch_generation > generation
    run()
    assert d._generation == pool.scratch_generation
