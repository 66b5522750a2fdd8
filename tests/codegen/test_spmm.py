"""Sparse and dense linear kernels (sparsednn.codegen.spmm) against a float64 numpy reference.

Property tests draw shapes (odd, tiny, not multiples of the tiles), batch sizes (0, 1, tails),
sparsities from dense to all-zero with empty rows and columns, bias/activation, thread counts,
every ISA this CPU can run (AVX-512, AVX2, generic SSE) and tile settings that force several
K-blocks and narrow panels.
"""

from __future__ import annotations

import itertools
import math
import re
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsednn.codegen import spmm
from sparsednn.codegen.epilogue import compile_epilogue
from sparsednn.codegen.spmm import (
    DenseLinearKernel,
    SparseLinearKernel,
    SpmmTuning,
    compile_dense_linear,
    compile_linear,
    compile_sparse_linear,
)
from sparsednn.codegen.target import available_isas, host_target
from sparsednn.errors import CompileError, InvalidInputError
from sparsednn.testing import guarded_array

ISAS = available_isas()


@pytest.fixture(autouse=True)
def always_split_threads(monkeypatch):
    """Small test problems would run on one thread (not worth the hand-off): split anyway,
    so that num_threads=2 exercises the threaded path."""
    monkeypatch.setattr(SparseLinearKernel, "_NS_PER_EXTRA_THREAD", 0)
    monkeypatch.setattr(DenseLinearKernel, "_NS_PER_EXTRA_THREAD", 0)


_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def gelu64(z: np.ndarray) -> np.ndarray:
    """Exact GELU in float64, 0.5 x (1 + erf(x / sqrt 2)) written with erfc so that negative x
    do not cancel (1 + erf(-6) has no correct digits left in float64)."""
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * z * _erfc(-z / math.sqrt(2.0))


