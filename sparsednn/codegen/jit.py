"""The one place that owns LLVM: initialisation, target machines, optimisation and the MCJIT engine.

    jm = compile_module(ir_module, target)        # verify, optimise (O3, new pass manager), JIT
    addr = jm.function_address("f32_spmm_...")    # valid as long as `jm` is alive
    jm.llvm_ir, jm.asm                           # optimised IR and machine code, for dumps

llvmlite wraps every call into LLVM in one process-wide lock. LLVM itself is thread-safe for
modules of distinct contexts compiled by distinct target machines: compile_module parses a
module into a context of its own and optimises and generates its code on the calling thread's
own target machine, calling those two steps (most of the time) without llvmlite's lock, so
that threads compile modules at once (CompiledOnce: once per key, different keys at once).
Everything else made here holds this module's lock. Compiled code runs without any.

libllvmlite is loaded on first use only: code from the kernel cache is loaded by
elf_loader.py where it can be, so a session whose kernels are all cached never loads LLVM.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import warnings

from llvmlite import ir

from sparsednn.codegen import elf_loader
from sparsednn.errors import CompileError


class _LazyBinding:
    """llvmlite.binding, imported on first attribute access (loading it maps and relocates
    libllvmlite: ~40 MB of resident memory)."""

    def __getattr__(self, name):
        import llvmlite.binding

        return getattr(llvmlite.binding, name)


llvm = _LazyBinding()

_lock = threading.RLock()
_initialized = False
_target_machines: dict = {}
_exported: dict[str, int] = {}  # export_symbol's table, also for code loaded without LLVM


def ensure_llvm_initialized() -> None:
    """Initialise LLVM's native target and assembly printer (once per process)."""
    global _initialized
    if _initialized:
        return
    with _lock:
        if not _initialized:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            llvm.initialize_native_asmparser()
            for name, address in _exported.items():  # exported while LLVM was not loaded
                llvm.add_symbol(name, address)
            _initialized = True


_own_machines = threading.local()


def _own_target_machine(target) -> llvm.TargetMachine:
    """This thread's TargetMachine for `target` (code generation mutates its machine: threads
    compiling at once need one each)."""
    machines = getattr(_own_machines, "by_target", None)
    if machines is None:
        machines = _own_machines.by_target = {}
    tm = machines.get(target)
    if tm is None:
        with _lock:
            tm = machines[target] = target.create_target_machine(opt=3)
    return tm


def _unlocked(name: str):
    """llvmlite's C function `name` without the process-wide lock its wrapper takes (see the
    module docstring), or the locked wrapper where llvmlite does not wrap it that way."""
    wrapped = getattr(llvm.ffi.lib, name)
    return getattr(wrapped, "_cfn", wrapped)


def target_machine(target) -> llvm.TargetMachine:
    """The cached TargetMachine of a Target (features always passed explicitly), for data
    layouts, optimisation and assembly dumps; never handed to an engine, which would own it."""
    with _lock:
        tm = _target_machines.get(target)
        if tm is None:
            tm = target.create_target_machine(opt=3)
            _target_machines[target] = tm
        return tm


# Passes of the "light" pipeline: generated kernels are already vectorised, unrolled and
# hoisted by hand, so they need little more than promoting loop variables to registers and
# folding the address arithmetic. Measured on the SpMM kernel: as fast as O3 (within noise)
# at a tenth of the optimisation time.
LIGHT_PIPELINE = ("sroa", "instruction_combine", "simplify_cfg", "new_gvn", "dead_code_elimination")


def _pipeline(tm: llvm.TargetMachine, opt: str | int) -> tuple:
    """(module pass manager, pass builder) of `opt`: "light" (see LIGHT_PIPELINE), or a speed
    level 0..3 for LLVM's default pipeline without its loop unroller and vectorisers."""
    if opt == "light":
        pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=2))
        mpm = llvm.create_new_module_pass_manager()
        for name in LIGHT_PIPELINE:
            getattr(mpm, f"add_{name}_pass")()
        return mpm, pb
    pto = llvm.create_pipeline_tuning_options(speed_level=int(opt))
    # Generated kernels are vectorised and unrolled by hand; LLVM's loop unroller and
    # vectorisers only multiply their size (and compile time) by duplicating cold paths.
    pto.loop_unrolling = False
    pto.loop_vectorization = False
    pto.slp_vectorization = False
    pb = llvm.create_pass_builder(tm, pto)
    return pb.getModulePassManager(), pb


def _optimize(mod: llvm.ModuleRef, tm: llvm.TargetMachine, opt: str | int) -> None:
    """Run `opt` (see _pipeline) over the module."""
    mpm, pb = _pipeline(tm, opt)
    mpm.run(mod, pb)


