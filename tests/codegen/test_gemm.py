"""The generated dense GEMM over a packed weight (sparsednn.codegen.gemm) against float64 numpy.

Y = act(X @ W + b) with W packed into panels of NR = 3 vectors of columns, MR-row register
tiles, K blocked by KC and rows by MC, threads splitting the panels. The tests pick shapes at
the edges of each of these: partial last panels (masked loads and stores), K blocks (partial
sums going through Y), row blocks and every remainder of the row tiles; bias, activations and
thread counts; zero and non-finite values; packing; stores that stay inside the output; and
results that do not depend on the number of threads. Shapes come from small sets of values
(each new (K, N, bias, activation) is a compilation).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llvmlite import ir
from test_spmm import (  # noqa: F401  (always_split_threads: an autouse fixture, used here too)
    ISAS,
    always_split_threads,
    assert_close,
    gelu64,
    random_weight,
)

from sparsednn.codegen import gemm, jit
from sparsednn.codegen.gemm import (
    KC,
    MC,
    GemmEmitter,
    PackedGemm,
    pack_weight,
    tile_shape,
    unpack_weight,
)
from sparsednn.codegen.spmm import DenseLinearKernel, compile_dense_linear
from sparsednn.codegen.target import host_target
from sparsednn.testing import guarded_array

GEMM_ISAS = [isa for isa in ISAS if gemm.supported(host_target(isa))]
ACTIVATIONS = ["none", "relu", "gelu"]

pytestmark = pytest.mark.skipif(not GEMM_ISAS, reason="no AVX2 / AVX-512 on this CPU")


def tiles(isa: str) -> tuple[int, int, int]:
    """(MR, NR, V) for `isa`."""
    target = host_target(isa)
    mr, nr = tile_shape(target)
    return mr, nr, target.vector_width


def make(w, bias, activation, isa) -> DenseLinearKernel:
    kern = compile_dense_linear(w, bias, activation, target=host_target(isa))
    assert isinstance(kern._gemm, PackedGemm)
    return kern


def act64(z, activation):
    """The activation in float64, NaN propagating (numpy's maximum, the erfc form of GELU)."""
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "gelu":
        return gelu64(z)
    return z


def run_packed(g: PackedGemm, x: np.ndarray, parts: int) -> np.ndarray:
    """PackedGemm called directly (no thread heuristics), into a NaN-filled output: every
    element must be written."""
    out = np.full((x.shape[0], g.n), np.nan, np.float32)
    g(x, out, parts)
    return out


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


def interesting_n(nr: int, v: int) -> list[int]:
    """Widths around the vector and panel sizes: last panel of 1 column, of less than a
    vector, of whole vectors but not a whole panel, exactly full, and one column over."""
    return sorted({1, v - 1, v, v + 1, nr - 1, nr, nr + 1, nr + v, 2 * nr, 2 * nr + 2 * v,
                   3 * nr - 1, 3 * nr + 5})  # fmt: skip


# ---- the property test over all the knobs at once ---------------------------------------------

K_VALUES = [1, 2, 3, 4, 5, 7, 13, 64, KC - 1, KC, KC + 1, 2 * KC + 3]
N_VALUES = [1, 3, 7, 8, 10, 16, 23, 24, 25, 32, 47, 48, 49, 64, 72, 80, 96, 100, 145]
M_VALUES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 15, 16, 17, 23, MC - 1, MC, MC + 1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.sampled_from(K_VALUES),
    n=st.sampled_from(N_VALUES),
    m=st.one_of(st.sampled_from(M_VALUES), st.integers(0, 40)),
    has_bias=st.booleans(),
    activation=st.sampled_from(ACTIVATIONS),
    num_threads=st.sampled_from([1, 2, 3]),
    isa=st.sampled_from(GEMM_ISAS or ["avx2"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference(k, n, m, has_bias, activation, num_threads, isa, seed):
    rng = np.random.default_rng(seed)
    w = random_weight(rng, k, n, 0.0)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    kern = make(w, bias, activation, isa)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x_before = x.copy()
    y = kern(x, num_threads=num_threads)
    assert y.dtype == np.float32 and y.shape == (m, n)
    assert_close(y, x, w, bias, activation)
    np.testing.assert_array_equal(x, x_before)  # the input is only read
    # into a given buffer full of NaN: every element is written, the same bits
    out = np.full((m, n), np.nan, np.float32)
    assert kern(x, out=out, num_threads=num_threads) is out
    np.testing.assert_array_equal(bits(out), bits(y))


# ---- each dimension's edges -------------------------------------------------------------------


@pytest.mark.parametrize("isa", GEMM_ISAS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 7, 9, KC - 1, KC, KC + 1, KC + 3, 2 * KC, 2 * KC + 5])
def test_k_edges(isa, k):
    """K below the unroll by 4, not a multiple of it, exactly one K block, one column over
    (a second block of 1), several blocks (partial sums go through Y between them)."""
    mr, nr, v = tiles(isa)
    rng = np.random.default_rng(k)
    n = 2 * nr + v + 3  # a partial, masked last panel
    w = random_weight(rng, k, n, 0.0)
    bias = rng.standard_normal(n).astype(np.float32)
    kern = make(w, bias, "relu", isa)
    for m in (1, mr - 1, 2 * mr + 3):
        x = rng.standard_normal((m, k)).astype(np.float32)
        for threads in (1, 2):
            assert_close(kern(x, num_threads=threads), x, w, bias, "relu")


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_k_blocks_accumulate_exactly_in_order(isa):
    """With integer values every partial sum is exact: K blocks must add up to exactly X @ W
    (a block skipped, repeated or started from garbage shows as a wrong integer)."""
    mr, nr, _ = tiles(isa)
    rng = np.random.default_rng(1)
    k, n = 3 * KC + 7, nr + 5
    w = rng.integers(-3, 4, (k, n)).astype(np.float32)
    kern = make(w, None, "none", isa)
    x = rng.integers(-3, 4, (2 * mr + 1, k)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    for threads in (1, 2):
        np.testing.assert_array_equal(kern(x, num_threads=threads), want)


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_n_edges(isa):
    """N below one vector, below one panel, a multiple of the vector but not of the panel
    (a partial panel without a mask), an exact multiple of the panel, and one over."""
    mr, nr, v = tiles(isa)
    rng = np.random.default_rng(2)
    k = 19
    x = rng.standard_normal((2 * mr + 3, k)).astype(np.float32)
    for n in interesting_n(nr, v):
        w = random_weight(rng, k, n, 0.0)
        bias = rng.standard_normal(n).astype(np.float32)
        kern = make(w, bias, "relu", isa)
        for threads in (1, 3):
            assert_close(kern(x, num_threads=threads), x, w, bias, "relu")
        assert_close(run_packed(kern._gemm, x, 2), x, w, bias, "relu")


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_m_edges(isa):
    """No rows, every remainder of the row tile, one row block exactly, one row over, several
    row blocks (with several K blocks and a partial last panel)."""
    mr, nr, _ = tiles(isa)
    rng = np.random.default_rng(3)
    k, n = KC + 9, 2 * nr + 5
    w = random_weight(rng, k, n, 0.0)
    bias = rng.standard_normal(n).astype(np.float32)
    kern = make(w, bias, "none", isa)
    ms = list(range(2 * mr + 2)) + [MC - 1, MC, MC + 1, MC + mr + 1, 2 * MC + 3]
    for m in ms:
        x = rng.standard_normal((m, k)).astype(np.float32)
        for threads in (1, 2):
            y = kern(x, num_threads=threads)
            assert y.shape == (m, n)
            assert_close(y, x, w, bias, "none")


@pytest.mark.parametrize("isa", GEMM_ISAS)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_epilogues(isa, has_bias, activation):
    """Bias and activation are applied once, after the last K block, also on the partial panel
    (bias read as whole vectors from the zero-padded copy)."""
    mr, nr, _ = tiles(isa)
    rng = np.random.default_rng(4)
    k, n = KC + 2, nr + 7
    w = random_weight(rng, k, n, 0.0, empty_cols=0.2)
    bias = 3.0 * rng.standard_normal(n).astype(np.float32) if has_bias else None
    kern = make(w, bias, activation, isa)
    suffix = ("_bias" if has_bias else "") + ("" if activation == "none" else f"_{activation}")
    assert kern.name == f"f32_gemm_packed_{isa}{suffix}"
    x = rng.standard_normal((mr + 3, k)).astype(np.float32)
    for threads in (1, 2):
        assert_close(kern(x, num_threads=threads), x, w, bias, activation)


# ---- threads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_more_threads_than_panels(isa):
    """N = 10 is one panel: extra threads have nothing to do (and must not run it twice or
    leave it undone); two panels on three threads likewise."""
    mr, nr, _ = tiles(isa)
    rng = np.random.default_rng(5)
    for n in (10, nr + 2):
        k = 33
        w = random_weight(rng, k, n, 0.0)
        bias = rng.standard_normal(n).astype(np.float32)
        kern = make(w, bias, "gelu", isa)
        x = rng.standard_normal((mr + 1, k)).astype(np.float32)
        y1 = kern(x, num_threads=1)
        assert_close(y1, x, w, bias, "gelu")
        for threads in (2, 3, 8):
            np.testing.assert_array_equal(bits(kern(x, num_threads=threads)), bits(y1))
            np.testing.assert_array_equal(bits(run_packed(kern._gemm, x, threads)), bits(y1))


@pytest.mark.parametrize("isa", GEMM_ISAS)
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_threads_give_identical_bits(isa, activation):
    """Each output element is computed by one thread in the same order whatever the split:
    1, 2, 3 and 5 threads give the same bits (several panels, K blocks and row blocks)."""
    mr, nr, v = tiles(isa)
    rng = np.random.default_rng(6)
    k, n, m = KC + 37, 4 * nr + v + 1, MC + 2 * mr + 3
    w = random_weight(rng, k, n, 0.0)
    bias = rng.standard_normal(n).astype(np.float32)
    kern = make(w, bias, activation, isa)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y1 = run_packed(kern._gemm, x, 1)
    assert_close(y1, x, w, bias, activation)
    for parts in (2, 3, 5):
        np.testing.assert_array_equal(bits(run_packed(kern._gemm, x, parts)), bits(y1))
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(bits(kern(x, num_threads=threads)), bits(y1))


# ---- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", GEMM_ISAS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_all_zero_weight_gives_activation_of_bias(isa, activation):
    mr, nr, _ = tiles(isa)
    rng = np.random.default_rng(7)
    k, n = KC + 1, nr + 3
    w = np.zeros((k, n), np.float32)
    bias = 4.0 * rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((mr + 2, k)).astype(np.float32)
    y = make(w, bias, activation, isa)(x, num_threads=2)
    assert_close(y, x, w, bias, activation)
    if activation != "gelu":  # (GELU is an approximation: assert_close above)
        want = np.broadcast_to(act64(bias.astype(np.float64), activation), y.shape)
        np.testing.assert_array_equal(y, want)
    y = make(w, None, activation, isa)(x, num_threads=2)
    np.testing.assert_array_equal(y, np.zeros_like(y))


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_zero_rows_and_columns_of_the_weight(isa):
    mr, nr, _ = tiles(isa)
    rng = np.random.default_rng(8)
    k, n = 70, 2 * nr + 9
    w = random_weight(rng, k, n, 0.0, empty_rows=0.3, empty_cols=0.3)
    w[:, -1] = 0.0  # the last column of the partial panel too
    assert (w == 0).all(axis=0).any() and (w == 0).all(axis=1).any()
    bias = rng.standard_normal(n).astype(np.float32)
    kern = make(w, bias, "relu", isa)
    x = rng.standard_normal((2 * mr + 1, k)).astype(np.float32)
    y = kern(x, num_threads=2)
    assert_close(y, x, w, bias, "relu")
    empty = (w == 0).all(axis=0)
    np.testing.assert_array_equal(
        y[:, empty], np.broadcast_to(np.maximum(bias[empty], 0), (len(x), empty.sum()))
    )
    np.testing.assert_array_equal(kern.dense_weight(), w)


def check_special(y, x, w, bias, activation):
    """NaN where numpy's float32 X @ W (then bias, activation) gives NaN, the same infinities,
    and the finite elements as close as ever."""
    with np.errstate(invalid="ignore", over="ignore"):
        z = (x @ w).astype(np.float64)
        if bias is not None:
            z = z + bias
        ref = act64(z, activation)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(ref))
    rows = np.isfinite(x).all(axis=1)
    cols = np.isfinite(w).all(axis=0)
    assert_close(y[rows][:, cols], x[rows], w[:, cols], None if bias is None else bias[cols],
                 activation)  # fmt: skip


@pytest.mark.parametrize("isa", GEMM_ISAS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_non_finite_values_propagate_like_numpy(isa, activation):
    """Every product is computed, zeros of W included: NaN or inf in a row of X makes that row
    NaN or inf wherever numpy's matmul does (inf * 0 = NaN, inf - inf = NaN), and a NaN in a
    column of W makes the column NaN; through the bias, ReLU (NaN stays NaN, -inf -> 0) and
    GELU (+inf -> inf, -inf -> NaN as 0.5 z erfc(-z / sqrt 2))."""
    mr, nr, v = tiles(isa)
    rng = np.random.default_rng(9)
    k, n, m = KC + 5, nr + v + 2, 3 * mr + 1
    w = random_weight(rng, k, n, 0.3)
    w[:, 3] = np.abs(w[:, 3]) + 1.0  # same sign, no zeros: an inf in x stays an inf here
    w[:, -2] = -np.abs(w[:, -2]) - 1.0
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[1, 5] = np.nan
    x[2, KC + 2] = np.inf  # in the second K block
    x[3, 0] = -np.inf
    x[4, 7], x[4, 8] = np.inf, -np.inf
    x[m - 1, k - 1] = np.inf  # the remainder tile
    kern = make(w, bias, activation, isa)
    for threads in (1, 2):
        check_special(kern(x, num_threads=threads), x, w, bias, activation)
    # a NaN and an inf in the weight (one in the partial panel)
    w[10, 1] = np.nan
    w[KC + 1, n - 1] = np.inf
    kern = make(w, None, activation, isa)
    x2 = rng.standard_normal((mr + 1, k)).astype(np.float32)
    check_special(kern(x2, num_threads=2), x2, w, None, activation)
    np.testing.assert_array_equal(bits(kern.dense_weight()), bits(w))


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_empty_inner_dimension_gives_activation_of_bias(isa):
    """K = 0: X @ W is all zeros, Y = act(b) (as BLAS gives on the other ISAs)."""
    bias = np.arange(-2, 5, dtype=np.float32)
    kern = make(np.zeros((0, 7), np.float32), bias, "relu", isa)
    x = np.zeros((3, 0), np.float32)
    out = np.full((3, 7), np.nan, np.float32)
    kern(x, out=out)
    np.testing.assert_array_equal(out, np.tile(np.maximum(bias, 0), (3, 1)))
    kern = make(np.zeros((0, 7), np.float32), None, "none", isa)
    out = np.full((3, 7), np.nan, np.float32)
    kern(x, out=out)
    np.testing.assert_array_equal(out, np.zeros((3, 7), np.float32))


# ---- memory: stores stay inside the output ------------------------------------------------------

SENTINEL = np.float32(-1234.5)


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_stores_stay_inside_the_output(isa):
    """out is rows 1..m of an [m + 2, N] buffer of sentinels: the rows before and after are
    untouched (the last row's partial panel is a masked store: a full vector store would
    spill into the next row), for each width at the panel edges and each thread split."""
    mr, nr, v = tiles(isa)
    rng = np.random.default_rng(11)
    k = KC + 4  # partial sums stored, then reloaded (masked) and the final values stored
    for n in interesting_n(nr, v):
        w = random_weight(rng, k, n, 0.0)
        bias = rng.standard_normal(n).astype(np.float32)
        g = make(w, bias, "relu", isa)._gemm
        for m in (1, mr - 1, mr + 1):
            x = rng.standard_normal((m, k)).astype(np.float32)
            for parts in (1, 2, 3):
                big = np.full((m + 2, n), SENTINEL, np.float32)
                out = big[1:-1]
                assert out.flags.c_contiguous
                g(x, out, parts)
                assert (big[0] == SENTINEL).all() and (big[-1] == SENTINEL).all(), (n, m, parts)
                assert_close(out, x, w, bias, "relu")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_no_access_past_the_buffers(isa):
    """x and out end at a guard page: the last rows' loads of x and the partial panel's masked
    loads (second K block) and stores of Y must not touch it."""
    mr, nr, v = tiles(isa)
    rng = np.random.default_rng(10)
    k = KC + 3
    for n in (v - 1, nr + v + 1, 2 * nr - 1):
        w = random_weight(rng, k, n, 0.0)
        bias = rng.standard_normal(n).astype(np.float32)
        kern = make(w, bias, "relu", isa)
        for m in (1, mr + 1):
            x, _x_region = guarded_array((m, k))  # (the mapping lives as long as the array)
            x[:] = rng.standard_normal((m, k)).astype(np.float32)
            y, _y_region = guarded_array((m, n))
            kern(x, out=y, num_threads=2)
            assert_close(np.array(y), np.array(x), w, bias, "relu")
            del x, y


# ---- packing ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(0, 40),
    n=st.integers(0, 200),
    nr=st.sampled_from([8, 16, 24, 48]),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(k, n, nr, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -3.4e38], np.float32)
    mask = rng.random((k, n)) < 0.1
    w[mask] = rng.choice(special, mask.sum())
    packed = pack_weight(w, nr)
    p = -(-n // nr)
    assert packed.shape == (p, k, nr) and packed.dtype == np.float32
    assert packed.flags.c_contiguous
    if packed.size:  # (an empty array's address means nothing)
        assert packed.ctypes.data % 64 == 0
    # panel j, row kk holds columns j*nr .. j*nr + nr of W's row kk; the padding is zero
    flat = packed.transpose(1, 0, 2).reshape(k, p * nr)
    np.testing.assert_array_equal(bits(flat[:, :n]), bits(w))
    np.testing.assert_array_equal(bits(flat[:, n:]), 0)
    back = unpack_weight(packed, n)
    assert back.shape == (k, n) and back.flags.c_contiguous
    np.testing.assert_array_equal(bits(back), bits(w))


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_packed_gemm_attributes(isa):
    mr, nr, v = tiles(isa)
    assert (mr, nr) == ((8, 48) if isa == "avx512" else (4, 24))
    assert nr == 3 * v
    rng = np.random.default_rng(12)
    k, n = 45, 2 * nr + 5
    w = random_weight(rng, k, n, 0.5)
    bias = rng.standard_normal(n).astype(np.float32)
    kern = make(w, bias, "relu", isa)
    g = kern._gemm
    assert (g.k, g.n, g.mr, g.nr, g.panels) == (k, n, mr, nr, 3)
    assert g.packed.ctypes.data % 64 == 0
    assert g.bias.shape == (3 * nr,) and (g.bias[n:] == 0).all()
    np.testing.assert_array_equal(g.bias[:n], bias)
    assert kern.weight is None and kern.holds_weight
    np.testing.assert_array_equal(bits(kern.dense_weight()), bits(w))
    np.testing.assert_array_equal(bits(g.dense_weight()), bits(w))
    # a second kernel of the same shape and epilogue shares the compiled code
    w2 = random_weight(rng, k, n, 0.5)
    g2 = make(w2, bias, "relu", isa)._gemm
    assert g2.address == g.address
    x = rng.standard_normal((mr + 1, k)).astype(np.float32)
    assert_close(run_packed(g2, x, 2), x, w2, bias, "relu")
    assert_close(run_packed(g, x, 2), x, w, bias, "relu")


@pytest.mark.parametrize("isa", GEMM_ISAS)
def test_emitter_tiles(isa):
    """The emitted function's signature, and one tile body per (rows, columns) case: MR rows
    and every remainder, for full panels and for the partial last one."""
    mr, nr, v = tiles(isa)
    target = host_target(isa)
    for n, cols in ((2 * nr, [nr]), (2 * nr + v + 3, [nr, v + 3])):
        module = jit.new_module("t", target)
        em = GemmEmitter(module, "gemm_t", 300, n, True, "gelu", target)
        fn = em.emit()
        assert fn.name == "gemm_t" and len(fn.args) == 7
        assert [str(a.type) for a in fn.args] == ["float*"] * 4 + ["i64"] * 3
        assert isinstance(fn.function_type.return_type, ir.VoidType)
        assert set(em._tiles) == {(r, c) for r in range(1, mr + 1) for c in cols}
        masked = 'call void @"llvm.masked.store' in str(module)
        assert masked == (n % v != 0)
