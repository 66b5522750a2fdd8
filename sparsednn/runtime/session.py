"""InferenceSession: the Python API, shaped like onnxruntime's.

Creating a session imports the model, runs the pass pipeline, compiles one kernel per Linear
node and lays out an execution plan: a list of steps over numbered value slots. run() checks
every input before any native code sees it, then walks the plan.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from sparsednn.errors import InvalidInputError, SparseDNNError
from sparsednn.frontend.onnx_import import import_onnx
from sparsednn.ir import Graph, Node, Value
from sparsednn.ir.storage import mapped_files, own_constants
from sparsednn.ir.verify import describe_memory_limit, format_bytes, memory_limit
from sparsednn.passes.choose_kernels import DEFAULT_SPARSE_THRESHOLD
from sparsednn.passes.pipeline import run_pipeline
from sparsednn.runtime import native_pool
from sparsednn.runtime.batch_parts import SLICE, describe_region, order_for_region, region_parts
from sparsednn.runtime.lowering import (
    LoweringContext,
    code_to_compile,
    lower,
    lower_linear_chain,
    lower_linear_norm,
)
from sparsednn.runtime.progress import progress_bar
from sparsednn.runtime.threads import (
    default_num_threads,
    parallel_for,
    running_part,
    single_threaded_blas,
)

_ONNX_TYPE_NAMES = {
    "float32": "tensor(float)",
    "float64": "tensor(double)",
    "float16": "tensor(float16)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "int16": "tensor(int16)",
    "int8": "tensor(int8)",
    "uint8": "tensor(uint8)",
    "bool": "tensor(bool)",
}


@dataclass
class SessionOptions:
    """Options of a session; the names follow onnxruntime's where they exist there."""

    intra_op_num_threads: int = 0  # 0: every core this process may use
    enable_profiling: bool = False  # per-node times in InferenceSession.profile()
    show_progress: bool = False  # a progress bar while compiling (on a terminal only)
    sparse_threshold: float = DEFAULT_SPARSE_THRESHOLD  # fraction of zeros for a sparse kernel
    # run a sparse Linear that only feeds another (a feed-forward block) chunk by chunk with
    # it, the intermediate in cache, and a residual layer norm after sparse Linears on each
    # chunk as it leaves them (codegen/chain.py)
    chain_sparse_linears: bool = True

    @property
    def num_threads(self) -> int:
        n = self.intra_op_num_threads
        return n if n and n > 0 else default_num_threads()


@dataclass(frozen=True)
class NodeArg:
    """An input or output of the model, as onnxruntime's get_inputs() describes it."""

    name: str
    shape: list[int | str | None]
    type: str

    @classmethod
    def of(cls, value: Value) -> NodeArg:
        dtype = "?" if value.dtype is None else np.dtype(value.dtype).name
        shape = [] if value.shape is None else list(value.shape)
        return cls(value.name, shape, _ONNX_TYPE_NAMES.get(dtype, f"tensor({dtype})"))


@dataclass
class NodeProfile:
    """Where run() spent its time: one node's totals over all profiled runs."""

    node: str
    op: str
    calls: int = 0
    seconds: float = 0.0  # summed over the parts of a batch run in parts (runtime/batch_parts.py)
    useful_flops: float = 0.0  # Linear: 2 * nonzeros * rows, the work a dense GEMM would skip

    @property
    def gflops(self) -> float:
        return self.useful_flops / self.seconds / 1e9 if self.seconds else 0.0


@dataclass
class Step:
    node: Node
    run: Callable[..., Any]
    inputs: list[int | None]
    outputs: list[int]
    frees: list[int] = field(default_factory=list)  # slots whose last reader this step is