def reference(x, w, bias, activation):
    """float64 result and a bound on fp32 rounding of each element."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    z = x64 @ w64
    scale = np.abs(x64) @ np.abs(w64)
    if bias is not None:
        z = z + bias
        scale = scale + np.abs(bias)
    if activation == "relu":
        z = np.maximum(z, 0.0)
    elif activation == "gelu":
        z = gelu64(z)
    k = max(w.shape[0], 1)
    tol = 1e-5 + 1e-5 * np.abs(z) + 2e-6 * math.sqrt(k) * scale
    return z, tol


def assert_close(y, x, w, bias, activation):
    ref, tol = reference(x, w, bias, activation)
    assert y.shape == ref.shape
    err = np.abs(y.astype(np.float64) - ref)
    bad = ~(err <= tol)  # also catches NaN
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{bad.sum()} of {y.size} elements off; first at {i}: got {y[i]}, want {ref[i]}, "
            f"tol {tol[i]:.3g} (max err {np.nanmax(err):.3g})"
        )


def random_weight(rng, k, n, sparsity, empty_rows=0.0, empty_cols=0.0):
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) < sparsity] = 0.0
    w[rng.random(k) < empty_rows, :] = 0.0  # inputs no output uses
    w[:, rng.random(n) < empty_cols] = 0.0  # outputs = act(bias)
    return w


TUNINGS = [
    spmm.DEFAULT_TUNING,
    SpmmTuning(vectors_per_panel=1),
    SpmmTuning(vectors_per_panel=3, k_block_bytes=1),  # K-blocks of V columns: many blocks
    SpmmTuning(vectors_per_panel=2, k_block_bytes=16 * 1024),
    SpmmTuning(group_rows=2, sort_span=32, k_block_bytes=1),  # pairs, rows sorted in 32s
    SpmmTuning(sparsest_vectors_per_panel=None),  # 64-token panels at every density
]


# what every generated-kernel property test draws besides the weight and the tokens
EPILOGUE_THREADS_TUNING = dict(
    has_bias=st.booleans(),
    activation=st.sampled_from(["none", "relu", "gelu"]),
    num_threads=st.sampled_from([1, 2]),
    isa=st.sampled_from(ISAS),
    tuning=st.sampled_from(TUNINGS),
    seed=st.integers(0, 2**32 - 1),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 300),
    n=st.integers(1, 300),
    m=st.one_of(
        st.sampled_from([0, 1, 2, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129]), st.integers(0, 300)
    ),
    sparsity=st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.98, 1.0]), st.floats(0.0, 1.0)),
    empty=st.sampled_from([0.0, 0.0, 0.3]),
    **EPILOGUE_THREADS_TUNING,
)
def test_sparse_matches_reference(k, n, m, sparsity, empty, has_bias, activation, num_threads, isa,
                                  tuning, seed):  # fmt: skip
    rng = np.random.default_rng(seed)
    w = random_weight(rng, k, n, sparsity, empty, empty)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    kern = compile_sparse_linear(w, bias, activation, target=host_target(isa), tuning=tuning)
    assert (kern.in_features, kern.out_features) == (k, n)
    assert kern.nnz == np.count_nonzero(w)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = kern(x, num_threads=num_threads)
    assert y.dtype == np.float32 and y.shape == (m, n)
    assert_close(y, x, w, bias, activation)
    # into a given buffer too, with garbage in it
    out = np.full((m, n), np.nan, np.float32)
    assert kern(x, out=out, num_threads=num_threads) is out
    np.testing.assert_array_equal(out, y)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k,n", [(768, 768), (300, 77)])
@pytest.mark.parametrize("m", [1, 64, 130])
def test_sparse_bert_like_shapes(isa, k, n, m):
    rng = np.random.default_rng(k * 1000 + n + m)
    w = random_weight(rng, k, n, 0.9)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    for activation in ("none", "gelu"):
        kern = compile_sparse_linear(w, bias, activation, target=host_target(isa))
        assert_close(kern(x), x, w, bias, activation)
        assert_close(kern(x, num_threads=2), x, w, bias, activation)


def test_sparse_k_blocked_large_k():
    """K = 3072 splits into several K-blocks by default; partial sums must add up."""
    rng = np.random.default_rng(7)
    w = random_weight(rng, 3072, 96, 0.9)
    bias = rng.standard_normal(96).astype(np.float32)
    kern = compile_sparse_linear(w, bias, "relu")
    assert kern.k_block < 3072
    x = rng.standard_normal((70, 3072)).astype(np.float32)
    assert_close(kern(x), x, w, bias, "relu")
    assert_close(kern(x, num_threads=2), x, w, bias, "relu")


@pytest.mark.parametrize("k,n", [(1000, 70), (3072, 96), (1100, 33)])
def test_sparsest_weights_take_narrow_panels_and_deep_k_blocks(k, n):
    """At <= 5.5% density on AVX-512, 32-token panels in K-blocks of more than 256 columns
    (16-bit k): several blocks, tails of tokens and rows, both thread counts, every epilogue."""
    rng = np.random.default_rng(k + n)
    w = random_weight(rng, k, n, 0.98, empty_cols=0.1)
    bias = rng.standard_normal(n).astype(np.float32)
    for activation in ("none", "gelu"):
        kern = compile_sparse_linear(w, bias, activation)
        if host_target().isa == "avx512":
            assert kern.tile_tokens == 32 and kern._csr.wide
            assert 256 < kern.k_block < k and kern._csr.n_blocks > 1
        np.testing.assert_array_equal(kern.dense_weight(), w)
        for m in (1, 9, 31, 32, 33, 100, 257):
            x = rng.standard_normal((m, k)).astype(np.float32)
            for threads in (1, 2):
                assert_close(kern(x, num_threads=threads), x, w, bias, activation)


@pytest.mark.parametrize("k,sparsity,k_block", [(3072, 0.98, 512), (3072, 0.99, 1024),
                                                (768, 0.99, 768), (3072, 0.95, 384),
                                                (768, 0.98, 768), (1024, 0.98, 512),
                                                (500, 0.95, 256)])  # fmt: skip
def test_sparsest_k_blocks_deepen_as_the_weight_thins(k, sparsity, k_block):
    """A row keeps about 11 nonzeros per K-block (SpmmTuning.sparsest_row_nonzeros), down to
    a floor of 48 KB; a K of up to 1.5 such blocks is one block of 16-bit k (98% K = 768),
    but not where the floor sets the block (95% K = 500)."""
    if host_target().isa != "avx512":
        pytest.skip("the narrow-panel plan is AVX-512 only")
    rng = np.random.default_rng(k)
    w = random_weight(rng, k, 200, sparsity)
    bias = rng.standard_normal(200).astype(np.float32)
    kern = compile_sparse_linear(w, bias, "gelu")
    assert kern.tile_tokens == 32 and kern._csr.wide == (k_block > 256)
    assert kern.k_block == k_block and kern._csr.n_blocks == -(-k // k_block)
    for m in (1, 31, 33, 100):
        x = rng.standard_normal((m, k)).astype(np.float32)
        for threads in (1, 2):
            assert_close(kern(x, num_threads=threads), x, w, bias, "gelu")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k,n,sparsity", [(500, 2100, 0.9), (1100, 4200, 0.98)])
def test_wide_layers_run_their_rows_in_slabs(k, n, sparsity, isa):
    """Where a panel's partial sums exceed PARTIAL_SLAB_BYTES, its rows run in slabs through
    all K-blocks (X's whole K packed once): tails of tokens and of slabs, both thread counts
    (rows or tokens split), the entry point and the general path."""
    rng = np.random.default_rng(n)
    w = random_weight(rng, k, n, sparsity, empty_rows=0.05)
    bias = rng.standard_normal(n).astype(np.float32)
    kern = compile_sparse_linear(w, bias, "gelu", target=host_target(isa))
    assert kern._csr.n_blocks > 1
    if 4 * kern.tile_tokens * n > spmm.PARTIAL_SLAB_BYTES:  # (not 2100 rows of 16 tokens)
        assert 0 < kern._slab_rows < n and kern._slab_rows % kern._csr.sort_unit == 0
    for m in (1, 9, 33, 64, 130):
        x = rng.standard_normal((m, k)).astype(np.float32)
        for threads in (1, 2):
            assert_close(kern(x, num_threads=threads), x, w, bias, "gelu")


def heavy_tailed_weight(rng, k, n, sparsity):
    """Magnitude-pruned weights whose outputs' scales vary widely: row lengths of Wᵀ then
    differ by 10x and more, as in real pruned models (bench/kernels.py --weights magnitude)."""
    w = rng.standard_normal((k, n)).astype(np.float32) * np.exp(rng.standard_normal(n))
    w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
    return w.astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k,n,sparsity", [(768, 777, 0.98), (700, 1024, 0.9), (3000, 300, 0.98)])
def test_last_block_sorted_within_spans(monkeypatch, k, n, sparsity, isa):
    """The last K-block's rows sorted within S rows (_row_spans; forced here), its
    tiles finished after the span: one K-block and several, staged and not, tails of rows
    and tokens, both thread counts."""
    monkeypatch.setattr(spmm, "LAST_SPAN_MIN_SAVING", -1.0)
    rng = np.random.default_rng(k + n)
    w = heavy_tailed_weight(rng, k, n, sparsity)
    bias = rng.standard_normal(n).astype(np.float32)
    kern = compile_sparse_linear(w, bias, "gelu", target=host_target(isa))
    assert kern._csr.last_unit == kern._csr.sort_unit > kern.target.vector_width
    np.testing.assert_array_equal(kern.dense_weight(), w)
    for m in (1, 9, 33, 130):
        x = rng.standard_normal((m, k)).astype(np.float32)
        for threads in (1, 2):
            assert_close(kern(x, num_threads=threads), x, w, bias, "gelu")


@pytest.mark.parametrize("k,n,sparsity", [(768, 777, 0.98), (700, 1024, 0.9), (3000, 768, 0.98)])
def test_uneven_rows_choose_spans_and_random_masks_tiles(k, n, sparsity):
    """On AVX-512, magnitude-pruned rows of very different lengths sort within wider spans
    (UNEVEN_SPAN), the last K-block too (less padding), in groups of four rows even with one
    K-block; random masks keep S = 128 and the last block's tiles (finished sooner), in
    pairs with one K-block."""
    if host_target().isa != "avx512":
        pytest.skip("measured on AVX-512's 16-row tiles")
    rng = np.random.default_rng(n)
    uneven = compile_sparse_linear(heavy_tailed_weight(rng, k, n, sparsity))
    assert uneven._csr.last_unit == uneven._csr.sort_unit == spmm.UNEVEN_SPAN
    assert uneven._csr.group_rows == 4  # (one K-block too: its spans pad little)
    plain = compile_sparse_linear(random_weight(rng, k, n, sparsity))
    assert plain._csr.last_unit == 16
    assert plain._csr.sort_unit == (16 if plain._csr.n_blocks == 1 else 128)
    assert plain._csr.group_rows == (2 if plain._csr.n_blocks == 1 else 4)


def test_k_block_longer_than_the_zero_page_is_refused(monkeypatch):
    """A tail panel's tokens past M are packed from the code's zero page, one K-block long
    at most: a K-block beyond it (no plan makes one) is a compile error, never a read past."""
    rng = np.random.default_rng(3)
    w = random_weight(rng, 2048, 64, 0.98)
    monkeypatch.setattr(spmm, "_k_blocking", lambda k, *args: (2048, 1))
    with pytest.raises(CompileError, match="zero page"):
        compile_sparse_linear(w)


def test_sparsest_plan_only_below_its_density_and_without_shared_rows():
    """90% keeps 64-token panels of 8-bit k; weights pruned in 1x4 blocks keep the shared-rows
    variant (8-bit k) at any density; an explicit K-block size keeps the caller's panels."""
    rng = np.random.default_rng(5)
    if host_target().isa != "avx512":
        pytest.skip("the narrow-panel plan is AVX-512 only")
    dense90 = compile_sparse_linear(random_weight(rng, 600, 64, 0.9))
    assert dense90.tile_tokens == 64 and not dense90._csr.wide
    blocks = rng.standard_normal((600, 64)).astype(np.float32)
    blocks[rng.random((600, 16)).repeat(4, axis=1) < 0.98] = 0.0
    shared = compile_sparse_linear(blocks)
    assert shared.shared_rows == 4 and shared.tile_tokens == 64 and not shared._csr.wide
    x = rng.standard_normal((70, 600)).astype(np.float32)
    assert_close(shared(x), x, blocks, None, "none")
    explicit = compile_sparse_linear(random_weight(rng, 600, 64, 0.99),
                                     tuning=SpmmTuning(k_block_bytes=40 * 1024))  # fmt: skip
    assert explicit.tile_tokens == 64 and not explicit._csr.wide


def test_sparse_all_zero_weight_gives_activation_of_bias():
    rng = np.random.default_rng(0)
    bias = rng.standard_normal(37).astype(np.float32)
    kern = compile_sparse_linear(np.zeros((20, 37), np.float32), bias, "gelu")
    assert kern.nnz == 0 and kern.sparsity == 1.0
    y = kern(rng.standard_normal((5, 20)).astype(np.float32))
    np.testing.assert_allclose(y, np.broadcast_to(gelu64(bias), (5, 37)), rtol=1e-6, atol=1e-7)


def test_sparse_attributes_and_name():
    rng = np.random.default_rng(0)
    w = random_weight(rng, 64, 48, 0.75)
    kern = compile_sparse_linear(w, None, "gelu", target=host_target("avx2"))
    assert isinstance(kern, SparseLinearKernel)
    assert kern.name == "f32_spmm_csr_32x1_avx2_gelu"
    assert kern.in_features == 64 and kern.out_features == 48
    assert kern.nnz == np.count_nonzero(w)
    assert kern.sparsity == pytest.approx(1 - kern.nnz / w.size)
    assert 0 < kern.compile_seconds < 10


@pytest.mark.parametrize("isa", ISAS)
def test_dump_ir_and_asm(isa):
    rng = np.random.default_rng(1)
    kern = compile_sparse_linear(
        random_weight(rng, 40, 24, 0.8), None, "gelu", target=host_target(isa)
    )
    ir_text, asm = kern.llvm_ir, kern.asm
    assert f"define void @{kern.name}(" in ir_text or f'define void @"{kern.name}"(' in ir_text
    assert kern.name in asm
    # no libm calls from vector code: GELU is inline
    for sym in ("erf", "exp", "fmaf", "rint"):
        assert f"call\t{sym}" not in asm and f"@{sym}" not in ir_text
    if isa == "avx512":
        assert "%zmm" in asm
    elif isa == "avx2":
        assert "%ymm" in asm and "%zmm" not in asm
    else:
        assert "%ymm" not in asm and "%zmm" not in asm and "vfmadd" not in asm
    if isa != "avx512":  # no EVEX encodings either: mask registers, xmm16-31
        assert "%k1" not in asm and not re.search(r"%[xy]mm(1[6-9]|2\d|3[01])\b", asm)


# ---- the dense kernel ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 200),
    n=st.integers(1, 200),
    m=st.sampled_from([0, 1, 5, 33, 64]),
    has_bias=st.booleans(),
    activation=st.sampled_from(["none", "relu", "gelu"]),
    num_threads=st.sampled_from([1, 2]),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**32 - 1),
)
def test_dense_matches_reference(k, n, m, has_bias, activation, num_threads, isa, seed):
    rng = np.random.default_rng(seed)
    w = random_weight(rng, k, n, 0.3)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    kern = compile_dense_linear(w, bias, activation, target=host_target(isa))
    assert isinstance(kern, DenseLinearKernel)
    x = rng.standard_normal((m, k)).astype(np.float32)
    assert_close(kern(x, num_threads=num_threads), x, w, bias, activation)


