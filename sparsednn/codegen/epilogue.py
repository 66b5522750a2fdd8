"""In-place bias + activation epilogue over a row-major [M, N] float32 matrix, as native code.

    ep = compile_epilogue(n=3072, has_bias=True, activation="gelu")
    ep(y, bias)            # y[m, :] = act(y[m, :] + bias), in place

Used after BLAS by the dense linear kernel; the activation is the same inline code as in the
sparse kernels (exact-erf GELU with relative error ~4e-7, no libm calls).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
from llvmlite import ir

from sparsednn.codegen import irutil as U
from sparsednn.codegen import jit
from sparsednn.codegen.target import Target, host_target

# Registers per operation in the main loop: GELU measured 38 / 27 / 21 cycles per 16 floats
# with 1 / 4 / 8 (AVX-512, 512 x 3072 in place); 4 where there are only 16 vector registers.
WIDE_VECTORS = {"avx512": 8, "avx2": 4, "generic": 4}

_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
_cache: dict = {}
_lock = threading.Lock()


def epilogue_name(n: int, has_bias: bool, activation: str, target: Target) -> str:
    parts = ["f32_epilogue", target.isa]
    if has_bias:
        parts.append("bias")
    if activation != "none":
        parts.append(activation)
    return "_".join(parts) + f"_n{n}"


def emit_epilogue(module: ir.Module, name: str, n: int, has_bias: bool, activation: str,
                  target: Target) -> ir.Function:  # fmt: skip
    """void name(float *y, int64 m, const float *bias): y[r, :] = act(y[r, :] + bias)."""
    V = target.vector_width
    vty = U.vec(V)
    fn = ir.Function(module, ir.FunctionType(U.void, (U.f32_ptr, U.i64, U.f32_ptr)), name=name)
    fn.attributes.add("nounwind")
    y, m_rows, bias = fn.args
    y.name, m_rows.name, bias.name = "y", "m", "bias"
    y.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    math = U.Math(b, vty, target.has_fma, target.isa)
    n_vec = n // V * V

    def apply(v, bias_v):
        if has_bias:
            v = b.fadd(v, bias_v, name="biased")
        return math.activation(v, activation)

    with b.goto_entry_block():
        buf = b.alloca(ir.ArrayType(U.f32, V), name="tail_buf")
        buf.align = 4 * V
        bias_buf = b.alloca(ir.ArrayType(U.f32, V), name="tail_bias")
        bias_buf.align = 4 * V
    buf_ptr = b.bitcast(buf, U.f32_ptr)
    bias_buf_ptr = b.bitcast(bias_buf, U.f32_ptr)
    tail = n - n_vec
    if tail:
        # bias of the last N % V columns, padded to one vector
        U.store_vec(b, U.const(vty, 0.0), bias_buf_ptr, 4 * V)
        if has_bias:
            for i in range(tail):
                b.store(b.load(U.gep(b, bias, n_vec + i)), U.gep(b, bias_buf_ptr, i))
    with U.for_range(b, 0, m_rows, name="row") as r:
        row = U.gep(b, y, b.mul(r, U.int64(n)), name="y_row")
        # whole groups of WIDE_VECTORS registers as one wide vector (see irutil.Math)
        WIDE = WIDE_VECTORS[target.isa] * V
        n_wide = n // WIDE * WIDE
        if n_wide:
            wmath = U.Math(b, U.vec(WIDE), target.has_fma, target.isa)
            with U.for_range(b, 0, n_wide, WIDE, name="jw") as j:
                ptr = U.gep(b, row, j)
                v = U.load_vec(b, ptr, WIDE, 4)
                if has_bias:
                    v = b.fadd(v, U.load_vec(b, U.gep(b, bias, j), WIDE, 4))
                U.store_vec(b, wmath.activation(v, activation), ptr, 4)
        if n_vec > n_wide:
            with U.for_range(b, n_wide, n_vec, V, name="j") as j:
                ptr = U.gep(b, row, j)
                bias_v = U.load_vec(b, U.gep(b, bias, j), V, 4) if has_bias else None
                U.store_vec(b, apply(U.load_vec(b, ptr, V, 4), bias_v), ptr, 4)
        if tail:
            U.store_vec(b, U.const(vty, 0.0), buf_ptr, 4 * V)
            for i in range(tail):
                b.store(b.load(U.gep(b, row, n_vec + i)), U.gep(b, buf_ptr, i))
            bias_v = U.load_vec(b, bias_buf_ptr, V, 4 * V) if has_bias else None
            U.store_vec(b, apply(U.load_vec(b, buf_ptr, V, 4 * V), bias_v), buf_ptr, 4 * V)
            for i in range(tail):
                b.store(b.load(U.gep(b, buf_ptr, i)), U.gep(b, row, n_vec + i))
    b.ret_void()
    return fn


class Epilogue:
    """A compiled epilogue for rows of N floats. Call: ep(y, bias) (bias ignored if not used)."""

    def __init__(self, n: int, has_bias: bool, activation: str, target: Target):
        self.n = n
        self.has_bias = has_bias
        self.activation = activation
        self.target = target
        self.name = epilogue_name(n, has_bias, activation, target)
        key = (n, has_bias, activation, target)
        with _lock:
            hit = _cache.get(key)
            self.cache_hit = hit is not None
            if hit is None:

                def emit():
                    module = jit.new_module(self.name, target)
                    emit_epilogue(module, self.name, n, has_bias, activation, target)
                    return module

                from sparsednn.codegen import cache

                ckey = cache.digest("code", cache.code_version(), "epilogue", self.name,
                                    (target.cpu_name, target.features, target.triple))  # fmt: skip
                jm = jit.cached_module(ckey, target, emit)
                self.cache_hit = jm.from_cache
                hit = (jm, _SIG(jm.function_address(self.name)))
                _cache[key] = hit
        self._jit, self._fn = hit

    @property
    def address(self) -> int:
        """The native function void epilogue(float *y, int64 rows, const float *bias)."""
        return ctypes.cast(self._fn, ctypes.c_void_p).value

    @property
    def llvm_ir(self) -> str:
        return self._jit.llvm_ir

    @property
    def asm(self) -> str:
        return self._jit.asm

    def __call__(self, y: np.ndarray, bias: np.ndarray | None = None) -> None:
        """In place on a C-contiguous float32 [M, N] array (not checked: callers validate)."""
        if y.shape[0] == 0:
            return
        if self.has_bias and bias is None:
            raise ValueError(f"{self.name}: needs a bias")
        bias_addr = bias.ctypes.data if self.has_bias else None
        self._fn(y.ctypes.data, y.shape[0], bias_addr)


def compile_epilogue(
    n: int, has_bias: bool, activation: str, target: Target | None = None
) -> Epilogue:
    return Epilogue(n, has_bias, activation, target or host_target())
