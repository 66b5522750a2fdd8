"""On-disk cache of compiled kernels: creating a session a second time skips LLVM and the
CSR build.

Two kinds of entries, under ``sparsednn.models.cache_dir() / "kernels"`` (so
``SPARSEDNN_CACHE_DIR`` moves it; ``SPARSEDNN_KERNEL_CACHE=0`` switches it off):

* ``code/<key>.o``: the machine code of one module (a kernel specialisation, a shared helper),
  as MCJIT produced it. The key hashes everything the code depends on: the specialisation
  (shapes, tiling, epilogue), the target (CPU name, LLVM features, triple), the llvmlite/LLVM
  version and the source of the code generator itself, so an edited emitter never loads stale
  code. Loading one skips IR optimisation and code generation.
* ``host/<key>.json``: the host CPU as LLVM reads it (name, features, triple), keyed by a
  digest of /proc/cpuinfo (see target.py).
* ``data/<key>.npz``: the arrays a layer's kernel passes to the code (CSR entries, SpMV steps),
  keyed by a SHA-256 of the weights plus the layout parameters and the sparsednn version.

Every file starts as a temporary file in the same directory and is renamed into place
(``os.replace``), so a concurrent reader sees a whole file or none. Object files carry a SHA-256
of their bytes, ``.npz`` members zip CRCs; anything unreadable, truncated or inconsistent is
treated as a miss (deleted and rebuilt), never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np

ENV_SWITCH = "SPARSEDNN_KERNEL_CACHE"
_MAGIC = b"SDNNOBJ1"

_stats_lock = threading.Lock()
stats = {"code_hits": 0, "code_misses": 0, "data_hits": 0, "data_misses": 0, "corrupt": 0}


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> Path:
    from sparsednn.models import cache_dir

    return cache_dir() / "kernels"


def _count(what: str) -> None:
    with _stats_lock:
        stats[what] += 1


def digest(*parts) -> str:
    """A hex SHA-256 of strings, numbers, tuples and numpy arrays (by dtype, shape and bytes)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"ndarray{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(a).cast("B") if a.size else b"")
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


_source_digest: str | None = None


def code_version() -> str:
    """A digest of the code generator's source and of the llvmlite in use, part of every code
    key."""
    global _source_digest
    if _source_digest is None:
        import llvmlite

        import sparsednn

        here = Path(__file__).parent
        h = hashlib.sha256()
        # (attention.py and norm.py key their code with their own digest, pool.py too)
        sources = ("spmm.py", "epilogue.py", "irutil.py", "jit.py", "target.py", "cache.py",
                   "elf_loader.py", "gemm.py", "chain.py", "gelu_table.py", "pyentry.py")  # fmt: skip
        for name in sources:
            try:
                h.update((here / name).read_bytes())
            except OSError:  # pragma: no cover - installed without sources
                h.update(name.encode())
        # (an llvmlite release links one LLVM: its version names the code generator, and
        # reading LLVM's own version would load the library)
        h.update(f"{sparsednn.__version__}|{llvmlite.__version__}".encode())
        _source_digest = h.hexdigest()
    return _source_digest


def _write_atomic(path: Path, write) -> None:
    """write(file object) into a temporary file next to path, then rename it into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    except OSError:
        pass  # a read-only or full disk: no cache, not an error


def _discard(path: Path) -> None:
    _count("corrupt")
    try:
        path.unlink()
    except OSError:
        pass


# -- machine code ---------------------------------------------------------------------------


def code_path(key: str) -> Path:
    return cache_root() / "code" / f"{key}.o"


def load_object(key: str) -> bytes | None:
    """The object code stored under key, or None (missing, disabled or corrupt)."""
    if not enabled():
        return None
    path = code_path(key)
    try:
        blob = path.read_bytes()
    except OSError:
        _count("code_misses")
        return None
    head = len(_MAGIC) + 8 + 32
    if len(blob) >= head and blob[: len(_MAGIC)] == _MAGIC:
        (size,) = struct.unpack_from("<Q", blob, len(_MAGIC))
        body = blob[head:]
        if size == len(body) and hashlib.sha256(body).digest() == blob[len(_MAGIC) + 8 : head]:
            _count("code_hits")
            return body
    _discard(path)
    _count("code_misses")
    return None


def store_object(key: str, obj: bytes) -> None:
    if not enabled() or not obj:
        return
    header = _MAGIC + struct.pack("<Q", len(obj)) + hashlib.sha256(obj).digest()
    _write_atomic(code_path(key), lambda f: (f.write(header), f.write(obj)))


# -- the host CPU ---------------------------------------------------------------------------


def host_path(key: str) -> Path:
    return cache_root() / "host" / f"{key}.json"


def load_host(key: str) -> tuple[str, dict[str, bool], str] | None:
    """(cpu name, features, triple) stored under key, or None (missing, disabled or corrupt)."""
    if not enabled():
        return None
    path = host_path(key)
    try:
        entry = json.loads(path.read_text())
        cpu, features, triple = entry["cpu"], entry["features"], entry["triple"]
        if not (isinstance(cpu, str) and isinstance(triple, str) and isinstance(features, dict)
                and all(isinstance(k, str) and isinstance(v, bool) for k, v in features.items())
                and entry.get("key") == key):  # fmt: skip
            raise ValueError("malformed host entry")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        _discard(path)
        return None
    return cpu, features, triple


def store_host(key: str, cpu: str, features: dict[str, bool], triple: str) -> None:
    if not enabled():
        return
    text = json.dumps({"key": key, "cpu": cpu, "features": features, "triple": triple})
    _write_atomic(host_path(key), lambda f: f.write(text.encode()))


# -- data arrays ----------------------------------------------------------------------------


def data_path(key: str) -> Path:
    return cache_root() / "data" / f"{key}.npz"


def load_arrays(key: str, expect: dict | None = None) -> dict[str, np.ndarray] | None:
    """The arrays stored under key, or None. expect: {name: dtype} that must all be present."""
    if not enabled():
        return None
    path = data_path(key)
    if not path.exists():
        _count("data_misses")
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        meta = json.loads(bytes(arrays.pop("__meta__")).decode())
        if meta.get("key") != key:
            raise ValueError("key mismatch")
        for name, dtype in (expect or {}).items():
            if name not in arrays or arrays[name].dtype != np.dtype(dtype):
                raise ValueError(f"missing or mistyped array {name}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError,
            UnicodeDecodeError, struct.error):  # fmt: skip
        _discard(path)
        _count("data_misses")
        return None
    _count("data_hits")
    return arrays


def store_arrays(key: str, arrays: dict[str, np.ndarray]) -> None:
    if not enabled():
        return
    meta = np.frombuffer(json.dumps({"key": key}).encode(), dtype=np.uint8)
    _write_atomic(data_path(key), lambda f: np.savez(f, __meta__=meta, **arrays))


def clear() -> None:
    """Delete every cached kernel (for tests and the CLI)."""
    import shutil

    shutil.rmtree(cache_root(), ignore_errors=True)
