"""Kernel tests use a private kernel cache directory (and test the cache explicitly)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_kernel_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEDNN_CACHE_DIR", str(tmp_path_factory.mktemp("sparsednn-cache")))
    yield
    mp.undo()
