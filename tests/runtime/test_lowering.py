"""CompressedWeight: what a Linear node keeps of a weight that runs on a sparse kernel."""

import numpy as np
import pytest

from sparsednn.codegen import compile_sparse_linear
from sparsednn.runtime.lowering import CompressedWeight


@pytest.mark.parametrize("shape", [(768, 3072), (3, 5), (1, 1), (0, 4), (7, 0), (50, 19)])
@pytest.mark.parametrize("zeros", [0.0, 0.9, 1.0])
def test_compressed_weight_gives_the_dense_back(shape, zeros):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < zeros] = 0
    if w.size:
        w.flat[-1] = np.nan  # kept as a nonzero, as a dense product sees it
    c = CompressedWeight(compile_sparse_linear(w))
    dense = np.asarray(c)
    assert dense.dtype == np.float32 and dense.shape == w.shape
    np.testing.assert_array_equal(dense, w)
    assert c.nnz == np.count_nonzero(w) and c.size == w.size and c.shape == w.shape
    assert np.asarray(c, np.float64).dtype == np.float64


def test_compressed_weight_holds_nothing_but_the_kernel():
    w = np.random.default_rng(1).standard_normal((768, 3072)).astype(np.float32)
    w[np.random.default_rng(2).random(w.shape) < 0.9] = 0
    c = CompressedWeight(compile_sparse_linear(w))
    assert [k for k, v in vars(c).items() if isinstance(v, np.ndarray)] == []
    assert "90.0% zeros, compressed" in str(c)


def test_code_to_compile_once_per_distinct_code():
    """What a session compiles ahead of lowering (beside the sparse layers): one function per
    distinct kernel code; nodes without such code, or with attributes the lowering will
    reject, add none."""
    from sparsednn.codegen.norm import compile_layer_norm
    from sparsednn.ir.graph import Node
    from sparsednn.runtime.lowering import code_to_compile

    ones = np.ones(24, np.float32)
    nodes = [
        Node("LayerNorm", "a", [], [], {"scale": ones}),
        Node("LayerNorm", "b", [], [], {"scale": ones * 2}),  # (the same code)
        Node("AddLayerNorm", "c", [], [], {"scale": ones}),
        Node("AddLayerNorm", "d", [], [], {}),  # (no scale: lower() reports it)
        Node("Relu", "e", [], [], {}),
    ]
    compile_code = code_to_compile(nodes)
    assert len(compile_code) == 2
    kernels = [f() for f in compile_code]
    assert kernels == [compile_layer_norm(24, False), compile_layer_norm(24, True)]
