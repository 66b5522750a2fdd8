"""Small helpers for emitting LLVM IR with llvmlite's IRBuilder (in the style of numba's cgutils).

Loops are emitted with loop variables kept in allocas of the entry block; LLVM's SROA/mem2reg
turns them into SSA phis, so generated code stays simple to read and to write.
"""

from __future__ import annotations

from contextlib import contextmanager

from llvmlite import ir

from sparsednn.codegen import gelu_table

f32 = ir.FloatType()
f64 = ir.DoubleType()
i1 = ir.IntType(1)
i32 = ir.IntType(32)
i64 = ir.IntType(64)
void = ir.VoidType()
f32_ptr = ir.PointerType(f32)
i32_ptr = ir.PointerType(i32)


def vec(width: int, elem=f32) -> ir.VectorType:
    return ir.VectorType(elem, width)


def const(ty, value) -> ir.Constant:
    """A constant of scalar or vector type `ty` (vector constants are splats of `value`)."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)
    return ir.Constant(ty, value)


def int64(value: int) -> ir.Constant:
    return ir.Constant(i64, value)


def intrinsic(module: ir.Module, name: str, ret, args) -> ir.Function:
    """Declare (once) an LLVM intrinsic by full mangled name, e.g. 'llvm.fma.v16f32'."""
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, args), name=name)
    return fn


def type_suffix(ty) -> str:
    """The overload suffix LLVM intrinsics use for a float type: 'f32', 'v16f32', ..."""
    if isinstance(ty, ir.VectorType):
        return f"v{ty.count}{type_suffix(ty.element)}"
    if ty == f32:
        return "f32"
    if ty == f64:
        return "f64"
    if isinstance(ty, ir.IntType):
        return f"i{ty.width}"
    raise TypeError(ty)


def alloca_once(builder: ir.IRBuilder, ty, name: str = "") -> ir.AllocaInstr:
    """An alloca in the function's entry block (so mem2reg can promote it)."""
    with builder.goto_entry_block():
        return builder.alloca(ty, name=name)


def alloca_once_value(builder: ir.IRBuilder, value, name: str = "") -> ir.AllocaInstr:
    slot = alloca_once(builder, value.type, name=name)
    builder.store(value, slot)
    return slot


@contextmanager
def for_range(builder: ir.IRBuilder, start, stop, step=1, name: str = "i"):
    """for name in range(start, stop, step) (step > 0), yielding the i64 loop variable."""
    if isinstance(start, int):
        start = int64(start)
    if isinstance(stop, int):
        stop = int64(stop)
    if isinstance(step, int):
        step = int64(step)
    fn = builder.function
    pre = builder.block
    cond_bb = fn.append_basic_block(f"{name}.cond")
    body_bb = fn.append_basic_block(f"{name}.body")
    end_bb = fn.append_basic_block(f"{name}.end")
    builder.branch(cond_bb)
    builder.position_at_end(cond_bb)
    idx = builder.phi(i64, name=name)
    idx.add_incoming(start, pre)
    builder.cbranch(builder.icmp_signed("<", idx, stop), body_bb, end_bb)
    builder.position_at_end(body_bb)
    yield idx
    nxt = builder.add(idx, step, name=f"{name}.next")
    idx.add_incoming(nxt, builder.block)
    builder.branch(cond_bb)
    builder.position_at_end(end_bb)


@contextmanager
def if_then(builder: ir.IRBuilder, cond, name: str = "if"):
    with builder.if_then(cond):
        yield


def gep(builder: ir.IRBuilder, ptr, index, name: str = "") -> ir.Value:
    """&ptr[index] (element-typed pointer arithmetic)."""
    if isinstance(index, int):
        index = int64(index)
    return builder.gep(ptr, [index], inbounds=True, name=name)


def load_vec(builder, ptr, width: int, align: int = 4, name: str = "") -> ir.Value:
    """Load `width` consecutive floats at float* ptr as one vector."""
    vptr = builder.bitcast(ptr, ir.PointerType(vec(width)))
    return builder.load(vptr, align=align, name=name)


def store_vec(builder, value, ptr, align: int = 4) -> None:
    vptr = builder.bitcast(ptr, ir.PointerType(value.type))
    builder.store(value, vptr, align=align)


def splat(builder: ir.IRBuilder, scalar, width: int, name: str = "") -> ir.Value:
    """Broadcast a scalar to all lanes of a vector."""
    vty = vec(width, scalar.type)
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, scalar, ir.Constant(i32, 0))
    mask = ir.Constant(vec(width, i32), [ir.Constant(i32, 0)] * width)
    return builder.shuffle_vector(one, undef, mask, name=name)


