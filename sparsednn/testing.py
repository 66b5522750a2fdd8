"""Helpers shared by the test suite and the robustness benchmarks (bench/fuzz.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import sparsednn
import sparsednn.ops.registry
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
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.standard_normal(20).astype(np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.array([-1, 3, 2], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "small_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
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
        del buf[at : at + int(rng.integers(1, 32))]
    elif kind == 3:
        del buf[int(rng.integers(0, len(buf))) :]
    else:
        at = int(rng.integers(0, len(buf)))
        buf[at : at + int(rng.integers(1, 6))] = b"\xff" * 5
    return bytes(buf)


# -- structured mutations ---------------------------------------------------------------------
# Byte mutations mostly break the protobuf encoding itself. These keep a valid protobuf and
# break the model instead: missing fields, wrong attribute types, cycles, duplicate and
# dangling names, absurd dimensions and sizes, unknown types and opsets. Each mutator draws its
# choices from a `Chooser`, so one set of mutators serves both hypothesis (shrinkable draws,
# tests/robustness) and a seeded numpy generator (bench/fuzz.py, 10,000+ cases).

HUGE = (2**62, 2**63 - 1, 2**40, 2**33, 2**31, 2**31 - 1, 65536 * 65536 + 1, -1, -2, -(2**62), 0)


class Chooser:
    """Where a mutator's choices come from."""

    def integer(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, items):
        items = list(items)
        return items[self.integer(0, len(items) - 1)]

    def boolean(self) -> bool:
        return self.integer(0, 1) == 1

    def dim(self) -> int:
        """A dimension: usually absurd (huge, negative, zero), sometimes plain."""
        return self.choice([*HUGE, 1, 2, 3, 7]) if self.integer(0, 3) else self.integer(-3, 9)


class RngChooser(Chooser):
    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))