@pytest.mark.parametrize("isa", ISAS)
def test_gelu_epilogue_accuracy(isa):
    """GELU of float32 values against float64. The erfc form (AVX2, generic): relative error
    < 1e-6 over the whole range. The table form (AVX-512): relative error < 1e-6 from x = -3 on,
    < 1e-4 down to -5 and error < 1.5e-7 * max(1, |x|) everywhere (about an ulp of x; a float32
    0.5 * x * (1 + erf(x / sqrt 2)), as onnxruntime computes it, is no better in the tail)."""
    z = np.concatenate([
        np.linspace(-20, 20, 40001), np.geomspace(1e-30, 20, 2000), -np.geomspace(1e-30, 20, 2000),
        [0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38],
    ]).astype(np.float32)  # fmt: skip
    n = 257  # not a multiple of any vector width: the tail path too
    z = np.concatenate([z, np.zeros((-len(z)) % n, np.float32)]).reshape(-1, n)
    kern = compile_dense_linear(np.eye(n, dtype=np.float32), None, "gelu", target=host_target(isa))
    y = kern(z).astype(np.float64)
    ref = gelu64(z)
    big = np.abs(ref) > 1e-30
    err = np.abs(y - ref)
    rel = err[big] / np.abs(ref)[big]
    if isa == "avx512":
        x = z.astype(np.float64)[big]
        assert rel[x >= -3].max() < 1e-6, rel[x >= -3].max()
        assert rel[x >= -5].max() < 1e-4, rel[x >= -5].max()
        assert (err / np.maximum(1.0, np.abs(z))).max() < 1.5e-7
        assert (y[z < -5.8] == 0).all()  # below the table (|GELU| < 2e-8 there)
    else:
        assert rel.max() < 1e-6, rel.max()
        assert err[~big].max() < 1e-30
    assert kern.name == (
        "f32_gemm_blas_gelu" if isa == "generic" else f"f32_gemm_packed_{isa}_gelu"
    )


def test_gelu_table_is_its_fit():
    """The AVX-512 GELU's coefficient tables are what `python -m sparsednn.codegen.gelu_table`
    fits (up to float64 least-squares noise across BLAS builds): nobody edited them by hand."""
    from sparsednn.codegen import gelu_table

    np.testing.assert_allclose(np.array(gelu_table.fit()), np.array(gelu_table.TABLE),
                               rtol=1e-4, atol=1e-9)  # fmt: skip
    assert len(gelu_table.TABLE) == 32 and gelu_table.TABLE[0] == (0.0,) * 6


def test_special_values_propagate():
    """NaN and inf pass through bias and activations (the sparse kernel skips zero weights, so
    an identity weight maps x to act(x); BLAS would turn inf * 0 into NaN)."""
    w = np.eye(4, dtype=np.float32)
    x = np.array([[np.nan, np.inf, 1e30, 1.0]], np.float32)
    for activation in ("none", "relu", "gelu"):
        y = compile_sparse_linear(w, None, activation)(x)
        assert (
            np.isnan(y[0, 0]) and y[0, 1] == np.inf and y[0, 2] == np.float32(1e30) and y[0, 3] > 0
        )
        y = x.copy()
        compile_epilogue(4, False, activation)(y)
        assert (
            np.isnan(y[0, 0]) and y[0, 1] == np.inf and y[0, 2] == np.float32(1e30) and y[0, 3] > 0
        )


def test_compile_linear_picks_by_sparsity():
    rng = np.random.default_rng(3)
    assert isinstance(compile_linear(random_weight(rng, 32, 32, 0.95)), SparseLinearKernel)
    assert isinstance(compile_linear(random_weight(rng, 32, 32, 0.2)), DenseLinearKernel)


# ---- validation ------------------------------------------------------------------------------


@pytest.fixture(params=["sparse", "dense"])
def kernel(request):
    w = random_weight(np.random.default_rng(5), 12, 7, 0.5)
    make = compile_sparse_linear if request.param == "sparse" else compile_dense_linear
    return make(w, np.ones(7, np.float32), "relu")


@pytest.mark.parametrize(
    "x,out,match",
    [
        (np.zeros((3, 11), np.float32), None, r"\[M, 12\].*\[3, 11\]"),
        (np.zeros((3, 12), np.float64), None, "float32.*float64"),
        (np.zeros(12, np.float32), None, r"\[M, 12\].*\[12\]"),
        (np.zeros((2, 3, 12), np.float32), None, r"\[M, 12\]"),
        ([[0.0] * 12], None, "numpy array"),
        (np.zeros((3, 12), np.float32), np.zeros((3, 8), np.float32), r"\[3, 7\].*\[3, 8\]"),
        (np.zeros((3, 12), np.float32), np.zeros((4, 7), np.float32), r"\[3, 7\].*\[4, 7\]"),
        (np.zeros((3, 12), np.float32), np.zeros((3, 7), np.float64), "float32.*float64"),
        (np.zeros((3, 12), np.float32), np.zeros((7, 3), np.float32).T, "contiguous"),
    ],
)
def test_invalid_inputs_raise(kernel, x, out, match):
    with pytest.raises(InvalidInputError, match=match):
        kernel(x, out=out)


