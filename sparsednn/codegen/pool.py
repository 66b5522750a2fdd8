"""IR of the native worker pool (see sparsednn.runtime.native_pool): the worker loop, the
dispatcher and the task trampolines. x86-64 Linux only (futex, `pause`).

Pool state: an array of i64, fields on separate cache lines (indices below).

    gen     i32 at byte 0: (sequence << 8) | n_tasks of the current dispatch; workers spin on
            it, then sleep on it with FUTEX_WAIT
    done    workers that finished their share of the current dispatch
    sleepers  workers in (or about to enter) FUTEX_WAIT
    stop    1: workers return

    claim   (gen << 32) | next task index: tasks are claimed by compare-and-swap, by the
            workers and the dispatcher alike (so a preempted worker's tasks are taken over)
    done    tasks finished in the current dispatch (its low 32 bits: the dispatcher's futex)
    dwait   1 while the dispatcher sleeps on `done` (after spinning SPIN cycles for it): a
            worker finishing a task then wakes it
    busy    1 while a dispatcher owns the pool (pool_try_lock): Python's dispatches and the
            native entry points (codegen/pyentry.py) take turns through it

A claim succeeds only while the claim word still carries the generation the claimer saw, so a
worker late from one dispatch can never take a task of the next; fn and ctx are read after a
successful claim, when the dispatcher cannot publish another dispatch (it waits for
done == n).
"""

from __future__ import annotations

from llvmlite import ir

from sparsednn.codegen.irutil import i32, i64, void

GEN, DONE, SLEEPERS, STOP, FN, CTX, NWORKERS, SYSCALL, SPIN, CLAIM, DWAIT, BUSY = (
    0, 8, 16, 24, 32, 33, 34, 35, 36, 40, 48, 56)  # fmt: skip
STATE_WORDS = 64
MAX_TASKS = 255

SYS_FUTEX, SYS_GETTID = 202, 186
FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 128, 129

i8p = ir.PointerType(ir.IntType(8))
i64p = ir.PointerType(i64)
i32p = ir.PointerType(i32)
TASK_TY = ir.FunctionType(void, [i8p, i64])
SYSCALL_TY = ir.FunctionType(i64, [i64], var_arg=True)


def _c(v, ty=i64):
    return ir.Constant(ty, v)


class _Ctx:
    def __init__(self, b: ir.IRBuilder, state):
        self.b = b
        self.state = state
        mod = b.module
        self.pause = mod.globals.get("llvm.x86.sse2.pause") or ir.Function(
            mod, ir.FunctionType(void, []), "llvm.x86.sse2.pause"
        )
        self.tsc = mod.globals.get("llvm.readcyclecounter") or ir.Function(
            mod, ir.FunctionType(i64, []), "llvm.readcyclecounter"
        )

    def field(self, idx):
        return self.b.gep(self.state, [_c(idx)], inbounds=True)

    def gen_ptr(self):
        return self.b.bitcast(self.field(GEN), i32p)

    def syscall(self, *args):
        b = self.b
        addr = b.load(self.field(SYSCALL))
        fn = b.inttoptr(addr, ir.PointerType(SYSCALL_TY))
        return b.call(fn, [_c(a) if isinstance(a, int) else a for a in args])


def _loop_block(fn, name):
    return fn.append_basic_block(name)


