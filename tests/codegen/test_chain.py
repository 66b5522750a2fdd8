"""Two sparse kernels chained over chunks of tokens (codegen/chain.py): bitwise what the two
kernels give one after the other, for any rows, threads, widths and epilogues; a NaN or an
infinity in X or between the layers is reported, not hidden."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsednn.codegen.chain import CHUNK, SparseChain
from sparsednn.codegen.spmm import compile_sparse_linear
from sparsednn.codegen.target import available_isas, host_target

ISAS = [isa for isa in available_isas() if isa != "generic"] or available_isas()


def pair(rng, k, n_mid, n, isa, activation="gelu", sparsity=0.9, block=1):
    w1 = rng.standard_normal((k, n_mid)).astype(np.float32)
    w1[rng.random((k, n_mid // block)).repeat(block, axis=1) < sparsity] = 0.0
    w2 = rng.standard_normal((n_mid, n)).astype(np.float32)
    w2[rng.random((n_mid, n)) < sparsity] = 0.0
    target = host_target(isa)
    first = compile_sparse_linear(w1, rng.standard_normal(n_mid).astype(np.float32), activation,
                                  target=target)  # fmt: skip
    second = compile_sparse_linear(w2, None, "none", target=target)
    return first, second


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(64, 96, 48), (100, 257, 33), (768, 3072, 768), (48, 64, 16)]),
    m=st.sampled_from([9, 15, 16, 63, 64, 65, 127, 128, 129, 200, 300]),
    threads=st.sampled_from([1, 2, 3]),
    activation=st.sampled_from(["none", "relu", "gelu"]),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**31),
)
def test_chain_equals_the_two_kernels(shape, m, threads, activation, isa, seed):
    rng = np.random.default_rng(seed)
    k, n_mid, n = shape
    first, second = pair(rng, k, n_mid, n, isa, activation)
    chain = SparseChain(first, second)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if not chain.applies(m, threads):
        assert m < CHUNK * threads or m <= first.spmv_max_m
        return
    y, non_finite = chain(x, threads)
    assert not non_finite
    np.testing.assert_array_equal(y, second(first(x)))


def test_panels_of_different_widths_do_not_chain():
    """A 98% layer runs 32-token panels (AVX-512), a 90% one 64: their panel layouts differ,
    so they do not chain; two 98% layers do, bitwise as the two kernels."""
    rng = np.random.default_rng(11)
    first, second = pair(rng, 600, 512, 96, ISAS[0], sparsity=0.98)
    x = rng.standard_normal((150, 600)).astype(np.float32)
    y, _ = SparseChain(first, second)(x, 2)
    np.testing.assert_array_equal(y, second(first(x)))
    w = rng.standard_normal((512, 96)).astype(np.float32)
    w[rng.random((512, 96)) < 0.9] = 0.0
    other = compile_sparse_linear(w, target=host_target(ISAS[0]))
    if other.tile_tokens != first.tile_tokens:
        with pytest.raises(ValueError, match="panels differ"):
            SparseChain(first, other)


def test_block_pruned_weights_and_shared_rows():
    rng = np.random.default_rng(3)
    first, second = pair(rng, 128, 256, 64, ISAS[0], block=4)
    assert first.shared_rows > 1
    x = rng.standard_normal((150, 128)).astype(np.float32)
    y, _ = SparseChain(first, second)(x, 2)
    np.testing.assert_array_equal(y, second(first(x)))


@pytest.mark.parametrize("where", ["x", "between"])
def test_non_finite_values_are_reported(where):
    rng = np.random.default_rng(5)
    first, second = pair(rng, 64, 96, 48, ISAS[0], activation="none")
    x = rng.standard_normal((130, 64)).astype(np.float32)
    if where == "x":
        x[77, 5] = np.nan
    else:  # finite X whose first layer overflows to inf
        x[77, :] = 3e38
    chain = SparseChain(first, second)
    for threads in (1, 2):
        assert chain(x, threads)[1]
    clean = rng.standard_normal((130, 64)).astype(np.float32)
    assert not chain(clean, 2)[1]


def test_applies_and_mismatched_features():
    rng = np.random.default_rng(0)
    first, second = pair(rng, 64, 96, 48, ISAS[0])
    chain = SparseChain(first, second)
    assert not chain.applies(first.spmv_max_m, 1)  # the SpMV path: two kernels
    assert chain.applies(first.spmv_max_m + 1, 1)
    assert not chain.applies(CHUNK * 2 - 1, 2) and chain.applies(CHUNK * 2, 2)
    with pytest.raises(ValueError, match="features"):
        SparseChain(second, first)


def layer_norm(rng, n, isa):
    from sparsednn.codegen.norm import compile_layer_norm

    kernel = compile_layer_norm(n, residual=True, target=host_target(isa))
    gamma = rng.standard_normal(n).astype(np.float32)
    beta = rng.standard_normal(n).astype(np.float32)
    return kernel, gamma, beta, 1e-5


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(64, 96, 48), (100, 257, 33), (768, 3072, 768), (48, 64, 16)]),
    m=st.sampled_from([9, 63, 64, 65, 128, 129, 300]),
    threads=st.sampled_from([1, 2, 3]),
    two=st.booleans(),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**31),
)
def test_chain_then_layer_norm_equals_the_kernels_apart(shape, m, threads, two, isa, seed):
    """Y = LayerNorm(B(A(X)) + R) (or of A(X)), each chunk normalised as it leaves the kernels:
    bitwise what the kernels and the layer norm give one after the other."""
    rng = np.random.default_rng(seed)
    k, n_mid, n = shape
    first, second = pair(rng, k, n_mid, n, isa)
    if not two:
        first, second = pair(rng, k, n, n, isa)[0], None
    norm = layer_norm(rng, n, isa)
    chain = SparseChain(first, second, norm=norm)
    x = rng.standard_normal((m, k)).astype(np.float32)
    residual = rng.standard_normal((m, n)).astype(np.float32)
    if not chain.applies(m, threads):
        return
    y, non_finite = chain(x, threads, residual=residual)
    assert not non_finite
    linear = second(first(x)) if two else first(x)
    kernel, gamma, beta, eps = norm
    np.testing.assert_array_equal(y, kernel(linear, residual, scale=gamma, bias=beta, epsilon=eps))


def test_layer_norm_stage_reports_non_finite_inputs_and_checks_features():
    rng = np.random.default_rng(7)
    first, second = pair(rng, 64, 96, 48, ISAS[0], activation="none")
    chain = SparseChain(first, second, norm=layer_norm(rng, 48, ISAS[0]))
    x = rng.standard_normal((130, 64)).astype(np.float32)
    residual = rng.standard_normal((130, 48)).astype(np.float32)
    assert not chain(x, 2, residual=residual)[1]
    x[100, 1] = np.inf
    assert chain(x, 2, residual=residual)[1]
    with pytest.raises(ValueError, match="layer norm"):
        SparseChain(first, second, norm=layer_norm(rng, 96, ISAS[0]))