def shuffle(builder: ir.IRBuilder, a, b, lanes: list[int], name: str = "") -> ir.Value:
    mask = ir.Constant(vec(len(lanes), i32), [ir.Constant(i32, x) for x in lanes])
    return builder.shuffle_vector(a, b, mask, name=name)


def concat(builder: ir.IRBuilder, parts: list, name: str = "") -> ir.Value:
    """One vector of the lanes of `parts` in order (a power-of-two count of vectors of one
    type; free after LLVM splits the wide vector back into registers)."""
    parts = list(parts)
    assert len(parts) & (len(parts) - 1) == 0 and len({p.type.count for p in parts}) == 1
    while len(parts) > 1:
        n = 2 * parts[0].type.count
        parts = [
            shuffle(builder, parts[i], parts[i + 1], list(range(n)))
            for i in range(0, len(parts), 2)
        ]
    v = parts[0]
    if name:
        v.name = name
    return v


def split(builder: ir.IRBuilder, v, width: int) -> list:
    """The consecutive `width`-lane pieces of vector v."""
    return [
        shuffle(builder, v, v, list(range(i, i + width))) for i in range(0, v.type.count, width)
    ]


def transpose(builder: ir.IRBuilder, rows: list, name: str = "t") -> list:
    """Transpose a V x V matrix held as V vectors of V lanes (V = 4, 8 or 16).

    The classic sequence, written as generic shuffles whose masks the x86 backend matches
    directly (cheap to compile and to run): unpcklps/unpckhps and shufps inside 128-bit lanes
    turn each group of 4 rows into 4-row column pieces, then 128-bit lanes are transposed
    across vectors (vperm2f128 on AVX, two rounds of vshuff32x4 on AVX-512).
    """
    v = len(rows)
    assert v in (4, 8, 16) and rows[0].type.count == v
    lanes = v // 4

    def lane_mask(pattern):  # per 128-bit lane L: pattern gives (source, offset) pairs
        return [src * v + 4 * lane + off for lane in range(lanes) for src, off in pattern]

    unpack_lo = lane_mask([(0, 0), (1, 0), (0, 1), (1, 1)])
    unpack_hi = lane_mask([(0, 2), (1, 2), (0, 3), (1, 3)])
    shuf_lo = lane_mask([(0, 0), (0, 1), (1, 0), (1, 1)])  # shufps 0x44
    shuf_hi = lane_mask([(0, 2), (0, 3), (1, 2), (1, 3)])  # shufps 0xEE
    t = [None] * v
    for i in range(0, v, 2):
        t[i] = shuffle(builder, rows[i], rows[i + 1], unpack_lo, name=f"{name}.lo{i}")
        t[i + 1] = shuffle(builder, rows[i], rows[i + 1], unpack_hi, name=f"{name}.hi{i}")
    u = [None] * v  # u[4g + c], lane L = rows 4g..4g+3 of column 4L + c
    for g in range(0, v, 4):
        u[g + 0] = shuffle(builder, t[g], t[g + 2], shuf_lo, name=f"{name}.q{g}c0")
        u[g + 1] = shuffle(builder, t[g], t[g + 2], shuf_hi, name=f"{name}.q{g}c1")
        u[g + 2] = shuffle(builder, t[g + 1], t[g + 3], shuf_lo, name=f"{name}.q{g}c2")
        u[g + 3] = shuffle(builder, t[g + 1], t[g + 3], shuf_hi, name=f"{name}.q{g}c3")
    if lanes == 1:
        return u

    def lanes_of(a_lanes, b_lanes):  # whole 128-bit lanes of a, then of b
        return [4 * l + j for l in a_lanes for j in range(4)] + [
            v + 4 * l + j for l in b_lanes for j in range(4)
        ]

    out = [None] * v
    for c in range(4):
        if lanes == 2:  # vperm2f128 0x20 / 0x31
            out[c] = shuffle(builder, u[c], u[4 + c], lanes_of([0], [0]), name=f"{name}.col{c}")
            out[4 + c] = shuffle(
                builder, u[c], u[4 + c], lanes_of([1], [1]), name=f"{name}.col{4 + c}"
            )
        else:  # two rounds of vshuff32x4 0x88 / 0xDD
            even, odd = lanes_of([0, 2], [0, 2]), lanes_of([1, 3], [1, 3])
            v0 = shuffle(builder, u[c], u[4 + c], even)
            v1 = shuffle(builder, u[c], u[4 + c], odd)
            v2 = shuffle(builder, u[8 + c], u[12 + c], even)
            v3 = shuffle(builder, u[8 + c], u[12 + c], odd)
            out[c] = shuffle(builder, v0, v2, even, name=f"{name}.col{c}")
            out[8 + c] = shuffle(builder, v0, v2, odd, name=f"{name}.col{8 + c}")
            out[4 + c] = shuffle(builder, v1, v3, even, name=f"{name}.col{4 + c}")
            out[12 + c] = shuffle(builder, v1, v3, odd, name=f"{name}.col{12 + c}")
    return out