class JITModule:
    """A compiled LLVM module and the MCJIT engine that keeps its code alive.

    from_cache: the machine code was loaded from the on-disk kernel cache (see cache.py); the
    optimised IR and assembly are then regenerated on demand from `source` (a callable that
    emits the module again), for dumps only."""

    def __init__(self, engine, module: llvm.ModuleRef | None, target, compile_seconds: float,
                 from_cache: bool = False, source=None, opt: str | int = "light",
                 image: elf_loader.LoadedObject | None = None):  # fmt: skip
        self._engine = engine
        self._image = image  # the code, when loaded without LLVM (then engine is None)
        self._module = module
        self.target = target
        self.compile_seconds = compile_seconds
        self.from_cache = from_cache
        self._source = source
        self._opt = opt
        self._ir_text: str | None = None
        self._asm_text: str | None = None

    def function_address(self, name: str) -> int:
        if self._image is not None:
            addr = self._image.address(name)
        else:
            with _lock:
                addr = self._engine.get_function_address(name)
        if not addr:
            raise CompileError(f"JIT module has no function named {name!r}")
        return addr

    @property
    def llvm_ir(self) -> str:
        """The optimised LLVM IR of the module, as text."""
        if self._ir_text is None:
            if self._module is None:  # loaded from the cache: emit and optimise it again
                if self._source is None:
                    return "; loaded from the kernel cache: no IR available\n"
                text = str(self._source())
                with _lock:
                    tm = target_machine(self.target)
                    mod = llvm.parse_assembly(text)
                    mod.triple = self.target.triple or llvm.get_process_triple()
                    mod.data_layout = str(tm.target_data)
                    if self._opt:
                        _optimize(mod, tm, self._opt)
                    self._ir_text = str(mod)
            else:
                with _lock:
                    self._ir_text = str(self._module)
        return self._ir_text

    @property
    def asm(self) -> str:
        """The machine code of the module, as assembly text (generated on first use)."""
        if self._asm_text is None:
            text = self.llvm_ir
            with _lock:
                # A fresh copy: the engine's module stays untouched.
                copy = llvm.parse_assembly(text)
                self._asm_text = target_machine(self.target).emit_assembly(copy)
        return self._asm_text


class JITKernel:
    """Base of the kernels whose code is one JITModule (self._jm): its text, for dumps."""

    _jm: JITModule

    @property
    def llvm_ir(self) -> str:
        return self._jm.llvm_ir

    @property
    def asm(self) -> str:
        return self._jm.asm


def export_symbol(name: str, address: int) -> None:
    """Make a compiled function callable by name from modules compiled later (the JIT links
    declarations of `name` to `address`). The code at `address` must be kept alive."""
    with _lock:
        _exported[name] = address
        if _initialized:
            llvm.add_symbol(name, address)


def new_module(name: str, target) -> ir.Module:
    """An empty llvmlite IR module for `target` (triple and data layout set)."""
    mod = ir.Module(name=name)
    mod.triple = target.triple or llvm.get_process_triple()
    mod.data_layout = str(target_machine(target).target_data)
    return mod


def compile_module(module: ir.Module | str, target, opt: str | int = "light",
                   cache_key: str | None = None) -> JITModule:  # fmt: skip
    """Verify, optimise (see _pipeline) and compile an IR module for `target`, and load its code.

    Threads may call this at once: each module is parsed into an LLVM context of its own, and
    optimised and compiled to object code on the thread's own target machine without
    llvmlite's lock (two BERT-base panel modules on two threads: 182 -> 117 ms). cache_key:
    also store the object code in the on-disk kernel cache under this key (see load_cached).
    Raises CompileError on failure."""
    ensure_llvm_initialized()
    t0 = time.perf_counter()
    text = str(module)
    name = getattr(module, "name", "?")
    tm = _own_target_machine(target)
    with _lock:
        context = llvm.create_context()
        try:
            mod = llvm.parse_assembly(text, context)
            mod.triple = target.triple or llvm.get_process_triple()
            mod.data_layout = str(tm.target_data)
            mod.verify()
        except RuntimeError as e:
            raise CompileError(f"invalid LLVM IR for module {name}: {e}")
        passes = _pipeline(tm, opt) if opt else None
    if passes is not None:
        mpm, pb = passes
        _unlocked("LLVMPY_RunNewModulePassManager")(mpm, mod, pb)
    with llvm.ffi.OutputString() as error:
        buffer = _unlocked("LLVMPY_TargetMachineEmitToMemory")(tm, mod, 1, error)
        if not buffer:
            raise CompileError(f"LLVM code generation failed for module {name}: {error}")
    with _lock:
        try:
            start = llvm.ffi.lib.LLVMPY_GetBufferStart(buffer)
            obj = ctypes.string_at(start, llvm.ffi.lib.LLVMPY_GetBufferSize(buffer))
        finally:
            llvm.ffi.lib.LLVMPY_DisposeMemoryBuffer(buffer)
    if cache_key is not None:
        from sparsednn.codegen import cache

        cache.store_object(cache_key, obj)
    jm = _load_object(obj, target)
    if jm is None:
        raise CompileError(f"LLVM JIT compilation failed: the object code of module {name} "
                           "would not load")  # fmt: skip
    jm._module, jm._opt = mod, opt
    jm.compile_seconds = time.perf_counter() - t0
    return jm


