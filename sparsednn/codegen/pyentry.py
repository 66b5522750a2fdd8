"""Native Python entry points: CPython functions generated with LLVM that check a kernel call's
arrays and run the kernel, with no ctypes and no Python in between.

A panel kernel called the ordinary way pays ~1.1 us for ctypes to convert its 11 arguments and
~1.5 us of Python around it (checks, addresses, a probe array): 3.5-4 us in all right after a
kernel has run, its caches cold (768x768 at 98% and 128 tokens: 46 us a call, 42 of them the
kernel). The entry point is a builtin function (METH_FASTCALL, the calling convention of C
extensions): it reads the ndarray fields it needs (type, dtype, shape, flags, data), finds the
call's plan in a table the Python path fills, releases the GIL and calls the kernel, or hands
the call to the pool. Anything it does not know (a new batch shape, a wrong dtype, an overlap,
a view) it leaves to the Python path, which has the checks and the error messages.

    entry(x, out, num_threads, scratch) -> 1: run, X finite; 0: run, X held a NaN or an
        infinity; 2: run, not probed (SpMV); None: not run (call the Python path)

Python objects are read at the offsets of CPython's and NumPy's C structs; available() checks
every one of them on live objects first, and without that (another interpreter, a
free-threaded build, another layout) there are no entry points: the Python path runs alone.
"""

from __future__ import annotations

import ctypes
import sys
import sysconfig
import threading

import numpy as np
from llvmlite import ir

from sparsednn.codegen import jit
from sparsednn.codegen.irutil import f32, i32, i64

# offsets in CPython's PyObject and NumPy's PyArrayObject (checked by available())
OB_TYPE, A_DATA, A_ND, A_DIMS, A_DESCR, A_FLAGS = 8, 16, 24, 32, 56, 64
C_CONTIGUOUS, WRITEABLE = 0x1, 0x400

# the descriptor of a kernel's entry point: int64 words
(D_VALID, D_K, D_N, D_FN, D_P0, D_P1, D_P2, D_PROBE_OFF, D_SPMV_FN, D_SPMV_PARAMS,
 D_SPMV_SLICES, D_SPMV_MAX_M, D_NDARRAY, D_F32, D_INT, D_SAVE, D_RESTORE, D_INCREF,
 D_AS_SSIZE, D_ERR_CLEAR, D_NONE, D_RET0, D_RET1, D_RET2) = range(24)  # fmt: skip
D_TABLE = 24
TABLE = 64  # plans per kernel (call shapes beyond that take the Python path)
DESC_WORDS = D_TABLE + TABLE

# a plan: int64 words, then per task its X and Y byte offsets
(P_M, P_THREADS, P_TASKS, P_LAYOUT, P_TRAMP, P_CTX, P_WIDTH, P_PROBES, P_POOL, P_TRY_LOCK,
 P_DISPATCH, P_UNLOCK, P_COL_X, P_COL_Y, P_COL_PROBE) = range(15)  # fmt: skip
P_OFFSETS = 16

# the panel kernel's arguments (codegen/spmm.py _KERNEL_ARGS)
KERNEL_ARGS = 11

_i8p = ir.PointerType(ir.IntType(8))
_i64p = ir.PointerType(i64)
_ENTRY_TY = ir.FunctionType(_i8p, [_i8p, ir.PointerType(_i8p), i64])

_lock = threading.Lock()
_state: dict = {}


class _MethodDef(ctypes.Structure):
    _fields_ = [("ml_name", ctypes.c_char_p), ("ml_meth", ctypes.c_void_p),
                ("ml_flags", ctypes.c_int), ("ml_doc", ctypes.c_char_p)]  # fmt: skip


_METH_FASTCALL = 0x80


def _read(addr: int, ctype):
    return ctype.from_address(addr).value


