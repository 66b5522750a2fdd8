"""The one ordered list of passes every model goes through."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from sparsednn.errors import SparseDNNError
from sparsednn.ir import Graph, verify
from sparsednn.ir.storage import release_graph
from sparsednn.passes.choose_kernels import DEFAULT_SPARSE_THRESHOLD, choose_kernels
from sparsednn.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from sparsednn.passes.eliminate_dead_code import eliminate_dead_code
from sparsednn.passes.fold_constants import fold_constants
from sparsednn.passes.fuse_attention import fuse_attention
from sparsednn.passes.fuse_embeddings import fuse_embeddings
from sparsednn.passes.fuse_gelu import fuse_gelu
from sparsednn.passes.fuse_layer_norm import fuse_layer_norm
from sparsednn.passes.fuse_linear import fuse_linear
from sparsednn.passes.infer_shapes import infer_shapes

Pass = Callable[[Graph], Graph]


def passes(sparse_threshold: float = DEFAULT_SPARSE_THRESHOLD) -> list[tuple[str, Pass]]:
    return [
        ("infer_shapes", infer_shapes),
        ("fold_constants", fold_constants),
        ("eliminate_dead_code", eliminate_dead_code),
        ("fuse_gelu", fuse_gelu),
        ("fuse_linear", fuse_linear),
        ("fuse_attention", fuse_attention),
        ("fuse_layer_norm", fuse_layer_norm),
        ("fuse_embeddings", fuse_embeddings),
        ("eliminate_common_subexpressions", eliminate_common_subexpressions),
        ("choose_kernels", partial(choose_kernels, sparse_threshold=sparse_threshold)),
        ("infer_shapes_after_fusion", infer_shapes),
        ("eliminate_dead_code_after_fusion", eliminate_dead_code),
    ]


PASS_NAMES = [name for name, _ in passes()]


def run_pipeline(
    graph: Graph,
    sparse_threshold: float = DEFAULT_SPARSE_THRESHOLD,
    stop_after: str | None = None,
) -> Graph:
    """Run the passes in order, verifying the IR after each; stop after `stop_after` if given."""
    if stop_after is not None and stop_after not in PASS_NAMES:
        raise SparseDNNError(f"no pass named {stop_after!r}; passes: {', '.join(PASS_NAMES)}")
    for name, run in passes(sparse_threshold):
        graph = run(graph)
        verify(graph)
        release_graph(graph)  # pages of the model file the pass read (ir/storage.py)
        if name == stop_after:
            break
    return graph
