"""ONNX in: a ModelProto (from a path, bytes or a proto) becomes a sparsednn Graph."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sparsednn.errors import InvalidGraphError, ModelLoadError, UnsupportedOpError
from sparsednn.frontend.onnx_wire import WireFormatError, strip_raw_data
from sparsednn.ir import Graph, Value, verify
from sparsednn.ir.storage import MappedFile, own_constants
from sparsednn.ir.verify import describe_memory_limit, format_bytes, memory_limit
from sparsednn.ops import lookup, supported_ops
from sparsednn.ops.registry import OPS

MIN_OPSET, MAX_OPSET = 13, 23
ONNX_DOMAINS = ("", "ai.onnx")

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT64: np.uint64,
    onnx.TensorProto.BOOL: np.bool_,
}


def numpy_dtype(elem_type: int) -> np.dtype | None:
    t = _ONNX_TO_NUMPY.get(elem_type)
    return None if t is None else np.dtype(t)


def load_model(model, base_dir: str | os.PathLike | None = None) -> tuple[onnx.ModelProto, Path]:
    """Read a model from a path, bytes or ModelProto; return it with its external data loaded."""
    if isinstance(model, onnx.ModelProto):
        proto = model
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    elif isinstance(model, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(model), "<bytes>")
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file {str(path)!r} does not exist or is not a file")
        proto = _parse(path.read_bytes(), str(path))
        base = path.resolve().parent
    else:
        raise ModelLoadError(
            f"cannot load a model from a {type(model).__name__}: "
            "give a path, bytes or an onnx.ModelProto"
        )
    _load_external_data(proto, base)
    return proto, base


def _read_model(model) -> tuple[onnx.ModelProto, Path, dict[int, memoryview]]:
    """Like load_model, but a model file's large initializers are mapped, not read: the proto
    comes back without their raw_data, and data[i] views graph.initializer[i]'s bytes in the
    mapped model file (or its external data file)."""
    if not isinstance(model, (str, os.PathLike)) or sys.byteorder != "little":
        proto, base = load_model(model)
        return proto, base, {}
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist or is not a file")
    try:
        mapped = MappedFile.open(path)
    except (OSError, ValueError):  # an empty file, or one that cannot be mapped: read it
        proto, base = load_model(model)
        return proto, base, {}
    proto = _parse_stripped(mapped, str(path))
    mapped.release()  # the pages the scan touched (whole large folios, on some file systems)
    if proto is None:  # protobuf's own judgement, and its own error
        proto = _parse(path.read_bytes(), str(path))
        data = {}
    else:
        proto, spans = proto
        view = memoryview(mapped)
        data = {i: view[o : o + n] for i, (o, n) in spans.items()}
    base = path.resolve().parent
    _load_external_data(proto, base, data)
    return proto, base, data


def _parse_stripped(mapped: MappedFile, where: str):
    """(the model without its large raw_data, {initializer index: (offset, length) of its
    raw_data in `mapped`}), or None if only a plain parse of the whole file can tell what is
    wrong with it."""
    try:
        stripped, spans = strip_raw_data(mapped)
    except WireFormatError:
        return None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(stripped)
    except Exception:  # noqa: BLE001 (any failure: the plain parse reports it)
        return None
    if not proto.HasField("graph") or len(proto.graph.initializer) != len(spans):
        return None
    _check_text(proto, where)
    return proto, {i: span for i, span in enumerate(spans) if span is not None}


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError and, on some inputs, others
        raise ModelLoadError(f"{where}: not a valid ONNX model ({type(e).__name__}: {e})") from e
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{where}: not a valid ONNX model (it has no graph)")
    _check_text(proto, where)
    return proto


def _check_text(proto: onnx.ModelProto, where: str) -> None:
    """Refuse text fields (names, op types, attribute names...) that are not valid UTF-8:
    protobuf hands them over as bytes, which no later stage expects."""
    stack: list[tuple[object, str]] = [(proto, "model")]
    while stack:
        msg, path = stack.pop()
        for fd, value in msg.ListFields():
            items = value if fd.is_repeated else (value,)
            if fd.type == fd.TYPE_STRING:
                if any(not isinstance(v, str) for v in items):
                    raise ModelLoadError(
                        f"{where}: not a valid ONNX model ({path}.{fd.name} is not UTF-8 text)"
                    )
            elif fd.type == fd.TYPE_MESSAGE:
                stack.extend((m, f"{path}.{fd.name}") for m in items)


def _load_external_data(proto: onnx.ModelProto, base: Path, mapped: dict | None = None) -> None:
    """Read tensors stored in files beside the model, refusing paths that leave its folder.

    With `mapped` (a dict), initializers are not read but mapped: mapped[i] becomes a view of
    the bytes of graph.initializer[i] in its mapped file, and the tensor is left as it is."""
    base = base.resolve()
    files: dict[Path, MappedFile | None] = {}  # one mapping per file, shared by its tensors
    initializers = len(proto.graph.initializer)  # _all_tensors yields them first
    for position, tensor in enumerate(_all_tensors(proto.graph)):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        what = f"tensor {tensor.name!r}: external data"
        target, offset, length = _external_span(tensor, base, what)
        index = position if mapped is not None and position < initializers else None
        if index is not None and length:
            if target not in files:
                try:
                    files[target] = MappedFile.open(target)
                except (OSError, ValueError):  # not mappable: read it
                    files[target] = None
            if files[target] is not None:
                view = memoryview(files[target])[offset : offset + length]
                if len(view) != length:  # the file shrank since it was measured
                    raise ModelLoadError(f"{what} file {str(target)!r} ended early")
                mapped[index] = view
                continue
        if index is not None:  # read below: not its raw_data's span in the model file
            mapped.pop(index, None)
        try:
            with open(target, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as e:
            raise ModelLoadError(f"{what} file {str(target)!r} cannot be read: {e}") from e
        if len(data) != length:  # the file shrank since it was measured
            raise ModelLoadError(f"{what} file {str(target)!r} ended early")
        tensor.raw_data = data
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _external_span(tensor: onnx.TensorProto, base: Path, what: str) -> tuple[Path, int, int]:
    """(file, offset, length) of a tensor's external data, checked: inside the model's folder,
    a regular file, within its size and the memory limit."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location or "\0" in location:
        raise ModelLoadError(f"{what} has no usable location ({location!r})")
    try:
        target = (base / location).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, too long names
        raise ModelLoadError(f"{what} location {location!r} cannot be resolved: {e}") from e
    if os.path.isabs(location) or not target.is_relative_to(base):
        raise ModelLoadError(
            f"{what} location {location!r} lies outside the model's folder {str(base)!r}; refused"
        )
    if not target.exists():
        raise ModelLoadError(f"{what} file {str(target)!r} is missing")
    if not target.is_file():
        raise ModelLoadError(f"{what} location {str(target)!r} is not a regular file")
    try:
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        length = None if length in (None, "") else int(length)
    except ValueError:
        raise ModelLoadError(
            f"{what}: offset {info.get('offset')!r} and length {info.get('length')!r} "
            "must be integers"
        ) from None
    size = target.stat().st_size
    length = size - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelLoadError(
            f"{what} file {str(target)!r} has {size} bytes, "
            f"but the model asks for {length} bytes at offset {offset}"
        )
    if length > memory_limit():
        raise ModelLoadError(
            f"{what}: {format_bytes(length)} in {str(target)!r} is more than "
            f"{describe_memory_limit()}; refused before reading"
        )
    return target, offset, length


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


