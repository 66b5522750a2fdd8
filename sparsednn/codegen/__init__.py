"""Native code generation with LLVM (llvmlite): targets, the JIT, and the linear-layer kernels.

from sparsednn.codegen import compile_sparse_linear, compile_dense_linear, host_target
kern = compile_sparse_linear(weight_kxn, bias, "gelu")    # Y = gelu(X @ W + b)
y = kern(x, num_threads=2)
print(kern.name, kern.llvm_ir, kern.asm)
"""

from sparsednn.codegen.epilogue import Epilogue, compile_epilogue
from sparsednn.codegen.spmm import (
    DenseLinearKernel,
    SparseLinearKernel,
    SpmmTuning,
    compile_dense_linear,
    compile_linear,
    compile_sparse_linear,
)
from sparsednn.codegen.target import Target, available_isas, host_target

__all__ = [
    "DenseLinearKernel",
    "Epilogue",
    "SparseLinearKernel",
    "SpmmTuning",
    "Target",
    "available_isas",
    "compile_dense_linear",
    "compile_epilogue",
    "compile_linear",
    "compile_sparse_linear",
    "host_target",
]
