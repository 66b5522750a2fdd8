"""Layer normalisation over the last axis, optionally of a residual sum, in one generated kernel.

    kernel = compile_layer_norm(768, residual=True)
    y = kernel(a, b, scale=gamma, bias=beta, epsilon=1e-12, num_threads=2)   # LN(a + b)

Code is specialised on (N, residual, ISA); rows are a run-time range, so threads split them.
Per row:

1. One pass over the row reads x = a (+ b, stored to the output row so the second pass finds
   it in L1) and accumulates Σ(x - x₀) and Σ(x - x₀)² in four independent vector accumulator
   pairs. The shift x₀, the mean of the row's first vector, is within about σ/4 of the row's
   mean, so E[(x - x₀)²] - E[x - x₀]² does not cancel whatever |mean| is against σ.
2. mean = x₀ + Σ/N, var = max(Σ²/N - (Σ/N)², 0), r = 1 / sqrt(var + ε) (exact sqrt and
   division, no approximations).
3. A second pass writes y = (x - mean)·r·γ + β.

N need not be a multiple of the vector width: the tail is covered by narrower vectors.
b may have the shape of a, or broadcast to it over leading dimensions (a [1, S, N] position
embedding against [B, S, N], one [N] row): row r of a meets row r mod rows(b) of b.
"""

from __future__ import annotations

import ctypes
import functools
import itertools

import numpy as np
from llvmlite import ir

from sparsednn.codegen import jit
from sparsednn.codegen.attention import _addr, _output, _pieces, compile_cached
from sparsednn.codegen.irutil import (
    Math,
    alloca_once,
    const,
    f32,
    f32_ptr,
    for_range,
    gep,
    i64,
    int64,
    intrinsic,
    load_vec,
    splat,
    store_vec,
    vec,
    void,
)
from sparsednn.codegen.target import Target, host_target
from sparsednn.errors import SparseDNNError

_UNROLL = 4  # independent accumulator pairs in the statistics pass
# A second thread only when the work pays for the hand-off (~40 us): ~1 ns per 16 floats.
_ELEMENTS_PER_EXTRA_THREAD = 400_000
# With the native pool: 2 threads measured 1.11x at 128 x 768 (98 k elements, ~21 us),
# 0.76x at 64 x 768.
_ELEMENTS_PER_EXTRA_THREAD_NATIVE = 90_000


def _repeats(full: tuple, part: tuple) -> bool:
    """Whether an array of shape `part` broadcast to `full` is `part` repeated over leading
    dimensions (part = full with some leading dimensions dropped or set to 1)."""
    if len(part) > len(full) or not part or part[-1] != full[-1]:
        return False
    part = (1,) * (len(full) - len(part)) + tuple(part)
    k = 0
    while k < len(full) - 1 and part[k] == 1 and full[k] != 1:
        k += 1
    return part[k:] == tuple(full[k:])


_ARGS = [
    ("a", f32_ptr), ("b", f32_ptr), ("gamma", f32_ptr), ("beta", f32_ptr), ("out", f32_ptr),
    ("lda", i64), ("ldb", i64), ("brows", i64), ("ldo", i64), ("eps", f32),
    ("begin", i64), ("end", i64),
]  # fmt: skip
_CTYPES = ctypes.CFUNCTYPE(
    None, *[ctypes.c_float if ty == f32 else ctypes.c_int64 if ty == i64 else ctypes.c_void_p
            for _, ty in _ARGS]
)  # fmt: skip

_KINDS = "".join("f" if ty == f32 else "i" for _, ty in _ARGS)  # native_pool.run_kernel


def _reduce_add(b: ir.IRBuilder, v):
    w = v.type.count
    i32 = ir.IntType(32)
    while w > 1:
        h = w // 2
        lo = b.shuffle_vector(v, v, ir.Constant(vec(h, i32), list(range(h))))
        hi = b.shuffle_vector(v, v, ir.Constant(vec(h, i32), list(range(h, w))))
        v = b.fadd(lo, hi)
        w = h
    return b.extract_element(v, ir.Constant(i32, 0))


