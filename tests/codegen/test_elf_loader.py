"""Cached machine code loaded without LLVM (codegen/elf_loader.py): the same results as MCJIT,
clean refusals of what it does not handle, and a warm-cache session that never loads LLVM."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sparsednn.codegen import cache, elf_loader, jit
from sparsednn.codegen.target import host_target

pytestmark = pytest.mark.skipif(not elf_loader.supported(), reason="ELF loader: Linux x86-64")

# A module with what MCJIT's objects hold: code calling an internal function and a helper
# exported by name, a jump table (.rodata with absolute addresses), a vector constant pool
# and a writable global.
_IR = """
@calls = global i64 0

declare double @sdnn_test_helper(double)

define internal double @twice(double %x) noinline {
  %r = fmul double %x, 2.0
  ret double %r
}

define double @pick(i32 %sel, double %x) {
entry:
  %n = load i64, ptr @calls
  %n1 = add i64 %n, 1
  store i64 %n1, ptr @calls
  switch i32 %sel, label %other [ i32 0, label %c0  i32 1, label %c1  i32 2, label %c2
                                  i32 3, label %c3  i32 4, label %c4  i32 5, label %c5 ]
c0:
  %r0 = fadd double %x, 3.25
  ret double %r0
c1:
  %r1 = call double @twice(double %x)
  ret double %r1
c2:
  %r2 = call double @sdnn_test_helper(double %x)
  ret double %r2
c3:
  %r3 = fmul double %x, 0.125
  ret double %r3
c4:
  %r4 = fsub double 7.5, %x
  ret double %r4
c5:
  %r5 = fdiv double %x, 3.0
  ret double %r5
other:
  %c = sitofp i64 %n1 to double
  ret double %c
}

define void @scale16(ptr %p) {
  %v = load <16 x float>, ptr %p, align 4
  %r = fmul <16 x float> %v, <float 1.0, float 2.0, float 3.0, float 4.0, float 5.0,
      float 6.0, float 7.0, float 8.0, float 9.0, float 10.0, float 11.0, float 12.0,
      float 13.0, float 14.0, float 15.0, float 16.0>
  store <16 x float> %r, ptr %p, align 4
  ret void
}

