"""The kernels' native entry points (sparsednn.codegen.pyentry): the same bits as the Python
path for every call shape they take (one thread, the pool, the SpMV variant), the same probe,
and every call they should not take left to the Python path and its errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsednn.codegen import pyentry
from sparsednn.codegen.spmm import SparseLinearKernel, compile_sparse_linear
from sparsednn.errors import InvalidInputError
from sparsednn.runtime.threads import native_pool_active, thread_scratch

pytestmark = pytest.mark.skipif(not pyentry.available(), reason="no native entry points here")


@pytest.fixture(autouse=True)
def always_split_threads(monkeypatch):
    """Small problems would run on one thread: split them anyway, so that num_threads=2 takes
    the pool."""
    monkeypatch.setattr(SparseLinearKernel, "_NS_PER_EXTRA_THREAD", 0)


def sparse_weight(rng, k, n, sparsity):
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) < sparsity] = 0
    return w


def pair(weight, bias=None, activation="none"):
    """A kernel, and its twin without an entry point: the Python path it stands in for."""
    twin = compile_sparse_linear(weight, bias, activation)
    twin._entry = None
    return compile_sparse_linear(weight, bias, activation), twin


def plan(kernel, x, num_threads):
    """Run the call through the Python path, which teaches the entry point its shape."""
    kernel._run(x, None, num_threads)


def entry_ran(kernel, x, out, num_threads):
    return kernel._entry.call(x, out, num_threads, thread_scratch(kernel._entry_floats))


def test_the_layout_checks_hold_in_this_interpreter():
    assert pyentry.available()
    kernel = compile_sparse_linear(np.eye(16, dtype=np.float32))
    assert kernel._entry is not None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 300),
    n=st.integers(1, 200),
    m=st.sampled_from([1, 3, 8, 9, 17, 64, 65, 128, 200]),
    sparsity=st.sampled_from([0.5, 0.9, 0.98, 1.0]),
    activation=st.sampled_from(["none", "relu", "gelu"]),
    bias=st.booleans(),
    num_threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_entry_point_gives_the_python_paths_bits(k, n, m, sparsity, activation, bias,
                                                 num_threads, seed):  # fmt: skip
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    kernel, twin = pair(sparse_weight(rng, k, n, sparsity), b, activation)
    x = rng.standard_normal((m, k)).astype(np.float32)
    want, want_probe = twin.call_and_probe(x, num_threads=num_threads)
    plan(kernel, x, num_threads)
    got, probe = kernel.call_and_probe(x, num_threads=num_threads)
    assert np.array_equal(got, want, equal_nan=True)
    assert probe == want_probe
    out = np.full((m, n), np.nan, np.float32)
    ran = entry_ran(kernel, x, out, num_threads)
    if num_threads == 1 or native_pool_active():
        assert ran is not None
        assert np.array_equal(out, want, equal_nan=True)
    assert np.array_equal(kernel(x, num_threads=num_threads), want, equal_nan=True)


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("m", [5, 64, 130])
def test_entry_point_probes_the_input(m, num_threads):
    rng = np.random.default_rng(m)
    kernel = compile_sparse_linear(sparse_weight(rng, 96, 80, 0.9))
    x = rng.standard_normal((m, 96)).astype(np.float32)
    plan(kernel, x, num_threads)
    spmv = m <= kernel.spmv_max_m
    taken = num_threads == 1 or native_pool_active()  # (else the Python path splits calls)
    ran = entry_ran(kernel, x, np.empty((m, 80), np.float32), num_threads)
    assert ran == ((2 if spmv else 1) if taken else None)
    assert kernel.call_and_probe(x, num_threads=num_threads)[1] is (None if spmv else False)
    for bad in (np.nan, np.inf, -np.inf):
        for row in (0, m - 1):
            x2 = x.copy()
            x2[row, 7] = bad
            _, probe = kernel.call_and_probe(x2, num_threads=num_threads)
            assert probe is (None if spmv else True)
            ran = entry_ran(kernel, x2, np.empty((m, 80), np.float32), num_threads)
            assert ran == ((2 if spmv else 0) if taken else None)
    assert kernel.call_and_probe(x, num_threads=num_threads)[1] is (None if spmv else False)


class Subclass(np.ndarray):
    pass


def test_calls_it_should_not_take_reach_the_checks(monkeypatch):
    # (the real "worth another thread" rule: split always, 2**70 threads would be asked for)
    monkeypatch.setattr(SparseLinearKernel, "_NS_PER_EXTRA_THREAD", 100_000)
    rng = np.random.default_rng(1)
    kernel = compile_sparse_linear(sparse_weight(rng, 64, 48, 0.9))
    x = rng.standard_normal((70, 64)).astype(np.float32)
    want = kernel(x)
    out = np.empty((70, 48), np.float32)
    assert entry_ran(kernel, x, out, 1) == 1  # the shape is known now
    call = kernel._entry.call
    scratch = thread_scratch(kernel._entry_floats)
    for args in [(), (x, out, 1), (x, out, 1, scratch, 0), (x.tolist(), out, 1, scratch),
                 (x, out.tolist(), 1, scratch), (x, out, 1.0, scratch), (x, out, True, scratch),
                 (x, out, 0, scratch), (x, out, -3, scratch), (x, out, 2**70, scratch),
                 (x, out, 1, 0), (x, out, 1, -(2**70)), (x.astype(np.float64), out, 1, scratch),
                 (x[:, :32], out, 1, scratch), (x[::2], out[:35], 1, scratch),
                 (x[:, ::2].copy(), out, 1, scratch), (x, out[:, :47], 1, scratch),
                 (x, out[:69], 1, scratch), (x, out.astype(np.float64), 1, scratch),
                 (x, out.T.copy().T, 1, scratch), (x.byteswap().view(x.dtype.newbyteorder()),
                                                   out, 1, scratch),
                 (np.empty((0, 64), np.float32), np.empty((0, 48), np.float32), 1, scratch),
                 (x.view(Subclass), out, 1, scratch), (x, out.view(Subclass), 1, scratch)]:  # fmt: skip
        assert call(*args) is None, args
    assert np.array_equal(kernel(x), want)  # (no error left set by an overflow)
    read_only = np.empty((70, 48), np.float32)
    read_only.flags.writeable = False
    assert call(x, read_only, 1, scratch) is None
    with pytest.raises(InvalidInputError, match="writable"):
        kernel(x, out=read_only)
    both = np.empty(70 * 64 + 70 * 48, np.float32)
    xa = both[: 70 * 64].reshape(70, 64)
    xa[:] = x
    overlapping = both[64 * 10 : 64 * 10 + 70 * 48].reshape(70, 48)
    assert call(xa, overlapping, 1, scratch) is None
    with pytest.raises(InvalidInputError, match="overlap"):
        kernel(xa, out=overlapping)
    with pytest.raises(InvalidInputError, match="num_threads"):
        kernel(x, num_threads=0)
    with pytest.raises(InvalidInputError, match="dtype"):
        kernel(x.astype(np.float64))
    assert np.array_equal(kernel(x, num_threads=True), want)
    assert np.array_equal(kernel(x, num_threads=np.int64(2)), want)
    assert np.array_equal(kernel(np.asfortranarray(x)), want)  # (copied by the checks)
    for _ in range(2):  # (a num_threads the entry point does not take: the Python path)
        assert np.array_equal(kernel(x, num_threads=2**70), want)
    with pytest.raises(InvalidInputError, match="input shape"):  # (no output allocated first)
        kernel(np.broadcast_to(np.float32(0), (10**12, 63)))
    with pytest.raises(InvalidInputError, match="dtype"):
        kernel(np.broadcast_to(np.float64(0), (10**12, 64)))


def test_references_are_neither_leaked_nor_lost():
    rng = np.random.default_rng(2)
    kernel = compile_sparse_linear(sparse_weight(rng, 64, 48, 0.9))
    x = rng.standard_normal((70, 64)).astype(np.float32)
    out = np.empty((70, 48), np.float32)
    kernel(x, out=out)
    before = [sys.getrefcount(o) for o in (x, out, kernel._entry.desc, None, 0, 1, 2)]
    for _ in range(1000):
        kernel(x, out=out)
        kernel.call_and_probe(x, out=out)
    after = [sys.getrefcount(o) for o in (x, out, kernel._entry.desc, None, 0, 1, 2)]
    assert after[:3] == before[:3]
    assert all(abs(a - b) < 50 for a, b in zip(after[3:], before[3:]))  # (not +2000)


def test_more_call_shapes_than_the_table_holds(monkeypatch):
    rng = np.random.default_rng(3)
    w = sparse_weight(rng, 40, 24, 0.8)
    kernel = compile_sparse_linear(w)
    tries = []
    add_plan = kernel._entry.add_plan
    monkeypatch.setattr(
        kernel._entry, "add_plan", lambda *a, **k: tries.append(a) or add_plan(*a, **k)
    )
    shapes = range(9, 9 + 2 * pyentry.TABLE)
    for m in shapes:
        x = rng.standard_normal((m, 40)).astype(np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64)
        for _ in range(3):
            np.testing.assert_allclose(kernel(x), want, rtol=1e-5, atol=1e-4)
    assert np.count_nonzero(kernel._entry.desc[pyentry.D_TABLE :]) == pyentry.TABLE
    assert kernel._entry.full
    assert len(tries) == pyentry.TABLE  # (a shape past a full table is not tried again)


def test_entry_points_outlive_the_module_state():
    """Builtin functions read their method definition on every call: it must outlive the
    module's globals (cleared at exit, replaced by a reload)."""
    code = textwrap.dedent("""
        import gc, importlib, ctypes
        import numpy as np
        from sparsednn.codegen import pyentry
        from sparsednn.codegen.spmm import compile_sparse_linear
        rng = np.random.default_rng(0)
        w = rng.standard_normal((64, 48)).astype(np.float32)
        k = compile_sparse_linear(w)
        x = rng.standard_normal((20, 64)).astype(np.float32)
        want = k(x)
        call = k._entry.call
        importlib.reload(pyentry)
        del k
        gc.collect()
        junk = [ctypes.create_string_buffer(b"A" * 31) for _ in range(20000)]
        out = np.empty((20, 48), np.float32)
        from sparsednn.runtime.threads import thread_scratch
        assert call(x, out, 1, thread_scratch(1 << 16)) == 1  # (its plan, arrays and code too)
        assert np.array_equal(out, want)
        print("ok")
    """)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_threads_calling_one_kernel_on_the_pool_at_once():
    """Callers that find the pool taken (by another entry point or the Python path) run
    their call another way: every result is right."""
    rng = np.random.default_rng(4)
    w = sparse_weight(rng, 128, 96, 0.9)
    kernel, twin = pair(w)
    inputs = [rng.standard_normal((130, 128)).astype(np.float32) for _ in range(4)]
    wants = [twin(x, num_threads=2) for x in inputs]
    errors = []

    def work(i):
        try:
            out = np.empty((130, 96), np.float32)
            for _ in range(200):
                kernel(inputs[i], out=out, num_threads=2)
                if not np.array_equal(out, wants[i]):
                    errors.append(i)
                    return
        except Exception as e:  # noqa: BLE001 - any failure in a worker is reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_calls_after_the_pool_stopped():
    """The pool stops at exit: entry points then leave two-thread calls to the Python path."""
    code = textwrap.dedent("""
        import numpy as np
        from sparsednn.codegen.spmm import SparseLinearKernel, compile_sparse_linear
        from sparsednn.runtime import native_pool
        SparseLinearKernel._NS_PER_EXTRA_THREAD = 0
        rng = np.random.default_rng(0)
        w = rng.standard_normal((128, 96)).astype(np.float32)
        w[rng.random(w.shape) < 0.9] = 0
        k = compile_sparse_linear(w)
        x = rng.standard_normal((130, 128)).astype(np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64)
        for _ in range(3):
            np.testing.assert_allclose(k(x, num_threads=2), want, rtol=1e-4, atol=1e-4)
        native_pool.shutdown()
        for _ in range(3):
            np.testing.assert_allclose(k(x, num_threads=2), want, rtol=1e-4, atol=1e-4)
        print("ok")
    """)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