# Where each element type keeps its values when not in raw_data, and each value's size in
# raw_data: a tensor's data is checked against its dims before numpy sees it, so that dims
# claiming more than the model holds never cause an allocation.
_TYPED_FIELD = {
    onnx.TensorProto.FLOAT: "float_data",
    onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.INT64: "int64_data",
    onnx.TensorProto.UINT32: "uint64_data",
    onnx.TensorProto.UINT64: "uint64_data",
}


def to_array(tensor: onnx.TensorProto, where: str, raw: memoryview | None = None) -> np.ndarray:
    """The tensor's values, checked against its dims; with `raw`, a read-only view of `raw`,
    the bytes of its raw_data kept outside the proto (see _read_model)."""
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise InvalidGraphError(f"{where}: tensor {tensor.name!r} has negative dims {dims}")
    dtype = numpy_dtype(tensor.data_type)
    if dtype is None:
        type_name = (
            onnx.TensorProto.DataType.Name(tensor.data_type)
            if (tensor.data_type in onnx.TensorProto.DataType.values())
            else str(tensor.data_type)
        )
        raise UnsupportedOpError(
            f"{where}: tensor {tensor.name!r} has element type {type_name}, which sparsednn "
            f"does not support (supported: {', '.join(sorted({np.dtype(t).name for t in _ONNX_TO_NUMPY.values()}))})"
        )
    count = 1
    for d in dims:
        count *= d
    if tensor.data_location == onnx.TensorProto.EXTERNAL and raw is None:
        raise ModelLoadError(
            f"{where}: tensor {tensor.name!r} has external data that was not loaded"
        )
    if raw is not None or tensor.HasField("raw_data"):
        held = len(raw) if raw is not None else len(tensor.raw_data)
        need = count * dtype.itemsize
        unit = "bytes"
    else:
        held = len(getattr(tensor, _TYPED_FIELD.get(tensor.data_type, "int32_data")))
        need, unit = count, "values"
    if held != need:
        raise InvalidGraphError(
            f"{where}: tensor {tensor.name!r} holds {held} {unit}, "
            f"which does not match its dims {dims} ({need} {unit})"
        )
    if count * dtype.itemsize > memory_limit():
        raise InvalidGraphError(
            f"{where}: tensor {tensor.name!r} (dims {dims}) needs "
            f"{format_bytes(count * dtype.itemsize)}, more than {describe_memory_limit()}"
        )
    try:
        if raw is not None and not tensor.HasField("segment"):  # (onnx refuses segments)
            array = np.frombuffer(raw, dtype=dtype).reshape(dims)
        else:
            array = numpy_helper.to_array(tensor)
    except Exception as e:
        raise InvalidGraphError(
            f"{where}: tensor {tensor.name!r} (dims {dims}) cannot be read: {e}"
        ) from e
    if list(array.shape) != dims:
        raise InvalidGraphError(
            f"{where}: tensor {tensor.name!r} holds {array.size} values, "
            f"which does not match its dims {dims}"
        )
    return array