class InferenceSession:
    def __init__(
        self,
        path_or_bytes,
        sess_options: SessionOptions | None = None,
        providers: Sequence[str] | None = None,
        **kwargs,
    ):
        self.options = sess_options or SessionOptions()
        start = time.perf_counter()
        model_name = _model_name(path_or_bytes)
        try:
            graph = import_onnx(path_or_bytes, name=model_name, mapped=True)
            files = weakref.WeakSet(mapped_files(graph))
            self.graph: Graph = run_pipeline(graph, sparse_threshold=self.options.sparse_threshold)
            del graph
        except (SparseDNNError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # a bug met by a malformed model: still a sparsednn error
            raise SparseDNNError(
                f"{model_name or 'model'}: internal error while compiling "
                f"({type(e).__name__}: {e}); the model is probably malformed"
            ) from e
        self.kernels: dict[str, Any] = {}
        self._build_plan()
        if files:  # views of the model file in the garbage the passes left (node-value cycles)
            gc.collect()  # unmap it now: the session must not depend on the file
        self.compile_seconds = time.perf_counter() - start
        self._profile: dict[str, NodeProfile] = {}
        self._profile_lock = threading.Lock()

    # -- onnxruntime-shaped API -----------------------------------------------------------
    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg.of(v) for v in self.graph.inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg.of(v) for v in self.graph.outputs]

    def get_providers(self) -> list[str]:
        return ["SparseDNNExecutionProvider"]

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: dict[str, Any],
        run_options: Any = None,
    ) -> list[np.ndarray]:
        wanted = self._output_slots(output_names)
        env: list[Any] = list(self._template)
        for slot, array in self._check_inputs(input_feed):
            env[slot] = array
        with single_threaded_blas, native_pool.running:
            self._execute(env)
        return [np.asarray(env[s]) for s in wanted]

    def _execute(self, env: list[Any]) -> None:
        region = self._region
        if region is None:
            self._run_steps(self._steps, env)
            return
        body = self._body
        self._run_steps(self._before_body, env)
        parts = region_parts(self._steps, region, env, self._num_threads)
        if parts is None:
            self._run_steps(body, env)
            return
        # the body once per part of the batch, each part on one thread (runtime/batch_parts.py)
        bounds, how = parts
        envs = []
        for lo, hi in bounds:
            part = list(env)
            for slot, mode in how.items():
                if mode == SLICE:
                    part[slot] = env[slot][lo:hi]
            envs.append(part)

        def run_part(part: list[Any]) -> None:
            with running_part():
                self._run_steps(body, part)

        parallel_for([partial(run_part, part) for part in envs])
        for slot in self._region_outputs:
            env[slot] = np.concatenate([part[slot] for part in envs])

    def _run_steps(self, steps: list[Step], env: list[Any]) -> None:
        profiling = self.options.enable_profiling
        for step in steps:
            args = [None if s is None else env[s] for s in step.inputs]
            t0 = time.perf_counter() if profiling else 0.0
            try:
                results = step.run(*args)
            except SparseDNNError:
                raise
            except Exception as e:  # numpy errors in an op: name the node that failed
                raise SparseDNNError(
                    f"node {step.node.name!r} ({step.node.op}) failed on inputs "
                    f"{[getattr(a, 'shape', None) for a in args]}: {e}"
                ) from e
            if profiling:
                self._record(step, time.perf_counter() - t0, args)
            if not isinstance(results, tuple):
                results = (results,)
            for slot, r in zip(step.outputs, results):
                env[slot] = r
            for slot in step.frees:
                env[slot] = None

    def profile(self) -> list[NodeProfile]:
        """Time spent per node over all runs so far, slowest first (needs enable_profiling)."""
        with self._profile_lock:
            return sorted(self._profile.values(), key=lambda p: -p.seconds)

    def reset_profile(self) -> None:
        with self._profile_lock:
            self._profile.clear()

    def _record(self, step: Step, seconds: float, args: list[Any]) -> None:
        node = step.node
        flops = 0.0
        if node.op == "Linear" and args and args[0] is not None:
            rows = args[0].size // max(args[0].shape[-1], 1)
            flops = 2.0 * self.kernels[node.name].nnz * rows
        with self._profile_lock:
            p = self._profile.setdefault(node.name, NodeProfile(node.name, node.op))
            p.calls += 1
            p.seconds += seconds
            p.useful_flops += flops

    # -- planning -------------------------------------------------------------------------
    def _build_plan(self) -> None:
        slots: dict[int, int] = {}
        template: list[Any] = []

        values: dict[int, Value] = {}  # slot -> value

        def slot_of(v: Value) -> int:
            if id(v) not in slots:
                slots[id(v)] = len(template)
                values[len(template)] = v
                template.append(v.const if v.is_const else None)
            return slots[id(v)]

        self._input_slots = {v.name: slot_of(v) for v in self.graph.inputs}
        ctx = LoweringContext(self.options.num_threads, self.kernels)
        if ctx.num_threads > 1:  # start the worker pool now: a run never compiles anything
            native_pool.prepare()
        # Weights bound for sparse kernels are compressed first, straight from the model file
        # (the dense arrays the passes made, such as fused QKV weights, freed one by one);
        # only then does every other constant the plan keeps get memory of its own
        # (ir/storage.py), so that the two never add up in the session's peak memory.
        nodes = self.graph.nodes
        sparse = _distinct_code_first([n for n in nodes if _compressed_from_file(n, "weight")])
        others = [n for n in nodes if not _compressed_from_file(n, "weight")]
        bar = iter(progress_bar(sparse + others, "compiling", self.options.show_progress,
                                unit="node"))  # fmt: skip
        lowered = {
            id(n): fn for fn, n in zip(_lower_sparse(sparse, ctx, code_to_compile(others)), bar)
        }
        own_constants(self.graph)
        lowered.update((id(n), lower(n, ctx)) for n in bar)
        steps: list[Step] = []
        for node in nodes:
            ins = [None if v is None else slot_of(v) for v in node.inputs]
            outs = [slot_of(v) for v in node.outputs]
            steps.append(Step(node, lowered[id(node)], ins, outs))
        self._output_slots_by_name = {v.name: slot_of(v) for v in self.graph.outputs}
        keep = set(self._output_slots_by_name.values())
        if self.options.chain_sparse_linears:
            chains: dict[int, tuple] = {}
            steps = _chain_sparse_linears(steps, keep, ctx, chains)
            steps = _fuse_layer_norms(steps, keep, ctx, chains)
        # With several threads, the steps that can run the batch in parts come last
        # (runtime/batch_parts.py).
        start = len(steps)
        if ctx.num_threads > 1:
            steps, start = order_for_region(steps)
        # Free each intermediate after its last reader, so peak memory follows the live set.
        last_reader: dict[int, Step] = {}
        for step in steps:
            for s in step.inputs:
                if s is not None and template[s] is None:
                    last_reader[s] = step
        for s, step in last_reader.items():
            if s not in keep:
                step.frees.append(s)
        self._steps = steps
        self._template = template
        self._num_threads = ctx.num_threads
        self._region = None
        self._region_outputs: list[int] = []
        if start < len(steps):
            ranks = {slot: None if v.shape is None else len(v.shape)
                     for slot, v in values.items()}  # fmt: skip
            self._region = describe_region(steps, start, ranks)
            self._region_outputs = [s for s in keep if s in self._region.made]
            self._before_body, self._body = steps[:start], steps[start:]
        self._size_terms = _size_terms(self.graph)

    # -- checks ---------------------------------------------------------------------------
    def _output_slots(self, output_names: Sequence[str] | None) -> list[int]:
        if output_names is None:
            return list(self._output_slots_by_name.values())
        slots = []
        for name in output_names:
            if name not in self._output_slots_by_name:
                raise InvalidInputError(
                    f"{self.graph.name}: no output named {name!r}; outputs: "
                    + ", ".join(self._output_slots_by_name)
                )
            slots.append(self._output_slots_by_name[name])
        return slots

    def _check_inputs(self, feed: dict[str, Any]) -> list[tuple[int, np.ndarray]]:
        if not isinstance(feed, dict):
            raise InvalidInputError(
                f"{self.graph.name}: inputs must be a dict {{name: array}}, got {type(feed).__name__}"
            )
        expected = {v.name: v for v in self.graph.inputs}
        unknown = sorted(set(feed) - set(expected))
        if unknown:
            raise InvalidInputError(
                f"{self.graph.name}: unknown input(s) {', '.join(map(repr, unknown))}; "
                f"the model's inputs are {', '.join(map(repr, expected))}"
            )
        missing = [n for n in expected if n not in feed]
        if missing:
            raise InvalidInputError(
                f"{self.graph.name}: missing input(s) {', '.join(map(repr, missing))}; "
                f"the model's inputs are {', '.join(map(repr, expected))}"
            )
        symbols: dict[str, tuple[int, str]] = {}
        checked = []
        for name, value in expected.items():
            array = _as_array(feed[name], value, f"{self.graph.name}: input {name!r}")
            if value.dtype is not None and array.dtype != value.dtype:
                raise InvalidInputError(
                    f"{self.graph.name}: input {name!r} must be {np.dtype(value.dtype).name}, "
                    f"got {array.dtype.name}"
                )
            if value.shape is not None:
                if array.ndim != len(value.shape):
                    raise InvalidInputError(
                        f"{self.graph.name}: input {name!r} must have rank {len(value.shape)} "
                        f"(shape {list(value.shape)}), got shape {list(array.shape)}"
                    )
                for axis, (want, got) in enumerate(zip(value.shape, array.shape)):
                    if isinstance(want, int) and want != got:
                        raise InvalidInputError(
                            f"{self.graph.name}: input {name!r} axis {axis} must be {want}, "
                            f"got shape {list(array.shape)}"
                        )
                    if isinstance(want, str):
                        seen = symbols.setdefault(want, (got, name))
                        if seen[0] != got:
                            raise InvalidInputError(
                                f"{self.graph.name}: dimension {want!r} is {seen[0]} in input "
                                f"{seen[1]!r} but {got} in input {name!r}"
                            )
            checked.append((self._input_slots[name], array))
        self._check_memory({sym: size for sym, (size, _) in symbols.items()})
        # Copies last, once the sizes are known to fit (a broadcast view may be huge).
        return [
            (
                slot,
                array
                if array.flags.c_contiguous and array.flags.aligned
                else array.copy(order="C"),
            )  # (ascontiguousarray would make 0-d inputs 1-d)
            for slot, array in checked
        ]

    def _check_memory(self, sizes: dict[str, int]) -> None:
        """Refuse inputs whose largest intermediate tensor would not fit in memory, before
        anything is allocated (sizes estimated from the symbolic shapes of the plan)."""
        limit = memory_limit()
        for nbytes, dims, example in self._size_terms:
            total = nbytes
            for d in dims:
                total *= sizes.get(d, 0)
            if total > limit:
                shape = [sizes.get(d, d) if isinstance(d, str) else d for d in example.shape]
                raise InvalidInputError(
                    f"{self.graph.name}: these inputs ({', '.join(f'{k}={v}' for k, v in sizes.items())}) "
                    f"would make {example.name!r} of shape {shape} ({format_bytes(total)}), "
                    f"more than {describe_memory_limit()}; refused before running"
                )


