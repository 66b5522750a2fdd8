"""How each node becomes a callable step of the execution plan.

Ops with native kernels register a lowering here: `@lowering("Op") def lower(node, ctx)` returns
the function the plan calls with the node's input arrays (compiling its kernel once, now).
Every other op runs its numpy function from the op registry. Ops whose kernel's code depends
on attributes only also register `@code_of("Op") def code(node)`: a function that compiles
that code ahead of the lowering (the session runs it beside other lowering work).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from sparsednn.errors import SparseDNNError
from sparsednn.ir import Node
from sparsednn.ir.storage import release
from sparsednn.ops import lookup
from sparsednn.ops.fused_ops import Linear
from sparsednn.runtime.threads import parallel_for, step_threads

Lowering = Callable[[Node, "LoweringContext"], Callable[..., Any]]
LOWERINGS: dict[str, Lowering] = {}
CODE: dict[str, Callable[[Node], tuple]] = {}


@dataclass
class LoweringContext:
    num_threads: int
    kernels: dict[str, Any] = field(default_factory=dict)  # node name -> compiled kernel

    def threads(self) -> int:
        """Threads for the step now running (fewer than num_threads while a batch runs in
        parts, one part per thread: runtime/batch_parts.py); read at each call."""
        return step_threads(self.num_threads)


class CompressedWeight:
    """Stands in a Linear node for a weight its kernel holds in a form of its own (a sparse
    kernel's grouped CSR, the generated GEMM's packed panels), so that the dense copy is freed
    and the weight is held once. Dumps and summaries read its shape and nnz; the rare paths
    that need it dense (NaN inputs) get it back with np.asarray, rebuilt from the kernel's
    arrays."""

    dtype = np.dtype(np.float32)

    def __init__(self, kernel):
        self.shape = (kernel.in_features, kernel.out_features)
        self._kernel = kernel

    @property
    def nnz(self) -> int:
        return self._kernel.nnz

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        dense = self._kernel.dense_weight()
        return dense if dtype is None else dense.astype(dtype)

    def __str__(self) -> str:
        zeros = 100.0 * (1.0 - self.nnz / max(self.size, 1))
        return f"float32{list(self.shape)} {zeros:.1f}% zeros, {self._kernel.weight_format}"


def lowering(op: str):
    def wrap(fn: Lowering) -> Lowering:
        LOWERINGS[op] = fn
        return fn

    return wrap


def code_of(op: str):
    """Register code(node) -> (key, compile): the code the node's kernel needs, as a key
    (equal for nodes that share the code) and a function that compiles it."""

    def wrap(fn):
        CODE[op] = fn
        return fn

    return wrap


def code_to_compile(nodes) -> list[Callable[[], Any]]:
    """The functions that compile the code these nodes' kernels need, once per distinct code
    (lower() then finds it compiled)."""
    found: dict = {}
    for node in nodes:
        if node.op in CODE:
            try:
                key, compile_code = CODE[node.op](node)
            except (KeyError, TypeError, ValueError):
                continue  # (malformed attributes: lower() reports them)
            found.setdefault(key, compile_code)
    return list(found.values())


def lower(node: Node, ctx: LoweringContext) -> Callable[..., Any]:
    if node.op in LOWERINGS:
        return LOWERINGS[node.op](node, ctx)
    compute = lookup(node.op, node.name).compute
    attrs = node.attrs
    return lambda *args: compute(*args, **attrs)


@lowering("Linear")
def lower_linear(node: Node, ctx: LoweringContext) -> Callable[..., Any]:
    from sparsednn.codegen.spmm import compile_dense_linear, compile_sparse_linear

    a = node.attrs
    sparse = a["kernel"] == "sparse"
    if sparse:  # (choose_kernels counted the nonzeros)
        kernel = compile_sparse_linear(a["weight"], a["bias"], a["activation"],
                                       nonzeros=a.get("nonzeros"))  # fmt: skip
    else:
        kernel = compile_dense_linear(a["weight"], a["bias"], a["activation"])
    ctx.kernels[node.name] = kernel
    a["kernel"] = kernel.name
    k, n = a["weight"].shape
    if kernel.holds_weight:  # its nonzeros, or the packed weight: free the dense copy (or
        dense = a["weight"]  # its file's pages)
        a["weight"] = CompressedWeight(kernel)
        release(dense)
        del dense
    threads = ctx.threads
    where = f"node {node.name!r} (Linear {k}x{n})"

    def run_linear(x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32 or x.ndim < 1 or x.shape[-1] != k:
            raise SparseDNNError(
                f"{where}: expects float32 input [..., {k}], got {x.dtype}{list(x.shape)}"
            )
        rows = np.ascontiguousarray(x).reshape(-1, k)
        if not sparse:
            return kernel(rows, num_threads=threads()).reshape(*x.shape[:-1], n)
        y, non_finite = kernel.call_and_probe(rows, num_threads=threads())
        if non_finite is not False and rows.size:  # True, or not known (few rows)
            _redo_non_finite_rows(rows, y, ones, a)
        return y.reshape(*x.shape[:-1], n)

    ones = np.ones(k, np.float32)
    return run_linear


def lower_linear_chain(first: Node, second: Node, run_first, run_second, ctx: LoweringContext):
    """One step for sparse Linear `first` feeding only sparse Linear `second`: the two kernels
    chained over chunks of tokens (codegen/chain.py), or the two lowered steps one after the
    other for what the chain does not take (few rows, a NaN or Inf in X or between them)."""
    from sparsednn.codegen.chain import SparseChain

    chain = SparseChain(ctx.kernels[first.name], ctx.kernels[second.name])
    k, n, threads = chain.k, chain.n_out, ctx.threads

    def run_chain(x: np.ndarray) -> np.ndarray:
        if x.dtype == np.float32 and x.ndim >= 1 and x.shape[-1] == k:
            rows = np.ascontiguousarray(x).reshape(-1, k)
            num_threads = threads()
            if chain.applies(rows.shape[0], num_threads):
                y, non_finite = chain(rows, num_threads)
                if not non_finite:
                    return y.reshape(*x.shape[:-1], n)
        return run_second(run_first(x))

    return run_chain


def lower_linear_norm(first: Node, second: Node | None, norm: Node, run_linear, run_norm,
                      side: int, ctx: LoweringContext):  # fmt: skip
    """One step for a residual layer norm (AddLayerNorm `norm`) whose input `side` is the
    output of sparse Linear `first` (or of the chained pair first -> second) and is read by it
    alone: each chunk of tokens is normalised with its residual rows as it leaves the kernels,
    while still in L2 (codegen/chain.py). What that does not take (few rows, a residual of
    another shape, a NaN or Inf in X or between the layers) runs as the steps apart."""
    from sparsednn.codegen.chain import SparseChain

    a = norm.attrs
    scale = np.ascontiguousarray(a["scale"], np.float32)
    bias = None if a.get("bias") is None else np.ascontiguousarray(a["bias"], np.float32)
    norm_kernel = (ctx.kernels[norm.name], scale, bias, float(a.get("epsilon", 1e-5)))
    chain = SparseChain(ctx.kernels[first.name],
                        None if second is None else ctx.kernels[second.name],
                        norm=norm_kernel)  # fmt: skip
    k, n, threads = chain.k, chain.n_out, ctx.threads

    def run_fused(x: np.ndarray, residual: np.ndarray) -> np.ndarray:
        if (
            x.dtype == np.float32
            and x.ndim >= 1
            and x.shape[-1] == k
            and isinstance(residual, np.ndarray)
            and residual.dtype == np.float32
            and residual.shape == (*x.shape[:-1], n)
        ):
            rows = np.ascontiguousarray(x).reshape(-1, k)
            num_threads = threads()
            if chain.applies(rows.shape[0], num_threads):
                res = np.ascontiguousarray(residual).reshape(-1, n)
                y, non_finite = chain(rows, num_threads, residual=res)
                if not non_finite:
                    return y.reshape(*x.shape[:-1], n)
        y = run_linear(x)
        return run_norm(y, residual) if side == 0 else run_norm(residual, y)

    return run_fused


def _redo_non_finite_rows(rows: np.ndarray, y: np.ndarray, ones: np.ndarray, attrs) -> None:
    """NaN and Inf as a dense product gives them: the sparse kernel skips zero weights, so a
    NaN or Inf input never meets them, where the reference's NaN * 0 and Inf * 0 are NaN.
    Rows holding one (their sum is not finite; one BLAS pass) are recomputed densely. Called
    only when the kernel's probe saw one (or could not look)."""
    bad = np.flatnonzero(~np.isfinite(rows @ ones))
    if bad.size:
        y[bad] = Linear(
            rows[bad],
            weight=np.asarray(attrs["weight"]),
            bias=attrs["bias"],
            activation=attrs["activation"],
        )


