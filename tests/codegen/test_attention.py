"""The fused attention kernel against the numpy reference (sparsednn.ops.fused_ops.Attention).

Every ISA this host runs, any batch / sequence lengths (1, odd, keys != queries), heads, head
sizes that are and are not multiples of the vector width, the mask shapes exporters produce
(and padded keys with -inf, float32 min or -10000), fully masked rows, threads, 3-D and 4-D
inputs, bad inputs, and no access past the buffers.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsednn.codegen.attention import block_rows, compile_attention
from sparsednn.codegen.target import available_isas, host_target
from sparsednn.errors import SparseDNNError
from sparsednn.ops.fused_ops import Attention
from sparsednn.testing import guarded_array

ISAS = available_isas()
NEG = {"-inf": -np.inf, "f32min": np.finfo(np.float32).min, "-1e4": -1e4}
MASKS = ["none", "pad", "pad_rank2", "causal", "rows", "full", "heads", "keys1", "vector"]


def make_mask(rng, kind, neg, b, h, sq, skv):
    """The mask shapes of exported graphs: [B,1,1,S] padding, [1,1,Sq,Skv] causal, [B,1,Sq,Skv]
    per row (with some rows fully masked), [B,H,Sq,Skv], [B,1,Sq,1], [Skv], [B,Skv]."""
    if kind == "none":
        return None
    if kind in ("pad", "pad_rank2"):
        m = np.zeros((b, 1, 1, skv), np.float32)
        for i in range(b):
            m[i, ..., int(rng.integers(1, skv + 1)) :] = neg
        return m.reshape(b, skv) if kind == "pad_rank2" and b == 1 else m
    if kind == "causal":
        keep = np.arange(skv)[None, :] <= np.arange(sq)[:, None] + (skv - sq)
        return np.where(keep, 0, neg).astype(np.float32)[None, None]
    if kind == "rows":
        m = rng.standard_normal((b, 1, sq, skv)).astype(np.float32)
        m[rng.random((b, 1, sq, skv)) < 0.3] = neg
        if neg < -1e30:  # whole rows masked (-inf or float32 min; rows of a finite -1e4 are
            # ill-conditioned: every score near -1e4, where float32's ulp is 1e-3)
            m[:, :, rng.random(sq) < 0.3, :] = neg
        return m
    if kind == "full":
        return rng.standard_normal((b, h, sq, skv)).astype(np.float32)
    if kind == "heads":
        return rng.standard_normal((1, h, 1, skv)).astype(np.float32)
    if kind == "keys1":
        return rng.standard_normal((b, 1, sq, 1)).astype(np.float32)
    if kind == "vector":
        return rng.standard_normal(skv).astype(np.float32)
    raise ValueError(kind)


def check(isa, b, sq, skv, h, d, mask_kind, neg, fully_masked, threads, four_d, seed, scale=None):
    rng = np.random.default_rng(seed)
    kern = compile_attention(h, d, host_target(isa))
    q = rng.standard_normal((b, sq, h * d)).astype(np.float32)
    k = rng.standard_normal((b, skv, h * d)).astype(np.float32)
    v = rng.standard_normal((b, skv, h * d)).astype(np.float32)
    mask = make_mask(rng, mask_kind, NEG[neg], b, h, sq, skv)
    scale = 1 / math.sqrt(d) if scale is None else scale
    expected = Attention(
        q, k, v, mask, num_heads=h, head_size=d, scale=scale, fully_masked=fully_masked
    )
    if four_d == "packed":  # one [B, S, 3·H·D] array, q | k | v
        q, k, v = np.concatenate([q, k, v], axis=-1), None, None
    elif four_d:
        q, k, v = (x.reshape(x.shape[0], x.shape[1], h, d) for x in (q, k, v))
    got = kern(
        q,
        k,
        v,
        mask,
        scale=scale,
        num_threads=threads,
        masked_row_value=0.0 if fully_masked == "zero" else math.nan,
    )
    assert got.shape == (b, sq, h * d) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, equal_nan=True)
    return got, expected


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    isa=st.sampled_from(ISAS),
    b=st.integers(1, 3),
    sq=st.integers(1, 40),
    skv=st.one_of(st.just(None), st.integers(1, 40)),
    h=st.integers(1, 3),
    d=st.sampled_from([1, 3, 8, 17, 32, 64]),
    mask_kind=st.sampled_from(MASKS),
    neg=st.sampled_from(list(NEG)),
    fully_masked=st.sampled_from(["nan", "zero"]),
    threads=st.integers(1, 3),
    layout=st.sampled_from([False, True, "packed"]),  # [B,S,H·D], [B,S,H,D], packed q|k|v
    seed=st.integers(0, 2**16),
)
def test_matches_reference(
    isa, b, sq, skv, h, d, mask_kind, neg, fully_masked, threads, layout, seed
):
    skv = sq if skv is None or layout == "packed" else skv
    check(isa, b, sq, skv, h, d, mask_kind, neg, fully_masked, threads, layout, seed)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "b,s,h,d", [(1, 128, 12, 64), (2, 77, 12, 64), (1, 1, 12, 64), (3, 33, 4, 32), (1, 300, 2, 64)]
)
def test_bert_shapes(isa, b, s, h, d):
    """The shapes of BERT-base / small models, with padding and the threaded path."""
    for threads in (1, 2):
        check(isa, b, s, s, h, d, "pad", "f32min", "nan", threads, False, seed=s + threads)


@pytest.mark.parametrize("isa", ISAS)
def test_fully_masked_rows(isa):
    """Rows whose every key is -inf: NaN (Softmax's answer) or 0 (exports guarding the
    softmax with Where(IsNaN(p), 0, p)); with float32 min instead of -inf, the uniform average
    of v (all scores equal), as onnxruntime computes it."""
    rng = np.random.default_rng(1)
    b, s, h, d = 2, 9, 2, 16
    kern = compile_attention(h, d, host_target(isa))
    q, k, v = (rng.standard_normal((b, s, h * d)).astype(np.float32) for _ in range(3))
    mask = np.zeros((b, 1, s, s), np.float32)
    mask[1, :, 3, :] = -np.inf
    nan_rows = kern(q, k, v, mask, scale=0.25)
    assert np.isnan(nan_rows[1, 3]).all() and np.isfinite(np.delete(nan_rows[1], 3, 0)).all()
    assert np.isfinite(nan_rows[0]).all()
    zero_rows = kern(q, k, v, mask, scale=0.25, masked_row_value=0.0)
    assert (zero_rows[1, 3] == 0).all()
    np.testing.assert_array_equal(np.delete(zero_rows[1], 3, 0), np.delete(nan_rows[1], 3, 0))
    mask[1, :, 3, :] = np.finfo(np.float32).min
    uniform = kern(q, k, v, mask, scale=0.25)
    np.testing.assert_allclose(uniform[1, 3], v[1].mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_masked_keys_weigh_exactly_zero(isa):
    """Keys masked with -inf (or float32 min) do not leak into the output, however large v
    is there."""
    rng = np.random.default_rng(2)
    b, s, h, d = 1, 21, 1, 8
    kern = compile_attention(h, d, host_target(isa))
    q, k = (rng.standard_normal((b, s, h * d)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((b, s, h * d)).astype(np.float32)
    v[:, 10:] = 1e30
    for neg in (-np.inf, np.finfo(np.float32).min):
        mask = np.zeros((b, 1, 1, s), np.float32)
        mask[..., 10:] = neg
        got = kern(q, k, v, mask, scale=1.0)
        np.testing.assert_allclose(
            got,
            kern(q[:, :], k[:, :10], v[:, :10], mask[..., :10], scale=1.0),
            rtol=1e-6,
            atol=1e-6,
        )


@pytest.mark.parametrize("isa", ISAS)
def test_large_scores_are_stable(isa):
    """Max-subtracted softmax: scores far beyond exp's range give the reference's result."""
    check(isa, 2, 13, 13, 2, 8, "full", "-inf", "nan", 1, False, seed=3, scale=40.0)


def test_kernel_is_cached_and_specialised_on_heads():
    t = host_target()
    assert compile_attention(4, 32, t) is compile_attention(4, 32, t)
    assert compile_attention(4, 32, t) is not compile_attention(2, 32, t)
    assert block_rows(64, t) >= 1
    assert "f32_attention_h4_d32" in compile_attention(4, 32, t).name


def test_variants_compile_when_named_or_first_called():
    """compile_attention compiles the variants it is asked for (a session: the one its node
    runs); the other one compiles at its first call, and both agree where the mask is zero."""
    kern = compile_attention(3, 16, masks=(True,))
    assert True in kern._variants
    assert compile_attention(3, 16, masks=()) is kern
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((2, 5, 3 * 48)).astype(np.float32)
    masked = kern(qkv, None, None, np.zeros((2, 1, 1, 5), np.float32), scale=0.25)
    unmasked = kern(qkv, None, None, scale=0.25)
    assert set(kern._variants) == {True, False}
    np.testing.assert_array_equal(masked, unmasked)
    assert kern.compile_seconds >= 0 and "define" in kern.llvm_ir


def test_bad_inputs_raise():
    kern = compile_attention(2, 8)
    q = np.zeros((1, 3, 16), np.float32)
    cases = [
        ((q.astype(np.float64), q, q), {}, "float32"),
        ((q[..., :8], q, q), {}, "[batch, sequence, 16]"),
        ((q, np.zeros((2, 3, 16), np.float32), q), {}, "batch size"),
        ((q, q, np.zeros((1, 4, 16), np.float32)), {}, "sequence length"),
        ((q, q, q, np.zeros((1, 1, 1, 4), np.float32)), {}, "does not broadcast"),
        ((q, q, q, np.zeros((2, 1, 1, 3), np.float32)), {}, "does not broadcast"),
        ((q, q, q, np.zeros((1, 1, 1, 1, 3), np.float32)), {}, "does not broadcast"),
        ((q, q, q, np.zeros((1, 3), np.float64)), {}, "mask must be a float32"),
        ((q, q, q), {"out": np.zeros((1, 3, 8), np.float32)}, "out must be"),
        ((q, None, None), {}, "packed q|k|v must be"),
    ]
    for args, kwargs, message in cases:
        pattern = message.replace("[", r"\[").replace("]", r"\]").replace("|", r"\|")
        with pytest.raises(SparseDNNError, match=pattern):
            kern(*args, scale=1.0, where="node 'attn'", **kwargs)
        with pytest.raises(SparseDNNError, match="node 'attn'"):
            kern(*args, scale=1.0, where="node 'attn'", **kwargs)


def test_empty_and_keyless():
    kern = compile_attention(2, 8)
    q = np.zeros((0, 3, 16), np.float32)
    assert kern(q, q, q, scale=1.0).shape == (0, 3, 16)
    q = np.ones((1, 2, 16), np.float32)
    k = np.zeros((1, 0, 16), np.float32)
    out = kern(q, k, k, scale=1.0)
    assert out.shape == (1, 2, 16) and (out == 0).all()


def test_non_contiguous_inputs():
    rng = np.random.default_rng(4)
    kern = compile_attention(2, 8)
    qkv = rng.standard_normal((2, 5, 48)).astype(np.float32)
    q, k, v = qkv[..., :16], qkv[..., 16:32], qkv[..., 32:]
    expected = Attention(
        *(np.ascontiguousarray(x) for x in (q, k, v)), num_heads=2, head_size=8, scale=0.3
    )
    np.testing.assert_allclose(kern(q, k, v, scale=0.3), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "s,d,mask_kind", [(1, 17, "pad"), (19, 20, "rows"), (33, 64, "full"), (7, 3, "causal")]
)
def test_no_access_past_the_buffers(isa, s, d, mask_kind):
    """q, k, v, the mask and the output each end at a guard page: tail keys, tail rows and
    head-size tails must stay inside them."""
    rng = np.random.default_rng(s)
    b, h = 2, 3
    kern = compile_attention(h, d, host_target(isa))
    arrays, regions = [], []
    for _ in range(3):
        x, region = guarded_array((b, s, h * d))
        x[:] = rng.standard_normal(x.shape)
        arrays.append(x)
        regions.append(region)
    m = make_mask(rng, mask_kind, -np.inf, b, h, s, s)
    mask, region = guarded_array(m.shape)
    mask[:] = m
    regions.append(region)
    out, region = guarded_array((b, s, h * d))
    regions.append(region)
    kern(*arrays, mask, scale=0.5, num_threads=2, out=out)
    expected = Attention(
        *(np.array(x) for x in arrays), np.array(mask), num_heads=h, head_size=d, scale=0.5
    )
    np.testing.assert_allclose(np.array(out), expected, rtol=2e-5, atol=2e-5, equal_nan=True)