def test_read_only_and_overlapping_out_raise(kernel):
    out = np.zeros((3, 7), np.float32)
    out.flags.writeable = False
    with pytest.raises(InvalidInputError, match="writable"):
        kernel(np.zeros((3, 12), np.float32), out=out)
    buf = np.zeros((3, 12), np.float32)
    with pytest.raises(InvalidInputError, match="overlap"):
        kernel(buf, out=buf.reshape(-1)[:21].reshape(3, 7))
    with pytest.raises(InvalidInputError, match="num_threads"):
        kernel(np.zeros((3, 12), np.float32), num_threads=0)


def test_invalid_weights_raise():
    with pytest.raises(InvalidInputError, match="2-D"):
        compile_sparse_linear(np.zeros(5, np.float32), None)
    with pytest.raises(InvalidInputError, match=r"bias must have shape \(4,\)"):
        compile_sparse_linear(np.zeros((3, 4), np.float32), np.zeros(3, np.float32))
    with pytest.raises(InvalidInputError, match="activation"):
        compile_dense_linear(np.zeros((3, 4), np.float32), None, "tanh")


@pytest.mark.parametrize("isa", ISAS)
def test_non_contiguous_input_is_copied(isa):
    rng = np.random.default_rng(11)
    w = random_weight(rng, 50, 40, 0.8)
    kern = compile_sparse_linear(w, None, "none", target=host_target(isa))
    big = rng.standard_normal((37, 100)).astype(np.float32)
    for x in (big[:, ::2], np.asfortranarray(big[:, :50]), big[::-1, 10:60]):
        assert not x.flags.c_contiguous
        np.testing.assert_array_equal(kern(x), kern(np.ascontiguousarray(x)))


def test_zero_rows_input():
    kern = compile_sparse_linear(random_weight(np.random.default_rng(0), 9, 5, 0.5), None)
    y = kern(np.zeros((0, 9), np.float32))
    assert y.shape == (0, 5)


# ---- threads ---------------------------------------------------------------------------------


def test_concurrent_calls_from_python_threads():
    rng = np.random.default_rng(21)
    w = random_weight(rng, 300, 200, 0.85)
    bias = rng.standard_normal(200).astype(np.float32)
    kern = compile_sparse_linear(w, bias, "gelu", tuning=SpmmTuning(k_block_bytes=32 * 1024))
    xs = [rng.standard_normal((m, 300)).astype(np.float32) for m in (1, 65, 130, 200)]
    want = [kern(x) for x in xs]
    errors = []

    def worker(i):
        try:
            for rep in range(15):
                j = (i + rep) % len(xs)
                got = kern(xs[j], num_threads=1 + (rep % 2))
                if not np.array_equal(got, want[j]):
                    errors.append((i, rep))
        except Exception as e:  # noqa: BLE001 - any failure in a worker is reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_small_work_stays_on_one_thread(monkeypatch):
    monkeypatch.undo()
    kern = compile_sparse_linear(random_weight(np.random.default_rng(2), 64, 64, 0.9), None)
    assert kern._useful_threads(1, 2) == 1
    big = compile_sparse_linear(random_weight(np.random.default_rng(2), 1024, 1024, 0.5), None)
    assert big._useful_threads(512, 2) == 2


def test_thread_split_balances_nonzeros():
    # nonzeros concentrated in the first rows: equal row counts would be badly unbalanced
    row_nnz = np.concatenate([np.full(64, 100), np.full(960, 10)])
    ranges = spmm._split_rows(row_nnz, 2, 16)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(row_nnz)
    assert all(e0 == s1 for (_, e0), (s1, _) in itertools.pairwise(ranges))
    assert all(s % 16 == 0 for s, _ in ranges)
    costs = [row_nnz[s:e].sum() + 4 * (e - s) for s, e in ranges]  # nonzeros + per-row work
    assert max(costs) / min(costs) < 1.1
    assert ranges[0][1] < 400  # far fewer rows than half
    assert spmm._split_rows(np.zeros(5, np.int64), 2, 16) == [(0, 5)]


def test_compile_time_is_recorded(observe):
    """Compile times of a BERT-sized layer: new code (first of its shape) and cached code
    (another layer of the same shape: only the CSR arrays are built). Loose bounds only: the
    figures themselves go to the observations summary."""
    rng = np.random.default_rng(4)
    w1, w2 = random_weight(rng, 768, 768, 0.9), random_weight(rng, 768, 768, 0.9)
    spmm.clear_code_cache()
    k1 = compile_sparse_linear(w1, None, "gelu")
    k2 = compile_sparse_linear(w2, None, "gelu")
    observe("codegen", f"compile {k1.name} 768x768 90%: {k1.compile_seconds * 1e3:.1f} ms "
                       f"(same shape again: {k2.compile_seconds * 1e3:.1f} ms)")  # fmt: skip
    assert k1.compile_seconds < 5 and k2.compile_seconds < 1


@pytest.mark.parametrize("make", [compile_sparse_linear, compile_dense_linear])
def test_empty_feature_dimensions(make):
    kern = make(np.zeros((0, 5), np.float32), np.arange(5, dtype=np.float32), "relu")
    np.testing.assert_array_equal(
        kern(np.zeros((3, 0), np.float32)), np.tile(np.arange(5.0), (3, 1))
    )
    kern = make(np.zeros((4, 0), np.float32), None, "gelu")
    assert kern(np.ones((3, 4), np.float32)).shape == (3, 0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [512, 1024])
def test_staged_output_for_thrashing_strides(isa, n):
    """N a multiple of 1 KB / 2 KB: output tiles go through the staging buffer (chunks of
    256 columns, copied out per chunk and at the end of each thread's row range)."""
    rng = np.random.default_rng(n)
    k = 200
    w = random_weight(rng, k, n, 0.9, empty_cols=0.1)
    bias = rng.standard_normal(n).astype(np.float32)
    tuning = SpmmTuning(k_block_bytes=16 * 1024)  # several K-blocks too
    kern = compile_sparse_linear(w, bias, "gelu", target=host_target(isa), tuning=tuning)
    assert kern._stage_cols > 0
    for m in (1, 37, 130):
        x = rng.standard_normal((m, k)).astype(np.float32)
        for threads in (1, 2):
            assert_close(kern(x, num_threads=threads), x, w, bias, "gelu")


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="Linux only")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 17, 70])
def test_no_access_past_the_buffers(isa, m):
    """x and y end at a guard page: the tail panels and tail rows must stay inside them."""
    rng = np.random.default_rng(m)
    k, n = 37, 1024  # odd K (scalar pack tail), staged output, tail rows of the last tile
    w = random_weight(rng, k, n, 0.8)
    bias = rng.standard_normal(n).astype(np.float32)
    x, _x_region = guarded_array((m, k))  # (the mapping stays alive with the array)
    x[:] = rng.standard_normal((m, k)).astype(np.float32)
    for make in (compile_sparse_linear, compile_dense_linear):
        kern = make(w, bias, "gelu", target=host_target(isa))
        y, _y_region = guarded_array((m, n))
        kern(x, out=y, num_threads=2)
        assert_close(np.array(y), np.array(x), w, bias, "gelu")
        del y


