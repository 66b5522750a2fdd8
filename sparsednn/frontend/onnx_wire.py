"""The protobuf wire format of an ONNX model, read just enough to leave its weights in place.

A BERT-base file is 440 MB of initializer data (TensorProto.raw_data) around 1 MB of graph.
Parsing all of it with protobuf holds the file's bytes, the parsed message and every tensor's
copy at once; instead `strip_raw_data` copies the model without the large raw_data payloads
(each replaced by an empty raw_data, so that the tensor still says where its data is kept) and
returns where each payload lies in the file, for numpy to view it there.

Only the fields on the way are read: ModelProto.graph (7), GraphProto.initializer (5),
TensorProto.raw_data (9). Everything else is copied as it is, for protobuf to judge. Repeated
or merged fields follow protobuf's rules: a model's graph fields merge (their initializers
concatenate) and the last raw_data of a tensor wins. Anything this reader cannot follow (a
length past the end, a group, a field number 0) makes it give up (WireFormatError), and the
caller parses the whole file the plain way, for protobuf's own error.
"""

from __future__ import annotations

from collections.abc import Iterator

MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_EMPTY_RAW_DATA = bytes([TENSOR_RAW_DATA << 3 | _LENGTH_DELIMITED, 0])


class WireFormatError(ValueError):
    """The bytes are not a protobuf message this reader can follow."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError(f"truncated or overlong varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the field, start of its value, end) of each field of
    the message in buf[start:end]; a length-delimited value is its payload."""
    pos = start
    while pos < end:
        key, value_start = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireFormatError(f"field number 0 at byte {pos}")
        if wire == _VARINT:
            _, value_end = _varint(buf, value_start, end)
        elif wire == _FIXED64:
            value_end = value_start + 8
        elif wire == _FIXED32:
            value_end = value_start + 4
        elif wire == _LENGTH_DELIMITED:
            length, value_start = _varint(buf, value_start, end)
            value_end = value_start + length
        else:  # groups (deprecated) and invalid wire types
            raise WireFormatError(f"wire type {wire} at byte {pos}")
        if value_end > end:
            raise WireFormatError(f"field {number} at byte {pos} runs past its message")
        yield number, wire, pos, value_start, value_end
        pos = value_end


def _embed(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def _strip_tensor(buf, start: int, end: int, min_bytes: int):
    """The tensor's bytes without its raw_data if that is at least min_bytes long (and then
    (offset, length) of the payload), else its bytes as they are (and None)."""
    raw = None
    for number, wire, _, value_start, value_end in _fields(buf, start, end):
        if number == TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED:
            raw = (value_start, value_end - value_start)
    if raw is None or raw[1] < min_bytes:
        return bytes(buf[start:end]), None
    out = bytearray()
    for number, wire, field_start, _, value_end in _fields(buf, start, end):
        if not (number == TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED):
            out += buf[field_start:value_end]
    out += _EMPTY_RAW_DATA
    return bytes(out), raw


def _strip_graph(buf, start: int, end: int, min_bytes: int, spans: list) -> bytes:
    out = bytearray()
    for number, wire, field_start, value_start, value_end in _fields(buf, start, end):
        if number == GRAPH_INITIALIZER and wire == _LENGTH_DELIMITED:
            tensor, span = _strip_tensor(buf, value_start, value_end, min_bytes)
            spans.append(span)
            out += _embed(GRAPH_INITIALIZER, tensor)
        else:
            out += buf[field_start:value_end]
    return bytes(out)


def strip_raw_data(buf, min_bytes: int = 4096) -> tuple[bytes, list[tuple[int, int] | None]]:
    """A serialized ModelProto without its initializers' raw_data of min_bytes or more, and
    for each initializer of the parsed model (in order) the (offset, length) in buf of the
    raw_data it had, or None if it was left in place. Raises WireFormatError."""
    out = bytearray()
    spans: list[tuple[int, int] | None] = []
    for number, wire, field_start, value_start, value_end in _fields(buf, 0, len(buf)):
        if number == MODEL_GRAPH and wire == _LENGTH_DELIMITED:
            out += _embed(MODEL_GRAPH, _strip_graph(buf, value_start, value_end, min_bytes, spans))
        else:
            out += buf[field_start:value_end]
    return bytes(out), spans