def _as_array(x: Any, value: Value, where: str) -> np.ndarray:
    """An input as a plain ndarray of native byte order. Lists, tuples and scalars are
    converted to the declared dtype when that loses no kind (ints to float, say)."""
    if isinstance(x, np.ndarray):
        array = x if type(x) is np.ndarray else np.asarray(x)
    else:
        try:
            array = np.asarray(x)
        except (ValueError, TypeError) as e:  # ragged lists, say
            raise InvalidInputError(f"{where} cannot be made an array: {e}") from None
        want = value.dtype
        if (
            want is not None
            and array.dtype != want
            and array.dtype.kind in "biuf"
            and (np.can_cast(array.dtype, want, "same_kind") or array.size == 0)
        ):
            converted = array.astype(want)
            if want.kind in "iu" and not np.array_equal(converted, array):
                raise InvalidInputError(f"{where}: values do not fit in {want.name}")
            array = converted
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _size_terms(graph: Graph) -> list[tuple[int, tuple[str, ...], Value]]:
    """Per distinct set of symbols, the largest intermediate: (bytes per unit of the symbols,
    the symbols, the value) for every non-constant value whose dims are ints or symbols."""
    largest: dict[tuple[str, ...], tuple[int, tuple[str, ...], Value]] = {}
    for v in graph.values():
        if v.is_const or v.shape is None or not all(isinstance(d, (int, str)) for d in v.shape):
            continue
        dims = tuple(sorted(d for d in v.shape if isinstance(d, str)))
        if not dims:
            continue  # a static shape: verify() checked it fits
        nbytes = np.dtype(v.dtype if v.dtype is not None else np.float32).itemsize
        for d in v.shape:
            if isinstance(d, int):
                nbytes *= d
        if dims not in largest or nbytes > largest[dims][0]:
            largest[dims] = (nbytes, dims, v)
    return list(largest.values())