def block_weight(rng, k, n, sparsity, cols):
    """Pruned in 1 x cols blocks: each aligned group of `cols` outputs shares its inputs."""
    keep = rng.random((k, -(-n // cols))) >= sparsity
    w = rng.standard_normal((k, n)).astype(np.float32)
    return w * np.repeat(keep, cols, axis=1)[:, :n]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 300),
    groups=st.integers(1, 80),
    cols=st.sampled_from([2, 4]),
    ragged=st.booleans(),
    m=st.one_of(st.sampled_from([1, 4, 9, 16, 63, 64, 65, 129]), st.integers(1, 300)),
    sparsity=st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.98]), st.floats(0.0, 0.99)),
    **EPILOGUE_THREADS_TUNING,
)
def test_shared_rows_variant_matches_reference(k, groups, cols, ragged, m, sparsity, has_bias,
                                               activation, num_threads, isa, tuning, seed):  # fmt: skip
    """Weights pruned in 1 x 2 or 1 x 4 blocks run the shared-rows variant (one panel load for
    the rows of a group) when N is a multiple of the block, the row pairs otherwise."""
    rng = np.random.default_rng(seed)
    n = groups * cols + (1 if ragged else 0)
    w = block_weight(rng, k, n, sparsity, cols)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    kern = compile_sparse_linear(w, bias, activation, target=host_target(isa), tuning=tuning)
    if ragged or not w.any():
        assert kern.shared_rows == 1
    else:  # (1 x 2 blocks may happen to share patterns by 4, e.g. dense weights)
        assert kern.shared_rows in (2, 4) and spmm._shares_rows(w, kern.shared_rows)
    o, kk, v = kern._csr.triplets()
    dense = np.zeros((n, k), np.float32)
    dense[o, kk] = v
    np.testing.assert_array_equal(dense, w.T)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = kern(x, num_threads=num_threads)
    assert_close(y, x, w, bias, activation)


def test_panel_code_is_shared_by_every_shape():
    """The panel kernel reads its layer's shape from its index header: layers of other shapes
    with the same epilogue and structure (staged stores or not, one K-block or several) run
    the same compiled code, each with its own right answer, tails and threads included."""
    rng = np.random.default_rng(12)
    groups: dict[tuple, set] = {}
    for k, n in ((300, 40), (520, 70), (700, 17), (300, 512), (520, 1024), (40, 30), (90, 7)):
        w = random_weight(rng, k, n, 0.9)
        bias = rng.standard_normal(n).astype(np.float32)
        kern = compile_sparse_linear(w, bias, "gelu")
        for m, threads in ((9, 1), (64, 1), (130, 2), (300, 1)):
            x = rng.standard_normal((m, k)).astype(np.float32)
            assert_close(kern(x, num_threads=threads), x, w, bias, "gelu")
        structure = (bool(kern._stage_cols), kern._csr.n_blocks == 1)
        groups.setdefault(structure, set()).add(id(kern._jit))
    assert len(groups) == 3 and all(len(jits) == 1 for jits in groups.values())