def _layout_holds() -> bool:
    """Whether the offsets above are those of this interpreter and NumPy, on live objects."""
    if (sys.implementation.name != "cpython" or sysconfig.get_config_var("Py_GIL_DISABLED")
            or ctypes.sizeof(ctypes.c_void_p) != 8 or sys.byteorder != "little"):  # fmt: skip
        return False
    base = np.zeros((3, 5), np.float32)
    cases = [base, base[:, 1:], base.T, np.zeros(7, np.float32), np.zeros((2, 4), np.float64)]
    ro = np.ones((4, 2), np.float32)
    ro.flags.writeable = False
    cases.append(ro)
    if np.ndarray.__basicsize__ < A_FLAGS + 4:
        return False
    for a in cases:
        o = id(a)
        if _read(o + OB_TYPE, ctypes.c_void_p) != id(np.ndarray):
            return False
        if _read(o + A_DATA, ctypes.c_void_p) != a.ctypes.data:
            return False
        if _read(o + A_ND, ctypes.c_int32) != a.ndim:
            return False
        if _read(o + A_DESCR, ctypes.c_void_p) != id(a.dtype):
            return False
        dims = _read(o + A_DIMS, ctypes.c_void_p)  # (dereferenced once the rest matched)
        if not dims or tuple((ctypes.c_int64 * a.ndim).from_address(dims)) != a.shape:
            return False
        flags = _read(o + A_FLAGS, ctypes.c_int32)
        if bool(flags & C_CONTIGUOUS) != a.flags.c_contiguous:
            return False
        if bool(flags & WRITEABLE) != a.flags.writeable:
            return False
    return _read(id(7) + OB_TYPE, ctypes.c_void_p) == id(int)


def _api() -> dict | None:
    """The CPython functions and objects an entry point uses, by address (None: unavailable)."""
    py = ctypes.pythonapi
    try:
        addr = {name: ctypes.cast(getattr(py, name), ctypes.c_void_p).value for name in
                ("PyEval_SaveThread", "PyEval_RestoreThread", "Py_IncRef", "PyLong_AsSsize_t",
                 "PyErr_Clear", "PyCFunction_NewEx")}  # fmt: skip
    except AttributeError:
        return None
    # (PYFUNCTYPE: called with the GIL held)
    new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.py_object, ctypes.c_void_p)
    addr["new_function"] = new(addr["PyCFunction_NewEx"])
    return addr


