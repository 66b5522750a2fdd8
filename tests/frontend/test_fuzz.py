"""Corrupt models never crash: every failure is a SparseDNNError (bench/fuzz.py runs 10,000+)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsednn.testing import mutate, small_mlp, try_model

VALID = small_mlp().SerializeToString()


def test_the_unmutated_model_runs():
    assert try_model(VALID) == "ok"


@pytest.mark.parametrize("seed", range(300))
def test_byte_mutations_fail_cleanly(seed):
    assert try_model(mutate(VALID, np.random.default_rng(seed))) in ("ok", "error")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_fail_cleanly(data):
    assert try_model(data) in ("ok", "error")
