"""Targets (host detection, forced lower ISAs) and the JIT (compile, link, dump, errors)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from llvmlite import ir

from sparsednn.codegen import irutil as U
from sparsednn.codegen import jit
from sparsednn.codegen.target import (
    ISA_ENV_VAR,
    available_isas,
    host_target,
    last_level_cache_bytes,
)
from sparsednn.errors import CompileError


def test_host_target_is_read_once_and_cached():
    assert host_target() is host_target()
    t = host_target()
    assert t.isa in ("avx512", "avx2", "generic")
    assert t.vector_width == {"avx512": 16, "avx2": 8, "generic": 4}[t.isa]
    assert t.features.count(",") > 10  # the explicit host feature list, not ""
    assert "Target(" in repr(t) and t.isa in repr(t)


def test_last_level_cache_from_sysfs(tmp_path):
    """The largest cache CPU 0's sysfs lists (K/M suffixes; entries it cannot parse skipped),
    32 MB when it lists none."""
    read = last_level_cache_bytes.__wrapped__  # (uncached)
    assert read(str(tmp_path / "missing")) == 32 << 20
    for index, size in enumerate(("48K", "junk", "1024K", "4M", "")):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    (tmp_path / "uevent").write_text("")
    assert read(str(tmp_path)) == 4 << 20
    (tmp_path / "index3" / "size").write_text("32768K\n")
    assert read(str(tmp_path)) == 32 << 20
    assert last_level_cache_bytes() >= 1 << 20  # this host's


@pytest.mark.parametrize("isa", available_isas())
def test_forcing_an_isa_by_environment(monkeypatch, isa):
    monkeypatch.setenv(ISA_ENV_VAR, isa)
    t = host_target()
    assert t.isa == isa and t == host_target(isa)
    feats = {f[1:]: f[0] == "+" for f in t.features.split(",")}
    if isa == "avx2":
        assert feats["avx2"] and feats["fma"]
        assert not any(on for name, on in feats.items() if name.startswith("avx512"))
    if isa == "generic":
        assert not any(on for name, on in feats.items() if name.startswith("avx") or name == "fma")
        assert feats.get("sse2", True)


def test_unknown_isa_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown ISA"):
        host_target("neon")
    monkeypatch.setenv(ISA_ENV_VAR, "sse9")
    with pytest.raises(ValueError, match="unknown ISA"):
        host_target()


def _axpy_module(target):
    """void axpy(float *y, const float *x, float a, int64 n): y += a * x (vectors + scalar tail)."""
    mod = jit.new_module("axpy", target)
    fn = ir.Function(
        mod, ir.FunctionType(U.void, [U.f32_ptr, U.f32_ptr, U.f32, U.i64]), name="axpy"
    )
    y, x, a, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    m = U.Math(b, U.f32, target.has_fma)
    with U.for_range(b, 0, n, name="i") as i:
        yp = U.gep(b, y, i)
        b.store(m.fma(a, b.load(U.gep(b, x, i)), b.load(yp)), yp)
    b.ret_void()
    return mod


@pytest.mark.parametrize("isa", available_isas())
def test_compile_run_and_dump(isa):
    target = host_target(isa)
    jm = jit.compile_module(_axpy_module(target), target)
    f = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64)(
        jm.function_address("axpy")
    )
    x = np.arange(37, dtype=np.float32)
    y = np.ones(37, dtype=np.float32)
    f(y.ctypes.data, x.ctypes.data, 2.0, 37)
    np.testing.assert_array_equal(y, 1 + 2 * x)
    assert "define void @axpy(" in jm.llvm_ir
    assert "axpy:" in jm.asm
    assert jm.compile_seconds > 0
    with pytest.raises(CompileError, match="no function named"):
        jm.function_address("nope")


def _scale_module(target, name: str, factor: float):
    """void <name>(float *y, int64 n): y *= factor."""
    mod = jit.new_module(name, target)
    fn = ir.Function(mod, ir.FunctionType(U.void, [U.f32_ptr, U.i64]), name=name)
    y, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    with U.for_range(b, 0, n, name="i") as i:
        yp = U.gep(b, y, i)
        b.store(b.fmul(b.load(yp), ir.Constant(U.f32, factor)), yp)
    b.ret_void()
    return mod


def test_threads_compile_modules_at_once():
    """compile_module from several threads at once (each module in a context of its own,
    optimised and compiled on the thread's own target machine, without llvmlite's lock):
    every module's code is right, and the same as compiled alone."""
    import threading

    target = host_target()
    factors = [1.5 + i for i in range(8)]
    alone = jit.compile_module(_scale_module(target, "scale_alone", 2.0), target)
    results: dict = {}
    start = threading.Barrier(4)

    def work(t):
        start.wait()
        for i in range(t, len(factors), 4):
            results[i] = jit.compile_module(_scale_module(target, f"scale{i}", factors[i]), target)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sig = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)
    for i, factor in enumerate(factors):
        y = np.arange(21, dtype=np.float32)
        sig(results[i].function_address(f"scale{i}"))(y.ctypes.data, 21)
        np.testing.assert_array_equal(y, np.arange(21, dtype=np.float32) * np.float32(factor))
    assert "fmul" in results[3].llvm_ir and alone.compile_seconds > 0