def _attribute(attr: onnx.AttributeProto, where: str):
    A = onnx.AttributeProto
    if attr.type == A.GRAPH or attr.type == A.GRAPHS:
        raise UnsupportedOpError(f"{where}: attribute {attr.name!r} holds a subgraph (unsupported)")
    if attr.type == A.TENSOR:
        return to_array(attr.t, where)
    if attr.type == A.TENSORS:
        return [to_array(t, where) for t in attr.tensors]
    if attr.type == A.SPARSE_TENSOR:
        raise UnsupportedOpError(f"{where}: sparse tensor attribute {attr.name!r} is unsupported")
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in value]
    return value


def _value_type(vi: onnx.ValueInfoProto) -> tuple[np.dtype | None, tuple | None]:
    if not vi.type.HasField("tensor_type"):
        return None, None
    tt = vi.type.tensor_type
    dtype = numpy_dtype(tt.elem_type)
    if not tt.HasField("shape"):
        return dtype, None
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            if d.dim_value < 0:
                raise InvalidGraphError(
                    f"value {vi.name!r} is declared with a negative dimension {d.dim_value}"
                )
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dtype, tuple(dims)


def _skeleton(
    proto: onnx.ModelProto, max_bytes: int = 4096, kept_apart: Iterable[int] = ()
) -> onnx.ModelProto:
    """The model without the data of its large initializers (and of those whose data is
    kept apart, by index), for onnx's shape inference: it needs their types and dims, not
    their values, and a full copy of a BERT-base would cost another 440 MB at the peak."""
    kept_apart = set(kept_apart)
    skeleton = onnx.ModelProto(ir_version=proto.ir_version)
    skeleton.opset_import.extend(proto.opset_import)
    g, sg = proto.graph, skeleton.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    for i, init in enumerate(g.initializer):
        if init.ByteSize() <= max_bytes and i not in kept_apart:
            sg.initializer.append(init)
        else:
            sg.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return skeleton