def _emit(module: ir.Module, name: str, n: int, residual: bool, target: Target,
          terms: int = 0) -> ir.Function:  # fmt: skip
    """The kernel over rows begin..end. terms > 0 (gathered rows, EmbedLayerNorm): `a` is
    int64 [terms][lda] row addresses, and row r normalises the sum of the terms' rows r."""
    V = target.vector_width
    fn = ir.Function(module, ir.FunctionType(void, [ty for _, ty in _ARGS]), name=name)
    for arg, (an, _) in zip(fn.args, _ARGS):
        arg.name = an
    a = {an: arg for arg, (an, _) in zip(fn.args, _ARGS)}
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    maths: dict[int, Math] = {}

    def math(w: int) -> Math:
        if w not in maths:
            maths[w] = Math(b, vec(w), target.has_fma, target.isa)
        return maths[w]

    chunk = _UNROLL * V
    nchunks = n // chunk
    rest = _pieces(n - nchunks * chunk, V)  # (offset from the end of the chunks, lanes)
    rest = [(nchunks * chunk + off, w) for off, w in rest]
    sqrt = intrinsic(module, "llvm.sqrt.f32", f32, [f32])
    vty = vec(V)
    i64p = ir.PointerType(i64)
    with for_range(b, a["begin"], a["end"], name="row") as r:
        if terms:
            addrs = b.bitcast(a["a"], i64p, name="row_addresses")
            rows = [b.inttoptr(b.load(gep(b, addrs, b.add(b.mul(int64(j), a["lda"]), r))),
                               f32_ptr, name=f"term{j}") for j in range(terms)]  # fmt: skip
            arow = rows[0]
        else:
            arow = gep(b, a["a"], b.mul(r, a["lda"]), name="arow")
        brow = None
        if residual:  # b repeats every `brows` rows (broadcast over leading dimensions)
            brow = gep(b, a["b"], b.mul(b.srem(r, a["brows"]), a["ldb"]), name="brow")
        orow = gep(b, a["out"], b.mul(r, a["ldo"]), name="orow")
        # the shift: the mean of the first vector, close to the row's mean
        w0 = _pieces(n, V)[0][1]
        first = load_vec(b, arow, w0)
        if residual:
            first = b.fadd(first, load_vec(b, brow, w0))
        for row in rows[1:] if terms else ():
            first = b.fadd(first, load_vec(b, row, w0))
        x0 = b.fmul(_reduce_add(b, first), ir.Constant(f32, 1.0 / w0), name="shift")

        def load_x(off, w):
            """x[off : off + w] for the statistics pass (storing a + b to the output)."""
            x = load_vec(b, gep(b, arow, off), w)
            if residual:
                x = b.fadd(x, load_vec(b, gep(b, brow, off), w))
            for row in rows[1:] if terms else ():
                x = b.fadd(x, load_vec(b, gep(b, row, off), w))
            if residual or terms:
                store_vec(b, x, gep(b, orow, off))
            return x

        sums = [alloca_once(b, vty, name=f"s{u}") for u in range(_UNROLL)]
        sqs = [alloca_once(b, vty, name=f"q{u}") for u in range(_UNROLL)]
        for slot in sums + sqs:
            b.store(const(vty, 0.0), slot)
        shift = splat(b, x0, V)
        if nchunks:
            with for_range(b, 0, nchunks, name="c") as c:
                base = b.mul(c, int64(chunk))
                for u in range(_UNROLL):
                    d = b.fsub(load_x(b.add(base, int64(u * V)), V), shift)
                    b.store(b.fadd(b.load(sums[u]), d), sums[u])
                    b.store(math(V).fma(d, d, b.load(sqs[u])), sqs[u])
        total = b.fadd(b.load(sums[0]), b.load(sums[1])) if _UNROLL > 1 else b.load(sums[0])
        total_sq = b.fadd(b.load(sqs[0]), b.load(sqs[1])) if _UNROLL > 1 else b.load(sqs[0])
        for u in range(2, _UNROLL):
            total = b.fadd(total, b.load(sums[u]))
            total_sq = b.fadd(total_sq, b.load(sqs[u]))
        s, q = _reduce_add(b, total), _reduce_add(b, total_sq)
        for off, w in rest:
            d = b.fsub(load_x(int64(off), w), splat(b, x0, w))
            s = b.fadd(s, _reduce_add(b, d))
            q = b.fadd(q, _reduce_add(b, b.fmul(d, d)))
        inv_n = ir.Constant(f32, 1.0 / n)
        m1 = b.fmul(s, inv_n, name="m1")  # mean of the shifted row
        var = b.fsub(b.fmul(q, inv_n), b.fmul(m1, m1))
        zero = ir.Constant(f32, 0.0)
        var = b.select(b.fcmp_ordered("<", var, zero), zero, var, name="var")
        mean = b.fadd(x0, m1, name="mean")
        rstd = b.fdiv(ir.Constant(f32, 1.0), b.call(sqrt, [b.fadd(var, a["eps"])]), name="rstd")
        src = orow if residual or terms else arow

        def normalise(off, w):
            x = load_vec(b, gep(b, src, off), w)
            t = b.fmul(b.fsub(x, splat(b, mean, w)), splat(b, rstd, w))
            g = load_vec(b, gep(b, a["gamma"], off), w)
            be = load_vec(b, gep(b, a["beta"], off), w)
            store_vec(b, math(w).fma(t, g, be), gep(b, orow, off))

        full = n // V
        if full:
            with for_range(b, 0, full, name="v") as i:
                normalise(b.mul(i, int64(V)), V)
        for off, w in _pieces(n - full * V, V):
            normalise(int64(full * V + off), w)
    b.ret_void()
    return fn


