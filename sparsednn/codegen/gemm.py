"""Dense GEMM with the weight packed once, at compile time: Y = act(X @ W + b).

BLAS packs both operands on every call; for inference W never changes, so it is packed once
into panels of NR = 3 vectors of columns, each panel stored k-major ([K, NR] contiguous), and
the kernel reads X in place. The register tile is MR rows of X times one panel: per k, NR/V
vector loads of W and MR broadcasts of X feed MR * NR/V FMAs (8 x 3 = 24 accumulators on
AVX-512, 4 x 3 = 12 on AVX2), which keeps the FMA units, not the loads, the limit.

Loop nest (per call, per thread): row blocks of MC rows, K blocks of KC columns (so that the
MC x KC block of X stays in L2 and a KC x NR panel block in L1), the thread's panels, then
MR-row tiles. Partial sums of a tile go through Y between K blocks; the last K block adds the
bias and applies the activation before storing. Threads split the panels (columns of W), so
that each reads only its share of W: at batch 1 W streams from DRAM.

Specialised on K, N, the tile sizes, the ISA and the epilogue; M, the row range and the panel
range are arguments.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from sparsednn.codegen import irutil as U
from sparsednn.codegen import jit
from sparsednn.codegen.target import Target
from sparsednn.runtime.threads import parallel_for, parallel_native

KC = 256  # K block: a KC x NR panel block is 48 KB on AVX-512 (L1), MC x KC of X 256 KB (L2)
MC = 256


def tile_shape(target: Target) -> tuple[int, int]:
    """(MR rows, NR columns) of the register tile."""
    v = target.vector_width
    return (8 if target.isa == "avx512" else 4), 3 * v


def pack_weight(weight: np.ndarray, nr: int) -> np.ndarray:
    """W [K, N] as panels [P, K, nr] (the last zero-padded), 64-byte aligned."""
    k, n = weight.shape
    p = -(-n // nr)
    raw = np.empty(p * k * nr + 16, np.float32)
    offset = (-raw.ctypes.data // 4) % 16
    packed = raw[offset : offset + p * k * nr].reshape(p, k, nr)
    full = n // nr
    packed[:full] = weight[:, : full * nr].reshape(k, full, nr).transpose(1, 0, 2)
    if full < p:
        packed[full] = 0.0
        packed[full, :, : n - full * nr] = weight[:, full * nr :]
    return packed


def unpack_weight(packed: np.ndarray, n: int) -> np.ndarray:
    p, k, nr = packed.shape
    return np.ascontiguousarray(packed.transpose(1, 0, 2).reshape(k, p * nr)[:, :n])


GEMM_ARGS = "iiiiiii"  # x, packed w, y, bias, m, first panel, end panel (native_pool kinds)
GEMM_SIGNATURE = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 3)


@dataclass
class _Block:
    """What the tiles of one (row block, K block, panel) share: X at the block's first k, the
    panel's rows of that K block, Y and the bias at the panel's first column, the K block's
    length and whether it is the first / the last."""

    x_k: ir.Value
    panel: ir.Value
    y_p: ir.Value
    bias_p: ir.Value
    klen: ir.Value
    first: ir.Value
    last: ir.Value


class GemmEmitter:
    """Emits `void name(const float *x, const float *wp, float *y, const float *bias,
    int64 m, int64 p0, int64 p1)`: rows 0..m of Y, panels p0..p1 (see the module docstring)."""

    def __init__(self, module: ir.Module, name: str, k: int, n: int, has_bias: bool,
                 activation: str, target: Target):  # fmt: skip
        self.module, self.name, self.k, self.n = module, name, k, n
        self.has_bias, self.activation, self.target = has_bias, activation, target
        self.V = target.vector_width
        self.MR, self.NR = tile_shape(target)
        self.NV = self.NR // self.V
        self.P = -(-n // self.NR)
        self.last_cols = n - (self.P - 1) * self.NR  # columns of the last panel
        self.vty = U.vec(self.V)
        self._tiles: dict = {}

    # -- one MR x NR tile over one K block ----------------------------------------------------
    def _tile(self, rows: int, cols: int) -> ir.Function:
        """void tile(x, wp, y, bias, klen, first, last) for `rows` rows and the panel's first
        `cols` columns (a multiple of V but for the last panel)."""
        key = (rows, cols)
        if key in self._tiles:
            return self._tiles[key]
        V, K, N = self.V, self.k, self.n
        fnty = ir.FunctionType(U.void, (U.f32_ptr, U.f32_ptr, U.f32_ptr, U.f32_ptr, U.i64,
                                        U.i1, U.i1))  # fmt: skip
        fn = ir.Function(self.module, fnty, name=f"tile_{rows}x{cols}")
        fn.linkage = "internal"
        fn.attributes.add("alwaysinline")
        x, wp, y, bias, klen, first, last = fn.args
        for a in (x, wp, y, bias):
            a.add_attribute("noalias")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        vty = self.vty
        nvec = -(-cols // V)
        tail = cols - (nvec - 1) * V  # lanes of the last vector that are real columns
        zero = U.const(vty, 0.0)
        fma = U.intrinsic(self.module, f"llvm.fma.{U.type_suffix(vty)}", vty, [vty] * 3)

        def y_ptr(r, j):
            return U.gep(b, y, r * N + j * V)

        def masked(j) -> bool:
            return j == nvec - 1 and tail < V

        mask = ir.Constant(U.vec(V, U.i1), [ir.Constant(U.i1, i < tail) for i in range(V)])
        mload = U.intrinsic(self.module, f"llvm.masked.load.{U.type_suffix(vty)}.p0", vty,
                            [ir.PointerType(vty), U.i32, mask.type, vty])  # fmt: skip
        mstore = U.intrinsic(self.module, f"llvm.masked.store.{U.type_suffix(vty)}.p0", U.void,
                             [vty, ir.PointerType(vty), U.i32, mask.type])  # fmt: skip

        def load_y(r, j):
            ptr = b.bitcast(y_ptr(r, j), ir.PointerType(vty))
            if masked(j):
                return b.call(mload, [ptr, ir.Constant(U.i32, 4), mask, zero])
            return b.load(ptr, align=4)

        def store_y(v, r, j):
            ptr = b.bitcast(y_ptr(r, j), ir.PointerType(vty))
            if masked(j):
                b.call(mstore, [v, ptr, ir.Constant(U.i32, 4), mask])
            else:
                b.store(v, ptr, align=4)

        entry = b.block
        init_bb = fn.append_basic_block("init")
        loop_pre = fn.append_basic_block("k.pre")
        with b.goto_block(init_bb):
            loaded = [[load_y(r, j) for j in range(nvec)] for r in range(rows)]
            b.branch(loop_pre)
        b.cbranch(first, loop_pre, init_bb)
        b.position_at_end(loop_pre)
        acc0 = []
        for r in range(rows):
            row = []
            for j in range(nvec):
                phi = b.phi(vty)
                phi.add_incoming(zero, entry)
                phi.add_incoming(loaded[r][j], init_bb)
                row.append(phi)
            acc0.append(row)

        # k loop, unrolled by UNROLL, then a remainder loop
        UNROLL = 4
        k_main = b.and_(klen, U.int64(~(UNROLL - 1)))

        def k_loop(start, stop, step, acc_in, label):
            pre = b.block
            cond = fn.append_basic_block(f"{label}.cond")
            body = fn.append_basic_block(f"{label}.body")
            end = fn.append_basic_block(f"{label}.end")
            b.branch(cond)
            b.position_at_end(cond)
            kk = b.phi(U.i64, name=label)
            kk.add_incoming(start, pre)
            acc = [[b.phi(vty) for _ in range(nvec)] for _ in range(rows)]
            for r in range(rows):
                for j in range(nvec):
                    acc[r][j].add_incoming(acc_in[r][j], pre)
            b.cbranch(b.icmp_signed("<", kk, stop), body, end)
            b.position_at_end(body)
            cur = [list(row) for row in acc]
            for u in range(step):
                ku = b.add(kk, U.int64(u)) if u else kk
                w_row = U.gep(b, wp, b.mul(ku, U.int64(self.NR)))
                wv = [U.load_vec(b, U.gep(b, w_row, j * V), V, 4 * V) for j in range(nvec)]
                for r in range(rows):
                    xs = b.load(U.gep(b, x, b.add(ku, U.int64(r * K))))
                    xv = U.splat(b, xs, V)
                    for j in range(nvec):
                        cur[r][j] = b.call(fma, [xv, wv[j], cur[r][j]])
            nxt = b.add(kk, U.int64(step))
            kk.add_incoming(nxt, b.block)
            for r in range(rows):
                for j in range(nvec):
                    acc[r][j].add_incoming(cur[r][j], b.block)
            b.branch(cond)
            b.position_at_end(end)
            return acc

        acc = k_loop(U.int64(0), k_main, UNROLL, acc0, "k4")
        acc = k_loop(k_main, klen, 1, acc, "k1")

        # store: raw partial sums, or (last K block) bias + activation
        raw_bb = fn.append_basic_block("store_raw")
        fin_bb = fn.append_basic_block("store_final")
        done_bb = fn.append_basic_block("done")
        b.cbranch(last, fin_bb, raw_bb)
        b.position_at_end(raw_bb)
        for r in range(rows):
            for j in range(nvec):
                store_y(acc[r][j], r, j)
        b.branch(done_bb)
        b.position_at_end(fin_bb)
        math = U.Math(b, vty, self.target.has_fma, self.target.isa)
        for j in range(nvec):
            bias_v = U.load_vec(b, U.gep(b, bias, j * V), V, 4) if self.has_bias else None
            for r in range(rows):
                v = acc[r][j] if bias_v is None else b.fadd(acc[r][j], bias_v)
                store_y(math.activation(v, self.activation), r, j)
        b.branch(done_bb)
        b.position_at_end(done_bb)
        b.ret_void()
        self._tiles[key] = fn
        return fn

    # -- the entry point ----------------------------------------------------------------------
    def emit(self) -> ir.Function:
        K, NR, MR, P = self.k, self.NR, self.MR, self.P
        fnty = ir.FunctionType(U.void, (U.f32_ptr, U.f32_ptr, U.f32_ptr, U.f32_ptr, U.i64,
                                        U.i64, U.i64))  # fmt: skip
        fn = ir.Function(self.module, fnty, name=self.name)
        fn.attributes.add("nounwind")
        x, wp, y, bias, m, p0, p1 = fn.args
        for a, nm in zip(fn.args, ("x", "wp", "y", "bias", "m", "p0", "p1")):
            a.name = nm
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        self.b = b

        def imin(a, c):
            return b.select(b.icmp_signed("<", a, c), a, c)

        with U.for_range(b, 0, m, MC, name="mb") as mb:
            mlen = imin(b.sub(m, mb), U.int64(MC))
            # (K = 0: one empty block, whose tiles still store act(bias))
            with U.for_range(b, 0, max(K, 1), KC, name="kb") as kb:
                klen = imin(b.sub(U.int64(K), kb), U.int64(KC))
                first = b.icmp_signed("==", kb, U.int64(0))
                last = b.icmp_signed(">=", b.add(kb, U.int64(KC)), U.int64(K))
                with U.for_range(b, p0, p1, name="p") as p:
                    block = _Block(
                        x_k=U.gep(b, x, kb),
                        panel=U.gep(
                            b, wp, b.add(b.mul(p, U.int64(K * NR)), b.mul(kb, U.int64(NR)))
                        ),
                        y_p=U.gep(b, y, b.mul(p, U.int64(NR))),
                        bias_p=U.gep(b, bias, b.mul(p, U.int64(NR))),
                        klen=klen,
                        first=first,
                        last=last,
                    )
                    m_full = b.add(mb, b.and_(mlen, U.int64(-MR)))
                    if self.last_cols == NR:
                        self._panel_tiles(fn, block, NR, mb, m_full, b.add(mb, mlen))
                    else:  # the last panel's columns are a part of NR: tiles of their own
                        full_bb = fn.append_basic_block("panel.full")
                        part_bb = fn.append_basic_block("panel.part")
                        join_bb = fn.append_basic_block("panel.join")
                        b.cbranch(b.icmp_signed("==", p, U.int64(P - 1)), part_bb, full_bb)
                        for bb, cols in ((full_bb, NR), (part_bb, self.last_cols)):
                            b.position_at_end(bb)
                            self._panel_tiles(fn, block, cols, mb, m_full, b.add(mb, mlen))
                            b.branch(join_bb)
                        b.position_at_end(join_bb)
        b.ret_void()
        return fn

    def _panel_tiles(self, fn, block: _Block, cols: int, mb, m_full, m_end) -> None:
        """Rows mb .. m_end of one panel block: whole MR-row tiles, then one of the rest."""
        b, MR = self.b, self.MR
        with U.for_range(b, mb, m_full, MR, name="mt") as mt:
            self._call_tile(MR, cols, block, mt)
        sw_end = fn.append_basic_block("rem.end")
        sw = b.switch(b.sub(m_end, m_full), sw_end)
        for rows in range(1, MR):
            case = fn.append_basic_block(f"rem{rows}")
            sw.add_case(ir.Constant(U.i64, rows), case)
            b.position_at_end(case)
            self._call_tile(rows, cols, block, m_full)
            b.branch(sw_end)
        b.position_at_end(sw_end)

    def _call_tile(self, rows: int, cols: int, block: _Block, mt) -> None:
        b = self.b
        x_t = U.gep(b, block.x_k, b.mul(mt, U.int64(self.k)))
        y_t = U.gep(b, block.y_p, b.mul(mt, U.int64(self.n)))
        args = [x_t, block.panel, y_t, block.bias_p, block.klen, block.first, block.last]
        b.call(self._tile(rows, cols), args)


_code_cache: dict = {}
_code_lock = threading.Lock()


def _compiled(k: int, n: int, has_bias: bool, activation: str, target: Target):
    """(JIT module, function address) of the GEMM for one shape and epilogue, compiled once
    per process (or loaded from the on-disk kernel cache)."""
    from sparsednn.codegen.spmm import _code_key, _target_key

    key = (k, n, has_bias, activation, target)
    with _code_lock:
        hit = _code_cache.get(key)
        if hit is None:
            name = f"gemm_{k}x{n}"

            def emit():
                module = jit.new_module(name, target)
                GemmEmitter(module, name, k, n, has_bias, activation, target).emit()
                return module

            ckey = _code_key("gemm", name, key[:-1], tile_shape(target), _target_key(target))
            jm = jit.cached_module(ckey, target, emit)
            hit = _code_cache[key] = (jm, jm.function_address(name))
        return hit


def supported(target: Target) -> bool:
    return target.isa in ("avx512", "avx2")


class PackedGemm:
    """The packed weight, its padded bias and the compiled GEMM of one dense Linear layer."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str,
                 target: Target):  # fmt: skip
        k, n = weight.shape
        self.k, self.n = k, n
        self.mr, self.nr = tile_shape(target)
        self.packed = pack_weight(weight, self.nr)
        self.panels = self.packed.shape[0]
        self.bias = np.zeros(self.panels * self.nr, np.float32)  # readable by whole vectors
        if bias is not None:
            self.bias[:n] = bias
        self.module, self.address = _compiled(k, n, bias is not None, activation, target)
        self._fn = GEMM_SIGNATURE(self.address)

    def dense_weight(self) -> np.ndarray:
        return unpack_weight(self.packed, self.n)

    def __call__(self, x: np.ndarray, out: np.ndarray, parts: int) -> None:
        """out = act(x @ W + b) for C-contiguous float32 x [m, K] and out [m, N] (checked by
        the caller: the code trusts these shapes), on `parts` threads."""
        m = x.shape[0]
        args = (x.ctypes.data, self.packed.ctypes.data, out.ctypes.data, self.bias.ctypes.data)
        parts = min(parts, self.panels)
        if parts <= 1:
            self._fn(*args, m, 0, self.panels)
            return
        # threads split the panels (W's columns): each streams only its share of W
        bounds = [self.panels * i // parts for i in range(parts + 1)]
        rows = [(*args, m, s, e) for s, e in itertools.pairwise(bounds) if e > s]
        if not parallel_native(self.address, GEMM_ARGS, rows):
            parallel_for([(lambda r=r: self._fn(*r)) for r in rows])
