"""Two sparse linear layers run depth-first, one chunk of tokens at a time.

Y = B(A(X)) for sparse kernels A [K, N_mid] and B [N_mid, N] (a transformer's feed-forward
block: up, GELU, down) runs as: for each chunk of CHUNK tokens, A's kernel on the chunk into a
per-thread buffer, then B's kernel on that buffer. The intermediate (CHUNK x N_mid: 768 KB for
64 tokens of BERT's 3072) stays in the core's L2, instead of a [M, N_mid] tensor written to
and read back from L3 or DRAM (25 MB at batch 16 x 128 tokens). It is kept in the kernels'
panel layout ([N_mid][TN] per panel of TN tokens, spmm.LAYOUT_PANEL_OUT / _IN): A stores its
finished tiles untransposed and B takes them as its packed X, so neither transposes it and B
does not pack it (BERT-base's 768 -> 3072 -> 768 at 90%, 1024 tokens on one thread: 8.5-8.7
-> 7.85-7.9 ms, bitwise the same result).

A residual layer norm after the layers (a transformer block's AddLayerNorm) can join as a
last stage: each chunk of Y leaves the kernels into a per-thread buffer and is normalised with
its residual rows from there (LayerNorm(Y + R), codegen/norm.py's kernel), instead of Y going
out to memory and coming back for a separate layer-norm pass (BERT-base 94%: 2-3% of a run).
A single layer A (with the norm) takes the same path.

The driver is one small function per variant (A alone or A then B, with or without the norm;
compiled once per process); the kernels are the layers' own, called through their addresses. Threads split the tokens, each thread with
its own buffer. Each kernel call reports whether its input held a NaN or an infinity (the
probe of its packing step, and for the intermediate of A's panel stores); the caller then
runs the two layers apart, whose Linear lowering gives non-finite inputs their dense semantics.
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
from sparsednn.codegen.norm import _ARGS as NORM_ARGS
from sparsednn.codegen.spmm import (
    _KERNEL_ARG_TYPES,
    LAYOUT_PANEL_IN,
    LAYOUT_PANEL_OUT,
    LAYOUT_PREFETCH_ENTRIES,
    _addr,
    _code_key,
    _target_key,
)
from sparsednn.codegen.target import Target
from sparsednn.runtime.threads import (
    native_pool_active,
    parallel_for,
    parallel_native,
    thread_scratch,
)

CHUNK = 64  # tokens per chunk: one panel of the AVX-512 kernels (two of the sparsest weights')

_ARGS = ("x", "m", "y", "k", "n_mid", "n_out", "a_fn", "a_index", "a_entries", "a_bias",
         "b_fn", "b_index", "b_entries", "b_bias", "scratch", "mid_offset", "probe",
         "norm_fn", "res", "gamma", "beta", "eps_bits", "last_offset")  # fmt: skip
_KINDS = "i" * len(_ARGS)
_SIGNATURE = ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * len(_ARGS))


def _emit_driver(module: ir.Module, name: str, two: bool, norm: bool) -> None:
    """The driver for A alone or A then B (two), each chunk then normalised with its residual
    rows (norm: norm_fn is a residual LayerNormKernel's code, codegen/norm.py)."""
    kernel_ty = ir.PointerType(ir.FunctionType(U.void, _KERNEL_ARG_TYPES))
    norm_ty = ir.PointerType(ir.FunctionType(U.void, [ty for _, ty in NORM_ARGS]))
    i8p = ir.PointerType(ir.IntType(8))
    types = {"x": U.f32_ptr, "y": U.f32_ptr, "scratch": U.f32_ptr, "probe": U.f32_ptr,
             "a_fn": i8p, "b_fn": i8p, "a_index": U.i32_ptr, "b_index": U.i32_ptr,
             "a_entries": _KERNEL_ARG_TYPES[6], "b_entries": _KERNEL_ARG_TYPES[6],
             "a_bias": U.f32_ptr, "b_bias": U.f32_ptr, "norm_fn": i8p, "res": U.f32_ptr,
             "gamma": U.f32_ptr, "beta": U.f32_ptr}  # fmt: skip
    fn = ir.Function(module, ir.FunctionType(U.void, [types.get(n, U.i64) for n in _ARGS]), name)
    a = dict(zip(_ARGS, fn.args))
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    first, second = b.bitcast(a["a_fn"], kernel_ty), b.bitcast(a["b_fn"], kernel_ty)
    mid = U.gep(b, a["scratch"], a["mid_offset"], name="mid")
    last = U.gep(b, a["scratch"], a["last_offset"], name="last")  # the chunk before norm
    eps = b.bitcast(b.trunc(a["eps_bits"], U.i32), U.f32, name="eps")
    seen = U.alloca_once_value(b, ir.Constant(U.f32, 0.0), name="probe_sum")
    with U.for_range(b, 0, a["m"], CHUNK, name="t0") as t0:
        left = b.sub(a["m"], t0)
        tn = b.select(b.icmp_signed("<", left, U.int64(CHUNK)), left, U.int64(CHUNK), name="tn")
        x = U.gep(b, a["x"], b.mul(t0, a["k"]))
        y = U.gep(b, a["y"], b.mul(t0, a["n_out"]))
        out = last if norm else y
        # the intermediate stays in the kernels' panel layout: A stores its tiles untransposed
        # and B reads them as its packed X (neither transposes it, B does not pack it)
        calls = [(first, [x, tn, mid if two else out, U.int64(0), a["n_mid"] if two else
                          a["n_out"], a["a_index"], a["a_entries"], a["a_bias"]],
                  LAYOUT_PANEL_OUT if two else 0)]  # fmt: skip
        if two:
            calls.append((second, [mid, tn, out, U.int64(0), a["n_out"], a["b_index"],
                                   a["b_entries"], a["b_bias"]], LAYOUT_PANEL_IN))  # fmt: skip
        # the first chunk prefetches the weights' entries, which may come from DRAM (later
        # chunks find them in cache; see spmm.LAYOUT_PREFETCH_ENTRIES)
        prefetch = b.select(b.icmp_signed("==", t0, U.int64(0)),
                            U.int64(LAYOUT_PREFETCH_ENTRIES), U.int64(0))  # fmt: skip
        for kernel, args, layout in calls:
            b.call(kernel, [*args, a["scratch"], a["probe"], b.or_(U.int64(layout), prefetch)])
            b.store(b.fadd(b.load(seen), b.load(a["probe"])), seen)
        if norm:  # y rows = LayerNorm(out rows + residual rows), the chunk still in L2
            res = U.gep(b, a["res"], b.mul(t0, a["n_out"]))
            n = a["n_out"]
            args = [out, res, a["gamma"], a["beta"], y, n, n, tn, n, eps, U.int64(0), tn]
            b.call(b.bitcast(a["norm_fn"], norm_ty), args)
    b.store(b.load(seen), a["probe"])
    b.ret_void()


_driver: dict = {}
_driver_lock = threading.Lock()


def _driver_address(target: Target, two: bool = True, norm: bool = False) -> int:
    with _driver_lock:
        hit = _driver.get((target, two, norm))
        if hit is None:
            name = "sparse_chain" + ("" if two else "_one") + ("_norm" if norm else "")

            def emit():
                module = jit.new_module(name, target)
                _emit_driver(module, name, two, norm)
                return module

            # from the on-disk kernel cache when it can: compiling it, even this small, pages
            # in LLVM's code generator (~30 MB of a session's resident memory)
            ckey = _code_key("chain", name, CHUNK, _target_key(target))
            jm = jit.cached_module(ckey, target, emit)
            hit = _driver[(target, two, norm)] = (jm, jm.function_address(name))
        return hit[1]


class SparseChain:
    """Y = second(first(X)) depth-first over chunks of tokens (see the module docstring), for
    two SparseLinearKernels with first.out_features == second.in_features; second None: Y =
    first(X). norm (kernel, gamma, beta, epsilon), kernel a residual LayerNormKernel: each
    chunk of Y is then LayerNorm(Y + residual) as it leaves the kernels (call with residual)."""

    def __init__(self, first, second=None, target: Target | None = None, norm=None):
        last = second if second is not None else first
        if second is not None and first.out_features != second.in_features:
            raise ValueError("the chained kernels' features do not meet")
        if second is not None and first.tile_tokens != second.tile_tokens:
            raise ValueError("the chained kernels' panels differ in width")
        if norm is not None and (not norm[0].residual or norm[0].n != last.out_features):
            raise ValueError("the layer norm does not take the chain's output")
        self.first, self.second = first, second
        self.k, self.n_out = first.in_features, last.out_features
        self.n_mid = first.out_features if second is not None else 0
        target = target or first.target
        self.address = _driver_address(target, second is not None, norm is not None)
        self._fn = _SIGNATURE(self.address)
        self._plans: dict = {}  # (m, num_threads) -> (spans, PreparedDispatch or None)
        kernel_floats = max(first._scratch_full, second._scratch_full if second else 0)
        self.mid_offset = -(-kernel_floats // 16) * 16  # the intermediate, 64-byte aligned
        self.last_offset = self.mid_offset + CHUNK * -(-self.n_mid // 16) * 16
        self.scratch_floats = self.last_offset + (CHUNK * self.n_out if norm is not None else 0)
        b_args = (second._fn_addr, *second._ptrs) if second is not None else (0, 0, 0, 0)
        self._args = (first._fn_addr, *first._ptrs, *b_args)
        self.norm = norm
        self._norm_args = (0, 0, 0, 0)  # (code, gamma, beta, epsilon bits): none without norm
        if norm is not None:
            kernel, gamma, beta, eps = norm
            self._gamma = np.ascontiguousarray(gamma, np.float32)
            self._beta = (np.zeros(self.n_out, np.float32) if beta is None
                          else np.ascontiguousarray(beta, np.float32))  # fmt: skip
            eps_bits = int(np.float32(eps).view(np.uint32))
            self._norm_args = (ctypes.cast(kernel._fn, ctypes.c_void_p).value,
                               self._gamma.ctypes.data, self._beta.ctypes.data, eps_bits)  # fmt: skip

    def applies(self, m: int, num_threads: int) -> bool:
        """Whether m rows run chained: both kernels on their panel path, and a chunk of tokens
        per thread (fewer rows run better as two kernels, whose threads split the outputs)."""
        fewest = max(self.first.spmv_max_m,
                     self.second.spmv_max_m if self.second is not None else 0) + 1  # fmt: skip
        return self.k > 0 and m >= max(fewest, CHUNK * num_threads if num_threads > 1 else 0)

    def _plan(self, m: int, num_threads: int) -> tuple:
        """(token spans of the threads, the native pool's PreparedDispatch of their rows or
        None), kept per call shape: X, Y, the probe and the residual are written per call."""
        plan = self._plans.get((m, num_threads))
        if plan is None:
            threads = max(1, min(num_threads, m // CHUNK))
            v = self.first.target.vector_width  # spans of whole vectors, as the kernels split
            bounds = [min(m, round(m * i / threads / v) * v) for i in range(threads)] + [m]
            spans = [(t0, t1) for t0, t1 in itertools.pairwise(bounds) if t1 > t0]
            dispatch = None
            if len(spans) > 1 and native_pool_active():
                from sparsednn.runtime.native_pool import PreparedDispatch

                fn_addr, g, be, eps_bits = self._norm_args
                rows = [(0, t1 - t0, 0, self.k, self.n_mid, self.n_out, *self._args, 0,
                         self.mid_offset, 0, fn_addr, 0, g, be, eps_bits, self.last_offset)
                        for t0, t1 in spans]  # fmt: skip
                varying = tuple(_ARGS.index(a) for a in ("x", "y", "probe", "res"))
                dispatch = PreparedDispatch(self.address, _KINDS, rows, _ARGS.index("scratch"),
                                            self.scratch_floats, varying)  # fmt: skip
            if len(self._plans) > 256:  # (many distinct batch shapes: start over)
                self._plans.clear()
            plan = self._plans[(m, num_threads)] = (spans, dispatch)
        return plan

    def __call__(self, x: np.ndarray, num_threads: int = 1,
                 residual: np.ndarray | None = None) -> tuple[np.ndarray, bool]:  # fmt: skip
        """(Y, whether X or the intermediate held a NaN or an infinity: Y is then not to be
        used). x: C-contiguous float32 [m, K] with m >= 1; residual (with norm): C-contiguous
        float32 [m, N] (both checked by the caller)."""
        m = x.shape[0]
        out = np.empty((m, self.n_out), np.float32)
        spans, dispatch = self._plan(m, num_threads)
        probe = np.zeros(len(spans), np.float32)
        xa, ya, pa = _addr(x), _addr(out), _addr(probe)
        k, n = self.k, self.n_out
        ra = _addr(residual) if self.norm is not None else 0
        if dispatch is not None and dispatch.run(
            [v for i, (t0, _) in enumerate(spans)
             for v in (xa + 4 * k * t0, ya + 4 * n * t0, pa + 4 * i, ra and ra + 4 * n * t0)]
        ):  # fmt: skip
            return out, any(map(math.isnan, probe.tolist()))
        fn_addr, g, be, eps_bits = self._norm_args
        rows = [(xa + 4 * k * t0, t1 - t0, ya + 4 * n * t0, k, self.n_mid, n, *self._args, 0,
                 self.mid_offset, pa + 4 * i, fn_addr, ra and ra + 4 * n * t0, g, be, eps_bits,
                 self.last_offset) for i, (t0, t1) in enumerate(spans)]  # fmt: skip
        scratch_col = _ARGS.index("scratch")
        if len(rows) == 1 or not parallel_native(
            self.address, _KINDS, rows, scratch_col, self.scratch_floats
        ):
            c = scratch_col
            parallel_for([(lambda r=r: self._fn(*r[:c], thread_scratch(self.scratch_floats),
                                                *r[c + 1:])) for r in rows])  # fmt: skip
        return out, any(map(math.isnan, probe.tolist()))
