"""Checks shared by the model tests: differences to the reference, no recompilation."""

from __future__ import annotations

import contextlib

import numpy as np

ORT_PROVIDERS = ["CPUExecutionProvider"]
TOLERANCE = 1e-4  # max |sparsednn - onnxruntime| on last_hidden_state


def linear_projections(graph) -> int:
    """The weight matrices the Linear nodes hold: a Linear computing attention's q|k|v at once
    (fuse_attention merges the three projections of one input) holds three."""
    packed = {id(n.inputs[0]) for n in graph.nodes if n.op == "Attention" and n.input(1) is None}
    return sum(3 if id(n.outputs[0]) in packed else 1 for n in graph.nodes if n.op == "Linear")


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| in float64; inf when `a` has NaN or inf where `b` is finite."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"shape {a.shape} != reference shape {b.shape}"
    if not a.size:
        return 0.0
    if not np.isfinite(a[np.isfinite(b)]).all():
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@contextlib.contextmanager
def no_recompilation(session):
    """Fail if running `session` compiles anything: no new kernels, no LLVM module JIT-ed."""
    kernels_before = dict(getattr(session, "kernels", {}))
    compiled = []
    patches = []
    try:
        from sparsednn.codegen import jit

        cls = getattr(jit, "JITModule", None)
        if cls is not None:
            original_init = cls.__init__

            def counting_init(self, *args, **kwargs):
                compiled.append(args)
                original_init(self, *args, **kwargs)

            cls.__init__ = counting_init
            patches.append(lambda: setattr(cls, "__init__", original_init))
    except ImportError:
        pass
    try:
        from sparsednn.codegen import spmm

        for name in ("compile_sparse_linear", "compile_dense_linear"):
            original = getattr(spmm, name, None)
            if original is None:
                continue

            def refuse(*args, _name=name, **kwargs):
                compiled.append(_name)
                raise AssertionError(f"{_name} called while running a compiled session")

            setattr(spmm, name, refuse)
            patches.append(lambda _n=name, _o=original: setattr(spmm, _n, _o))
    except ImportError:
        pass
    try:
        yield
    finally:
        for undo in patches:
            undo()
    after = getattr(session, "kernels", {})
    assert set(after) == set(kernels_before) and all(
        after[k] is kernels_before[k] for k in after
    ), "the session's kernels changed while running"
    assert not compiled, f"running the session compiled {len(compiled)} LLVM module(s)/kernel(s)"