define i64 @calls_so_far() {
  %n = load i64, ptr @calls
  ret i64 %n
}
"""

_HELPER_IR = """
define double @sdnn_test_helper(double %x) {
  %r = fadd double %x, 100.0
  ret double %r
}
"""

_PICK = ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_int32, ctypes.c_double)
_SCALE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_COUNT = ctypes.CFUNCTYPE(ctypes.c_int64)


@pytest.fixture(scope="module")
def compiled():
    """(helper module, _IR's object code loaded by MCJIT, the object's bytes), the helper
    exported first."""
    target = host_target()
    helper = jit.compile_module(_HELPER_IR, target)
    jit.export_symbol("sdnn_test_helper", helper.function_address("sdnn_test_helper"))
    key = cache.digest("test-elf-loader", os.getpid())
    jit.compile_module(_IR, target, cache_key=key)
    obj = cache.load_object(key)
    assert obj is not None and obj[:4] == b"\x7fELF"
    saved = os.environ.get(elf_loader.ENV_SWITCH)
    os.environ[elf_loader.ENV_SWITCH] = "0"
    try:
        by_mcjit = jit._load_object(obj, target)
    finally:
        if saved is None:
            del os.environ[elf_loader.ENV_SWITCH]
        else:
            os.environ[elf_loader.ENV_SWITCH] = saved
    assert by_mcjit._engine is not None
    return helper, by_mcjit, obj


def _functions(address):
    return (_PICK(address("pick")), _SCALE(address("scale16")), _COUNT(address("calls_so_far")))


def test_loaded_code_computes_what_mcjit_computes(compiled):
    _, jm, obj = compiled
    image = elf_loader.LoadedObject(obj, jit._exported)
    loaded = _functions(image.address)
    reference = _functions(jm.function_address)
    for sel in range(-1, 8):
        for x in (0.0, 1.5, -3.0, 1e300):
            assert loaded[0](sel, x) == reference[0](sel, x), (sel, x)
    for scale in (loaded[1], reference[1]):
        v = np.arange(16, dtype=np.float32) - 4
        scale(v.ctypes.data)
        np.testing.assert_array_equal(v, (np.arange(16) - 4) * np.arange(1, 17))
    # each image has its own writable global: 9 selectors x 4 values counted in each
    assert loaded[2]() == reference[2]() == 36
    assert loaded[0](2, 1.0) == 101.0  # through the exported helper
    assert image.address("twice") == 0  # internal symbols are not looked up by name
    assert image.address("nope") == 0


def test_code_pages_are_not_writable(compiled):
    _, _, obj = compiled
    image = elf_loader.LoadedObject(obj, jit._exported)
    code = image.address("pick")
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
            if lo <= code < hi:
                perms = line.split()[1]
                assert perms.startswith("r-x"), perms
                break
        else:
            pytest.fail("code address not mapped")


def test_undefined_symbol_is_refused(compiled):
    _, _, obj = compiled
    with pytest.raises(elf_loader.UnsupportedObject, match="undefined symbol"):
        elf_loader.LoadedObject(obj, {})


@pytest.mark.parametrize("damage", ["truncated", "not_elf", "machine", "relocation_type"])
def test_damaged_or_foreign_objects_are_refused(compiled, damage):
    _, _, obj = compiled
    blob = bytearray(obj)
    if damage == "truncated":
        blob = blob[: len(blob) // 3]
    elif damage == "not_elf":
        blob[:4] = b"\x7fXYZ"
    elif damage == "machine":
        blob[18] = 183  # EM_AARCH64
    else:  # the first relocation of every RELA section gets an unknown type
        import struct

        (shoff,) = struct.unpack_from("<Q", blob, 0x28)
        (shnum,) = struct.unpack_from("<H", blob, 0x3C)
        for i in range(shnum):
            sec = struct.unpack_from("<IIQQQQIIQQ", blob, shoff + 64 * i)
            if sec[1] == 4 and sec[5]:
                struct.pack_into("<I", blob, sec[4] + 8, 42)
    with pytest.raises(elf_loader.UnsupportedObject):
        elf_loader.LoadedObject(bytes(blob), jit._exported)


def test_load_cached_uses_the_loader_and_falls_back_to_mcjit(compiled, monkeypatch):
    target = host_target()
    key = cache.digest("test-elf-loader-load-cached", os.getpid())
    jit.compile_module(_IR, target, cache_key=key)
    jm = jit.load_cached(key, target)
    assert jm is not None and jm.from_cache and jm._image is not None and jm._engine is None
    assert _PICK(jm.function_address("pick"))(0, 1.0) == 4.25
    monkeypatch.setattr(elf_loader, "supported", lambda: False)
    jm = jit.load_cached(key, target)
    assert jm._image is None and jm._engine is not None
    assert _PICK(jm.function_address("pick"))(0, 1.0) == 4.25


def test_fresh_code_is_loaded_like_cached_code_and_named_to_perf(monkeypatch):
    """compile_module loads its object code with the loader where it can (else MCJIT, from
    the same object), and with SPARSEDNN_PERF_MAP=1 names each function in perf's map."""
    target = host_target()
    path = f"/tmp/perf-{os.getpid()}.map"
    existed = os.path.exists(path)
    monkeypatch.setenv(jit.PERF_MAP_ENV, "1")
    try:
        jm = jit.compile_module(_HELPER_IR.replace("sdnn_test_helper", "sdnn_perf_named"), target)
        assert jm._image is not None and jm._engine is None
        address = jm.function_address("sdnn_perf_named")
        with open(path) as f:
            entries = [line.split() for line in f]
        assert [f"{address:x}", "sdnn_perf_named"] in [[e[0], e[2]] for e in entries]
        assert all(int(e[1], 16) > 0 for e in entries)
    finally:
        if not existed and os.path.exists(path):
            os.remove(path)
    monkeypatch.setattr(elf_loader, "supported", lambda: False)
    jm = jit.compile_module(_HELPER_IR.replace("sdnn_test_helper", "sdnn_by_mcjit"), target)
    assert jm._image is None and jm._engine is not None
    assert ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_double)(
        jm.function_address("sdnn_by_mcjit"))(1.0) == 101.0  # fmt: skip
    assert "fadd" in jm.llvm_ir


