"""Recognise multi-head attention and replace it with one Attention node.

The exported subgraph, per attention layer:

    q, k, v = three [B, S, H·D] tensors (the Linear layers' outputs)
    q → Reshape [B, S, H, D] → Transpose [0, 2, 1, 3]                 (→ [B, H, S, D])
    k → Reshape → Transpose [0, 2, 3, 1]                              (→ [B, H, D, S])
        or Transpose [0, 2, 1, 3] → Transpose [0, 1, 3, 2],
        or Transpose [0, 2, 1, 3] → Reshape [B·H, S, D] → Transpose [0, 2, 1] → Reshape (dynamo)
    v → Reshape → Transpose [0, 2, 1, 3]
    scores = MatMul(q', k') (· or / scalars: on the scores, or D^-¼ on both q and k as torch's
             SDPA exports do) + mask (any tensor broadcasting to [B, H, S, S])
    p = Softmax(scores, axis=-1), possibly guarded as Where(IsNaN(p), 0, p)
    MatMul(p, v') → Transpose [0, 2, 1, 3] → Reshape [B, S, H·D]  (some exports add a Reshape
             [B, H, S, D] → [B, H, S, D] first)

becomes Attention(q, k, v, mask) {num_heads, head_size, scale, fully_masked}, which reads q, k
and v in the Linear layout and writes [B, S, H·D] (sparsednn/codegen/attention.py). When q, k
and v are three Linear layers of one input, they are then merged into one Linear whose [K, 3N]
weight holds the three side by side, read packed: Attention(qkv, _, _, mask)
(merge_qkv_projections).

Soundness: every tensor on the way is described by its layout, a list of dimensions each made
of logical axes (b, s, h, d of q, k or v) in row-major order. Transpose permutes dimensions;
Reshape regroups the flat sequence of axes by size, position by position, exactly as a
row-major reshape does, with sizes that are ints, shape symbols ("batch", onnx's unk__N: equal
symbols are equal sizes) or sizes read off Shape/Gather/Slice/Concat chains of tensors whose
layout or shape is known. A reshape whose target cannot be resolved ends the match (or, at the
end of the output chain, keeps reading the Attention output, which has the same row-major data).
Only when q, k and v reach the two MatMuls as [b, h, s, d] / [b, h, d, s] / [b, h, s, d] and
the output as [b, s, (h d)] (or [b, s, h, d]) is the subgraph replaced.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from sparsednn.ir import Graph, Node, Value
from sparsednn.ir.storage import release, zero_fraction
from sparsednn.ops.fused_ops import DOMAIN
from sparsednn.passes.infer_shapes import infer_shapes
from sparsednn.passes.matching import Uses, const_scalar

CHAIN_OPS = ("Transpose", "Reshape", "Mul", "Div")
_private = itertools.count()


# -- sizes: an int coefficient times a product of symbols ------------------------------------
@dataclass(frozen=True)
class Size:
    coeff: int
    symbols: tuple[str, ...] = ()

    def __mul__(self, other: Size) -> Size:
        return Size(self.coeff * other.coeff, tuple(sorted(self.symbols + other.symbols)))

    def divides(self, other: Size) -> bool:
        if self.coeff == 0 or other.coeff % self.coeff:
            return False
        rest = list(other.symbols)
        for s in self.symbols:
            if s not in rest:
                return False
            rest.remove(s)
        return True


ONE = Size(1)


def size_of_dim(dim, private_key) -> Size:
    """A Size for a dimension of an inferred shape: an int, a symbol, or (unknown) a fresh
    symbol private to `private_key` (so that only the same dimension of the same value is
    known equal to it)."""
    if isinstance(dim, (int, np.integer)):
        return Size(int(dim))
    if isinstance(dim, str):
        return Size(1, (dim,))
    return Size(1, (f"#{private_key}",))


@dataclass(frozen=True, eq=False)
class Axis:
    name: str  # b, s, h, d (for printing)
    size: Size

    def __repr__(self) -> str:
        return self.name


Layout = tuple[tuple[Axis, ...], ...]


def group_size(group: tuple[Axis, ...]) -> Size:
    out = ONE
    for a in group:
        out = out * a.size
    return out


class Tracker:
    """Layouts of the tensors around one attention, and the sizes of shape tensors."""

    def __init__(self):
        self.layouts: dict[int, Layout] = {}
        self._private: dict[tuple[int, int], Size] = {}

    def dims(self, v: Value) -> list[Size] | None:
        """The sizes of the dimensions of `v`: from its layout if known, else its shape."""
        lay = self.layouts.get(id(v))
        if lay is not None:
            return [group_size(g) for g in lay]
        if v.shape is None:
            return None
        out = []
        for i, d in enumerate(v.shape):
            if d is None:
                key = (id(v), i)
                if key not in self._private:
                    self._private[key] = Size(1, (f"#{next(_private)}",))
                out.append(self._private[key])
            else:
                out.append(size_of_dim(d, None))
        return out

    def shape_entries(self, v: Value | None, depth: int = 0) -> list | None:
        """The value of a 1-D int64 shape tensor as entries: Size for positive sizes, or the
        raw ints 0 and -1 (Reshape's copy and infer), or None when unknown."""
        if v is None or depth > 12:
            return None
        if v.is_const:
            c = v.const
            if c.dtype.kind not in "iu" or c.ndim > 1:
                return None
            return [Size(int(x)) if x > 0 else int(x) for x in c.reshape(-1)]
        n = v.producer
        if n is None:
            return None
        op = n.op
        if op == "Shape":
            dims = self.dims(n.inputs[0])
            if dims is None:
                return None
            start, end = n.attrs.get("start", 0), n.attrs.get("end")
            return dims[slice(start, end)]
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape"):
            inner = self.shape_entries(n.inputs[0], depth + 1)
            if inner is None:
                return None
            if op in ("Unsqueeze", "Squeeze", "Reshape") and len(inner) != 1:
                return None  # scalars <-> 1-element vectors only
            return inner
        if op == "Concat":
            out = []
            for x in n.inputs:
                part = self.shape_entries(x, depth + 1)
                if part is None:
                    return None
                out += part
            return out
        if op == "Gather":
            data = self.shape_entries(n.inputs[0], depth + 1)
            idx = n.inputs[1]
            if data is None or not idx.is_const or n.attrs.get("axis", 0) != 0:
                return None
            try:
                return [data[int(i)] for i in idx.const.reshape(-1)]
            except IndexError:
                return None
        if op == "Slice":
            data = self.shape_entries(n.inputs[0], depth + 1)
            args = [n.input(i) for i in range(1, 5)]
            if data is None or any(a is not None and not a.is_const for a in args):
                return None
            starts, ends = (int(args[i].const.reshape(-1)[0]) for i in (0, 1))
            if args[2] is not None and int(args[2].const.reshape(-1)[0]) not in (0, -1):
                return None
            if args[3] is not None and int(args[3].const.reshape(-1)[0]) != 1:
                return None
            n_ = len(data)
            starts = max(-n_, min(starts, n_))
            ends = max(-n_, min(ends, n_))
            return data[starts:ends]
        return None

    # -- replaying the chain ops on layouts ----------------------------------------------------
    def apply(self, node: Node, layout: Layout) -> Layout | None:
        if node.op == "Transpose":
            perm = node.attrs.get("perm") or list(range(len(layout)))[::-1]
            if sorted(perm) != list(range(len(layout))):
                return None
            return tuple(layout[p] for p in perm)
        if node.op == "Reshape":
            entries = self.shape_entries(node.inputs[1])
            if entries is None:
                return None
            return regroup(layout, entries, bool(node.attrs.get("allowzero", 0)))
        return layout  # Mul / Div by a scalar


def regroup(layout: Layout, entries: list, allowzero: bool) -> Layout | None:
    """The layout after a row-major reshape of `layout` to `entries`, or None if unknown."""
    sizes = []
    for i, e in enumerate(entries):
        if e == 0:
            if allowzero or i >= len(layout):
                return None
            e = group_size(layout[i])
        sizes.append(e)
    if sizes.count(-1) > 1:
        return None
    axes = [a for g in layout for a in g]

    def take(seq: list[Axis], target: Size) -> int | None:
        """How many axes from the front of seq make up exactly `target` (0 for a new
        dimension of size 1, which no axis makes up)."""
        if target == ONE:
            return 1 if seq and seq[0].size == ONE else 0
        prod, k = ONE, 0
        while prod != target:
            if k >= len(seq):
                return None
            prod = prod * seq[k].size
            k += 1
            if not prod.divides(target):
                return None
        return k

    if -1 in sizes:
        split = sizes.index(-1)
        left, right = sizes[:split], sizes[split + 1 :]
    else:
        left, right = sizes, []
    groups_left, pos = [], 0
    for target in left:
        k = take(axes[pos:], target)
        if k is None:
            return None
        groups_left.append(tuple(axes[pos : pos + k]))
        pos += k
    groups_right, end = [], len(axes)
    for target in reversed(right):
        k = take(axes[pos:end][::-1], target)
        if k is None:
            return None
        groups_right.append(tuple(axes[end - k : end]))
        end -= k
    if -1 in sizes:
        middle = tuple(axes[pos:end])
        return tuple(groups_left) + (middle,) + tuple(reversed(groups_right))
    if pos != len(axes):
        return None
    return tuple(groups_left)


# -- matching --------------------------------------------------------------------------------
def data_reader(uses: Uses, v: Value) -> Node | None:
    """The one node reading `v`'s data, not counting Shape nodes (which read only its shape:
    those feeding shape arguments of the matched chains die with them), if `v` is not a graph
    output. Other readers would keep the unfused computation alive beside the fused one."""
    if id(v) in uses.outputs:
        return None
    readers = [r for r in uses.readers.get(id(v), []) if r.op != "Shape"]
    return readers[0] if len(readers) == 1 else None


def _scalar_factor(node: Node, x: Value) -> float | None:
    """The factor a Mul/Div node applies to `x` when the other operand is a scalar constant."""
    if node.op == "Mul":
        other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
        c = const_scalar(other)
        return None if c is None or other.const.ndim > 1 else c
    if node.op == "Div" and node.inputs[0] is x:
        c = const_scalar(node.inputs[1])
        if c is None or c == 0 or node.inputs[1].const.ndim > 1:
            return None
        return 1.0 / c
    return None


def _data_input(node: Node) -> Value | None:
    """The tensor a chain op moves (not its shape argument or scale)."""
    if node.op in ("Transpose", "Reshape"):
        return node.inputs[0]
    for x in node.inputs[:2]:
        if x is not None and not x.is_const:
            return x if _scalar_factor(node, x) is not None else None
    return None


def _walk_back(v: Value) -> list[tuple[Value, list[Node]]]:
    """Candidate (source, chain) pairs for an operand: every tensor up the chain of
    Transpose/Reshape/scalar Mul/Div ops, nearest first, with the chain from it to `v`."""
    out, chain = [], []
    while True:
        out.append((v, list(reversed(chain))))
        n = v.producer
        if n is None or n.op not in CHAIN_OPS:
            return out
        x = _data_input(n)
        if x is None:
            return out
        chain.append(n)
        v = x


@dataclass
class Operand:
    source: Value
    layout: Layout  # of the MatMul operand
    scale: float
    b: Axis
    s: Axis
    h: Axis
    d: Axis


def _trace_operand(tr: Tracker, v: Value, head_size: int, expect: str) -> Operand | None:
    """Follow an operand of the attention MatMuls back to a [B, S, H·D] source and check that
    it arrives with the dimensions `expect` ("bhsd" or "bhds")."""
    for source, chain in reversed(_walk_back(v)):  # furthest source first
        if source.shape is None or len(source.shape) != 3:
            continue
        n = source.shape[2]
        if not isinstance(n, (int, np.integer)) or n % head_size or n == 0:
            continue
        x = None
        if source.producer is not None and source.producer.op == "Linear":
            x = source.producer.inputs[0]
        base = x if x is not None and x.shape is not None and len(x.shape) == 3 else source
        dims = tr.dims(base)
        if dims is None:
            continue
        b, s = Axis("b", dims[0]), Axis("s", dims[1])
        h, d = Axis("h", Size(int(n) // head_size)), Axis("d", Size(head_size))
        layout: Layout | None = ((b,), (s,), (h, d))
        tr.layouts[id(source)] = layout
        if base is not source:
            features = Axis("f", size_of_dim(base.shape[2], id(base)))
            tr.layouts.setdefault(id(base), ((b,), (s,), (features,)))
        scale = 1.0
        cur = source
        for node in chain:
            if node.op in ("Mul", "Div"):
                f = _scalar_factor(node, cur)
                if f is None:
                    layout = None
                    break
                scale *= f
            layout = tr.apply(node, layout)
            if layout is None:
                break
            cur = node.outputs[0]
            tr.layouts[id(cur)] = layout
        if layout is None:
            continue
        want = {"bhsd": ((b,), (h,), (s,), (d,)), "bhds": ((b,), (h,), (d,), (s,))}[expect]
        if _same(layout, want):
            return Operand(source, layout, scale, b, s, h, d)
    return None


def _same(a: Layout, b: Layout) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(p is q for p, q in zip(x, y)) for x, y in zip(a, b)
    )


@dataclass
class Match:
    q: Operand
    k: Operand
    v: Operand
    mask: Value | None
    scale: float
    guarded: bool
    out_value: Value  # replaced by the Attention output (reshaped to 4-D if out_4d)
    out_4d: bool
    heads: int
    head_size: int


def _scaled_matmul(uses: Uses, v: Value):
    """(MatMul, factor) when `v` is a MatMul output times/over scalar constants, each
    intermediate read only by the next node; else None."""
    scale = 1.0
    n = v.producer
    while n is not None and n.op in ("Mul", "Div"):
        x = _data_input(n)
        if x is None or data_reader(uses, x) is not n:
            return None
        scale *= _scalar_factor(n, x)
        v, n = x, x.producer
    if n is None or n.op != "MatMul" or data_reader(uses, v) is None:
        return None
    if v.shape is not None and len(v.shape) != 4:
        return None
    return n, scale


def _scores_chain(uses: Uses, softmax: Node):
    """(QK MatMul, scale on the scores, mask or None) above a Softmax over the last axis."""
    if softmax.attrs.get("axis", -1) not in (-1, 3):
        return None
    v = softmax.inputs[0]
    if data_reader(uses, v) is not softmax:
        return None
    n = v.producer
    if n is not None and n.op == "Add":
        for scores, m in (n.inputs, n.inputs[::-1]):
            if data_reader(uses, scores) is not n or m is None:
                continue
            if m.shape is None or len(m.shape) > 4 or m.dtype != np.float32:
                continue
            found = _scaled_matmul(uses, scores)
            if found is not None:
                return found[0], found[1], m
        return None
    found = _scaled_matmul(uses, v)
    return None if found is None else (found[0], found[1], None)


def _probs_consumer(uses: Uses, softmax: Node):
    """(PV MatMul, guarded) below a Softmax: directly, or through Where(IsNaN(p), 0, p)."""
    p = softmax.outputs[0]
    if id(p) in uses.outputs:
        return None
    readers = [r for r in uses.readers.get(id(p), []) if r.op != "Shape"]
    if len(readers) == 1 and readers[0].op == "MatMul" and readers[0].inputs[0] is p:
        return readers[0], False
    if len(readers) != 2:
        return None
    isnan = next((r for r in readers if r.op == "IsNaN"), None)
    where = next((r for r in readers if r.op == "Where"), None)
    if isnan is None or where is None or data_reader(uses, isnan.outputs[0]) is not where:
        return None
    cond, zero, same = where.inputs
    if cond is not isnan.outputs[0] or same is not p or const_scalar(zero) != 0.0:
        return None
    mm = data_reader(uses, where.outputs[0])
    if mm is None or mm.op != "MatMul" or mm.inputs[0] is not where.outputs[0]:
        return None
    return mm, True


def _output_chain(tr: Tracker, uses: Uses, pv: Node, q: Operand):
    """Walk the PV MatMul's output through Transpose/Reshape to [b, s, (h d)]: the value the
    Attention node produces and whether it is the 4-D [b, s, h, d] form."""
    b, s, h, d = q.b, q.s, q.h, q.d
    flat = ((b,), (s,), (h, d))
    split = ((b,), (s,), (h,), (d,))
    v = pv.outputs[0]
    layout: Layout = ((b,), (h,), (s,), (d,))
    tr.layouts[id(v)] = layout
    best = None
    while True:
        if _same(layout, flat):
            best = (v, False)
        elif _same(layout, split):
            best = (v, True)
        if id(v) in uses.outputs:
            break
        nxt = data_reader(uses, v)
        if nxt is None or nxt.op not in ("Transpose", "Reshape") or nxt.inputs[0] is not v:
            break
        new = tr.apply(nxt, layout)
        if new is None:
            break
        v, layout = nxt.outputs[0], new
        tr.layouts[id(v)] = layout
    return best


def _head_sizes(tr: Tracker, qv: Value) -> list[int]:
    """Candidate head sizes for the q operand of q·kᵀ: its last dimension if known, and the
    int sizes the reshapes on its way from the source name (the layout check then decides)."""
    out = []
    if qv.shape is not None and isinstance(qv.shape[-1], (int, np.integer)):
        out.append(int(qv.shape[-1]))
    for _, chain in _walk_back(qv):
        for node in chain:
            if node.op == "Reshape":
                for e in tr.shape_entries(node.inputs[1]) or []:
                    if isinstance(e, Size) and not e.symbols and e.coeff > 1:
                        out.append(e.coeff)
    return list(dict.fromkeys(out))


def match_attention(uses: Uses, softmax: Node) -> Match | None:
    found = _scores_chain(uses, softmax)
    if found is None:
        return None
    qk, score_scale, mask = found
    below = _probs_consumer(uses, softmax)
    if below is None:
        return None
    pv, guarded = below
    qv, kv = qk.inputs
    vv = pv.inputs[1]
    for head_size in _head_sizes(Tracker(), qv):
        tr = Tracker()
        q = _trace_operand(tr, qv, head_size, "bhsd")
        k = _trace_operand(tr, kv, head_size, "bhds") if q else None
        v = _trace_operand(tr, vv, head_size, "bhsd") if k else None
        if v is not None:
            break
    else:
        return None
    heads = q.h.size.coeff
    if not (
        k.h.size == v.h.size == q.h.size
        and q.b.size == k.b.size == v.b.size
        and k.s.size == v.s.size
    ):
        return None
    if v.scale != 1.0:  # a scaled v (not seen in exports): left alone
        return None
    out = _output_chain(tr, uses, pv, q)
    if out is None:
        return None
    scale = q.scale * k.scale * score_scale
    return Match(q, k, v, mask, scale, guarded, out[0], out[1], heads, head_size)


def fuse_attention(graph: Graph) -> Graph:
    # The fusions before this pass change shapes (Linear's rule says more than the importer):
    # infer them again, as the matching reads sizes off them.
    infer_shapes(graph)
    uses = Uses(graph)
    replaced: dict[int, list[Node]] = {}
    for node in list(graph.nodes):
        if node.op != "Softmax":
            continue
        m = match_attention(uses, node)
        if m is None:
            continue
        producer = m.out_value.producer
        if producer is None or id(producer) in replaced:
            continue
        name = f"{producer.name}_attention"
        attrs = {
            "num_heads": m.heads,
            "head_size": m.head_size,
            "scale": float(np.float32(m.scale)),
            "fully_masked": "zero" if m.guarded else "nan",
        }
        inputs = [m.q.source, m.k.source, m.v.source] + ([m.mask] if m.mask is not None else [])
        if m.out_4d:
            flat = Value(graph.fresh_name(f"{name}_out"), np.dtype(np.float32))
            attn = Node("Attention", name, inputs, [flat], attrs, domain=DOMAIN)
            flat.producer = attn
            shape = Value.constant(
                graph.fresh_name(f"{name}_heads"), np.array([0, 0, m.heads, m.head_size], np.int64)
            )
            reshape = Node("Reshape", f"{name}_split", [flat, shape], [m.out_value], {})
            m.out_value.producer = reshape
            replaced[id(producer)] = [attn, reshape]
        else:
            attn = Node("Attention", name, inputs, [m.out_value], attrs, domain=DOMAIN)
            m.out_value.producer = attn
            replaced[id(producer)] = [attn]
    if replaced:
        nodes = []
        for n in graph.nodes:
            nodes.extend(replaced.get(id(n), [n]))
        graph.nodes = nodes
        merge_qkv_projections(graph)
    return graph


MAX_SPARSITY_SPREAD = 0.05


def merge_qkv_projections(graph: Graph) -> Graph:
    """Attention(q, k, v) whose q, k and v are three Linear layers of one input becomes
    Attention(qkv) on one Linear with the three weights side by side ([K, 3N]): one kernel call
    instead of three, and a layer wide enough to keep two threads busy (measured on BERT-base
    at batch 1, 2 threads: three 768x768 sparse kernels 0.40 ms, one 768x2304 0.24 ms). The
    old outputs stay available as Slices of the merged one for any other reader (dead code
    elimination drops them otherwise). Left alone when the three weights differ much in
    sparsity (the kernel choice is per layer)."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    replace: dict[int, Node] = {}
    insert: dict[int, Node] = {}
    for attn in graph.nodes:
        if attn.op != "Attention" or attn.input(1) is None:
            continue
        sources = attn.inputs[:3]
        linears = [v.producer for v in sources]
        if len({id(v) for v in sources}) != 3 or any(
            n is None or n.op != "Linear" or id(n) in replace for n in linears
        ):
            continue
        x = linears[0].inputs[0]
        weights = [n.attrs.get("weight") for n in linears]
        if any(
            n.inputs[0] is not x
            or n.attrs.get("activation", "none") != "none"
            or not isinstance(w, np.ndarray)
            or w.ndim != 2
            or w.dtype != np.float32
            or w.shape != weights[0].shape
            for n, w in zip(linears, weights)
        ):
            continue
        sparsity = [zero_fraction(w) for w in weights]
        if max(sparsity) - min(sparsity) > MAX_SPARSITY_SPREAD:
            continue
        merged_weight = np.ascontiguousarray(np.concatenate(weights, axis=1))
        for w in weights:  # weights still in the model file: give back the pages just read
            release(w)
        n = weights[0].shape[1]
        biases = [n_.attrs.get("bias") for n_ in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = np.concatenate([np.zeros(n, np.float32) if b is None else b for b in biases])
        first = min(linears, key=lambda node: position[id(node)])
        qkv = Value(graph.fresh_name(f"{first.name}_qkv_out"), np.dtype(np.float32))
        merged = Node(
            "Linear",
            f"{first.name}_qkv",
            [x],
            [qkv],
            {
                "weight": merged_weight,
                "bias": bias,
                "activation": "none",
            },
            domain=DOMAIN,
        )
        qkv.producer = merged
        insert[id(first)] = merged
        for i, (node, out) in enumerate(zip(linears, sources)):
            bounds = [
                Value.constant(graph.fresh_name(f"{node.name}_{what}"), np.array([value], np.int64))
                for what, value in (("start", i * n), ("end", (i + 1) * n), ("axis", -1))
            ]
            part = Node("Slice", f"{node.name}_part", [qkv, *bounds], [out], {})
            out.producer = part
            replace[id(node)] = part
        attn.inputs = [qkv, None, None, *attn.inputs[3:]]
    if replace:
        nodes = []
        for node in graph.nodes:
            if id(node) in insert:
                nodes.append(insert[id(node)])
            nodes.append(replace.get(id(node), node))
        graph.nodes = nodes
    return graph