def _data_propagation_is_safe(proto: onnx.ModelProto) -> bool:
    """Whether onnx's data propagation stays small on this model. It holds every propagated
    value as a shape, one protobuf dim (~140 bytes) per element, and walks shape tensors
    element by element: a ConstantOfShape of 2**32 elements makes it allocate ~600 GB, and a
    value declared as a 'shape' millions long takes it minutes."""
    g = proto.graph
    declared = max(
        (
            d.dim_value
            for vi in [*g.input, *g.output, *g.value_info]
            for d in vi.type.tensor_type.shape.dim
        ),
        default=0,
    )
    return declared <= 1 << 16 and not any(n.op_type == "ConstantOfShape" for n in g.node)


def _check_attribute_types(node: onnx.NodeProto, opset: int, where: str) -> None:
    """Each attribute has the type the op's ONNX schema gives it, and is given once."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:  # noqa: BLE001 (not an ONNX op: the op registry reports it)
        return
    A = onnx.AttributeProto.AttributeType
    seen = set()
    for attr in node.attribute:
        if attr.name in seen:
            raise InvalidGraphError(
                f"{where} ({node.op_type}): attribute {attr.name!r} is given twice"
            )
        seen.add(attr.name)
        spec = schema.attributes.get(attr.name)
        if spec is not None and attr.type != int(spec.type.value):
            got = A.Name(attr.type) if attr.type in A.values() else str(attr.type)
            raise InvalidGraphError(
                f"{where} ({node.op_type}): attribute {attr.name!r} must be "
                f"{A.Name(int(spec.type.value))}, got {got}"
            )


def _check_arity(opdef, node: onnx.NodeProto, where: str) -> None:
    """The node gives the op its required inputs and no more inputs than it takes."""
    params = inspect.signature(opdef.compute).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in params)
    required = [p.name for p in positional if p.default is p.empty]
    given = list(node.input)
    if not variadic and len(given) > len(positional):
        raise InvalidGraphError(
            f"{where} ({node.op_type}) has {len(given)} inputs; {node.op_type} takes at most "
            f"{len(positional)} ({', '.join(p.name for p in positional)})"
        )
    for i, name in enumerate(required):
        if i >= len(given) or given[i] == "":
            raise InvalidGraphError(
                f"{where} ({node.op_type}) lacks its required input {i} ({name!r})"
            )
    if variadic and not positional and not any(given):
        raise InvalidGraphError(f"{where} ({node.op_type}) has no inputs")


def opset_version(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ONNX_DOMAINS:
            return imp.version
    return 1


def import_onnx(model, name: str | None = None, mapped: bool = False) -> Graph:
    """Turn an ONNX model (path, bytes or ModelProto) into a verified Graph.

    A model file is mapped, not read, and its weights are copied one at a time, so that the
    file's bytes and the weights are never in memory together. With `mapped`, they are not
    copied at all: large constants are read-only views of the mapped file, for a caller that
    reads each once and gives it back (sparsednn.ir.storage; the session does)."""
    proto, _, data = _read_model(model)
    where = name or proto.graph.name or "model"
    opset = opset_version(proto)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelLoadError(
            f"{where}: default-domain opset {opset} is not supported "
            f"(sparsednn reads opsets {MIN_OPSET} to {MAX_OPSET}; "
            "convert with onnx.version_converter.convert_version)"
        )
    initializers = {}
    for i, init in enumerate(proto.graph.initializer):  # checked before onnx's inference
        if init.name in initializers:
            raise InvalidGraphError(f"{where}: initializer {init.name!r} is defined twice")
        initializers[init.name] = to_array(init, where, data.get(i))
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        _value_type(vi)  # negative declared dims
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _skeleton(proto, kept_apart=data),
            strict_mode=False,
            data_prop=_data_propagation_is_safe(proto),
        )
    except Exception:  # noqa: BLE001
        inferred = proto  # shapes are a help, not a requirement: our own pass infers them too
    g = inferred.graph
    graph = Graph(where)

    values: dict[str, Value] = {}
    types = {vi.name: _value_type(vi) for vi in [*g.value_info, *g.input, *g.output]}

    for init_name, array in initializers.items():
        values[init_name] = Value.constant(init_name, array)
    for vi in g.input:
        if vi.name in values:  # old exporters also list initializers as inputs
            continue
        dtype, shape = _value_type(vi)
        if dtype is None:
            raise UnsupportedOpError(
                f"{where}: input {vi.name!r} is not a tensor of a supported type"
            )
        v = Value(vi.name, dtype, shape)
        values[vi.name] = v
        graph.inputs.append(v)

    unsupported: list[str] = []
    for i, node in enumerate(g.node):
        node_name = node.name or f"{node.op_type}_{i}"
        known = node.op_type in OPS and OPS[node.op_type].domain == ""
        if node.domain not in ONNX_DOMAINS or not known:
            domain = f"{node.domain}." if node.domain not in ONNX_DOMAINS else ""
            unsupported.append(f"{domain}{node.op_type} (node {node_name!r})")
            values.update((o, Value(o)) for o in node.output)  # keep reading: report them all
            continue
        _check_attribute_types(node, opset, f"{where}: node {node_name!r}")
        attrs = {a.name: _attribute(a, f"{where}: node {node_name!r}") for a in node.attribute}
        _check_arity(lookup(node.op_type, node_name, attrs), node, f"{where}: node {node_name!r}")
        inputs = []
        for in_name in node.input:
            if in_name == "":
                inputs.append(None)
            elif in_name not in values:
                raise InvalidGraphError(
                    f"{where}: node {node_name!r} ({node.op_type}) reads {in_name!r}, which no "
                    "input, initializer or earlier node defines (dangling input, or the nodes "
                    "are not in topological order)"
                )
            else:
                inputs.append(values[in_name])
        out_names = list(node.output)
        n = graph.add_node(
            node.op_type,
            inputs,
            attrs=attrs,
            name=node_name,
            output_names=[o or graph.fresh_name("unused") for o in out_names],
        )
        for out in n.outputs:
            if out.name in values:
                raise InvalidGraphError(
                    f"{where}: value {out.name!r} is produced twice (node {node_name!r})"
                )
            out.dtype, out.shape = types.get(out.name, (None, None))
            values[out.name] = out
    if unsupported:
        raise UnsupportedOpError(
            f"{where}: unsupported op(s): {'; '.join(unsupported)}. "
            f"Supported ops: {', '.join(supported_ops())}"
        )
    for vi in g.output:
        if vi.name not in values:
            raise InvalidGraphError(f"{where}: output {vi.name!r} is never computed")
        v = values[vi.name]
        dtype, shape = _value_type(vi)
        v.dtype = v.dtype or dtype
        if shape is not None:  # the model's own word on its outputs beats onnx's inference
            v.shape = (
                shape
                if v.shape is None or len(v.shape) != len(shape)
                else tuple(
                    d if d is not None and not (isinstance(d, str) and d.startswith("unk__")) else o
                    for d, o in zip(shape, v.shape)
                )
            )
        graph.outputs.append(v)
    graph.opset = opset
    verify(graph)
    if not mapped:
        own_constants(graph)
    return graph