class DrawChooser(Chooser):
    """Choices drawn from hypothesis's `st.data()`, so failures shrink."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))


def shape_ops_model(seed: int = 0) -> onnx.ModelProto:
    """A model whose constants drive the ops that make tensors from shapes (ConstantOfShape,
    Expand, Tile, Range, Reshape) beside Gather, Slice, Concat, Cast, LayerNorm and a GELU:
    the targets of the 'absurd dimension' mutations."""
    rng = np.random.default_rng(seed)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    inits = {
        "shape2": i64(2, 4),
        "reps": i64(1, 2),
        "rshape": i64(-1, 2, 2),
        "zero": i64(0),
        "one": i64(1),
        "idx": i64(0, 2),
        "axes": i64(0),
        "start": np.int64(0),
        "limit": np.int64(4),
        "delta": np.int64(1),
        "gamma": f32(rng.standard_normal(4)),
        "beta": f32(rng.standard_normal(4)),
        "w": f32(np.where(rng.random((4, 8)) < 0.8, 0, rng.standard_normal((4, 8)))),
        "sqrt2": f32(np.sqrt(2)),
        "half": f32(0.5),
        "onef": f32(1.0),
    }
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["shape2"], ["c"], value=numpy_helper.from_array(f32([1.5]), "v")
        ),
        helper.make_node("Expand", ["x", "shape2"], ["e"]),
        helper.make_node("Add", ["c", "e"], ["s0"]),
        helper.make_node("Tile", ["s0", "reps"], ["t"]),  # [2, 8]
        helper.make_node("Range", ["start", "limit", "delta"], ["r"]),  # [4]
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["t", "rshape"], ["rs"]),  # [4, 2, 2]
        helper.make_node("Shape", ["rs"], ["sh"]),
        helper.make_node("Gather", ["sh", "axes"], ["n0"], axis=0),
        helper.make_node("Slice", ["rs", "zero", "n0", "axes"], ["sl"]),
        helper.make_node("Flatten", ["sl"], ["fl"], axis=1),  # [4, 4]
        helper.make_node("Add", ["fl", "rf"], ["a1"]),
        helper.make_node("LayerNormalization", ["a1", "gamma", "beta"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "w"], ["mm"]),
        helper.make_node("Div", ["mm", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["er"]),
        helper.make_node("Add", ["er", "onef"], ["ep"]),
        helper.make_node("Mul", ["mm", "ep"], ["m1"]),
        helper.make_node("Mul", ["m1", "half"], ["g"]),
        helper.make_node("Gather", ["g", "idx"], ["gi"], axis=1),
        helper.make_node("Concat", ["g", "gi"], ["y"], axis=1),
        helper.make_node("Softmax", ["y"], ["z"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "shape_ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _messages(msg, path="model"):
    """Every sub-message of a proto, with its path (for missing-field mutations)."""
    stack = [(msg, path)]
    while stack:
        m, p = stack.pop()
        yield m, p
        for fd, value in m.ListFields():
            if fd.type == fd.TYPE_MESSAGE:
                items = value if fd.is_repeated else (value,)
                stack.extend((v, f"{p}.{fd.name}") for v in items)


def _names(g: onnx.GraphProto) -> list[str]:
    return (
        [i.name for i in g.input]
        + [i.name for i in g.initializer]
        + [o for n in g.node for o in n.output]
    )


def _m_drop_field(m: onnx.ModelProto, c: Chooser) -> str:
    msgs = [(msg, p) for msg, p in _messages(m) if msg.ListFields()]
    msg, path = c.choice(msgs)
    fd, value = c.choice(msg.ListFields())
    if fd.is_repeated and len(value) > 1 and c.boolean():
        del value[c.integer(0, len(value) - 1)]
        return f"drop one {path}.{fd.name}"
    msg.ClearField(fd.name)
    return f"clear {path}.{fd.name}"


_ATTR_VALUES = [
    lambda c: helper.make_attribute("a", float(c.choice([0.5, -1e30, float("nan"), float("inf")]))),
    lambda c: helper.make_attribute("a", c.choice([*HUGE, 1, 3, -100])),
    lambda c: helper.make_attribute("a", c.choice(["", "tanh", "x" * 100, "\u00e9"])),
    lambda c: helper.make_attribute("a", [c.dim() for _ in range(c.integer(0, 5))]),
    lambda c: helper.make_attribute("a", [0.5] * c.integer(1, 4)),
    lambda c: helper.make_attribute("a", ["s"] * c.integer(1, 3)),
    lambda c: helper.make_attribute(
        "a",
        numpy_helper.from_array(
            np.zeros(
                [c.integer(0, 3)] * c.integer(0, 3), c.choice([np.float32, np.int64, np.bool_])
            )
        ),
    ),
    lambda c: helper.make_attribute("a", helper.make_graph([], "sub", [], [])),
]


def _m_attribute(m: onnx.ModelProto, c: Chooser) -> str:
    node = c.choice(m.graph.node)
    new = c.choice(_ATTR_VALUES)(c)
    kind = c.integer(0, 3)
    if kind == 0 and len(node.attribute):  # same name, another type
        attr = c.choice(node.attribute)
        new.name = attr.name
        attr.CopyFrom(new)
        return f"{node.op_type}.{attr.name} := {onnx.AttributeProto.AttributeType.Name(new.type)}"
    if kind == 1 and len(node.attribute):  # the declared type disagrees with the value held
        attr = c.choice(node.attribute)
        attr.type = c.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 99])
        return f"{node.op_type}.{attr.name}.type := {attr.type}"
    new.name = c.choice(
        [
            "axis",
            "perm",
            "to",
            "value",
            "allowzero",
            "epsilon",
            "axes",
            "approximate",
            "transB",
            "keepdims",
            "mode",
            "nonsense",
        ]
    )
    node.attribute.append(new)  # a known or unknown name, possibly a duplicate
    return f"{node.op_type} += attribute {new.name}"


def _m_cycle(m: onnx.ModelProto, c: Chooser) -> str:
    nodes = m.graph.node
    i = c.integer(0, len(nodes) - 1)
    j = c.integer(i, len(nodes) - 1)  # i's input := j's output: a cycle, or a forward read
    if not len(nodes[i].input) or not len(nodes[j].output):
        return "no-op"
    nodes[i].input[c.integer(0, len(nodes[i].input) - 1)] = nodes[j].output[0]
    return f"node {i} reads node {j}'s output"


def _m_duplicate(m: onnx.ModelProto, c: Chooser) -> str:
    g = m.graph
    kind = c.integer(0, 4)
    if kind == 0:  # two producers of one name
        a, b = c.choice(g.node), c.choice(g.node)
        b.output[0] = c.choice(_names(g)) if c.boolean() else a.output[0]
        return f"{b.op_type} output := {b.output[0]}"
    if kind == 1 and len(g.output):
        g.output.append(g.output[c.integer(0, len(g.output) - 1)])
        return "duplicate graph output"
    if kind == 2 and len(g.input):
        g.input.append(g.input[0])
        return "duplicate graph input"
    if kind == 3 and len(g.initializer):
        t = g.initializer[c.integer(0, len(g.initializer) - 1)]
        g.initializer.append(
            t if c.boolean() else numpy_helper.from_array(np.zeros(3, np.int64), t.name)
        )
        return f"duplicate initializer {t.name}"
    if len(g.input) and len(g.initializer):  # an initializer named like an input
        g.initializer[0].name = g.input[0].name
        return "initializer named like the input"
    return "no-op"


def _m_dangling(m: onnx.ModelProto, c: Chooser) -> str:
    node = c.choice(m.graph.node)
    name = c.choice(["nowhere", "", " ", "x\x00y"])
    if len(node.input) and c.integer(0, 2):
        node.input[c.integer(0, len(node.input) - 1)] = name
    elif c.boolean() and len(node.input):
        del node.input[c.integer(0, len(node.input) - 1)]
    else:
        node.input.append(c.choice([name, *_names(m.graph)]))
    return f"{node.op_type} inputs := {list(node.input)}"


def _m_huge_constant(m: onnx.ModelProto, c: Chooser) -> str:
    """Absurd values in an integer initializer (shapes, repeats, Range limits, indices)."""
    ints = [t for t in m.graph.initializer if t.data_type in (TensorProto.INT64, TensorProto.INT32)]
    if not ints:
        return "no-op"
    t = c.choice(ints)
    a = numpy_helper.to_array(t).copy().reshape(-1)
    if a.size == 0 or c.integer(0, 4) == 0:
        a = np.array([c.dim() for _ in range(c.integer(0, 6))], np.int64)
    else:
        a[c.integer(0, a.size - 1)] = c.dim()
    dtype = np.int64 if t.data_type == TensorProto.INT64 else np.int32
    t.CopyFrom(numpy_helper.from_array(a.astype(dtype), t.name))
    return f"{t.name} := {a.tolist()}"


def _m_dims(m: onnx.ModelProto, c: Chooser) -> str:
    """Dims that disagree with the data: huge, negative, or just wrong."""
    g = m.graph
    if c.boolean() and len(g.initializer):
        t = c.choice(g.initializer)
        kind = c.integer(0, 3)
        if kind == 0:
            t.dims[c.integer(0, len(t.dims) - 1) if len(t.dims) else 0 :] = [c.dim()]
        elif kind == 1:
            t.dims.append(c.dim())
        elif kind == 2 and t.raw_data:
            t.raw_data = t.raw_data[: c.integer(0, len(t.raw_data))] + b"\x01" * c.integer(0, 9)
        else:
            t.data_type = c.choice([0, 2, 8, 14, 15, 16, 17, 21, 22, 23, 99, -1])
        return f"initializer {t.name}: dims {list(t.dims)} type {t.data_type}"
    vis = [*g.input, *g.output]
    vi = c.choice(vis)
    tt = vi.type.tensor_type
    if c.integer(0, 3) == 0:
        tt.elem_type = c.choice([0, 8, 14, 16, 99, -5])
        return f"{vi.name} elem_type {tt.elem_type}"
    del tt.shape.dim[:]
    for _ in range(c.integer(0, 4)):
        d = tt.shape.dim.add()
        if c.integer(0, 3):
            d.dim_value = c.dim()
        else:
            d.dim_param = c.choice(["n", "m", ""])
    return f"{vi.name} dims {[d.dim_value or d.dim_param for d in tt.shape.dim]}"


def _m_op(m: onnx.ModelProto, c: Chooser) -> str:
    node = c.choice(m.graph.node)
    kind = c.integer(0, 3)
    if kind == 0:
        node.op_type = c.choice(sorted(sparsednn.ops.registry.OPS) + ["If", "Loop", "Nope", ""])
    elif kind == 1:
        node.domain = c.choice(["com.microsoft", "ai.onnx.ml", "sparsednn", "ai.onnx", "x"])
    elif kind == 2:
        node.input.append(c.choice(_names(m.graph)))
    else:
        node.output.append(c.choice(["extra", "", *_names(m.graph)]))
    return f"node {node.name or node.op_type}: {node.domain}.{node.op_type} {list(node.input)}"


def _m_opset(m: onnx.ModelProto, c: Chooser) -> str:
    kind = c.integer(0, 2)
    if kind == 0 and len(m.opset_import):
        m.opset_import[0].version = c.choice([-1, 0, 1, 12, 13, 21, 23, 24, 2**62])
    elif kind == 1:
        m.opset_import.append(
            helper.make_opsetid(c.choice(["", "ai.onnx", "x"]), c.integer(-1, 30))
        )
    else:
        m.ir_version = c.choice([-1, 0, 1, 3, 12, 2**62])
    return f"opset {[(o.domain, o.version) for o in m.opset_import]} ir {m.ir_version}"


def _m_attribute_value(m: onnx.ModelProto, c: Chooser) -> str:
    """Out-of-range values for the attributes ops do have: axes, perms, target types."""
    node = c.choice(m.graph.node)
    name, value = c.choice(
        [
            ("axis", c.choice([-100, -3, 2, 5, 2**62])),
            ("perm", [c.integer(-2, 4) for _ in range(c.integer(0, 4))]),
            ("to", c.choice([0, 8, 16, 99, -1])),
            ("epsilon", c.choice([-1.0, float("nan"), 0.0])),
            ("allowzero", c.choice([1, 7, -1])),
        ]
    )
    for attr in node.attribute:
        if attr.name == name:
            attr.CopyFrom(helper.make_attribute(name, value))
            break
    else:
        node.attribute.append(helper.make_attribute(name, value))
    return f"{node.op_type}.{name} := {value}"


def _m_value_info(m: onnx.ModelProto, c: Chooser) -> str:
    """A declared type for an intermediate value that contradicts the real one."""
    g = m.graph
    name = c.choice([o for n in g.node for o in n.output])
    shape = [c.choice([c.dim(), "n", None]) for _ in range(c.integer(0, 4))]
    g.value_info.append(
        helper.make_tensor_value_info(
            name, c.choice([TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL]), shape
        )
    )
    return f"value_info {name}: {shape}"


MUTATORS = {
    "drop_field": _m_drop_field,
    "attribute_type": _m_attribute,
    "cycle": _m_cycle,
    "duplicate": _m_duplicate,
    "dangling": _m_dangling,
    "huge_constant": _m_huge_constant,
    "dims": _m_dims,
    "op": _m_op,
    "opset": _m_opset,
    "attribute_value": _m_attribute_value,
    "value_info": _m_value_info,
}


def tiny_encoder(seed: int = 0) -> onnx.ModelProto:
    """A one-layer BERT-like encoder (hidden 16, 2 heads, vocab 50), 80% sparse: embeddings,
    LayerNorm, attention with its mask, GELU, as sparsednn.models builds them."""
    from sparsednn.models.encoders import EncoderConfig, build_encoder

    config = EncoderConfig(16, 1, 2, 32, vocab=50, max_positions=16)
    return build_encoder(config, 0.8, seed=seed, name="tiny_encoder")


BASE_MODELS = {"small_mlp": small_mlp, "shape_ops": shape_ops_model, "tiny_encoder": tiny_encoder}


def structured_mutation(
    c: Chooser, base: str | None = None, kinds: list[str] | None = None
) -> tuple[bytes, list[str]]:
    """A base model with 1-3 structured mutations: (serialised model, what was done)."""
    m = BASE_MODELS[base or c.choice(sorted(BASE_MODELS))]()
    done = []
    for _ in range(c.integer(1, 3)):
        kind = c.choice(kinds or sorted(MUTATORS))
        try:
            done.append(f"{kind}: {MUTATORS[kind](m, c)}")
        except (IndexError, ValueError, TypeError) as e:  # nothing to mutate of that kind
            done.append(f"{kind}: skipped ({e})")
    return m.SerializeToString(), done


def run_model(data, rows: int = 3) -> list[np.ndarray]:
    """Load a possibly corrupt model and run it on ones of its declared input shapes (symbols
    set to `rows`). Raises SparseDNNError (also for inputs too absurd to make)."""
    session = sparsednn.InferenceSession(data)
    feed = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else rows for d in arg.shape]
        if any(d < 0 or d > 1 << 16 for d in shape) or np.prod(shape, dtype=float) > 1 << 20:
            raise SparseDNNError("absurd input shape")  # nothing sensible to feed
        dtype = next(v.dtype for v in session.graph.inputs if v.name == arg.name)
        feed[arg.name] = np.ones(shape, dtype)
    return session.run(None, feed)


def try_model(data, rows: int = 3) -> str:
    """Load and run a possibly corrupt model: 'ok', 'error' (a SparseDNNError) or raises."""
    try:
        run_model(data, rows)
        return "ok"
    except SparseDNNError:
        return "error"


def unguarded_allocation(error: BaseException) -> bool:
    """Whether a sparsednn error hides a problem: a failed allocation (MemoryError) that
    sparsednn's own memory checks, which refuse before allocating, did not catch first, or
    a bug that InferenceSession's backstop turned into an 'internal error'."""
    seen = set()
    while error is not None and id(error) not in seen:
        if "internal error" in str(error):  # session's backstop around a bug: not clean
            return True
        seen.add(id(error))
        if isinstance(error, MemoryError) and "refused before allocating" not in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def guarded_array(shape, page: int = 4096):
    """A float32 array ending exactly where an inaccessible page starts (Linux): a kernel
    reading or writing one element past its end faults instead of passing silently.
    Returns the array and its mapping (keep the mapping alive as long as the array)."""
    import ctypes
    import ctypes.util
    import mmap

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    count = int(np.prod(shape))
    size = (count * 4 + page - 1) // page * page + page
    region = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    if libc.mprotect(ctypes.c_void_p(base + size - page), page, 0) != 0:
        raise OSError("mprotect refused to protect the guard page")
    arr = np.frombuffer(region, dtype=np.float32, count=count, offset=size - page - count * 4)
    return arr.reshape(shape), region