_SESSION_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, sparsednn
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    def weight(k, n, sparsity):
        w = rng.standard_normal((k, n)).astype(np.float32)
        w[rng.random(w.shape) < sparsity] = 0
        return numpy_helper.from_array(w, f"w{k}x{n}")
    inits = [weight(256, 512, 0.9), weight(512, 256, 0.9), weight(256, 96, 0.0),
             numpy_helper.from_array(rng.standard_normal(512).astype(np.float32), "b"),
             numpy_helper.from_array(np.ones(256, np.float32), "g"),
             numpy_helper.from_array(np.zeros(256, np.float32), "z")]
    nodes = [helper.make_node("MatMul", ["x", "w256x512"], ["h0"]),
             helper.make_node("Add", ["h0", "b"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w512x256"], ["h3"]),
             helper.make_node("Add", ["h3", "x"], ["h4"]),
             helper.make_node("LayerNormalization", ["h4", "g", "z"], ["h5"], axis=-1),
             helper.make_node("MatMul", ["h5", "w256x96"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    s = sparsednn.InferenceSession(model.SerializeToString(),
                                   sparsednn.SessionOptions(intra_op_num_threads=2))
    x = rng.standard_normal((300, 256)).astype(np.float32)
    ys = [s.run(None, {"x": x[:m]})[0].ravel() for m in (300, 64, 1)]
    np.save(sys.argv[1], np.concatenate(ys))
    print(" ".join(sorted(getattr(k, "name", "?") for k in s.kernels.values())))
    print("binding" if "llvmlite.binding" in sys.modules else "no-binding")
    """
)


def test_warm_cache_session_never_loads_llvm(tmp_path):
    env = {**os.environ, "SPARSEDNN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("SPARSEDNN_KERNEL_CACHE", None)
    runs = []
    for i in range(2):
        out = subprocess.run([sys.executable, "-c", _SESSION_SCRIPT, str(tmp_path / f"y{i}.npy")],
                             env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert out.returncode == 0, out.stderr
        kernels, llvm = out.stdout.splitlines()[-2:]
        runs.append(llvm)
    # sparse panel kernels (chained), the packed dense GEMM and layer norm all came from the cache
    assert "spmm_csr" in kernels and "gemm_packed" in kernels and "layer_norm" in kernels, kernels
    assert runs == ["binding", "no-binding"]  # the first compiles; the second only loads
    np.testing.assert_array_equal(np.load(tmp_path / "y0.npy"), np.load(tmp_path / "y1.npy"))


def test_host_cpu_is_remembered_and_a_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    from sparsednn.codegen import target as T

    monkeypatch.setenv("SPARSEDNN_CACHE_DIR", str(tmp_path))
    key = T._cpuinfo_digest()
    if key is None:
        pytest.skip("no /proc/cpuinfo")
    llvm_answer = T._host_cpu()  # this process's (cached) answer
    cache.store_host(key, *llvm_answer)
    assert cache.load_host(key) == llvm_answer
    cache.host_path(key).write_text('{"cpu": 3}')
    assert cache.load_host(key) is None and not cache.host_path(key).exists()
    monkeypatch.setenv("SPARSEDNN_KERNEL_CACHE", "0")
    assert cache.load_host(key) is None


def test_cpu_digest_ignores_the_clock_but_not_the_features():
    from sparsednn.codegen import target as T

    info = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
            "cpu MHz\t\t: {mhz}\nflags\t\t: fpu avx2 {extra}\n\nprocessor\t: 1\n")  # fmt: skip
    base = T._cpuinfo_digest(info.format(mhz="2596.1", extra="avx512f"))
    assert base == T._cpuinfo_digest(info.format(mhz="3701.9", extra="avx512f"))
    assert base != T._cpuinfo_digest(info.format(mhz="2596.1", extra=""))
    assert T._cpuinfo_digest("processor\t: 0\n") is None


def test_refused_executable_mapping_falls_back_to_mcjit(compiled, monkeypatch):
    """Where the system refuses executable pages to the loader (a hardened kernel), the cached
    code still loads, through MCJIT."""
    target = host_target()
    key = cache.digest("test-elf-loader-refused", os.getpid())
    jit.compile_module(_IR, target, cache_key=key)

    def refuse(*args, **kwargs):
        raise OSError(13, "mprotect of kernel code failed")

    monkeypatch.setattr(elf_loader, "LoadedObject", refuse)
    jm = jit.load_cached(key, target)
    assert jm is not None and jm._image is None
    assert _PICK(jm.function_address("pick"))(0, 1.0) == 4.25


def test_code_version_covers_every_emitter_keyed_by_it():
    """Every module whose cached code is keyed by cache.code_version() is part of it: an edited
    emitter (the chain driver, the dense GEMM) must never load code from before the edit."""
    import inspect
    from pathlib import Path

    src = inspect.getsource(cache.code_version)
    here = Path(cache.__file__).parent
    for path in here.glob("*.py"):
        text = path.read_text()
        if "_code_key(" in text or "cache.code_version()" in text:
            own = "_own_source_digest" in text or path.name in ("attention.py", "norm.py")
            assert own or f'"{path.name}"' in src, path.name