def _emit_run_claimed(mod: ir.Module) -> ir.Function:
    """run_claimed(state*, gen): claim and run tasks of dispatch `gen` until none is left."""
    f = ir.Function(mod, ir.FunctionType(void, [i64p, i32]), "run_claimed")
    f.linkage = "internal"
    state, g = f.args
    entry = f.append_basic_block("entry")
    loop = f.append_basic_block("loop")
    check = f.append_basic_block("check")
    cas = f.append_basic_block("cas")
    body = f.append_basic_block("body")
    out = f.append_basic_block("out")
    b = ir.IRBuilder(entry)
    c = _Ctx(b, state)
    n = b.zext(b.and_(g, _c(255, i32)), i64)
    want = b.shl(b.zext(g, i64), _c(32))
    claim = c.field(CLAIM)
    b.branch(loop)
    b.position_at_end(loop)
    cur = b.load_atomic(claim, "acquire", 8)
    same = b.icmp_unsigned("==", b.and_(cur, _c(-(1 << 32))), want)
    b.cbranch(same, check, out)
    b.position_at_end(check)
    idx = b.and_(cur, _c(0xFFFFFFFF))
    b.cbranch(b.icmp_unsigned("<", idx, n), cas, out)
    b.position_at_end(cas)
    res = b.cmpxchg(claim, cur, b.add(cur, _c(1)), "acq_rel", "acquire")
    b.cbranch(b.extract_value(res, 1), body, loop)
    b.position_at_end(body)
    task = b.inttoptr(b.load(c.field(FN)), ir.PointerType(TASK_TY))
    ctx = b.inttoptr(b.load(c.field(CTX)), i8p)
    b.call(task, [ctx, idx])
    b.atomic_rmw("add", c.field(DONE), _c(1), "seq_cst")
    waiting = b.load_atomic(c.field(DWAIT), "seq_cst", 8)
    wake = f.append_basic_block("wake_dispatcher")
    b.cbranch(b.icmp_unsigned("!=", waiting, _c(0)), wake, loop)
    b.position_at_end(wake)
    c.syscall(_c(SYS_FUTEX), b.ptrtoint(c.field(DONE), i64), _c(FUTEX_WAKE_PRIVATE), _c(1),
              _c(0), _c(0))  # fmt: skip
    b.branch(loop)
    b.position_at_end(out)
    b.ret_void()
    return f


