"""Helpers shared by the test suite and the robustness benchmarks (bench/fuzz.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.errors import SparseDNNError


def small_mlp(seed: int = 0, sparsity: float = 0.8) -> onnx.ModelProto:
    """A two-layer perceptron with a Reshape/Softmax tail: small, but with several op kinds."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((12, 20)).astype(np.float32)
    w1[rng.random(w1.shape) < sparsity] = 0
    w2 = rng.standard_normal((20, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Reshape", ["h3", "shape"], ["h4"]),
        helper.make_node("Softmax", ["h4"], ["y"], axis=-1),
    ]
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.standard_normal(20).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array([-1, 3, 2], np.int64), "shape")]
    graph = helper.make_graph(
        nodes, "small_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random corruption of a serialised model: flipped, inserted or deleted bytes,
    truncation, or a region overwritten with 0xff (absurd varints: huge dims and lengths)."""
    buf = bytearray(data)
    kind = rng.integers(0, 5)
    if kind == 0:
        for _ in range(rng.integers(1, 8)):
            buf[rng.integers(0, len(buf))] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:
        at = int(rng.integers(0, len(buf)))
        buf[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    elif kind == 2:
        at = int(rng.integers(0, len(buf)))
        del buf[at: at + int(rng.integers(1, 32))]
    elif kind == 3:
        del buf[int(rng.integers(0, len(buf))):]
    else:
        at = int(rng.integers(0, len(buf)))
        buf[at: at + int(rng.integers(1, 6))] = b"\xff" * 5
    return bytes(buf)


def try_model(data: bytes, rows: int = 3) -> str:
    """Load and run a possibly corrupt model: 'ok', 'error' (a SparseDNNError) or raises."""
    try:
        session = sparsednn.InferenceSession(data)
        feed = {}
        for arg in session.get_inputs():
            shape = [d if isinstance(d, int) else rows for d in arg.shape]
            if any(d < 0 or d > 1 << 16 for d in shape):
                raise SparseDNNError("absurd input shape")  # nothing sensible to feed
            dtype = next(v.dtype for v in session.graph.inputs if v.name == arg.name)
            feed[arg.name] = np.ones(shape, dtype)
        session.run(None, feed)
        return "ok"
    except SparseDNNError:
        return "error"