def test_compiled_once_builds_each_key_once_across_threads():
    import threading
    import time

    cache = jit.CompiledOnce()
    builds = []

    def build(key):
        builds.append(key)
        time.sleep(0.02)  # (the other threads ask meanwhile)
        return f"code {key}"

    got = []
    threads = [threading.Thread(target=lambda k=k: got.append(cache.get(k % 2, lambda: build(k % 2))))
               for k in range(6)]  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(builds) == [0, 1] and sorted(got) == ["code 0"] * 3 + ["code 1"] * 3
    assert 0 in cache and 2 not in cache

    def fail():
        raise CompileError("no")

    with pytest.raises(CompileError):
        cache.get("bad", fail)
    assert "bad" not in cache
    assert cache.get("bad", lambda: "now built") == "now built"  # (a failure is tried again)
    cache.clear()
    assert 0 not in cache


def test_code_built_in_the_background_is_found_or_its_error_raised_again():
    """jit.in_background: a build started there is the one a caller then gets (or waits for);
    one that failed there fails again, raised to the caller."""
    import threading

    cache = jit.CompiledOnce()
    started = threading.Event()
    built = []

    def build(name):
        built.append(name)
        started.set()
        if name == "bad":
            raise CompileError("bad code")
        return name

    jit.in_background(cache.get, "good", lambda: build("good"))
    jit.in_background(cache.get, "bad", lambda: build("bad"))
    if jit._background is not None:  # (none on one core)
        assert started.wait(10)
    assert cache.get("good", lambda: build("good")) == "good"
    with pytest.raises(CompileError, match="bad code"):
        cache.get("bad", lambda: build("bad"))
    assert built.count("good") == 1


def test_invalid_ir_raises_compile_error():
    target = host_target()
    mod = jit.new_module("bad", target)
    fn = ir.Function(mod, ir.FunctionType(U.i64, []), name="bad")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.branch(fn.append_basic_block("no_terminator"))  # a block without a terminator
    with pytest.raises(CompileError, match="invalid LLVM IR"):
        jit.compile_module(mod, target)


@pytest.mark.parametrize("isa", available_isas())
def test_transpose_helper_is_a_transpose(isa):
    """irutil.transpose for V = 16, 8, 4 (the shuffle masks), run natively."""
    target = host_target(isa)
    V = target.vector_width
    mod = jit.new_module("tr", target)
    fn = ir.Function(mod, ir.FunctionType(U.void, [U.f32_ptr, U.f32_ptr]), name="tr")
    src, dst = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    rows = [U.load_vec(b, U.gep(b, src, i * V), V) for i in range(V)]
    for j, col in enumerate(U.transpose(b, rows)):
        U.store_vec(b, col, U.gep(b, dst, j * V))
    b.ret_void()
    jm = jit.compile_module(mod, target)
    f = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(jm.function_address("tr"))
    a = np.arange(V * V, dtype=np.float32).reshape(V, V)
    out = np.zeros_like(a)
    f(a.ctypes.data, out.ctypes.data)
    np.testing.assert_array_equal(out, a.T)