def _reader_counts(steps: list[Step]) -> dict[int, int]:
    readers: dict[int, int] = {}
    for step in steps:
        for slot in step.inputs:
            if slot is not None:
                readers[slot] = readers.get(slot, 0) + 1
    return readers


def _chain_sparse_linears(steps: list[Step], outputs: set[int], ctx,
                          chains: dict[int, tuple]) -> list[Step]:  # fmt: skip
    """Steps with each pair of sparse Linear steps A -> B, where A's output is read by B only,
    as one step running them chained (lowering.lower_linear_chain). chains[id(new step)] =
    (A's node, B's node)."""
    readers = _reader_counts(steps)
    producer = {slot: step for step in steps for slot in step.outputs}
    chained: dict[int, Step] = {}  # id of B's step -> the chained step
    dropped: set[int] = set()  # ids of A's steps
    for second in steps:
        first = producer.get(second.inputs[0]) if second.inputs else None
        if (
            first is None
            or id(first) in dropped
            or id(first) in chained
            or not _is_sparse_linear(first, ctx)
            or not _is_sparse_linear(second, ctx)
            # (the intermediate passes in the kernels' panel layout: panels of one width)
            or ctx.kernels[first.node.name].tile_tokens != ctx.kernels[second.node.name].tile_tokens
            or readers.get(second.inputs[0]) != 1
            or second.inputs[0] in outputs
        ):
            continue
        run = lower_linear_chain(first.node, second.node, first.run, second.run, ctx)
        chained[id(second)] = Step(second.node, run, [first.inputs[0]], second.outputs)
        chains[id(chained[id(second)])] = (first.node, second.node)
        dropped.add(id(first))
    return [chained.get(id(s), s) for s in steps if id(s) not in dropped]