@lowering("MatMul")
def lower_matmul(node: Node, ctx: LoweringContext) -> Callable[..., Any]:
    if ctx.num_threads == 1:
        return np.matmul
    return lambda a, b: batched_matmul(a, b, ctx.threads())


def batched_matmul(a: np.ndarray, b: np.ndarray, num_threads: int) -> np.ndarray:
    """MatMul of activations (attention's QK^T and PV) split over the batch of matrices,
    one slice per thread: BLAS runs single-threaded inside sparsednn's own pool."""
    if (
        a.ndim < 3
        or a.shape[:-2] != b.shape[:-2]
        or a.dtype != b.dtype
        or a.dtype.kind != "f"
        or a.size == 0
        or b.size == 0
    ):  # (reshape(-1, ...) cannot size empty batches)
        return np.matmul(a, b)
    batch = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.reshape(-1, *b.shape[-2:])
    count = a3.shape[0]
    if count < 2:
        return np.matmul(a, b)
    out = np.empty((count, a.shape[-2], b.shape[-1]), a.dtype)
    bounds = np.linspace(0, count, min(num_threads, count) + 1).astype(int)
    parallel_for(
        [
            partial(np.matmul, a3[lo:hi], b3[lo:hi], out=out[lo:hi])
            for lo, hi in itertools.pairwise(bounds)
        ]
    )
    return out.reshape(*batch, a.shape[-2], b.shape[-1])


