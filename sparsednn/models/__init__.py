"""The built-in model zoo: standard encoders built as ONNX on the spot, no downloads.

A name is an architecture with an optional sparsity suffix in percent: "bert-base" (dense),
"bert-base-90" (90% of every encoder linear weight pruned by magnitude).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import onnx

from sparsednn.errors import ModelLoadError
from sparsednn.models.encoders import ARCHITECTURES, EncoderConfig, build_encoder, example_inputs

DEFAULT_MODEL = "bert-base-90"


def cache_dir() -> Path:
    root = os.environ.get("SPARSEDNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparsednn"
    )
    return Path(root)


def parse_name(name: str) -> tuple[str, EncoderConfig, float]:
    """'bert-base-90' -> ('bert-base', config, 0.9)."""
    match = re.fullmatch(r"(.+?)(?:-(\d{1,2}(?:\.\d+)?))?", name)
    arch, percent = match.group(1), match.group(2)
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"no built-in model {name!r}; built-in architectures: {', '.join(ARCHITECTURES)} "
            "(add -SPARSITY in percent, e.g. bert-base-90)"
        )
    return arch, ARCHITECTURES[arch], float(percent or 0) / 100.0


def is_builtin(name: str) -> bool:
    try:
        parse_name(name)
    except ModelLoadError:
        return False
    return not os.path.exists(name)


def builtin_model_path(name: str, progress=None) -> Path:
    """The ONNX file of a built-in model, building and caching it on first use."""
    arch, config, sparsity = parse_name(name)
    path = cache_dir() / "models" / f"{arch}-{round(sparsity * 100, 2):g}.onnx"
    if not path.exists():
        if progress:
            progress(f"building {name} (once; cached in {path.parent})")
        model = build_encoder(config, sparsity, seed=0, name=name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        onnx.save(model, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return path


__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MODEL",
    "EncoderConfig",
    "build_encoder",
    "builtin_model_path",
    "cache_dir",
    "example_inputs",
    "is_builtin",
    "parse_name",
]