class Math:
    """Elementwise float math on scalars or vectors of one type, emitted inline (no libm).

    Vectors may be wider than a register (e.g. <64 x float>): LLVM splits each operation into
    register-sized ones emitted side by side, which interleaves independent dependency chains
    (GELU: ~40 dependent operations) for the out-of-order core."""

    def __init__(self, builder: ir.IRBuilder, ty, use_fma: bool, isa: str = "generic"):
        self.b = builder
        self.ty = ty
        self.use_fma = use_fma
        self.isa = isa
        self.module = builder.module
        suffix = type_suffix(ty)
        # llvm.fma is always fused (a libm call where the CPU has no FMA); llvm.fmuladd lets
        # the backend fuse where it can, so the generic ISA gets a plain multiply and add.
        kind = "fma" if use_fma else "fmuladd"
        self._fma = intrinsic(self.module, f"llvm.{kind}.{suffix}", ty, [ty, ty, ty])

    def c(self, value) -> ir.Constant:
        return const(self.ty, float(value))

    def fma(self, a, b, c, name: str = "") -> ir.Value:
        """a * b + c (fused where the ISA has FMA)."""
        return self.b.call(self._fma, [a, b, c], name=name)

    def max(self, a, b, name: str = "") -> ir.Value:
        # select(a > b, a, b) with NaN in `a` propagated like numpy's maximum.
        gt = self.b.fcmp_unordered(">", a, b)
        return self.b.select(gt, a, b, name=name)

    def min(self, a, b, name: str = "") -> ir.Value:
        lt = self.b.fcmp_unordered("<", a, b)
        return self.b.select(lt, a, b, name=name)

    def abs(self, x, name: str = "") -> ir.Value:
        fabs = intrinsic(self.module, f"llvm.fabs.{type_suffix(self.ty)}", self.ty, [self.ty])
        return self.b.call(fabs, [x], name=name)

    def horner(self, x, coeffs: list[float], name: str = "") -> ir.Value:
        """coeffs[0] + coeffs[1]*x + ... evaluated by Horner's rule with FMAs."""
        acc = self.c(coeffs[-1])
        for i, c in enumerate(reversed(coeffs[:-1])):
            acc = self.fma(acc, x, self.c(c), name=f"{name}.h{i}" if name else "")
        return acc

    def relu(self, x, name: str = "relu") -> ir.Value:
        return self.max(x, self.c(0.0), name=name)

    def exp_split(self, a_hi, a_lo, name: str = "exp") -> ir.Value:
        """exp(a_hi + a_lo) for a_hi + a_lo <= 0, where a_hi may be large but is exact and
        a_lo is small; keeping them apart preserves the bits of a_lo in the reduced argument.

        Cody-Waite reduction a = n*ln2 + r (ln2 = C1 + C2, C1 with 9 significant bits so n*C1
        is exact), a degree-6 polynomial for exp(r) on [-ln2/2, ln2/2] (relative error 2e-9,
        fitted for this project), and 2^n built in the exponent bits. Results below 2^-126 are
        flushed to about 1.6e-38 (the argument is clamped at -87).
        """
        b = self.b
        a = b.fadd(a_hi, a_lo, name=f"{name}.arg")
        a = self.max(a, self.c(-87.0), name=f"{name}.arg.clamped")
        magic = self.c(12582912.0)  # 1.5 * 2^23: adding and subtracting rounds to an integer
        n = b.fsub(b.fadd(b.fmul(a, self.c(_LOG2E)), magic), magic, name=f"{name}.n")
        r = self.fma(n, self.c(-_LN2_C1), a_hi)  # exact (Sterbenz), as a_hi ~ n*ln2
        r = b.fadd(r, a_lo)
        r = self.fma(n, self.c(-_LN2_C2), r, name=f"{name}.r")
        p = self.horner(r, _EXP_COEFFS, name=f"{name}.poly")
        ity = vec(self.ty.count, i32) if isinstance(self.ty, ir.VectorType) else i32
        ni = b.fptosi(n, ity)
        bits = b.shl(b.add(ni, const(ity, 127)), const(ity, 23))
        scale = b.bitcast(bits, self.ty, name=f"{name}.2n")
        return b.fmul(p, scale, name=name)

    def exp_nonpositive(self, x, name: str = "exp") -> ir.Value:
        """exp(x) for x <= 0 (NaN propagates; -inf and anything below -200 give exactly 0).

        On AVX-512 the same reduction and polynomial as exp_split, with n rounded by
        vrndscaleps and 2^n applied by vscalefps (which underflows to 0 by itself): 12
        operations instead of 19 with the flush, and the same bits down to e^-87; below that
        denormal down to e^-103 (exp_split flushes them), then 0. Elsewhere: exp_split,
        flushed to 0 below e^-87."""
        b = self.b
        if not (self.isa == "avx512" and isinstance(self.ty, ir.VectorType)
                and self.ty.count == 16):  # fmt: skip
            e = self.exp_split(self.max(x, self.c(-87.0)), self.c(0.0), name=name)
            return b.select(b.fcmp_ordered("<", x, self.c(-87.0)), self.c(0.0), e)
        roundeven = intrinsic(self.module, "llvm.roundeven.v16f32", self.ty, [self.ty])
        scalef = intrinsic(self.module, "llvm.x86.avx512.mask.scalef.ps.512", self.ty,
                           [self.ty, self.ty, self.ty, ir.IntType(16), i32])  # fmt: skip
        a = self.max(x, self.c(-200.0), name=f"{name}.arg")
        n = b.call(roundeven, [b.fmul(a, self.c(_LOG2E))], name=f"{name}.n")
        r = self.fma(n, self.c(-_LN2_C1), a)  # exact, as in exp_split
        r = self.fma(n, self.c(-_LN2_C2), r, name=f"{name}.r")
        p = self.horner(r, _EXP_COEFFS, name=f"{name}.poly")
        # (all lanes, rounding 4: the current direction)
        return b.call(scalef, [p, n, p, ir.Constant(ir.IntType(16), -1), ir.Constant(i32, 4)],
                      name=name)  # fmt: skip

    def square_exact(self, x, name: str = "sq") -> tuple:
        """(hi, lo) with hi + lo == x*x exactly (FMA, or a float64 product without FMA)."""
        b = self.b
        hi = b.fmul(x, x, name=f"{name}.hi")
        if self.use_fma:
            lo = self.fma(x, x, b.fsub(self.c(-0.0), hi), name=f"{name}.lo")
        else:
            dty = vec(self.ty.count, f64) if isinstance(self.ty, ir.VectorType) else f64
            xd = b.fpext(x, dty)
            lo_d = b.fsub(b.fmul(xd, xd), b.fpext(hi, dty))
            lo = b.fptrunc(lo_d, self.ty, name=f"{name}.lo")
        return hi, lo

    def gelu(self, x, name: str = "gelu") -> ir.Value:
        """Exact (erf) GELU, x * Phi(x): by table on AVX-512 (`gelu_table`), else by erfc."""
        if self.isa == "avx512" and isinstance(self.ty, ir.VectorType) and self.ty.count % 16 == 0:
            return self.gelu_by_table(x, name)
        return self.gelu_by_erfc(x, name)

    def gelu_by_table(self, x, name: str = "gelu") -> ir.Value:
        """x * Phi(x), Phi a degree-5 polynomial per interval of x (`gelu_table`), the lanes'
        coefficients picked from 32-entry tables by vpermi2ps (AVX-512, 16-lane pieces).

        x is clamped to just outside [LOW, HIGH], so the interval index r is 0 (Phi = 0) or 31
        (Phi = 1) there and u = x - centre stays small (inf gives inf or NaN as the erfc form
        does; NaN gives NaN: its index lanes are in range whatever the conversion gives)."""
        b = self.b
        v16, i16 = vec(16), vec(16, i32)
        permute = intrinsic(self.module, "llvm.x86.avx512.vpermi2var.ps.512", v16,
                            [v16, i16, v16])  # fmt: skip
        roundeven = intrinsic(self.module, f"llvm.roundeven.{type_suffix(self.ty)}", self.ty,
                              [self.ty])  # fmt: skip
        # (clamped 0.9 of an interval outside the table: the interval coordinate is then -0.4
        # or 31.4, far from a rounding boundary, so the index is 0 or 31 whatever the rounding)
        lo, hi = gelu_table.LOW - 0.9 * gelu_table.WIDTH, gelu_table.HIGH + 0.9 * gelu_table.WIDTH
        xc = b.select(b.fcmp_ordered(">", x, self.c(lo)), x, self.c(lo))
        xc = b.select(b.fcmp_ordered("<", xc, self.c(hi)), xc, self.c(hi), name=f"{name}.xc")
        s = self.fma(xc, self.c(1.0 / gelu_table.WIDTH),
                     self.c(0.5 - gelu_table.LOW / gelu_table.WIDTH))  # fmt: skip
        r = b.call(roundeven, [s], name=f"{name}.r")
        u = b.fsub(xc, self.fma(r, self.c(gelu_table.WIDTH),
                                self.c(gelu_table.LOW - 0.5 * gelu_table.WIDTH)), name=f"{name}.u")
        index = split(b, b.fptosi(r, vec(self.ty.count, i32)), 16)

        def coefficient(d):
            table = [ir.Constant(v16, [ir.Constant(f32, row[d]) for row in gelu_table.TABLE[h:h + 16]])
                     for h in (0, 16)]  # fmt: skip
            parts = [b.call(permute, [table[0], i, table[1]]) for i in index]
            return parts[0] if len(parts) == 1 else concat(b, parts)

        p = coefficient(gelu_table.DEGREE)
        for d in reversed(range(gelu_table.DEGREE)):
            p = self.fma(p, u, coefficient(d))
        return b.fmul(x, p, name=name)

    def gelu_by_erfc(self, x, name: str = "gelu") -> ir.Value:
        """Exact (erf) GELU: 0.5 * x * (1 + erf(x / sqrt 2)) = 0.5 * x * erfc(-x / sqrt 2).

        erfc(z) for z = |x|/sqrt2 >= 0 is t * exp(-z^2 + P(t)) with t = 1 / (1 + z/2) and P a
        degree-9 polynomial fitted (weighted least squares, towards minimax) to
        log(erfc(z) e^(z^2) / t) on z in [0, 10]: relative error 5e-8 in exact arithmetic.
        z^2 = x^2/2 is kept exact as hi + lo. For x >= 0 we use 2 - erfc(z), so the result has
        a relative error of about 4e-7 over the whole float range (measured against float64),
        with no cancellation for negative x. Past |x| = 13 (erfc(9.2) ~ 1e-38) erfc is taken as 0.
        """
        b = self.b
        abs_x = self.abs(x)
        ax = self.min(abs_x, self.c(13.0), name=f"{name}.ax")
        hi, lo = self.square_exact(ax, name=f"{name}.x2")
        z = b.fmul(ax, self.c(_SQRT1_2), name=f"{name}.z")
        t = b.fdiv(self.c(1.0), self.fma(z, self.c(0.5), self.c(1.0)), name=f"{name}.t")
        p = self.horner(b.fsub(t, self.c(_ERFC_CENTER)), _ERFC_COEFFS, name=f"{name}.p")
        e = self.exp_split(
            b.fmul(hi, self.c(-0.5)), self.fma(lo, self.c(-0.5), p), name=f"{name}.e"
        )
        erfc_z = b.fmul(t, e, name=f"{name}.erfc")
        # past |x| = 13, GELU is x or 0 in float32 (|x * erfc| < 1e-37 unless x is huge)
        erfc_z = b.select(b.fcmp_ordered(">", abs_x, self.c(13.0)), self.c(0.0), erfc_z)
        neg = b.fcmp_ordered("<", x, self.c(0.0))
        phi2 = b.select(neg, erfc_z, b.fsub(self.c(2.0), erfc_z), name=f"{name}.2phi")
        return b.fmul(b.fmul(x, self.c(0.5)), phi2, name=name)

    def activation(self, x, kind: str) -> ir.Value:
        if kind == "none":
            return x
        if kind == "relu":
            return self.relu(x)
        if kind == "gelu":
            return self.gelu(x)
        raise ValueError(f"unknown activation {kind!r}")


ACTIVATIONS = ("none", "relu", "gelu")

_LOG2E = 1.4426950408889634
_SQRT1_2 = 0.7071067811865476
_LN2_C1 = 0.693359375  # 355/512
_LN2_C2 = 0.6931471805599453 - 0.693359375
_EXP_COEFFS = [
    1.0,
    1.0,
    0.49999991059303284,
    0.16666419804096222,
    0.04166822507977486,
    0.008374815806746483,
    0.001383684342727065,
]
_ERFC_CENTER = 0.5833333333333334  # P is evaluated at t - 7/12 (t in [1/6, 1])
_ERFC_COEFFS = [
    -0.5585954189300537,
    1.368736982345581,
    0.09070397168397903,
    -0.4073916971683502,
    -0.0352664478123188,
    0.29507872462272644,
    -0.04332061856985092,
    -0.2440139353275299,
    0.08045674115419388,
    0.14219442009925842,
]