def emit_pool(mod: ir.Module) -> None:
    """worker_loop(state*, w); pool_run(state*, task, ctx, n) -> 1, or 0 (nothing run) while
    another dispatch owns the pool or it is stopped; pool_try_lock(state*) -> 1/0,
    pool_dispatch(state*, task, ctx, n) (the lock held), pool_unlock(state*); pool_stop;
    read_tsc(); gettid_task(ctx, i); noop_task(ctx, i)."""
    run_claimed = _emit_run_claimed(mod)

    # ---- worker_loop -----------------------------------------------------------------------
    f = ir.Function(mod, ir.FunctionType(void, [i64p, i64]), "worker_loop")
    state, w = f.args
    entry = f.append_basic_block("entry")
    b = ir.IRBuilder(entry)
    c = _Ctx(b, state)
    seen_slot = b.alloca(i32)
    spin_start = b.alloca(i64)
    gp = c.gen_ptr()
    # the state starts at gen 0 and no dispatch publishes 0: a worker that starts late still
    # sees the dispatch in progress
    b.store(_c(0, i32), seen_slot)
    b.store(b.call(c.tsc, []), spin_start)
    wait = f.append_basic_block("wait")
    check_stop = f.append_basic_block("check_stop")
    spin_more = f.append_basic_block("spin_more")
    sleep = f.append_basic_block("sleep")
    do_wait = f.append_basic_block("do_wait")
    after_sleep = f.append_basic_block("after_sleep")
    work = f.append_basic_block("work")
    back = f.append_basic_block("back")
    exit_ = f.append_basic_block("exit")
    b.branch(wait)

    b.position_at_end(wait)
    g = b.load_atomic(gp, "acquire", 4)
    changed = b.icmp_unsigned("!=", g, b.load(seen_slot))
    b.cbranch(changed, work, check_stop)

    b.position_at_end(check_stop)
    stop = b.load_atomic(c.field(STOP), "monotonic", 8)
    b.cbranch(b.icmp_unsigned("!=", stop, _c(0)), exit_, spin_more)

    b.position_at_end(spin_more)
    b.call(c.pause, [])
    elapsed = b.sub(b.call(c.tsc, []), b.load(spin_start))
    budget = b.load(c.field(SPIN))
    b.cbranch(b.icmp_unsigned("<", elapsed, budget), wait, sleep)

    b.position_at_end(sleep)  # Dekker with the dispatcher: sleepers++ then re-check gen
    b.atomic_rmw("add", c.field(SLEEPERS), _c(1), "seq_cst")
    g2 = b.load_atomic(gp, "seq_cst", 4)
    stop2 = b.load_atomic(c.field(STOP), "seq_cst", 8)
    same = b.and_(b.icmp_unsigned("==", g2, b.load(seen_slot)), b.icmp_unsigned("==", stop2, _c(0)))
    b.cbranch(same, do_wait, after_sleep)
    b.position_at_end(do_wait)
    c.syscall(_c(SYS_FUTEX), b.ptrtoint(gp, i64), _c(FUTEX_WAIT_PRIVATE),
              b.zext(b.load(seen_slot), i64), _c(0), _c(0))  # fmt: skip
    b.branch(after_sleep)
    b.position_at_end(after_sleep)
    b.atomic_rmw("sub", c.field(SLEEPERS), _c(1), "seq_cst")
    b.store(b.call(c.tsc, []), spin_start)
    b.branch(wait)

    b.position_at_end(work)
    b.store(g, seen_slot)
    b.call(run_claimed, [state, g])
    b.branch(back)

    b.position_at_end(back)
    b.store(b.call(c.tsc, []), spin_start)
    b.branch(wait)

    b.position_at_end(exit_)
    b.ret_void()

    # ---- pool_dispatch: publish, wake, run a share, wait for the rest (the lock held) -------
    f = ir.Function(mod, ir.FunctionType(void, [i64p, i64, i64, i64]), "pool_dispatch")
    dispatch = f
    state, task_addr, ctx_addr, n = f.args
    b = ir.IRBuilder(f.append_basic_block("entry"))
    c = _Ctx(b, state)
    gp = c.gen_ptr()
    b.store_atomic(_c(0), c.field(DONE), "monotonic", 8)
    b.store(task_addr, c.field(FN))
    b.store(ctx_addr, c.field(CTX))
    old = b.load(gp)
    new = b.or_(b.and_(b.add(old, _c(256, i32)), _c(-256, i32)), b.trunc(n, i32))
    b.store_atomic(b.shl(b.zext(new, i64), _c(32)), c.field(CLAIM), "monotonic", 8)
    b.store_atomic(new, gp, "seq_cst", 4)
    sl = b.load_atomic(c.field(SLEEPERS), "seq_cst", 8)
    wake = f.append_basic_block("wake")
    own = f.append_basic_block("own")
    b.cbranch(b.icmp_unsigned("!=", sl, _c(0)), wake, own)
    b.position_at_end(wake)
    c.syscall(_c(SYS_FUTEX), b.ptrtoint(gp, i64), _c(FUTEX_WAKE_PRIVATE), _c(0x7FFFFFFF),
              _c(0), _c(0))  # fmt: skip
    b.branch(own)
    b.position_at_end(own)
    b.call(run_claimed, [state, new])
    t0 = b.call(c.tsc, [])
    spin = f.append_basic_block("spin")
    spin_body = f.append_basic_block("spin_body")
    sleep = f.append_basic_block("sleep")
    do_wait = f.append_basic_block("do_wait")
    after = f.append_basic_block("after")
    out = f.append_basic_block("out")
    b.branch(spin)
    b.position_at_end(spin)
    d = b.load_atomic(c.field(DONE), "acquire", 8)
    b.cbranch(b.icmp_unsigned("<", d, n), spin_body, out)
    b.position_at_end(spin_body)
    b.call(c.pause, [])
    elapsed = b.sub(b.call(c.tsc, []), t0)
    b.cbranch(b.icmp_unsigned("<", elapsed, b.load(c.field(SPIN))), spin, sleep)
    b.position_at_end(sleep)  # Dekker with the workers: dwait = 1, then re-read done
    b.store_atomic(_c(1), c.field(DWAIT), "seq_cst", 8)
    d2 = b.load_atomic(c.field(DONE), "seq_cst", 8)
    b.cbranch(b.icmp_unsigned("<", d2, n), do_wait, after)
    b.position_at_end(do_wait)
    c.syscall(_c(SYS_FUTEX), b.ptrtoint(c.field(DONE), i64), _c(FUTEX_WAIT_PRIVATE),
              b.and_(d2, _c(0xFFFFFFFF)), _c(0), _c(0))  # fmt: skip
    b.branch(after)
    b.position_at_end(after)
    b.store_atomic(_c(0), c.field(DWAIT), "seq_cst", 8)
    b.branch(spin)
    b.position_at_end(out)
    b.ret_void()

    # ---- pool_try_lock / pool_unlock -----------------------------------------------------------
    f = ir.Function(mod, ir.FunctionType(i64, [i64p]), "pool_try_lock")
    try_lock = f
    b = ir.IRBuilder(f.append_basic_block("entry"))
    c = _Ctx(b, f.args[0])
    got = b.extract_value(b.cmpxchg(c.field(BUSY), _c(0), _c(1), "acquire", "monotonic"), 1)
    locked = f.append_basic_block("locked")
    fail = f.append_basic_block("fail")
    b.cbranch(got, locked, fail)
    b.position_at_end(locked)
    stopped = b.icmp_unsigned("!=", b.load_atomic(c.field(STOP), "acquire", 8), _c(0))
    release = f.append_basic_block("release")
    ok = f.append_basic_block("ok")
    b.cbranch(stopped, release, ok)
    b.position_at_end(release)
    b.store_atomic(_c(0), c.field(BUSY), "release", 8)
    b.branch(fail)
    b.position_at_end(ok)
    b.ret(_c(1))
    b.position_at_end(fail)
    b.ret(_c(0))

    f = ir.Function(mod, ir.FunctionType(void, [i64p]), "pool_unlock")
    unlock = f
    b = ir.IRBuilder(f.append_basic_block("entry"))
    b.store_atomic(_c(0), _Ctx(b, f.args[0]).field(BUSY), "release", 8)
    b.ret_void()

    # ---- pool_run: the three above in one call ---------------------------------------------------
    f = ir.Function(mod, ir.FunctionType(i64, [i64p, i64, i64, i64]), "pool_run")
    b = ir.IRBuilder(f.append_basic_block("entry"))
    run = f.append_basic_block("run")
    busy = f.append_basic_block("busy")
    b.cbranch(b.icmp_unsigned("!=", b.call(try_lock, [f.args[0]]), _c(0)), run, busy)
    b.position_at_end(run)
    b.call(dispatch, list(f.args))
    b.call(unlock, [f.args[0]])
    b.ret(_c(1))
    b.position_at_end(busy)
    b.ret(_c(0))

    # ---- pool_stop: stop flag, new generation, wake all ---------------------------------------
    f = ir.Function(mod, ir.FunctionType(void, [i64p]), "pool_stop")
    b = ir.IRBuilder(f.append_basic_block("entry"))
    c = _Ctx(b, f.args[0])
    gp = c.gen_ptr()
    b.store_atomic(_c(1), c.field(STOP), "seq_cst", 8)
    old = b.load(gp)
    b.store_atomic(b.and_(b.add(old, _c(256, i32)), _c(-256, i32)), gp, "seq_cst", 4)
    c.syscall(_c(SYS_FUTEX), b.ptrtoint(gp, i64), _c(FUTEX_WAKE_PRIVATE), _c(0x7FFFFFFF),
              _c(0), _c(0))  # fmt: skip
    b.ret_void()

    # ---- read_tsc -------------------------------------------------------------------------------
    f = ir.Function(mod, ir.FunctionType(i64, []), "read_tsc")
    b = ir.IRBuilder(f.append_basic_block("entry"))
    b.ret(b.call(_Ctx(b, None).tsc, []))

    # ---- gettid_task(ctx, i): ctx = [syscall address, out[0..n)] (tests) -------------------------
    f = ir.Function(mod, TASK_TY, "gettid_task")
    ctx, idx = f.args
    b = ir.IRBuilder(f.append_basic_block("entry"))
    p = b.bitcast(ctx, i64p)
    sc = b.inttoptr(b.load(p), ir.PointerType(SYSCALL_TY))
    tid = b.call(sc, [_c(SYS_GETTID)])
    b.store(tid, b.gep(p, [b.add(idx, _c(1))], inbounds=True))
    b.ret_void()

    # ---- noop_task --------------------------------------------------------------------------------
    f = ir.Function(mod, TASK_TY, "noop_task")
    b = ir.IRBuilder(f.append_basic_block("entry"))
    b.ret_void()


def emit_trampoline(mod: ir.Module, kinds: str) -> str:
    """`tramp_<kinds>(ctx, i)`: ctx = [kernel address, then one row of len(kinds) i64 per
    task]; calls kernel(row i...) with each argument an i64 ('i': pointers and integers, both
    in integer registers) or a float held in the low 32 bits ('f')."""
    name = f"tramp_{kinds}"
    f = ir.Function(mod, TASK_TY, name)
    ctx, idx = f.args
    b = ir.IRBuilder(f.append_basic_block("entry"))
    p = b.bitcast(ctx, i64p)
    nargs = len(kinds)
    kty = ir.FunctionType(void, [ir.FloatType() if k == "f" else i64 for k in kinds])
    kernel = b.inttoptr(b.load(p), ir.PointerType(kty))
    row = b.gep(p, [b.add(b.mul(idx, _c(nargs)), _c(1))], inbounds=True)
    args = []
    for j, k in enumerate(kinds):
        v = b.load(b.gep(row, [_c(j)], inbounds=True))
        if k == "f":
            v = b.bitcast(b.trunc(v, i32), ir.FloatType())
        args.append(v)
    b.call(kernel, args)
    b.ret_void()
    return name
