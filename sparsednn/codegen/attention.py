"""Fused multi-head attention: softmax(q·kᵀ·scale + mask)·v, per (batch, head), in one kernel.

    kernel = compile_attention(num_heads=12, head_size=64)
    out = kernel(q, k, v, mask, scale=0.125, num_threads=2)    # [B, Sq, H·D]

q is [B, Sq, H·D] (or [B, Sq, H, D]), k and v [B, Skv, H·D] (or [B, Skv, H, D]), or q is the
packed [B, S, 3·H·D] output of one Linear computing q | k | v (k and v None): the layout the
Linear layers produce, read in place (head h is the columns h·D .. h·D+D-1 of every row), and
the output is written straight in that layout too, so the head split/merge Reshape and
Transpose nodes of the exported graph cost nothing. The optional additive mask broadcasts to
[B, H, Sq, Skv] (typically [B, 1, 1, Skv] or [B, 1, Sq, Skv]); it is read with per-axis strides.

Code is specialised on (H, D, ISA) and on whether there is a mask (two modules, each compiled
when a caller first needs it: a session compiles only the one its graph runs, ~200 ms of
LLVM's code generator less per session without the kernel cache); sequence lengths, strides
and the scale are run-time arguments. Per (batch, head) pair:

1. Kᵀ of the head is packed into per-thread scratch, `kt[d, 0:Sp]` (Sp = Skv rounded up to a
   vector; padding columns zeroed), with V×V register transposes.
2. Query rows in blocks of R: scores for R rows × C vectors of keys accumulate over d in
   registers (broadcast q[r, d], FMA with kt[d, j:j+V]); `s = acc·scale + mask` goes to a
   scratch row, the lanes past Skv get -inf (a scalar fix-up handles the last partial vector).
3. Softmax per row: max, p = exp(s - max) (irutil.Math.exp_nonpositive: exactly 0 for -inf, so
   padded keys weigh exactly 0; on AVX-512 2^n is applied by vscalefps, 3-5% faster attention), sum; the reciprocal of the sum is applied at the
   end. A row whose scores are all -inf (every key masked with -inf) has no maximum: its weights
   are all 0 and the output row is `masked_row_value` (NaN as onnxruntime's Softmax gives; 0 for
   graphs that guard the softmax with Where(IsNaN(p), 0, p), as torch's SDPA exports do).
4. out[r, :] = Σ_j p[r, j]·v[j, :] / sum: R rows × ⌈D/V⌉ accumulators, broadcast p[r, j], FMA with
   the rows of v in place; a D that is not a multiple of V uses narrower vectors for the rest.

Pairs are split over threads (`num_threads`) with runtime.threads.parallel_for; each thread has
its own scratch. Shapes are checked in Python before any native code runs.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import threading
from typing import Any

import numpy as np
from llvmlite import ir

from sparsednn.codegen import jit
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
    load_vec,
    splat,
    store_vec,
    transpose,
    vec,
    void,
)
from sparsednn.codegen.target import Target, host_target
from sparsednn.errors import SparseDNNError
from sparsednn.runtime.threads import thread_scratch

# Vector registers of accumulators per phase (the rest hold loads and broadcasts).
_ACC_BUDGET = {"avx512": 24, "avx2": 8, "generic": 8}  # of 32 / 16 / 16 registers
_MAX_ROWS = 8
# LLVM's pipeline at O1 (no unrolling/vectorising): its LICM hoists the exp constants. Measured
# (stop 18, 12 heads of 64, alternating processes): O1 compiles in 175 ms against O3's 196 and
# runs as fast (batch 1 x 128: 242-244 against 244-248 us; 16 x 128, 1 x 384 within 1%); the
# light pipeline compiles in 125 ms but runs 1-2% slower at batch 1.
_OPT = 1
# A second thread only when the work pays for the hand-off (~40 us, see codegen/README.md):
# ~4 flops per (pair, query, key, d) at well under 50 GFLOP/s on small problems.
_FLOPS_PER_EXTRA_THREAD = 4e6
# With the native pool: 2 threads measured faster from ~3 M flops (12 heads x 64, S = 32:
# 1.07x; S = 24, 1.8 M flops: 0.97x).
_FLOPS_PER_EXTRA_THREAD_NATIVE = 2.5e6

_ARGS = [
    ("q", f32_ptr), ("k", f32_ptr), ("v", f32_ptr), ("mask", f32_ptr), ("out", f32_ptr),
    ("scratch", f32_ptr),
    ("sq", i64), ("skv", i64), ("ldq", i64), ("ldk", i64), ("ldv", i64), ("ldo", i64),
    ("qb", i64), ("kb", i64), ("vb", i64), ("ob", i64),
    ("mb", i64), ("mh", i64), ("mr", i64), ("ldt", i64),
    ("scale", f32), ("masked_row_value", f32), ("begin", i64), ("end", i64),
]  # fmt: skip
_CTYPES = ctypes.CFUNCTYPE(
    None, *[ctypes.c_float if ty == f32 else ctypes.c_int64 if ty == i64 else ctypes.c_void_p
            for _, ty in _ARGS]
)  # fmt: skip

_KINDS = "".join("f" if ty == f32 else "i" for _, ty in _ARGS)  # native_pool.run_kernel


def _pieces(d: int, width: int) -> list[tuple[int, int]]:
    """(offset, lanes) vector pieces covering d floats: full vectors, then power-of-two tails."""
    out, off = [], 0
    while d - off >= width:
        out.append((off, width))
        off += width
    w = width // 2
    while off < d and w >= 1:
        if d - off >= w:
            out.append((off, w))
            off += w
        w //= 2
    return out


def block_rows(head_size: int, target: Target) -> int:
    """Query rows per block: as many as the PV accumulators (R × ⌈D/V⌉) allow."""
    vectors = len(_pieces(head_size, target.vector_width))
    return max(1, min(_MAX_ROWS, _ACC_BUDGET[target.isa] // vectors))


def key_vectors(rows: int, target: Target) -> int:
    """Key vectors per step of the score loop (R × C accumulators)."""
    return max(1, min(4, _ACC_BUDGET[target.isa] // rows))


class _Emitter:
    def __init__(
        self, module: ir.Module, target: Target, heads: int, head_size: int, has_mask: bool
    ):
        self.module, self.t = module, target
        self.H, self.D, self.V = heads, head_size, target.vector_width
        self.has_mask = has_mask
        self.R = block_rows(head_size, target)
        self.C = key_vectors(self.R, target)
        self.vty = vec(self.V)

    def math(self, b, width: int) -> Math:
        ty = vec(width) if width > 1 else vec(1)
        return Math(b, ty, self.t.has_fma, self.t.isa)

    # -- the function -----------------------------------------------------------------------
    def emit(self, name: str) -> ir.Function:
        fnty = ir.FunctionType(void, [ty for _, ty in _ARGS])
        fn = ir.Function(self.module, fnty, name=name)
        for arg, (n, _) in zip(fn.args, _ARGS):
            arg.name = n
            if isinstance(arg.type, ir.PointerType):
                arg.add_attribute("noalias")
        a = {n: arg for arg, (n, _) in zip(fn.args, _ARGS)}
        self.a = a
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        self.b = b
        self.m = self.math(b, self.V)
        V, D = self.V, self.D
        # Sp: keys rounded up to whole vectors
        sp = b.mul(b.sdiv(b.add(a["skv"], int64(V - 1)), int64(V)), int64(V), name="sp")
        self.sp = sp
        kt = a["scratch"]
        sbuf = gep(b, kt, b.mul(int64(D), a["ldt"]), name="sbuf")
        with for_range(b, a["begin"], a["end"], name="pair") as p:
            bi = b.sdiv(p, int64(self.H), name="b")
            h = b.srem(p, int64(self.H), name="h")
            hd = b.mul(h, int64(D))
            qp = gep(b, a["q"], b.add(b.mul(bi, a["qb"]), hd), name="qp")
            kp = gep(b, a["k"], b.add(b.mul(bi, a["kb"]), hd), name="kp")
            vp = gep(b, a["v"], b.add(b.mul(bi, a["vb"]), hd), name="vp")
            op = gep(b, a["out"], b.add(b.mul(bi, a["ob"]), hd), name="op")
            mp = None
            if self.has_mask:
                mp = gep(b, a["mask"], b.add(b.mul(bi, a["mb"]), b.mul(h, a["mh"])), name="mp")
            self.pack_kt(kp, kt)
            R = self.R
            nblocks = b.sdiv(a["sq"], int64(R))
            with for_range(b, 0, nblocks, name="blk") as blk:
                self.row_block(R, b.mul(blk, int64(R)), qp, vp, op, mp, kt, sbuf)
            if R > 1:
                with for_range(b, b.mul(nblocks, int64(R)), a["sq"], name="row") as i:
                    self.row_block(1, i, qp, vp, op, mp, kt, sbuf)
        b.ret_void()
        return fn

    # -- 1. Kᵀ into scratch -------------------------------------------------------------------
    def pack_kt(self, kp, kt):
        b, a, V, D = self.b, self.a, self.V, self.D
        ldk, ldt, skv = a["ldk"], a["ldt"], a["skv"]
        full = b.mul(b.sdiv(skv, int64(V)), int64(V), name="kfull")
        dfull = (D // V) * V
        if dfull:
            with for_range(b, 0, full, step=V, name="kj") as j:
                for d0 in range(0, dfull, V):
                    rows = [
                        load_vec(b, gep(b, kp, b.add(b.mul(b.add(j, int64(t)), ldk), int64(d0))), V)
                        for t in range(V)
                    ]
                    cols = transpose(b, rows) if V > 1 else rows
                    for u in range(V):
                        store_vec(
                            b, cols[u], gep(b, kt, b.add(b.mul(int64(d0 + u), ldt), j)), align=4 * V
                        )
        # the rest: dims past the last full vector for the full key blocks, then tail keys
        if dfull < D:
            with for_range(b, 0, full, name="kjs") as j:
                for d in range(dfull, D):
                    x = b.load(gep(b, kp, b.add(b.mul(j, ldk), int64(d))))
                    b.store(x, gep(b, kt, b.add(b.mul(int64(d), ldt), j)))
        with for_range(b, full, skv, name="kjt") as j, for_range(b, 0, D, name="kd") as d:
            x = b.load(gep(b, kp, b.add(b.mul(j, ldk), d)))
            b.store(x, gep(b, kt, b.add(b.mul(d, ldt), j)))
        with for_range(b, skv, self.sp, name="kjz") as j, for_range(b, 0, D, name="kdz") as d:
            b.store(ir.Constant(f32, 0.0), gep(b, kt, b.add(b.mul(d, ldt), j)))

    # -- 2-4. a block of R query rows ---------------------------------------------------------
    def row_block(self, R, i0, qp, vp, op, mp, kt, sbuf):
        b, a, V = self.b, self.a, self.V
        ldt = a["ldt"]
        qrows = [gep(b, qp, b.mul(b.add(i0, int64(r)), a["ldq"])) for r in range(R)]
        srows = [gep(b, sbuf, b.mul(int64(r), ldt)) for r in range(R)]
        mrows = None
        if mp is not None:
            mrows = [gep(b, mp, b.mul(b.add(i0, int64(r)), a["mr"])) for r in range(R)]
        nfull = b.sdiv(a["skv"], int64(V), name="nfull")
        C = self.C
        nchunks = b.sdiv(nfull, int64(C))
        with for_range(b, 0, nchunks, name="jc") as jc:
            self.scores(R, C, b.mul(jc, int64(C * V)), qrows, srows, mrows, kt, full=True)
        if C > 1:
            with for_range(b, b.mul(nchunks, int64(C)), nfull, name="jv") as jv:
                self.scores(R, 1, b.mul(jv, int64(V)), qrows, srows, mrows, kt, full=True)
        tail_start = b.mul(nfull, int64(V))
        has_tail = b.icmp_signed("<", tail_start, a["skv"])
        with b.if_then(has_tail):
            self.scores(R, 1, tail_start, qrows, srows, mrows, kt, full=False)
        inv = self.softmax(srows)
        self.weighted_sum(R, i0, srows, inv, vp, op)

    def scores(self, R, C, j0, qrows, srows, mrows, kt, full: bool):
        """s[r, j0 : j0 + C·V] = q[r]·kt[:, j] · scale + mask[r, j] (full vectors of keys), or
        the last partial vector (full=False): lanes past Skv get -inf."""
        b, a, V, m = self.b, self.a, self.V, self.m
        ldt = a["ldt"]
        accs = [[alloca_once(b, self.vty, name=f"acc{r}_{c}") for c in range(C)] for r in range(R)]
        zero = const(self.vty, 0.0)
        for row in accs:
            for slot in row:
                b.store(zero, slot)
        with for_range(b, 0, self.D, name="d") as d:
            krow = gep(b, kt, b.add(b.mul(d, ldt), j0))
            kv = [load_vec(b, gep(b, krow, c * V), V, align=4 * V) for c in range(C)]
            for r in range(R):
                qs = splat(b, b.load(gep(b, qrows[r], d)), V)
                for c in range(C):
                    b.store(m.fma(qs, kv[c], b.load(accs[r][c])), accs[r][c])
        scale = splat(b, a["scale"], V)
        for r in range(R):
            for c in range(C):
                j = b.add(j0, int64(c * V))
                acc = b.load(accs[r][c])
                if full and mrows is not None:
                    s = m.fma(acc, scale, load_vec(b, gep(b, mrows[r], j), V))
                else:
                    s = b.fmul(acc, scale)
                store_vec(b, s, gep(b, srows[r], j), align=4 * V)
        if full:
            return
        # the partial vector: mask the valid keys, -inf past Skv (up to Sp)
        skv = a["skv"]
        for r in range(R):
            if mrows is not None:
                with for_range(b, j0, skv, name="mj") as j:
                    ptr = gep(b, srows[r], j)
                    b.store(b.fadd(b.load(ptr), b.load(gep(b, mrows[r], j))), ptr)
            with for_range(b, skv, self.sp, name="pj") as j:
                b.store(ir.Constant(f32, float("-inf")), gep(b, srows[r], j))

    def _reduce(self, v, op):
        b = self.b
        w = v.type.count
        while w > 1:
            h = w // 2
            lo = b.shuffle_vector(v, v, ir.Constant(vec(h, ir.IntType(32)), list(range(h))))
            hi = b.shuffle_vector(v, v, ir.Constant(vec(h, ir.IntType(32)), list(range(h, w))))
            v = op(lo, hi)
            w = h
        return b.extract_element(v, ir.Constant(ir.IntType(32), 0))

    def softmax(self, srows):
        """p = exp(s - max) in place over the Sp scores of each row; returns [1 / Σp] per row
        (or the masked-row value when every score of the row is -inf). The rows go through
        each pass together: a row alone is a chain of dependent steps (max, reduce, exp,
        sum, reduce, divide) that left the core idle (1.4 of 5.0 ms at batch 16 x 128)."""
        b, V, m = self.b, self.V, self.m
        R = len(srows)
        nv = b.sdiv(self.sp, int64(V))
        mx_slots = [alloca_once(b, self.vty, name=f"mx{r}") for r in range(R)]
        for slot in mx_slots:
            b.store(const(self.vty, float("-inf")), slot)
        with for_range(b, 0, nv, name="smx") as jv:
            for srow, slot in zip(srows, mx_slots):
                x = load_vec(b, gep(b, srow, b.mul(jv, int64(V))), V, align=4 * V)
                b.store(m.max(x, b.load(slot)), slot)
        ninf = ir.Constant(f32, float("-inf"))
        mxvs = []
        for r, slot in enumerate(mx_slots):
            mx = self._reduce(b.load(slot), lambda x, y: self._max_scalarish(x, y))
            mx = b.select(b.fcmp_ordered("==", mx, ninf), ir.Constant(f32, 0.0), mx,
                          name=f"rowmax{r}")  # fmt: skip
            mxvs.append(splat(b, mx, V))
        sum_slots = [alloca_once(b, self.vty, name=f"sum{r}") for r in range(R)]
        for slot in sum_slots:
            b.store(const(self.vty, 0.0), slot)
        with for_range(b, 0, nv, name="sexp") as jv:
            for srow, mxv, slot in zip(srows, mxvs, sum_slots):
                ptr = gep(b, srow, b.mul(jv, int64(V)))
                x = b.fsub(load_vec(b, ptr, V, align=4 * V), mxv)
                e = m.exp_nonpositive(x, name="e")
                store_vec(b, e, ptr, align=4 * V)
                b.store(b.fadd(b.load(slot), e), slot)
        invs = []
        for r, slot in enumerate(sum_slots):
            total = self._reduce(b.load(slot), lambda x, y: b.fadd(x, y))
            inv = b.fdiv(ir.Constant(f32, 1.0), total)
            invs.append(b.select(b.fcmp_ordered(">", total, ir.Constant(f32, 0.0)), inv,
                                 self.a["masked_row_value"], name=f"inv{r}"))  # fmt: skip
        return invs

    def _max_scalarish(self, x, y):
        b = self.b
        return b.select(b.fcmp_unordered(">", x, y), x, y)

    def weighted_sum(self, R, i0, srows, inv, vp, op):
        """out[i0 + r, 0:D] = inv[r] · Σ_j p[r, j] · v[j, 0:D]."""
        b, a = self.b, self.a
        pieces = _pieces(self.D, self.V)
        maths = {w: self.math(b, w) for _, w in pieces}
        accs = [[alloca_once(b, vec(w), name=f"o{r}_{off}") for off, w in pieces] for r in range(R)]
        for row in accs:
            for slot, (_, w) in zip(row, pieces):
                b.store(const(vec(w), 0.0), slot)
        with for_range(b, 0, a["skv"], name="pv") as j:
            vrow = gep(b, vp, b.mul(j, a["ldv"]))
            vv = [load_vec(b, gep(b, vrow, off), w) for off, w in pieces]
            for r in range(R):
                p = b.load(gep(b, srows[r], j))
                for (off, w), x, slot in zip(pieces, vv, accs[r]):
                    b.store(maths[w].fma(splat(b, p, w), x, b.load(slot)), slot)
        for r in range(R):
            orow = gep(b, op, b.mul(b.add(i0, int64(r)), a["ldo"]))
            for (off, w), slot in zip(pieces, accs[r]):
                y = b.fmul(b.load(slot), splat(b, inv[r], w))
                store_vec(b, y, gep(b, orow, off))


_own_source_digest: str | None = None


def compile_cached(name: str, emit, target: Target, opt, *key_parts) -> jit.JITModule:
    """The module emit() makes, from the on-disk kernel cache (codegen/cache.py) or compiled,
    keyed on the specialisation, the target, and the sources of this module and norm.py (the
    shared code version covers the rest of the code generator and LLVM)."""
    from pathlib import Path

    from sparsednn.codegen import cache

    global _own_source_digest
    if _own_source_digest is None:
        here = Path(__file__).parent
        parts = []
        for f in ("attention.py", "norm.py"):
            try:
                parts.append((here / f).read_bytes())
            except OSError:  # pragma: no cover - installed without sources
                parts.append(f.encode())
        _own_source_digest = cache.digest(*[p.hex() for p in parts])
    target_key = (target.cpu_name, target.features, target.isa, target.vector_width, target.triple)
    key = cache.digest(
        "code", cache.code_version(), _own_source_digest, name, opt, *key_parts, *target_key
    )
    return jit.cached_module(key, target, emit, opt)


def _name(heads: int, head_size: int, target: Target, has_mask: bool) -> str:
    return f"f32_attention_h{heads}_d{head_size}_{target.isa}" + ("_mask" if has_mask else "")


def _emit_module(heads: int, head_size: int, target: Target, has_mask: bool) -> ir.Module:
    name = _name(heads, head_size, target, has_mask)
    mod = jit.new_module(name, target)
    _Emitter(mod, target, heads, head_size, has_mask).emit(name)
    return mod


# --------------------------------------------------------------------------------------------
# Scratch: one growable 64-byte aligned buffer per thread
# --------------------------------------------------------------------------------------------
def _kt_stride(skv: int, width: int) -> int:
    """Row stride of the packed Kᵀ: Skv rounded up to a vector, plus a vector when the stride
    would be a multiple of 512 bytes (rows of kt falling into a few L1 sets)."""
    sp = -(-skv // width) * width
    if sp and (sp * 4) % 512 == 0:
        sp += width
    return max(sp, width)


_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def _addr(a: np.ndarray) -> int:
    """The address of a C-contiguous array's data (through the buffer protocol for writable
    arrays: ~4x cheaper than .ctypes.data)."""
    if a.flags.writeable:
        try:
            return _addressof(_from_buffer(a))
        except (ValueError, TypeError, BufferError):
            pass
    return a.ctypes.data


def _output(out, shape: tuple, where: str) -> np.ndarray:
    """`out` checked to be a writable C-contiguous float32 array of `shape`, or a new one."""
    if out is None:
        return np.empty(shape, np.float32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise SparseDNNError(
            f"{where}: out must be a writable C-contiguous float32 array of shape {list(shape)}, "
            f"got {getattr(out, 'dtype', type(out).__name__)}{list(getattr(out, 'shape', []))}"
        )
    return out


def _dims(x: np.ndarray, n: int, heads: int, head_size: int):
    """(batch, sequence) of a [B, S, H·D] or [B, S, H, D] array, else None."""
    if x.ndim == 3 and x.shape[2] == n:
        return x.shape[0], x.shape[1]
    if x.ndim == 4 and x.shape[2:] == (heads, head_size):
        return x.shape[0], x.shape[1]
    return None


class AttentionKernel(jit.JITKernel):
    """softmax(q·kᵀ·scale + mask)·v for `num_heads` heads of `head_size`; see the module doc.

    The variants with and without a mask are separate modules, each compiled when first
    needed (compile_attention compiles the ones a caller names up front): a model's attention
    takes one of them, and each is ~200 ms of LLVM's code generator."""

    def __init__(self, num_heads: int, head_size: int, target: Target):
        self.num_heads, self.head_size, self.target = num_heads, head_size, target
        self.name = _name(num_heads, head_size, target, False)
        self.rows_per_block = block_rows(head_size, target)
        self._variants: dict[bool, tuple[jit.JITModule, Any]] = {}
        self._variant_lock = threading.Lock()

    def prepare(self, has_mask: bool) -> Any:
        """The compiled function of one variant (compiled, or loaded from the kernel cache, on
        first use)."""
        variant = self._variants.get(has_mask)
        if variant is None:
            with self._variant_lock:
                variant = self._variants.get(has_mask)
                if variant is None:
                    H, D, t = self.num_heads, self.head_size, self.target
                    name = _name(H, D, t, has_mask)
                    jm = compile_cached(name, lambda: _emit_module(H, D, t, has_mask), t, _OPT,
                                        H, D)  # fmt: skip
                    variant = self._variants[has_mask] = (jm, _CTYPES(jm.function_address(name)))
        return variant[1]

    @property
    def _jm(self) -> jit.JITModule:  # (for llvm_ir / asm: the masked variant unless only the other)
        if not self._variants:
            self.prepare(True)
        return self._variants.get(True, self._variants.get(False))[0]

    @property
    def compile_seconds(self) -> float:
        return sum(jm.compile_seconds for jm, _ in self._variants.values())

    def __call__(
        self,
        q,
        k,
        v,
        mask=None,
        *,
        scale: float,
        masked_row_value: float = math.nan,
        num_threads: int = 1,
        where: str = "attention",
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        H, D = self.num_heads, self.head_size
        n = H * D
        packed = k is None and v is None
        if packed:  # q is [B, S, 3·H·D]: q | k | v along the features, as one Linear makes them
            if (
                not isinstance(q, np.ndarray)
                or q.dtype != np.float32
                or q.ndim != 3
                or q.shape[2] != 3 * n
            ):
                raise SparseDNNError(
                    f"{where}: packed q|k|v must be a float32 [batch, sequence, {3 * n}] array, "
                    f"got {getattr(q, 'dtype', type(q).__name__)}{list(getattr(q, 'shape', []))}"
                )
            bq = bk = bv = q.shape[0]
            sq = skv = sv = q.shape[1]
        else:
            dims = []
            for label, x in (("q", q), ("k", k), ("v", v)):
                if not isinstance(x, np.ndarray) or x.dtype != np.float32:
                    raise SparseDNNError(
                        f"{where}: {label} must be a float32 array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', []))}"
                    )
                d = _dims(x, n, H, D)
                if d is None:
                    raise SparseDNNError(
                        f"{where}: {label} must be [batch, sequence, {n}] or [batch, sequence, "
                        f"{H}, {D}] ({H} heads of {D}), got {list(x.shape)}"
                    )
                dims.append(d)
            (bq, sq), (bk, skv), (bv, sv) = dims
            if not (bq == bk == bv) or skv != sv:
                raise SparseDNNError(
                    f"{where}: q {list(q.shape)}, k {list(k.shape)} and v {list(v.shape)} must "
                    "share the batch size, and k and v the sequence length"
                )
        B = bq
        out = _output(out, (B, sq, n), where)
        if B == 0 or sq == 0 or n == 0:
            return out
        if skv == 0:  # softmax over no keys: nothing to weigh
            out.fill(0.0)
            return out
        if packed:
            q = q if q.flags.c_contiguous else np.ascontiguousarray(q)
            qa = _addr(q)
            ka, va, ld = qa + 4 * n, qa + 8 * n, 3 * n
            strides = (ld, ld, ld, n, sq * ld, sq * ld, sq * ld, sq * n)
        else:
            q, k, v = (x if x.flags.c_contiguous else np.ascontiguousarray(x) for x in (q, k, v))
            qa, ka, va = _addr(q), _addr(k), _addr(v)
            strides = (n, n, n, n, sq * n, skv * n, skv * n, sq * n)
        mstrides = (0, 0, 0)
        has_mask = mask is not None
        m_addr = 0
        if has_mask:
            mask, mstrides = self._mask(mask, (B, H, sq, skv), where)
            m_addr = _addr(mask)
        ldt = _kt_stride(skv, self.target.vector_width)
        floats = (D + self.rows_per_block) * ldt
        fn = self.prepare(has_mask)
        pairs = B * H
        args = (qa, ka, va, m_addr, _addr(out))
        common = (sq, skv, *strides, *mstrides, ldt, float(scale), float(masked_row_value))
        threads = self.useful_threads(pairs, sq, skv, num_threads)
        if threads == 1:
            fn(*args, thread_scratch(floats), *common, 0, pairs)
            return out

        def run(lo: int, hi: int) -> None:
            fn(*args, thread_scratch(floats), *common, lo, hi)

        from sparsednn.runtime.native_pool import float_bits
        from sparsednn.runtime.threads import parallel_for, parallel_native

        bounds = [pairs * i // threads for i in range(threads + 1)]
        head = (*args, 0, sq, skv, *strides, *mstrides, ldt, float_bits(scale),
                float_bits(masked_row_value))  # fmt: skip
        rows = [(*head, lo, hi) for lo, hi in itertools.pairwise(bounds)]
        if parallel_native(ctypes.cast(fn, ctypes.c_void_p).value, _KINDS, rows, 5, floats):
            return out
        parallel_for([functools.partial(run, lo, hi) for lo, hi in itertools.pairwise(bounds)])
        return out

    def useful_threads(self, pairs: int, sq: int, skv: int, num_threads: int) -> int:
        flops = 4.0 * pairs * sq * skv * self.head_size
        from sparsednn.runtime.threads import native_pool_active

        per = _FLOPS_PER_EXTRA_THREAD
        if native_pool_active():
            per = min(per, _FLOPS_PER_EXTRA_THREAD_NATIVE)
        return max(1, min(int(num_threads), pairs, 1 + int(flops // per)))

    @staticmethod
    def _mask(mask, target_shape, where):
        """The mask as a float32 array whose last axis is contiguous, and its element strides
        over (batch, head, query row); broadcast axes get stride 0."""
        if not isinstance(mask, np.ndarray) or mask.dtype != np.float32:
            raise SparseDNNError(
                f"{where}: the mask must be a float32 array, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}{list(getattr(mask, 'shape', []))}"
            )
        if mask.ndim > 4 or any(
            m not in (1, t) for m, t in zip(mask.shape[::-1], target_shape[::-1])
        ):
            raise SparseDNNError(
                f"{where}: mask {list(mask.shape)} does not broadcast to [batch, heads, queries, "
                f"keys] = {list(target_shape)}"
            )
        if mask.ndim == 4 and mask.shape[3] == target_shape[3] and mask.flags.c_contiguous:
            m = mask  # the usual case: no copy, no view
        else:
            m = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
            if m.shape[3] != target_shape[3]:  # one value for every key: spell it out
                m = np.broadcast_to(m, (*m.shape[:3], target_shape[3]))
            m = np.ascontiguousarray(m)
        shape, strides = m.shape, m.strides
        return m, (
            0 if shape[0] == 1 else strides[0] >> 2,
            0 if shape[1] == 1 else strides[1] >> 2,
            0 if shape[2] == 1 else strides[2] >> 2,
        )


_kernels = jit.CompiledOnce()  # (sessions compile these on several threads at once)


def _cached(num_heads: int, head_size: int, target: Target) -> AttentionKernel:
    return _kernels.get((num_heads, head_size, target),
                        lambda: AttentionKernel(num_heads, head_size, target))  # fmt: skip


def compile_attention(
    num_heads: int, head_size: int, target: Target | None = None, masks=(True, False)
) -> AttentionKernel:
    """The attention kernel for `num_heads` heads of `head_size` (cached per process), with
    the variants of `masks` compiled now (True: with a mask; a variant not named here is
    compiled at its first call)."""
    if num_heads < 1 or head_size < 1:
        raise SparseDNNError(
            f"attention needs heads and head size >= 1, got {num_heads}, {head_size}"
        )
    kernel = _cached(int(num_heads), int(head_size), target or host_target())
    for has_mask in masks:
        kernel.prepare(bool(has_mask))
    return kernel