def _emit(mod: ir.Module) -> None:
    """spmm_entry(self, args, nargs): see the module's docstring; self is the descriptor (an
    int64 ndarray)."""
    f = ir.Function(mod, _ENTRY_TY, "spmm_entry")
    self_, args, nargs = f.args
    b = ir.IRBuilder(f.append_basic_block("entry"))

    def c(v):
        return ir.Constant(i64, v)

    def word(p, i):  # p[i] of an i64*
        return b.load(b.gep(p, [c(i) if isinstance(i, int) else i], inbounds=True))

    def field(obj, off, ty=i64):  # an object's field at byte offset off
        return b.load(b.bitcast(b.gep(obj, [c(off)], inbounds=True), ir.PointerType(ty)))

    def fn(addr, ret, params):
        return b.inttoptr(addr, ir.PointerType(ir.FunctionType(ret, params)))

    def returning(slot):  # a new reference to desc[slot] (None, 0, 1 or 2)
        obj = b.inttoptr(word(desc, slot), _i8p)
        b.call(fn(word(desc, D_INCREF), ir.VoidType(), [_i8p]), [obj])
        b.ret(obj)

    def check(cond, name):  # continue in a new block if cond, else return None
        ok = f.append_basic_block(name)
        b.cbranch(cond, ok, none_bb)
        b.position_at_end(ok)

    desc = b.bitcast(field(self_, A_DATA, _i8p), _i64p)
    none_bb = f.append_basic_block("none")
    check(b.and_(b.icmp_signed("==", nargs, c(4)),
                 b.icmp_signed("!=", word(desc, D_VALID), c(0))), "args")  # fmt: skip
    x, y, nt_obj, scratch_obj = (b.load(b.gep(args, [c(i)], inbounds=True)) for i in range(4))
    arr_t, int_t, f32_d = word(desc, D_NDARRAY), word(desc, D_INT), word(desc, D_F32)
    ok = b.icmp_signed("==", field(x, OB_TYPE), arr_t)
    ok = b.and_(ok, b.icmp_signed("==", field(y, OB_TYPE), arr_t))
    ok = b.and_(ok, b.icmp_signed("==", field(nt_obj, OB_TYPE), int_t))
    ok = b.and_(ok, b.icmp_signed("==", field(scratch_obj, OB_TYPE), int_t))
    check(ok, "types")
    two = ir.Constant(i32, 2)
    ok = b.and_(b.icmp_signed("==", field(x, A_DESCR), f32_d),
                b.icmp_signed("==", field(y, A_DESCR), f32_d))  # fmt: skip
    ok = b.and_(ok, b.icmp_signed("==", field(x, A_ND, i32), two))
    ok = b.and_(ok, b.icmp_signed("==", field(y, A_ND, i32), two))
    xf, yf = field(x, A_FLAGS, i32), field(y, A_FLAGS, i32)
    ok = b.and_(ok, b.icmp_signed("!=", b.and_(xf, ir.Constant(i32, C_CONTIGUOUS)),
                                  ir.Constant(i32, 0)))  # fmt: skip
    want = ir.Constant(i32, C_CONTIGUOUS | WRITEABLE)
    ok = b.and_(ok, b.icmp_signed("==", b.and_(yf, want), want))
    check(ok, "arrays")
    k, n = word(desc, D_K), word(desc, D_N)
    xd, yd = field(x, A_DIMS, _i64p), field(y, A_DIMS, _i64p)
    m = word(xd, 0)
    ok = b.and_(b.icmp_signed(">", m, c(0)), b.icmp_signed("==", word(xd, 1), k))
    ok = b.and_(ok, b.icmp_signed("==", word(yd, 0), m))
    ok = b.and_(ok, b.icmp_signed("==", word(yd, 1), n))
    check(ok, "shapes")
    xa, ya = field(x, A_DATA), field(y, A_DATA)
    x_end = b.add(xa, b.mul(b.mul(m, k), c(4)))
    y_end = b.add(ya, b.mul(b.mul(m, n), c(4)))
    overlap = b.and_(b.icmp_unsigned("<", xa, y_end), b.icmp_unsigned("<", ya, x_end))
    check(b.not_(overlap), "apart")
    as_ssize = fn(word(desc, D_AS_SSIZE), i64, [_i8p])
    cleared = f.append_basic_block("clear_error")
    ints = []
    for name, obj in (("threads", nt_obj), ("scratch", scratch_obj)):
        ints.append(b.call(as_ssize, [obj]))  # (each checked before the next call)
        ok_bb = f.append_basic_block(name)
        b.cbranch(b.icmp_signed("<", ints[-1], c(1)), cleared, ok_bb)
        b.position_at_end(ok_bb)
    nt, scratch = ints
    ints_bb = b.block
    b.position_at_end(cleared)  # (-1 may come with an OverflowError set: drop it)
    b.call(fn(word(desc, D_ERR_CLEAR), ir.VoidType(), []), [])
    b.branch(none_bb)
    b.position_at_end(ints_bb)

    save = fn(word(desc, D_SAVE), _i8p, [])
    restore = fn(word(desc, D_RESTORE), ir.VoidType(), [_i8p])

    # few tokens (the SpMV kernel) on one thread: no plan needed
    spmv_bb = f.append_basic_block("spmv")
    panel_bb = f.append_basic_block("plans")
    few = b.icmp_signed("<=", m, word(desc, D_SPMV_MAX_M))
    b.cbranch(b.and_(few, b.icmp_signed("==", nt, c(1))), spmv_bb, panel_bb)
    b.position_at_end(spmv_bb)
    spmv = word(desc, D_SPMV_FN)
    check(b.icmp_signed("!=", spmv, c(0)), "spmv_ready")
    spmv_fn = fn(spmv, ir.VoidType(), [i64] * 7)
    ts = b.call(save, [])
    b.call(spmv_fn, [xa, m, ya, c(0), word(desc, D_SPMV_SLICES), word(desc, D_SPMV_PARAMS),
                     scratch])  # fmt: skip
    b.call(restore, [ts])
    returning(D_RET2)

    # else the plan of (m, nt) from the table (open addressing, never deleted): one task (the
    # SpMV or the panel kernel, as m says) on this thread, or several on the pool
    b.position_at_end(panel_bb)
    table = b.gep(desc, [c(D_TABLE)], inbounds=True)
    start = b.urem(b.add(b.mul(m, c(31)), nt), c(TABLE))  # (as in SpmmEntry.add_plan)
    probe_bb = f.append_basic_block("lookup")
    hit_bb = f.append_basic_block("hit")
    next_bb = f.append_basic_block("lookup_next")
    b.branch(probe_bb)
    b.position_at_end(probe_bb)
    i = b.phi(i64)
    i.add_incoming(c(0), panel_bb)
    rec_addr = word(table, b.urem(b.add(start, i), c(TABLE)))
    check(b.icmp_signed("!=", rec_addr, c(0)), "occupied")
    rec = b.inttoptr(rec_addr, _i64p)
    same = b.and_(b.icmp_signed("==", word(rec, P_M), m),
                  b.icmp_signed("==", word(rec, P_THREADS), nt))  # fmt: skip
    b.cbranch(same, hit_bb, next_bb)
    b.position_at_end(next_bb)
    i_next = b.add(i, c(1))
    i.add_incoming(i_next, next_bb)
    b.cbranch(b.icmp_signed("<", i_next, c(TABLE)), probe_bb, none_bb)

    b.position_at_end(hit_bb)
    kernel = fn(word(desc, D_FN), ir.VoidType(), [i64] * KERNEL_ARGS)
    tasks = word(rec, P_TASKS)
    direct_bb = f.append_basic_block("direct")
    one_bb = f.append_basic_block("one_thread")
    pool_bb = f.append_basic_block("pool")
    b.cbranch(b.icmp_signed("==", tasks, c(1)), direct_bb, pool_bb)
    b.position_at_end(direct_bb)
    b.cbranch(few, spmv_bb, one_bb)

    def finite_result(probes, count):  # 1 if no probe is NaN, else 0
        loop = f.append_basic_block("probes")
        body = f.append_basic_block("probe")
        done = f.append_basic_block("probes_done")
        pre = b.block
        b.branch(loop)
        b.position_at_end(loop)
        j = b.phi(i64)
        nan = b.phi(ir.IntType(1))
        j.add_incoming(c(0), pre)
        nan.add_incoming(ir.Constant(ir.IntType(1), 0), pre)
        b.cbranch(b.icmp_signed("<", j, count), body, done)
        b.position_at_end(body)
        v = b.load(b.gep(probes, [j], inbounds=True))
        nan2 = b.or_(nan, b.fcmp_unordered("uno", v, v))
        j.add_incoming(b.add(j, c(1)), body)
        nan.add_incoming(nan2, body)
        b.branch(loop)
        b.position_at_end(done)
        return nan

    b.position_at_end(one_bb)
    probe = b.add(scratch, word(desc, D_PROBE_OFF))
    ts = b.call(save, [])
    b.call(kernel, [xa, m, ya, c(0), n, word(desc, D_P0), word(desc, D_P1), word(desc, D_P2),
                    scratch, probe, word(rec, P_LAYOUT)])  # fmt: skip
    b.call(restore, [ts])
    v = b.load(b.inttoptr(probe, ir.PointerType(f32)))
    nan = b.fcmp_unordered("uno", v, v)
    nan_bb, fin_bb = f.append_basic_block("nan"), f.append_basic_block("finite")
    b.cbranch(nan, nan_bb, fin_bb)

    # several tasks: own the pool, write the call's addresses into the plan's rows, dispatch
    b.position_at_end(pool_bb)
    state = word(rec, P_POOL)
    ts = b.call(save, [])
    got = b.call(fn(word(rec, P_TRY_LOCK), i64, [i64]), [state])
    busy_bb, locked_bb = f.append_basic_block("busy"), f.append_basic_block("locked")
    b.cbranch(b.icmp_signed("!=", got, c(0)), locked_bb, busy_bb)
    b.position_at_end(busy_bb)
    b.call(restore, [ts])
    b.branch(none_bb)
    b.position_at_end(locked_bb)
    ctx = word(rec, P_CTX)
    ctx_p = b.inttoptr(ctx, _i64p)
    width = word(rec, P_WIDTH)
    probes = word(rec, P_PROBES)
    rows_bb, row_bb, rows_done = (f.append_basic_block(s) for s in ("rows", "row", "rows_done"))
    b.branch(rows_bb)
    b.position_at_end(rows_bb)
    t = b.phi(i64)
    t.add_incoming(c(0), locked_bb)
    b.cbranch(b.icmp_signed("<", t, tasks), row_bb, rows_done)
    b.position_at_end(row_bb)
    row = b.add(b.mul(t, width), c(1))
    xo = word(rec, b.add(c(P_OFFSETS), b.mul(t, c(2))))
    yo = word(rec, b.add(c(P_OFFSETS + 1), b.mul(t, c(2))))
    b.store(b.add(xa, xo), b.gep(ctx_p, [b.add(row, word(rec, P_COL_X))], inbounds=True))
    b.store(b.add(ya, yo), b.gep(ctx_p, [b.add(row, word(rec, P_COL_Y))], inbounds=True))
    probe_col_bb, row_end_bb = f.append_basic_block("probe_col"), f.append_basic_block("row_end")
    b.cbranch(b.icmp_signed("!=", probes, c(0)), probe_col_bb, row_end_bb)  # (SpMV: none)
    b.position_at_end(probe_col_bb)
    b.store(b.add(probes, b.mul(t, c(4))),
            b.gep(ctx_p, [b.add(row, word(rec, P_COL_PROBE))], inbounds=True))  # fmt: skip
    b.branch(row_end_bb)
    b.position_at_end(row_end_bb)
    t.add_incoming(b.add(t, c(1)), row_end_bb)
    b.branch(rows_bb)
    b.position_at_end(rows_done)
    b.call(fn(word(rec, P_DISPATCH), ir.VoidType(), [i64] * 4),
           [state, word(rec, P_TRAMP), ctx, tasks])  # fmt: skip
    probed_bb, unprobed_bb = f.append_basic_block("probed"), f.append_basic_block("unprobed")
    b.cbranch(b.icmp_signed("==", probes, c(0)), unprobed_bb, probed_bb)
    b.position_at_end(unprobed_bb)
    b.call(fn(word(rec, P_UNLOCK), ir.VoidType(), [i64]), [state])
    b.call(restore, [ts])
    returning(D_RET2)
    b.position_at_end(probed_bb)
    nan = finite_result(b.inttoptr(probes, ir.PointerType(f32)), tasks)
    b.call(fn(word(rec, P_UNLOCK), ir.VoidType(), [i64]), [state])  # (probes read first)
    b.call(restore, [ts])
    b.cbranch(nan, nan_bb, fin_bb)

    b.position_at_end(nan_bb)
    returning(D_RET0)
    b.position_at_end(fin_bb)
    returning(D_RET1)
    b.position_at_end(none_bb)
    returning(D_NONE)