def _attention_code(node: Node) -> tuple:
    """(heads, head size, masked): the attention kernel's code (only the variant this node
    runs: with a mask or without)."""
    a = node.attrs
    return a["num_heads"], a["head_size"], len(node.inputs) > 3 and node.inputs[3] is not None


@code_of("Attention")
def code_of_attention(node: Node) -> tuple:
    from sparsednn.codegen.attention import compile_attention

    heads, head_size, masked = _attention_code(node)
    return ("Attention", heads, head_size, masked), partial(
        compile_attention, heads, head_size, masks=(masked,)
    )


@lowering("Attention")
def lower_attention(node: Node, ctx: LoweringContext) -> Callable[..., Any]:
    """The fused attention kernel (sparsednn/codegen/attention.py), specialised on the heads."""
    from sparsednn.codegen.attention import compile_attention

    a = node.attrs
    heads, head_size, masked = _attention_code(node)
    kernel = compile_attention(heads, head_size, masks=(masked,))
    ctx.kernels[node.name] = kernel
    scale = float(a["scale"])
    masked_row_value = 0.0 if a.get("fully_masked", "nan") == "zero" else float("nan")
    threads = ctx.threads
    where = f"node {node.name!r} (Attention, {heads} heads of {head_size})"

    def run_attention(q, k, v, mask=None):
        return kernel(
            q,
            k,
            v,
            mask,
            scale=scale,
            masked_row_value=masked_row_value,
            num_threads=threads(),
            where=where,
        )

    return run_attention


