"""Decide, per Linear node, between the sparse kernel and the dense (BLAS) path."""

from __future__ import annotations

import numpy as np

from sparsednn.ir import Graph
from sparsednn.ir.storage import release

# Below this fraction of zeros a dense GEMM beats the sparse kernels (bench/kernels.py).
DEFAULT_SPARSE_THRESHOLD = 0.6


def choose_kernels(graph: Graph, sparse_threshold: float = DEFAULT_SPARSE_THRESHOLD) -> Graph:
    for node in graph.nodes:
        if node.op != "Linear":
            continue
        weight = node.attrs["weight"]
        sparsity = 1.0 - np.count_nonzero(weight) / max(weight.size, 1)
        release(weight)  # a weight still in the model file: give back the pages just read
        node.attrs["sparsity"] = round(float(sparsity), 4)
        node.attrs["kernel"] = "sparse" if sparsity >= sparse_threshold else "dense"
    return graph