def to_panels(a: np.ndarray, tn: int) -> np.ndarray:
    """[m, c] -> [ceil(m / tn)][c][tn], tokens past m zero: the kernels' panel layout (64-byte
    aligned, as the kernels load and store panels)."""
    m, c = a.shape
    padded = np.zeros((-(-m // tn) * tn, c), np.float32)
    padded[:m] = a
    out = spmm.empty_aligned((len(padded) // tn, c, tn))
    out[:] = padded.reshape(-1, tn, c).transpose(0, 2, 1)
    return out


def empty_panels(m: int, n: int, tn: int, fill: float) -> np.ndarray:
    out = spmm.empty_aligned((-(-m // tn), n, tn))
    out.fill(fill)
    return out


def raw_call(kern, x: np.ndarray, m: int, y: np.ndarray, layout: int) -> float:
    """The kernel's code called directly with a layout flag; returns its probe."""
    scratch = spmm.empty_aligned(kern._scratch_full)
    probe = np.zeros(1, np.float32)
    kern._fn(x.ctypes.data, m, y.ctypes.data, 0, kern.out_features, *kern._ptrs,
             scratch.ctypes.data, probe.ctypes.data, layout)  # fmt: skip
    return float(probe[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 300),
    n=st.one_of(st.integers(1, 300), st.sampled_from([512, 1024])),  # (staged stores too)
    m=st.one_of(st.sampled_from([1, 9, 16, 63, 64, 65, 129]), st.integers(1, 200)),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    **{name: s for name, s in EPILOGUE_THREADS_TUNING.items() if name != "num_threads"},
)
def test_panel_layouts_match_the_row_major_call(k, n, m, sparsity, has_bias, activation, isa,
                                                tuning, seed):  # fmt: skip
    """X given as panels (LAYOUT_PANEL_IN) and Y written as panels (LAYOUT_PANEL_OUT), as
    chained kernels pass their intermediate, and Y written by streaming stores
    (LAYOUT_STREAM_OUT): bitwise the row-major call's values, in every panel width, tail and
    K-blocking; the probe sees a Y that is not finite."""
    rng = np.random.default_rng(seed)
    w = random_weight(rng, k, n, sparsity)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    kern = compile_sparse_linear(w, bias, activation, target=host_target(isa), tuning=tuning)
    tn = kern.tile_tokens
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = np.empty((m, n), np.float32)  # the panel kernel's (not the SpMV variant's) bits
    assert raw_call(kern, x, m, want, 0) == 0.0
    assert_close(want, x, w, bias, activation)
    y = np.empty((m, n), np.float32)
    assert raw_call(kern, to_panels(x, tn), m, y, spmm.LAYOUT_PANEL_IN) == 0.0
    np.testing.assert_array_equal(y, want)
    # streaming stores: rows starting on a cache line streamed, the others not
    for offset in (0, 1):
        y = spmm.empty_aligned(m * n + offset)[offset:].reshape(m, n)
        assert raw_call(kern, x, m, y, spmm.LAYOUT_STREAM_OUT) == 0.0
        np.testing.assert_array_equal(y, want)
    for layout, xs in ((spmm.LAYOUT_PANEL_OUT, x),
                       (spmm.LAYOUT_PANEL_IN | spmm.LAYOUT_PANEL_OUT, to_panels(x, tn))):  # fmt: skip
        panels = empty_panels(m, n, tn, np.nan)
        assert raw_call(kern, xs, m, panels, layout) == 0.0
        np.testing.assert_array_equal(panels.transpose(0, 2, 1).reshape(-1, n)[:m], want)
    # packed X is not probed (its producer's store_panel was): Y's probe sees what it stores
    # (an infinite row of X gives infinite or NaN outputs, unless the activation maps them to a
    # finite value, as ReLU does -inf)
    x[m // 2] = np.inf
    panels = empty_panels(m, n, tn, 0.0)
    probe = raw_call(kern, to_panels(x, tn), m, panels,
                     spmm.LAYOUT_PANEL_IN | spmm.LAYOUT_PANEL_OUT)  # fmt: skip
    stored = panels.transpose(0, 2, 1).reshape(-1, n)[:m]
    assert math.isnan(probe) == (not np.isfinite(stored).all())


@pytest.mark.parametrize("group_rows", [1, 2, 4])
@pytest.mark.parametrize("sort_span", [0, 16])
def test_csr_entries_round_trip(group_rows, sort_span):
    """The grouped, blocked entries decode to the weight's nonzeros, and each group's rows
    are padded only up to its longest member (and a whole quad); every K-block but the last
    sorts its rows within units of sort_span rows, the last within tiles."""
    rng = np.random.default_rng(8)
    w = random_weight(rng, 50, 19, 0.7)
    w[3, 2] = -0.0  # a negative zero is a zero
    w[:, 5] = 0.0  # an empty row of Wᵀ
    csr = spmm._build_csr(w, 16, 4, 256, tile_rows=8, group_rows=group_rows, sort_span=sort_span)
    o, k, v = csr.triplets()
    dense = np.zeros((19, 50), np.float32)
    dense[o, k] = v
    np.testing.assert_array_equal(dense, w.T)
    assert len(o) == np.count_nonzero(w)
    assert csr.row_nnz.tolist() == np.count_nonzero(w, axis=0).tolist()
    idx = csr.index.reshape(csr.n_blocks, csr.block_stride)
    G = csr.n_groups
    padded = 32 if sort_span else 24  # rows: N = 19 in whole units
    assert G * group_rows == padded
    for b in range(4):
        unit = 8 if b == 3 or not sort_span else sort_span
        assert csr.block_unit(b) == unit
        counts = np.zeros(padded, np.int64)
        counts[:19] = np.count_nonzero(w[b * 16 : (b + 1) * 16] != 0, axis=0)
        slots = idx[b, G + 1 :].reshape(G, group_rows)
        assert slots.max() < unit
        rows = slots + (np.arange(G) // (unit // group_rows) * unit)[:, None]
        assert sorted(rows.ravel().tolist()) == list(range(padded))  # every row in one group
        entries = np.diff(idx[b, : G + 1]) * 4  # whole quads of 4 entries
        longest = counts[rows].max(axis=1) * group_rows
        assert (entries == (longest + 3) // 4 * 4).all()
        # sorted: within each unit, the groups' longest members never grow
        per_unit = counts[rows].max(axis=1).reshape(-1, unit // group_rows)
        assert (np.diff(per_unit, axis=1) <= 0).all()


def test_wide_csr_entries_round_trip():
    """K-blocks of more than 256 columns store 16-bit k (24-byte quads) and decode back."""
    rng = np.random.default_rng(9)
    w = random_weight(rng, 700, 21, 0.9)
    csr = spmm._build_csr(w, 320, 3, 128, tile_rows=16, group_rows=4, sort_span=32)
    assert csr.wide and csr.quad.itemsize == 24 and len(csr.entries) % 24 == 0
    o, k, v = csr.triplets()
    dense = np.zeros((21, 700), np.float32)
    dense[o, k] = v
    np.testing.assert_array_equal(dense, w.T)
    assert not spmm._build_csr(w, 256, 3, 128, tile_rows=16, group_rows=4).wide


# ---- the SpMV variant (few tokens, AVX-512) --------------------------------------------------

needs_avx512 = pytest.mark.skipif("avx512" not in ISAS, reason="the SpMV variant is AVX-512 only")


@needs_avx512
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 200),
    n=st.integers(1, 150),
    m=st.integers(1, spmm.SPMV_MAX_M),
    sparsity=st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.98, 1.0]), st.floats(0.0, 1.0)),
    structure=st.sampled_from(["random", "empty", "blocks4x1", "2:4"]),
    has_bias=st.booleans(),
    activation=st.sampled_from(["none", "relu", "gelu"]),
    num_threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_spmv_matches_reference(k, n, m, sparsity, structure, has_bias, activation, num_threads,
                                 seed):  # fmt: skip
    rng = np.random.default_rng(seed)
    w = structured_weight(rng, k, n, sparsity, structure)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    kern = compile_sparse_linear(w, bias, activation, target=host_target("avx512"))
    assert m <= kern.spmv_max_m
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = kern(x, num_threads=num_threads)
    assert_close(y, x, w, bias, activation)
    layout = kern.spmv_layout
    assert layout.steps % spmm._SPMV_UNROLL == 0
    assert int((layout.idx[: layout.steps * 16] != 0x80).sum()) == kern.nnz
    # windows start at whole vectors and end inside the zero-padded row of x
    kp = -(-k // spmm.SPMV_CHUNK) * spmm.SPMV_CHUNK
    assert (layout.off % 16 == 0).all() and layout.off.max() + spmm.SPMV_CHUNK <= kp


def structured_weight(rng, k, n, sparsity, structure):
    """Unstructured random, with empty rows/columns, 4x1 blocks (4 consecutive outputs share
    a pattern) or 2:4 along K."""
    if structure == "random":
        return random_weight(rng, k, n, sparsity)
    if structure == "empty":
        return random_weight(rng, k, n, sparsity, 0.3, 0.3)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if structure == "blocks4x1":
        keep = rng.random((k, -(-n // 4))) >= sparsity
        return w * np.repeat(keep, 4, axis=1)[:, :n]
    # 2:4 along K: two of every four inputs kept per output
    kp = -(-k // 4) * 4
    scores = rng.random((kp, n)).reshape(kp // 4, 4, n)
    keep = scores >= np.sort(scores, axis=1)[:, 1:2, :]  # the top two of four
    return w * keep.reshape(kp, n)[:k]


@needs_avx512
def test_spmv_special_values_and_tail_slices():
    """inf/NaN in x reach only outputs whose weights use them (padding lanes read x but have
    weight 0); N not a multiple of 16 stores only the valid outputs."""
    k, n = 70, 37
    w = np.zeros((k, n), np.float32)
    w[0, 0] = 1.0
    w[1, 1:] = 2.0
    x = np.ones((3, k), np.float32)
    x[:, 0] = np.inf
    x[1, 5] = np.nan
    kern = compile_sparse_linear(w, None, "none", target=host_target("avx512"))
    out = np.full((3, n), 7.0, np.float32)
    kern(x, out=out)
    assert np.all(out[:, 0] == np.inf)
    np.testing.assert_array_equal(out[:, 1:], 2.0)


@needs_avx512
@pytest.mark.parametrize("m", [1, 3, 8, 9])
def test_spmv_and_panel_kernels_agree(m):
    rng = np.random.default_rng(m)
    w = random_weight(rng, 300, 130, 0.9)
    bias = rng.standard_normal(130).astype(np.float32)
    kern = compile_sparse_linear(w, bias, "gelu", target=host_target("avx512"))
    x = rng.standard_normal((m, 300)).astype(np.float32)
    y = kern(x)
    max_m, kern.spmv_max_m = kern.spmv_max_m, 0  # force the panel kernel
    y_panel = kern(x)
    kern.spmv_max_m = max_m
    np.testing.assert_allclose(y, y_panel, rtol=2e-5, atol=2e-5)
    assert_close(y, x, w, bias, "gelu")


@pytest.mark.parametrize("rows_vary", [False, True])
def test_spmv_rows_are_sorted_when_their_counts_vary(rows_vary):
    """Large layers decide the SpMV row order by how much rows' nonzero counts vary (one
    build): random pruning keeps the order; magnitude pruning of rows of different scales
    sorts them, which saves steps."""
    rng = np.random.default_rng(11)
    k, n = 512, 256  # 50%: 65536 nonzeros, past the build-both limit
    w = rng.standard_normal((k, n))
    if rows_vary:  # outputs' scales varying 4x: their counts after pruning vary too
        w *= rng.uniform(0.5, 2.0, n)
    w[np.abs(w) < np.median(np.abs(w))] = 0
    w = w.astype(np.float32)
    o, kk = np.nonzero(w.T)
    assert len(o) >= 1 << 16
    layout = spmm._build_spmv(o, kk, w.T[o, kk], n, k, spmm._SPMV_UNROLL)
    plain = spmm._build_spmv(o, kk, w.T[o, kk], n, k, spmm._SPMV_UNROLL, sort_rows=False)
    assert layout.perm[-1] == (0 if rows_vary else 1)  # 1: the identity order
    if rows_vary:
        assert layout.steps < 0.9 * plain.steps
    else:
        assert layout.steps == plain.steps
    if "avx512" in ISAS:
        kern = compile_sparse_linear(w, None, "none", target=host_target("avx512"))
        x = rng.standard_normal((2, k)).astype(np.float32)
        assert_close(kern(x), x, w, None, "none")
        assert kern.spmv_layout.perm[-1] == layout.perm[-1]


@needs_avx512
def test_spmv_code_is_shared_by_every_shape():
    """The SpMV code takes the shape as data: layers of other shapes with the same epilogue
    reuse it (no LLVM for a new shape's SpMV), and each gets its own right answer."""
    rng = np.random.default_rng(5)
    kernels = []
    for k, n in ((50, 37), (130, 70), (33, 16), (1, 1)):
        w = random_weight(rng, k, n, 0.7)
        bias = rng.standard_normal(n).astype(np.float32)
        kern = compile_sparse_linear(w, bias, "relu", target=host_target("avx512"))
        for m in (1, 3, 8):
            x = rng.standard_normal((m, k)).astype(np.float32)
            assert_close(kern(x), x, w, bias, "relu")
        kernels.append(kern)
    assert len({id(kern._spmv_code[0]) for kern in kernels}) == 1


@needs_avx512
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_one_thread_spmv_shortcut_matches_the_general_path(m):
    """__call__'s shortcut for one thread (taken once the SpMV steps exist), with a new or a
    given output, gives the general path's bits, and still leaves every unusual argument to
    its checks."""
    rng = np.random.default_rng(40 + m)
    w = random_weight(rng, 150, 45, 0.9)
    bias = rng.standard_normal(45).astype(np.float32)
    kern = compile_sparse_linear(w, bias, "gelu", target=host_target("avx512"))
    x = rng.standard_normal((m, 150)).astype(np.float32)
    first = kern(x)  # builds the steps: the shortcut applies from the next call
    assert kern._spmv is not None
    general = kern._run(x, None, 1)[0]
    np.testing.assert_array_equal(kern(x), general)
    np.testing.assert_array_equal(first, general)
    assert_close(general, x, w, bias, "gelu")
    read_only = x.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(kern(read_only), general)
    np.testing.assert_array_equal(kern(np.asfortranarray(x)), general)
    with pytest.raises(InvalidInputError, match="float32.*float64"):
        kern(x.astype(np.float64))
    with pytest.raises(InvalidInputError, match=r"\[M, 150\]"):
        kern(x[:, :149].copy())
    assert kern(np.zeros((0, 150), np.float32)).shape == (0, 45)
    # a given output: filled in place when the full checks would take it, refused otherwise
    out = np.full((m, 45), np.nan, np.float32)
    assert kern(x, out=out) is out
    np.testing.assert_array_equal(out, general)
    for bad, match in ((np.zeros((m, 45)), "out dtype"), (np.zeros((m + 1, 45), np.float32),
                       "out shape"), (np.zeros((m, 90), np.float32)[:, ::2], "C-contiguous")):  # fmt: skip
        with pytest.raises(InvalidInputError, match=match):
            kern(x, out=bad)
    frozen = np.zeros((m, 45), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(InvalidInputError, match="writable"):
        kern(x, out=frozen)
    both = np.zeros(m * 150 + m * 45, np.float32)  # x and out in one buffer, overlapping
    xs = both[: m * 150].reshape(m, 150)
    xs[:] = x
    with pytest.raises(InvalidInputError, match="overlap"):
        kern(xs, out=both[m * 150 - 1 : m * 150 - 1 + m * 45].reshape(m, 45))
    np.testing.assert_array_equal(kern(xs, out=both[m * 150 :].reshape(m, 45)), general)


# ---- token-panel split across threads (large M) ----------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [128, 129, 200, 300])
def test_token_split_across_threads(isa, m):
    rng = np.random.default_rng(m)
    w = random_weight(rng, 200, 70, 0.8)
    bias = rng.standard_normal(70).astype(np.float32)
    kern = compile_sparse_linear(w, bias, "relu", target=host_target(isa))
    x = rng.standard_normal((m, 200)).astype(np.float32)
    y1 = kern(x, num_threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(kern(x, num_threads=threads), y1)
    assert_close(y1, x, w, bias, "relu")


@pytest.mark.parametrize("m", [70, 200])
def test_large_outputs_are_streamed_bitwise_the_same(monkeypatch, m):
    """Outputs from stream_out_bytes() on go out by streaming stores (staged layers): the
    same bits as ordinary stores, on one and several threads (the native pool's prepared
    calls included), into the kernel's own output and into a misaligned out."""
    rng = np.random.default_rng(m)
    w = random_weight(rng, 96, 1024, 0.9)  # (4 KB rows thrash L1 sets: staged)
    kern = compile_sparse_linear(w, rng.standard_normal(1024).astype(np.float32), "gelu")
    assert kern._stage_cols
    if kern.target.isa != "generic":
        assert "vmovntps" in kern.asm
    x = rng.standard_normal((m, 96)).astype(np.float32)
    want = {t: kern(x, num_threads=t) for t in (1, 2)}
    monkeypatch.setattr(spmm, "stream_out_bytes", lambda: 0)
    kern.forget_plans()
    for t in (1, 2):
        assert kern._token_plan(m, t)[3] & spmm.LAYOUT_STREAM_OUT
        np.testing.assert_array_equal(kern(x, num_threads=t), want[t])
        out = spmm.empty_aligned(m * 1024 + 1)[1:].reshape(m, 1024)
        np.testing.assert_array_equal(kern(x, out=out, num_threads=t), want[t])


@pytest.mark.parametrize("k,sparsity", [(1100, 0.98), (700, 0.9), (300, 0.995)])
def test_large_inputs_prefetched_ahead_give_the_same_bits(monkeypatch, k, sparsity):
    """Inputs from prefetch_x_bytes() on are prefetched a K-block (or panel) ahead by the
    sparsest weights' code: the same bits as without, with several K-blocks or one, tails of
    tokens, one and two threads; the flag is ignored by the other plans' code."""
    rng = np.random.default_rng(k)
    w = random_weight(rng, k, 300, sparsity)
    kern = compile_sparse_linear(w, rng.standard_normal(300).astype(np.float32), "relu")
    if kern.target.isa == "avx512":
        assert ("prefetcht1" in kern.asm) == (sparsity > 0.95)
    xs = [rng.standard_normal((m, k)).astype(np.float32) for m in (1, 33, 150)]
    want = [[kern(x, num_threads=t) for t in (1, 2)] for x in xs]
    monkeypatch.setattr(spmm, "prefetch_x_bytes", lambda: 0)
    kern.forget_plans()
    for x, got in zip(xs, want):
        for t in (1, 2):
            assert kern._token_plan(len(x), t)[3] & spmm.LAYOUT_PREFETCH_X
            np.testing.assert_array_equal(kern(x, num_threads=t), got[t - 1])


def test_unstaged_outputs_stream_only_where_inputs_come_from_dram(monkeypatch):
    """An unstaged layer (768 features) streams its output only where its X is large as well
    (LAYOUT_PREFETCH_X): the same bits either way, into its own output and a misaligned one."""
    rng = np.random.default_rng(3)
    w = random_weight(rng, 200, 768, 0.95)
    kern = compile_sparse_linear(w, rng.standard_normal(768).astype(np.float32), "gelu")
    assert not kern._stage_cols
    if kern.target.isa == "avx512":
        assert "vmovntps" in kern.asm
    x = rng.standard_normal((150, 200)).astype(np.float32)
    want = {t: kern(x, num_threads=t) for t in (1, 2)}
    monkeypatch.setattr(spmm, "stream_out_bytes", lambda: 0)
    kern.forget_plans()
    assert not kern._token_plan(150, 1)[3] & spmm.LAYOUT_PREFETCH_X  # (streams, but plainly)
    np.testing.assert_array_equal(kern(x), want[1])
    monkeypatch.setattr(spmm, "prefetch_x_bytes", lambda: 0)
    kern.forget_plans()
    for t in (1, 2):
        assert kern._token_plan(150, t)[3] & spmm.LAYOUT_STREAM_OUT
        np.testing.assert_array_equal(kern(x, num_threads=t), want[t])
        out = spmm.empty_aligned(150 * 768 + 1)[1:].reshape(150, 768)
        np.testing.assert_array_equal(kern(x, out=out, num_threads=t), want[t])


@pytest.mark.parametrize("m", [1, 5, 40, 200])
def test_dense_column_and_row_split(m):
    rng = np.random.default_rng(m)
    w = random_weight(rng, 90, 100, 0.2)
    bias = rng.standard_normal(100).astype(np.float32)
    kern = compile_dense_linear(w, bias, "gelu")
    x = rng.standard_normal((m, 90)).astype(np.float32)
    for threads in (1, 2, 3):
        assert_close(kern(x, num_threads=threads), x, w, bias, "gelu")


@pytest.mark.parametrize("m", [3, 130, 513, 1100])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("isa", ["generic", None])
def test_dense_slices_on_the_native_pool(m, activation, isa):
    """Big enough for two threads: the slices run on the native pool, as cblas_sgemm calls
    (generic ISA: columns up to M = 512, rows above) then the epilogue, or as the generated
    GEMM over its share of the packed panels; as close to float64 as one thread."""
    from sparsednn.runtime.threads import single_threaded_blas

    rng = np.random.default_rng(m)
    w = rng.standard_normal((300, 520)).astype(np.float32)
    bias = rng.standard_normal(520).astype(np.float32)
    kern = compile_dense_linear(w, bias, activation, target=host_target(isa) if isa else None)
    x = rng.standard_normal((m, 300)).astype(np.float32)
    assert kern._useful_threads(m, 2) == 2
    with single_threaded_blas:
        y2 = kern(x, num_threads=2)
    assert_close(y2, x, w, bias, activation)
    assert_close(kern(x, num_threads=2), x, w, bias, activation)  # outside a session too
    assert_close(kern(x, num_threads=1), x, w, bias, activation)


# ---- the on-disk kernel cache ----------------------------------------------------------------


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    from sparsednn.codegen import cache

    monkeypatch.setenv("SPARSEDNN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSEDNN_KERNEL_CACHE", raising=False)
    spmm.clear_code_cache()
    yield cache.cache_root()
    spmm.clear_code_cache()


def _cache_files(root, sub):
    return sorted((root / sub).glob("*")) if (root / sub).exists() else []


def test_cache_hit_after_miss_gives_identical_results(fresh_cache):
    rng = np.random.default_rng(30)
    w = random_weight(rng, 160, 96, 0.9)
    bias = rng.standard_normal(96).astype(np.float32)
    x1 = rng.standard_normal((1, 160)).astype(np.float32)
    x2 = rng.standard_normal((77, 160)).astype(np.float32)
    cold = compile_sparse_linear(w, bias, "gelu")
    assert not cold.cache_hit
    want = (cold(x1), cold(x2))
    assert _cache_files(fresh_cache, "code") and _cache_files(fresh_cache, "data")
    spmm.clear_code_cache()  # as in a new process: the code must come from disk
    warm = compile_sparse_linear(w, bias, "gelu")
    assert warm.cache_hit and warm._jit.from_cache
    np.testing.assert_array_equal(warm(x1), want[0])
    np.testing.assert_array_equal(warm(x2), want[1])
    assert "define" in warm.llvm_ir  # dumps still work (regenerated)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupted_cache_files_are_rebuilt(fresh_cache, damage):
    rng = np.random.default_rng(31)
    w = random_weight(rng, 100, 48, 0.85)
    x = rng.standard_normal((20, 100)).astype(np.float32)
    want = compile_sparse_linear(w, None, "relu")(x)
    files = _cache_files(fresh_cache, "code") + _cache_files(fresh_cache, "data")
    assert files
    for f in files:
        blob = f.read_bytes()
        if damage == "truncate":
            f.write_bytes(blob[: len(blob) // 2])
        elif damage == "flip":
            i = len(blob) * 2 // 3
            f.write_bytes(blob[:i] + bytes([blob[i] ^ 0x40]) + blob[i + 1 :])
        elif damage == "garbage":
            f.write_bytes(b"not a cache file" * 10)
        else:
            f.write_bytes(b"")
    spmm.clear_code_cache()
    again = compile_sparse_linear(w, None, "relu")
    assert not again.cache_hit
    np.testing.assert_array_equal(again(x), want)
    # and rebuilt: a third time hits
    spmm.clear_code_cache()
    assert compile_sparse_linear(w, None, "relu").cache_hit


def test_cache_keys_depend_on_weights_and_can_be_disabled(fresh_cache, monkeypatch):
    rng = np.random.default_rng(32)
    w = random_weight(rng, 64, 32, 0.9)
    compile_sparse_linear(w)
    w2 = w.copy()
    w2[np.nonzero(w)[0][0], np.nonzero(w)[1][0]] += 1.0  # one weight changed
    k2 = compile_sparse_linear(w2)
    assert not k2.cache_hit
    assert len(_cache_files(fresh_cache, "data")) == 2
    x = rng.standard_normal((9, 64)).astype(np.float32)
    assert_close(k2(x), x, w2, None, "none")
    monkeypatch.setenv("SPARSEDNN_KERNEL_CACHE", "0")
    spmm.clear_code_cache()
    k3 = compile_sparse_linear(random_weight(rng, 64, 32, 0.9))
    assert not k3.cache_hit
    assert len(_cache_files(fresh_cache, "data")) == 2


def test_concurrent_writers_leave_whole_files(fresh_cache):
    """Threads building the same kernel at once: every file in the cache is complete."""
    rng = np.random.default_rng(33)
    w = random_weight(rng, 120, 64, 0.9)
    errors = []

    def build():
        try:
            compile_sparse_linear(w, None, "gelu")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not list(fresh_cache.rglob("*.tmp"))
    spmm.clear_code_cache()
    assert compile_sparse_linear(w, None, "gelu").cache_hit


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,m", [(768, 128), (37, 70), (50, 200), (16, 9)])
def test_probe_sees_every_non_finite_input(threads, k, m):
    """call_and_probe tells whether X held a NaN or an infinity, wherever it sits: any token
    (tail panels too), any column (the scalar tail of a K-block too), any thread's share."""
    rng = np.random.default_rng(k * m)
    w = random_weight(rng, k, 40, 0.9)
    kern = compile_sparse_linear(w)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y, non_finite = kern.call_and_probe(x, num_threads=threads)
    assert non_finite is False
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-4)
    for t, c in [(0, 0), (m - 1, k - 1), (m // 2, k // 3), (m - 1, 0), (0, k - 1)]:
        for bad in (np.nan, np.inf, -np.inf):
            xb = x.copy()
            xb[t, c] = bad
            assert kern.call_and_probe(xb, num_threads=threads)[1] is True, (t, c, bad)
    if kern.spmv_max_m >= 4:
        assert kern.call_and_probe(x[:4])[1] is None  # the SpMV variant does not look
