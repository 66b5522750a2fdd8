"""Two sparse linear layers run depth-first, one chunk of tokens at a time.

Y = B(A(X)) for sparse kernels A [K, N_mid] and B [N_mid, N] (a transformer's feed-forward
block: up, GELU, down) runs as: for each chunk of CHUNK tokens, A's kernel on the chunk into a
per-thread buffer, then B's kernel on that buffer. The intermediate (CHUNK x N_mid: 768 KB for
64 tokens of BERT's 3072) stays in the core's L2, instead of a [M, N_mid] tensor written to
and read back from L3 or DRAM (25 MB at batch 16 x 128 tokens).

The driver is one small function for all shapes (compiled once per process); the kernels are
the layers' own, called through their addresses. Threads split the tokens, each thread with
its own buffer. Each kernel call reports whether its input held a NaN or an infinity (the
probe of its packing step); the caller then runs the two layers apart, whose Linear lowering
gives non-finite inputs their dense semantics.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import threading

import numpy as np
from llvmlite import ir

from sparsednn.codegen import irutil as U
from sparsednn.codegen import jit
from sparsednn.codegen.spmm import _KERNEL_ARG_TYPES, _code_key, _target_key
from sparsednn.codegen.target import Target
from sparsednn.runtime.threads import parallel_for, parallel_native, thread_scratch

CHUNK = 64  # tokens per chunk: one panel of the AVX-512 kernels

_ARGS = ("x", "m", "y", "k", "n_mid", "n_out", "a_fn", "a_index", "a_entries", "a_bias",
         "b_fn", "b_index", "b_entries", "b_bias", "scratch", "mid_offset", "probe")  # fmt: skip
_KINDS = "i" * len(_ARGS)
_SIGNATURE = ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * len(_ARGS))


def _emit_driver(module: ir.Module, name: str) -> None:
    kernel_ty = ir.PointerType(ir.FunctionType(U.void, _KERNEL_ARG_TYPES))
    i8p = ir.PointerType(ir.IntType(8))
    types = {"x": U.f32_ptr, "y": U.f32_ptr, "scratch": U.f32_ptr, "probe": U.f32_ptr,
             "a_fn": i8p, "b_fn": i8p, "a_index": U.i32_ptr, "b_index": U.i32_ptr,
             "a_entries": _KERNEL_ARG_TYPES[6], "b_entries": _KERNEL_ARG_TYPES[6],
             "a_bias": U.f32_ptr, "b_bias": U.f32_ptr}  # fmt: skip
    fn = ir.Function(module, ir.FunctionType(U.void, [types.get(n, U.i64) for n in _ARGS]), name)
    a = dict(zip(_ARGS, fn.args))
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    first, second = b.bitcast(a["a_fn"], kernel_ty), b.bitcast(a["b_fn"], kernel_ty)
    mid = U.gep(b, a["scratch"], a["mid_offset"], name="mid")
    seen = U.alloca_once_value(b, ir.Constant(U.f32, 0.0), name="probe_sum")
    with U.for_range(b, 0, a["m"], CHUNK, name="t0") as t0:
        left = b.sub(a["m"], t0)
        tn = b.select(b.icmp_signed("<", left, U.int64(CHUNK)), left, U.int64(CHUNK), name="tn")
        x = U.gep(b, a["x"], b.mul(t0, a["k"]))
        y = U.gep(b, a["y"], b.mul(t0, a["n_out"]))
        for kernel, args in (
            (first, [x, tn, mid, U.int64(0), a["n_mid"], a["a_index"], a["a_entries"],
                     a["a_bias"]]),
            (second, [mid, tn, y, U.int64(0), a["n_out"], a["b_index"], a["b_entries"],
                      a["b_bias"]]),
        ):  # fmt: skip
            b.call(kernel, [*args, a["scratch"], a["probe"]])
            b.store(b.fadd(b.load(seen), b.load(a["probe"])), seen)
    b.store(b.load(seen), a["probe"])
    b.ret_void()


_driver: dict = {}
_driver_lock = threading.Lock()


def _driver_address(target: Target) -> int:
    with _driver_lock:
        hit = _driver.get(target)
        if hit is None:

            def emit():
                module = jit.new_module("sparse_chain", target)
                _emit_driver(module, "sparse_chain")
                return module

            # from the on-disk kernel cache when it can: compiling it, even this small, pages
            # in LLVM's code generator (~30 MB of a session's resident memory)
            ckey = _code_key("chain", "sparse_chain", CHUNK, _target_key(target))
            jm = jit.load_cached(ckey, target, source=emit)
            if jm is None:
                jm = jit.compile_module(emit(), target, cache_key=ckey)
            hit = _driver[target] = (jm, jm.function_address("sparse_chain"))
        return hit[1]


class SparseChain:
    """Y = second(first(X)) depth-first over chunks of tokens (see the module docstring), for
    two SparseLinearKernels with first.out_features == second.in_features."""

    def __init__(self, first, second, target: Target | None = None):
        if first.out_features != second.in_features:
            raise ValueError("the chained kernels' features do not meet")
        self.first, self.second = first, second
        self.k, self.n_mid, self.n_out = first.in_features, first.out_features, second.out_features
        self.address = _driver_address(target or first.target)
        self._fn = _SIGNATURE(self.address)
        kernel_floats = max(first._scratch_full, second._scratch_full)
        self.mid_offset = -(-kernel_floats // 16) * 16  # the intermediate, 64-byte aligned
        self.scratch_floats = self.mid_offset + CHUNK * self.n_mid
        self._args = (first._fn_addr, *first._ptrs, second._fn_addr, *second._ptrs)

    def applies(self, m: int, num_threads: int) -> bool:
        """Whether m rows run chained: both kernels on their panel path, and a chunk of tokens
        per thread (fewer rows run better as two kernels, whose threads split the outputs)."""
        fewest = max(self.first.spmv_max_m, self.second.spmv_max_m) + 1
        return self.k > 0 and m >= max(fewest, CHUNK * num_threads if num_threads > 1 else 0)

    def __call__(self, x: np.ndarray, num_threads: int = 1) -> tuple[np.ndarray, bool]:
        """(Y, whether X or the intermediate held a NaN or an infinity: Y is then not to be
        used). x: C-contiguous float32 [m, K] with m >= 1 (checked by the caller)."""
        m = x.shape[0]
        out = np.empty((m, self.n_out), np.float32)
        threads = max(1, min(num_threads, m // CHUNK))
        v = self.first.target.vector_width  # spans of whole vectors, as the kernels split
        bounds = [min(m, round(m * i / threads / v) * v) for i in range(threads)] + [m]
        spans = [(t0, t1) for t0, t1 in itertools.pairwise(bounds) if t1 > t0]
        probe = np.zeros(len(spans), np.float32)
        xa, ya, pa = x.ctypes.data, out.ctypes.data, probe.ctypes.data
        k, n = self.k, self.n_out
        rows = [(xa + 4 * k * t0, t1 - t0, ya + 4 * n * t0, k, self.n_mid, n, *self._args, 0,
                 self.mid_offset, pa + 4 * i) for i, (t0, t1) in enumerate(spans)]  # fmt: skip
        scratch_col = _ARGS.index("scratch")
        if len(rows) == 1 or not parallel_native(
            self.address, _KINDS, rows, scratch_col, self.scratch_floats
        ):
            c = scratch_col
            parallel_for([(lambda r=r: self._fn(*r[:c], thread_scratch(self.scratch_floats),
                                                *r[c + 1:])) for r in rows])  # fmt: skip
        return out, any(map(math.isnan, probe.tolist()))
