"""Decide, per Linear node, between the sparse kernel and the dense (packed GEMM) path."""

from __future__ import annotations

from sparsednn.ir import Graph
from sparsednn.ir.storage import nonzero_count, release

# Below this fraction of zeros the dense kernel (codegen/gemm.py) beats the sparse one. Measured
# on BERT shapes, unstructured zeros, 1 and 2 threads, 128 and 2048 rows (AVX-512): sparse is
# 0.82-0.98x dense at 30%, 1.03-1.16x at 40%, 1.17-1.44x at 50%.
DEFAULT_SPARSE_THRESHOLD = 0.45


def choose_kernels(graph: Graph, sparse_threshold: float = DEFAULT_SPARSE_THRESHOLD) -> Graph:
    for node in graph.nodes:
        if node.op != "Linear":
            continue
        weight = node.attrs["weight"]
        nonzeros = nonzero_count(weight)
        release(weight)  # a weight still in the model file: give back the pages just read
        sparsity = 1.0 - nonzeros / max(weight.size, 1)
        node.attrs["nonzeros"] = nonzeros  # (for the sparse kernel: not counted again)
        node.attrs["sparsity"] = round(sparsity, 4)
        node.attrs["kernel"] = "sparse" if sparsity >= sparse_threshold else "dense"
    return graph
