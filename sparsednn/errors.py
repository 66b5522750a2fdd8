"""The one small hierarchy of errors sparsednn raises.

Every message names what is wrong: the model, node, op, input, shape or dtype involved.
"""


class SparseDNNError(Exception):
    """Base class of every error sparsednn raises on purpose."""


class ModelLoadError(SparseDNNError):
    """The model file or proto cannot be read, parsed or trusted."""


class InvalidGraphError(SparseDNNError):
    """The graph is malformed: cycles, dangling or duplicate names, inconsistent shapes."""


class UnsupportedOpError(SparseDNNError):
    """The model uses an op (or an attribute of it) that sparsednn does not implement."""


class InvalidInputError(SparseDNNError):
    """An input given to run() has a wrong name, dtype, rank or shape, or is missing."""


class CompileError(SparseDNNError):
    """LLVM code generation or JIT compilation failed."""