class LayerNormKernel(jit.JITKernel):
    """y = LayerNorm(a (+ b)) over the last axis (N features); see the module doc."""

    def __init__(self, n: int, residual: bool, target: Target, terms: int = 0):
        self.n, self.residual, self.target, self.terms = n, residual, target, terms
        self.name = f"f32_layer_norm_n{n}_{target.isa}" + ("_residual" if residual else "")
        if terms:
            self.name = f"f32_embed_layer_norm_n{n}_t{terms}_{target.isa}"

        def emit():
            mod = jit.new_module(self.name, target)
            _emit(mod, self.name, n, residual, target, terms)
            return mod

        self._jm = compile_cached(self.name, emit, target, "light", n, residual, terms)
        self._fn = _CTYPES(self._jm.function_address(self.name))
        self.compile_seconds = self._jm.compile_seconds
        # for sums that broadcast otherwise than over leading dimensions (compiled now: a
        # session never compiles while running)
        self._plain = _cached(n, False, target) if residual else self

    def gathered(self, addresses: np.ndarray, *, scale: np.ndarray, bias: np.ndarray | None,
                 epsilon: float, num_threads: int = 1, out: np.ndarray) -> np.ndarray:  # fmt: skip
        """out[r] = LayerNorm(sum over j of the float32 [n] row at addresses[j, r]), for a
        kernel compiled with `terms` (codegen only: the caller vouches for every address,
        e.g. runtime/lowering.py's EmbedLayerNorm from checked indices into its tables)."""
        rows = addresses.shape[1]
        if (addresses.dtype != np.int64 or addresses.shape[0] != self.terms
                or not addresses.flags.c_contiguous or out.shape[-1:] != (self.n,)
                or out.size != rows * self.n or not out.flags.c_contiguous
                or out.dtype != np.float32 or scale.shape != (self.n,)
                or scale.dtype != np.float32
                or (bias is not None and (bias.shape != (self.n,) or bias.dtype != np.float32))):  # fmt: skip
            raise SparseDNNError("gathered layer norm: inconsistent row addresses or output")
        if bias is None:
            bias = _zeros(self.n)
        if rows:
            args = (_addr(addresses), 0, _addr(scale), _addr(bias), _addr(out), rows, 0, 1,
                    self.n, float(epsilon))  # fmt: skip
            self._run(args, rows, num_threads)
        return out

    def __call__(
        self,
        a,
        b=None,
        *,
        scale: np.ndarray,
        bias: np.ndarray | None = None,
        epsilon: float = 1e-5,
        num_threads: int = 1,
        where: str = "layer norm",
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        n = self.n
        if (
            scale.shape != (n,)
            or scale.dtype != np.float32
            or (bias is not None and (bias.shape != (n,) or bias.dtype != np.float32))
        ):
            raise SparseDNNError(f"{where}: scale and bias must be float32 [{n}]")
        if bias is None:
            bias = _zeros(n)
        brows = 1
        if self.residual:
            for x in (a, b):
                if not isinstance(x, np.ndarray) or x.dtype != np.float32:
                    raise SparseDNNError(
                        f"{where}: the input and the residual must be float32 arrays, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', []))}"
                    )
            if _repeats(b.shape, a.shape):  # (a + b = b + a)
                a, b = b, a
            elif not _repeats(a.shape, b.shape):
                # other broadcasts: add first (numpy checks them), then normalise the sum
                try:
                    total = np.add(a, b)
                except ValueError as e:
                    raise SparseDNNError(
                        f"{where}: inputs {list(a.shape)} and {list(b.shape)} do not broadcast: {e}"
                    ) from None
                return self._plain(
                    total,
                    scale=scale,
                    bias=bias,
                    epsilon=epsilon,
                    num_threads=num_threads,
                    where=where,
                    out=out,
                )
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim < 1 or a.shape[-1] != n:
            raise SparseDNNError(
                f"{where}: expects a float32 input [..., {n}], got "
                f"{getattr(a, 'dtype', type(a).__name__)}{list(getattr(a, 'shape', []))}"
            )
        if self.residual:
            b = b if b.flags.c_contiguous else np.ascontiguousarray(b)
            brows = max(1, b.size // n)
        a = a if a.flags.c_contiguous else np.ascontiguousarray(a)
        out = _output(out, a.shape, where)
        rows = a.size // n if n else 0
        if rows == 0 or n == 0:
            return out
        args = (
            _addr(a),
            _addr(b) if self.residual else 0,
            _addr(scale),
            _addr(bias),
            _addr(out),
            n,
            n,
            brows,
            n,
            float(epsilon),
        )
        self._run(args, rows, num_threads)
        return out

    def _run(self, args: tuple, rows: int, num_threads: int) -> None:
        """The kernel over rows 0..rows, split over up to num_threads threads."""
        fn, n = self._fn, self.n
        threads = 1
        if num_threads > 1:
            from sparsednn.runtime.threads import native_pool_active

            per = _ELEMENTS_PER_EXTRA_THREAD
            if native_pool_active():
                per = min(per, _ELEMENTS_PER_EXTRA_THREAD_NATIVE)
            threads = max(1, min(int(num_threads), rows, 1 + (rows * n) // per))
        if threads == 1:
            fn(*args, 0, rows)
        else:
            from sparsednn.runtime.native_pool import float_bits
            from sparsednn.runtime.threads import parallel_for, parallel_native

            bounds = [rows * i // threads for i in range(threads + 1)]
            head = (*args[:9], float_bits(args[9]))
            cells = [(*head, lo, hi) for lo, hi in itertools.pairwise(bounds)]
            if parallel_native(ctypes.cast(fn, ctypes.c_void_p).value, _KINDS, cells):
                return
            parallel_for(
                [functools.partial(fn, *args, lo, hi) for lo, hi in itertools.pairwise(bounds)]
            )


@functools.cache
def _zeros(n: int) -> np.ndarray:
    z = np.zeros(n, np.float32)
    z.flags.writeable = False
    return z


_kernels = jit.CompiledOnce()  # (sessions compile these on several threads at once)


def _cached(n: int, residual: bool, target: Target, terms: int = 0) -> LayerNormKernel:
    return _kernels.get((n, residual, target, terms),
                        lambda: LayerNormKernel(n, residual, target, terms))  # fmt: skip


def compile_layer_norm(
    n: int, residual: bool = False, target: Target | None = None
) -> LayerNormKernel:
    """The layer-norm kernel for rows of `n` features, of a + b if `residual` (cached)."""
    if n < 1:
        raise SparseDNNError(f"layer norm needs at least one feature, got {n}")
    return _cached(int(n), bool(residual), target or host_target())


def compile_embed_layer_norm(n: int, terms: int, target: Target | None = None) -> LayerNormKernel:
    """The layer-norm kernel for the sum of `terms` gathered rows of `n` features (cached):
    see LayerNormKernel.gathered."""
    if n < 1 or not 1 <= terms <= 4:
        raise SparseDNNError(f"embedding layer norm: {n} features, {terms} tables")
    return _cached(int(n), False, target or host_target(), int(terms))
