"""sparsednn: sparse deep-learning inference on CPUs.

import sparsednn
session = sparsednn.InferenceSession("model.onnx")
outputs = session.run(None, {"input_ids": ids, "attention_mask": mask})
"""

from sparsednn import ops as _ops  # noqa: F401  (registers every op)
from sparsednn.errors import (
    CompileError,
    InvalidGraphError,
    InvalidInputError,
    ModelLoadError,
    SparseDNNError,
    UnsupportedOpError,
)
from sparsednn.runtime.session import InferenceSession, NodeArg, SessionOptions, compile

__version__ = "0.1.0"

__all__ = [
    "CompileError",
    "InferenceSession",
    "InvalidGraphError",
    "InvalidInputError",
    "ModelLoadError",
    "NodeArg",
    "SessionOptions",
    "SparseDNNError",
    "UnsupportedOpError",
    "__version__",
    "compile",
]