def _fuse_layer_norms(steps: list[Step], outputs: set[int], ctx,
                      chains: dict[int, tuple]) -> list[Step]:  # fmt: skip
    """Steps with each residual layer norm (AddLayerNorm) one of whose inputs comes from a
    sparse Linear step or a chained pair and is read by it alone, as one step normalising each
    chunk of tokens as it leaves the kernels (lowering.lower_linear_norm), at the layer norm's
    place. The step keeps the (last) Linear's node: profiles count the norm in the Linear."""
    readers = _reader_counts(steps)
    producer = {slot: step for step in steps for slot in step.outputs}
    fused: dict[int, Step] = {}  # id of the norm's step -> the fused step
    dropped: set[int] = set()  # ids of the Linear steps
    for step in steps:
        if step.node.op != "AddLayerNorm" or len(step.inputs) != 2 or None in step.inputs:
            continue
        for side in (0, 1):
            slot = step.inputs[side]
            linear = producer.get(slot)
            if linear is None or id(linear) in dropped or readers.get(slot) != 1 or slot in outputs:
                continue
            if id(linear) in chains:
                first, second = chains[id(linear)]
            elif _is_sparse_linear(linear, ctx):
                first, second = linear.node, None
            else:
                continue
            run = lower_linear_norm(first, second, step.node, linear.run, step.run, side, ctx)
            inputs = [linear.inputs[0], step.inputs[1 - side]]
            fused[id(step)] = Step(second or first, run, inputs, step.outputs)
            dropped.add(id(linear))
            break
    return [fused.get(id(s), s) for s in steps if id(s) not in dropped]


def _is_sparse_linear(step: Step, ctx) -> bool:
    kernel = ctx.kernels.get(step.node.name)
    return step.node.op == "Linear" and type(kernel).__name__ == "SparseLinearKernel"


def _lower_sparse(nodes: list[Node], ctx: LoweringContext, code=()):
    """lower(node, ctx) of each of the nodes, in order; with several threads, on as many
    threads at once (at most one per core: each holds a layer's weight): a kernel's
    compression (numpy), digest (hashlib) and LLVM (jit.compile_module) each let go of the
    GIL, so layers compress and compile beside each other. code: functions compiling the code
    of the other nodes (lowering.code_to_compile), run on the same threads first (on one
    thread they are left to those nodes' lowering)."""
    threads = min(ctx.num_threads, default_num_threads(), len(nodes) + len(code))
    if threads < 2:
        yield from (lower(n, ctx) for n in nodes)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="sparsednn-compile")
    try:
        compiling = [pool.submit(compile_code) for compile_code in code]
        yield from pool.map(lambda n: lower(n, ctx), nodes)
        for done in compiling:
            # (a failure is the lowering's to report, with the node it concerns: it compiles
            # that code again)
            done.exception()
    finally:  # (on an error: the layers not started yet are not compiled)
        pool.shutdown(wait=True, cancel_futures=True)


def _distinct_code_first(nodes: list[Node]) -> list[Node]:
    """The sparse Linears with the first of each epilogue (activation, bias) moved to the
    front: their kernels' code differs, so the threads of _lower_sparse compile it at once
    instead of waiting for one another."""
    seen, first, rest = set(), [], []
    for node in nodes:
        key = (node.attrs.get("activation"), node.attrs.get("bias") is None)
        (rest if key in seen else first).append(node)
        seen.add(key)
    return first + rest


def _compressed_from_file(node: Node, key: str) -> bool:
    """Whether lowering reads this attribute once, into a kernel of its own (lowering.py)."""
    return node.op == "Linear" and key == "weight" and node.attrs.get("kernel") == "sparse"


def _model_name(model) -> str | None:
    if isinstance(model, (str, os.PathLike)):
        return os.path.basename(os.fspath(model))
    return None


def compile(model, sess_options: SessionOptions | None = None, **options) -> InferenceSession:
    """The short path: compile a model (path, bytes or ModelProto) into a session."""
    if options:
        sess_options = SessionOptions(**{**(vars(sess_options) if sess_options else {}), **options})
    return InferenceSession(model, sess_options)