def _immortal_method(jm) -> int:
    """The address of a PyMethodDef for spmm_entry in memory never freed, its code kept alive
    for good: the builtin functions read it on every call and when they are freed, which can
    be after this module's globals are cleared at exit (or after a reload)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(jm))  # (never released: the code stays)
    malloc = ctypes.CDLL(None).malloc
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    name = b"spmm_entry\0"
    block = malloc(ctypes.sizeof(_MethodDef) + len(name))
    if not block:
        raise MemoryError("no memory for the entry point's method definition")
    ctypes.memmove(block + ctypes.sizeof(_MethodDef), name, len(name))
    method = _MethodDef.from_address(block)
    method.ml_name = ctypes.cast(block + ctypes.sizeof(_MethodDef), ctypes.c_char_p)
    method.ml_meth = jm.function_address("spmm_entry")
    method.ml_flags, method.ml_doc = _METH_FASTCALL, None
    return block


def _compiled():
    """(api, address of the method definition), compiled once per process through the kernel
    cache; None if the layout checks fail or anything else does (no entry points then)."""
    with _lock:
        if "entry" not in _state:
            _state["entry"] = None
            try:
                api = _api() if _layout_holds() else None
                if api is not None:
                    from sparsednn.codegen import cache
                    from sparsednn.codegen.target import host_target

                    t = host_target()
                    key = cache.digest("code", cache.code_version(), "pyentry", t.cpu_name,
                                       t.features, t.triple)  # fmt: skip

                    def emit():
                        mod = jit.new_module("sparsednn_pyentry", t)
                        _emit(mod)
                        return mod

                    jm = jit.cached_module(key, t, emit)
                    _state["entry"] = (api, _immortal_method(jm))
            except Exception:  # noqa: BLE001 - no entry points: the Python path runs every call
                _state["entry"] = None
        return _state["entry"]


class _Descriptor(np.ndarray):
    """The int64 words an entry point reads (its `self`), holding in `owners` everything they
    point at: the function object keeps it, so a kept entry point never calls into freed
    memory. (A subclass adds no field before the array's data pointer.)"""

    owners: list


class SpmmEntry:
    """The entry point of one sparse linear kernel, `call`, and the plans it knows. Plans are
    added by the Python path (add_plan) and kept for the kernel's life: the table only fills,
    so the entry point reads it without a lock (under the GIL, before it releases it).

    The entry point trusts its `scratch` argument (a positive int) as the address of a
    writable buffer of the kernel's `_entry_floats` floats: it is private to the kernel."""

    def __init__(self, k: int, n: int, fn_addr: int, ptrs, probe_offset: int, spmv_max_m: int,
                 owners=()):  # fmt: skip
        """owners: what fn_addr and ptrs point into (kept as long as the entry point is)."""
        compiled = _compiled()
        if compiled is None:
            raise RuntimeError("native entry points are not available here")
        api, method = compiled
        d = self.desc = np.zeros(DESC_WORDS, np.int64).view(_Descriptor)
        d.owners = [np.dtype(np.float32), *owners]
        self._lock = threading.Lock()
        self._known: set = set()  # (m, num_threads) of the plans in the table
        d[D_K], d[D_N], d[D_FN] = k, n, fn_addr
        d[D_P0], d[D_P1], d[D_P2] = ptrs
        d[D_PROBE_OFF], d[D_SPMV_MAX_M] = probe_offset, spmv_max_m
        d[D_NDARRAY], d[D_F32], d[D_INT] = id(np.ndarray), id(np.dtype(np.float32)), id(int)
        d[D_SAVE], d[D_RESTORE] = api["PyEval_SaveThread"], api["PyEval_RestoreThread"]
        d[D_INCREF], d[D_AS_SSIZE] = api["Py_IncRef"], api["PyLong_AsSsize_t"]
        d[D_ERR_CLEAR] = api["PyErr_Clear"]
        d[D_NONE], d[D_RET0], d[D_RET1], d[D_RET2] = id(None), id(0), id(1), id(2)
        self.call = api["new_function"](method, d, None)
        d[D_VALID] = 1

    @property
    def full(self) -> bool:
        return len(self._known) >= TABLE

    def set_spmv(self, fn_addr: int, params_addr: int, n_slices: int, owner) -> None:
        """owner: what fn_addr and params_addr point into."""
        d = self.desc
        d.owners.append(owner)
        d[D_SPMV_PARAMS], d[D_SPMV_SLICES] = params_addr, n_slices
        d[D_SPMV_FN] = fn_addr  # last: the entry point takes it as the sign that all is set

    def add_plan(self, m: int, num_threads: int, layout: int = 0, tasks=(), dispatch=None,
                 columns: tuple = (0, 2, 9)) -> bool:  # fmt: skip
        """Make calls of m tokens with num_threads known: one direct call of the panel kernel
        (no tasks), or `tasks` ((x offset, y offset) each, in bytes) on the pool, dispatch =
        (pool, trampoline address, argument block: array('q') [kernel, one row per task]),
        each call writing the rows' columns (x, y, probe): the probe None for a kernel without
        one (SpMV). False: not taken (the table is full, or num_threads is no plain int the
        entry point would take)."""
        if type(num_threads) is not int or not 0 < num_threads < 1 << 31:
            return False
        with self._lock:
            if (m, num_threads) in self._known:
                return True
            if self.full:
                return False
            return self._add(m, num_threads, layout, tasks, dispatch, columns)

    def _add(self, m, num_threads, layout, tasks, dispatch, columns) -> bool:
        d = self.desc
        slot = next(
            j
            for j in ((m * 31 + num_threads + i) % TABLE for i in range(TABLE))
            if d[D_TABLE + j] == 0
        )  # (the entry point looks in the same order)
        n_tasks = max(1, len(tasks))
        rec = np.zeros(P_OFFSETS + 2 * n_tasks, np.int64)
        rec[P_M], rec[P_THREADS], rec[P_TASKS], rec[P_LAYOUT] = m, num_threads, n_tasks, layout
        keep = [rec]
        if tasks:
            pool, tramp, ctx = dispatch
            keep += [pool, ctx]
            rec[P_TRAMP], rec[P_CTX] = tramp, ctx.buffer_info()[0]
            rec[P_WIDTH] = (len(ctx) - 1) // n_tasks
            rec[P_COL_X], rec[P_COL_Y] = columns[0], columns[1]
            if columns[2] is not None:
                probes = np.zeros(n_tasks, np.float32)
                keep.append(probes)
                rec[P_PROBES], rec[P_COL_PROBE] = probes.ctypes.data, columns[2]
            rec[P_POOL], rec[P_TRY_LOCK] = pool.state_addr, pool.try_lock_addr
            rec[P_DISPATCH], rec[P_UNLOCK] = pool.dispatch_addr, pool.unlock_addr
            rec[P_OFFSETS:] = np.asarray(tasks, np.int64).reshape(-1)
        d.owners.append(keep)
        d[D_TABLE + slot] = rec.ctypes.data  # last: the entry point finds it complete
        self._known.add((m, num_threads))
        return True


def available() -> bool:
    """Whether entry points can be made in this process (see the module's docstring)."""
    return _compiled() is not None