def load_cached(cache_key: str, target, source=None, opt: str | int = "light") -> JITModule | None:
    """The module stored by compile_module(..., cache_key=cache_key), loaded without running
    LLVM's optimiser or code generator, or None if the cache has no (valid) entry. Symbols it
    calls by name (export_symbol) must be exported before. source: a callable that emits the
    module again, for llvm_ir / asm dumps."""
    from sparsednn.codegen import cache

    obj = cache.load_object(cache_key)
    if obj is None:
        return None
    jm = _load_object(obj, target, source, opt)
    if jm is not None:
        jm.from_cache = True
    return jm


def cached_module(cache_key: str, target, emit, opt: str | int = "light") -> JITModule:
    """The module `emit()` makes, from the kernel cache, else compiled (and stored there)."""
    jm = load_cached(cache_key, target, source=emit, opt=opt)
    return jm if jm is not None else compile_module(emit(), target, opt=opt, cache_key=cache_key)


def _load_object(obj: bytes, target, source=None, opt: str | int = "light") -> JITModule | None:
    """Object code loaded by elf_loader.py where it can be, else by an MCJIT engine; None if
    neither takes it."""
    t0 = time.perf_counter()
    if elf_loader.supported():
        try:
            with _lock:
                image = elf_loader.LoadedObject(obj, _exported)
        except (elf_loader.UnsupportedObject, OSError, MemoryError):
            pass  # MCJIT loads it (also where mapping executable pages was refused)
        else:
            if os.environ.get(PERF_MAP_ENV, "0") != "0":
                _add_to_perf_map(image.functions)
            return JITModule(None, None, target, time.perf_counter() - t0, source=source,
                             opt=opt, image=image)  # fmt: skip
    ensure_llvm_initialized()
    with _lock:
        try:
            empty = llvm.parse_assembly("")
            empty.triple = target.triple or llvm.get_process_triple()
            empty.data_layout = str(target_machine(target).target_data)
            # The engine takes ownership of (and disposes) its target machine: its own one.
            engine = llvm.create_mcjit_compiler(empty, target.create_target_machine(opt=3))
            engine.set_object_cache(None, lambda _m: obj)
            engine.finalize_object()
        except RuntimeError:
            return None
    return JITModule(engine, None, target, time.perf_counter() - t0, source=source, opt=opt)


# SPARSEDNN_PERF_MAP=1: name the generated functions to `perf` (Linux perf's JIT interface:
# /tmp/perf-<pid>.map, a line "address size name" per function; code loaded by elf_loader.py),
# so that `perf record` / `perf report` attribute samples in generated code to its functions.
PERF_MAP_ENV = "SPARSEDNN_PERF_MAP"


def _add_to_perf_map(functions) -> None:
    path = f"/tmp/perf-{os.getpid()}.map"
    try:
        with _lock, open(path, "a") as f:
            f.writelines(f"{a:x} {max(size, 1):x} {name}\n" for name, a, size in functions)
    except OSError as e:  # (a profiling aid: the code runs all the same)
        warnings.warn(f"{PERF_MAP_ENV}: cannot write {path}: {e}", RuntimeWarning, stacklevel=2)


_background = None  # the executor of in_background


def in_background(fn, *args) -> None:
    """Run fn(*args) on LLVM's background thread, to compile code beside the caller (on a
    machine of more than one core). For builds through CompiledOnce: its result is kept
    there, and an error is left to whoever builds that code next (it is raised again)."""
    global _background
    if _background is None:
        with _lock:
            if _background is None:
                from concurrent.futures import ThreadPoolExecutor

                from sparsednn.runtime.threads import default_num_threads

                if default_num_threads() < 2:
                    return
                _background = ThreadPoolExecutor(1, thread_name_prefix="sparsednn-llvm")
    _background.submit(fn, *args)


class CompiledOnce:
    """Compiled code of a process by key: each key built once, by the first thread to ask for
    it, while other threads wait for that key only (so different keys compile at once); a
    build that raises is tried again by the next caller."""

    def __init__(self):
        self._lock = threading.Lock()
        self._slots: dict = {}  # key -> [lock, value or None]

    def get(self, key, build):
        with self._lock:
            slot = self._slots.setdefault(key, [threading.Lock(), None])
        if slot[1] is None:
            with slot[0]:
                if slot[1] is None:
                    slot[1] = build()
        return slot[1]

    def __contains__(self, key) -> bool:
        slot = self._slots.get(key)
        return slot is not None and slot[1] is not None

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()