def _lower_layer_norm(node: Node, ctx: LoweringContext, residual: bool) -> Callable[..., Any]:
    from sparsednn.codegen.norm import compile_layer_norm

    a = node.attrs
    scale = np.ascontiguousarray(a["scale"], np.float32)
    bias = None if a.get("bias") is None else np.ascontiguousarray(a["bias"], np.float32)
    eps = float(a.get("epsilon", 1e-5))
    n = scale.shape[0]
    kernel = compile_layer_norm(n, residual)
    ctx.kernels[node.name] = kernel
    threads = ctx.threads
    where = f"node {node.name!r} ({node.op}, {n} features)"
    if residual:
        return lambda x, y: kernel(
            x, y, scale=scale, bias=bias, epsilon=eps, num_threads=threads(), where=where
        )
    return lambda x: kernel(
        x, scale=scale, bias=bias, epsilon=eps, num_threads=threads(), where=where
    )


@code_of("LayerNorm")
@code_of("AddLayerNorm")
def code_of_layer_norm(node: Node) -> tuple:
    from sparsednn.codegen.norm import compile_layer_norm

    n, residual = len(node.attrs["scale"]), node.op == "AddLayerNorm"
    return ("LayerNorm", n, residual), partial(compile_layer_norm, n, residual)


@code_of("EmbedLayerNorm")
def code_of_embed_layer_norm(node: Node) -> tuple:
    from sparsednn.codegen.norm import compile_embed_layer_norm

    n, terms = len(node.attrs["scale"]), len(node.attrs["tables"])
    return ("EmbedLayerNorm", n, terms), partial(compile_embed_layer_norm, n, terms)


@lowering("LayerNorm")
def lower_layer_norm(node: Node, ctx: LoweringContext) -> Callable[..., Any]:
    """Layer norm over the last axis (sparsednn/codegen/norm.py)."""
    return _lower_layer_norm(node, ctx, residual=False)


@lowering("AddLayerNorm")
def lower_add_layer_norm(node: Node, ctx: LoweringContext) -> Callable[..., Any]:
    """Residual Add + layer norm in one pass (sparsednn/codegen/norm.py)."""
    return _lower_layer_norm(node, ctx, residual=True)


@lowering("EmbedLayerNorm")
def lower_embed_layer_norm(node: Node, ctx: LoweringContext) -> Callable[..., Any]:
    """Embeddings summed from rows of their tables and normalised, in one pass per row
    (passes/fuse_embeddings.py; codegen/norm.py). The indices are checked here, in numpy, and
    become row addresses: the kernel reads only rows of the tables."""
    from sparsednn.codegen.norm import compile_embed_layer_norm
    from sparsednn.ops.fused_ops import embedding_rows

    a = node.attrs
    tables = [np.ascontiguousarray(t, np.float32) for t in a["tables"]]
    term_shapes = a.get("term_shapes")
    scale = np.ascontiguousarray(a["scale"], np.float32)
    bias = None if a.get("bias") is None else np.ascontiguousarray(a["bias"], np.float32)
    eps = float(a.get("epsilon", 1e-5))
    n = scale.shape[0]
    kernel = compile_embed_layer_norm(n, len(tables))
    ctx.kernels[node.name] = kernel
    bases = [t.ctypes.data for t in tables]
    threads = ctx.threads
    where = f"node {node.name!r} ({node.op}, {len(tables)} tables of {n} features)"

    def run_embed_layer_norm(*indices):
        try:
            rows = embedding_rows(indices, tables, term_shapes, a.get("gathers"))
        except (ValueError, SparseDNNError) as e:
            raise SparseDNNError(f"{where}: {e}") from None
        shape = rows[0].shape
        addresses = np.empty((len(tables), rows[0].size), np.int64)
        for address, row, base in zip(addresses, rows, bases):
            np.multiply(row.reshape(-1), 4 * n, out=address)
            address += base
        out = np.empty((*shape, n), np.float32)
        return kernel.gathered(addresses, scale=scale, bias=bias, epsilon=eps,
                               num_threads=threads(), out=out)  # fmt: skip

    return run_embed_layer_norm
