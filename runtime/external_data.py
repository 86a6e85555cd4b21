"""The files an ONNX graph makes its runtime read: the `location` of every tensor stored as external data, read
from the protobuf wire format of model.onnx, so that the runtime needs no `onnx` package.

A tensor's bytes may live in another file (`TensorProto.external_data`, key "location", a path relative to the
model's folder). ONNX Runtime refuses absolute and escaping locations only from 1.24 on (and follows them before);
TensorRT's parser has its own rules. `check_external_data` lets a bundle's graph read only files bundle.json
lists, each of them checked (inside the folder, no symbolic link, size and sha256), before any of them opens it.

Tensors are reached along the message fields below (onnx.proto field numbers): initializers and sparse initializers
of the graph, tensors and subgraphs in node attributes (If, Loop, Scan bodies, Constant values), functions, and
training graphs. The walk keeps its own stack, so a deeply nested hostile file cannot exhaust Python's.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Iterator

from nectar_runtime.errors import BundleError

# message kind -> {field number: kind of the message it holds}: every path from a ModelProto to a TensorProto
SCHEMA = {
    "model": {7: "graph", 20: "training", 25: "function"},       # ModelProto: graph, training_info, functions
    "graph": {1: "node", 5: "tensor", 15: "sparse"},             # GraphProto: node, initializer, sparse_initializer
    "node": {5: "attribute"},                                    # NodeProto: attribute
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},   # t g tensors ...
    "sparse": {1: "tensor", 2: "tensor"},                        # SparseTensorProto: values, indices
    "function": {7: "node", 11: "attribute"},                    # FunctionProto: node, attribute_proto
    "training": {1: "graph", 2: "graph"},                        # TrainingInfoProto: initialization, algorithm
    "tensor": {13: "entry"},                                     # TensorProto: external_data
}
LOCATION = b"location"


class Malformed(ValueError):
    """Bytes that are not a protobuf message."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Malformed("a varint runs past its message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in buf[start:end]; the others are
    skipped (their values hold no paths)."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        wire = tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise Malformed("a field runs past its message")
            yield tag >> 3, pos, pos + length
            pos += length
        else:
            raise Malformed(f"wire type {wire} (groups or garbage)")
    if pos != end:
        raise Malformed("the last field runs past its message")


def _location(buf: memoryview, start: int, end: int) -> bytes | None:
    """The value of a StringStringEntryProto whose key is "location", else None."""
    key = value = None
    for number, a, b in _fields(buf, start, end):
        if number == 1:
            key = bytes(buf[a:b])
        elif number == 2:
            value = bytes(buf[a:b])
    return value if key == LOCATION else None


def external_locations(onnx_path: Path) -> list[str]:
    """Every external-data location named in the ONNX file, in file order (duplicates kept); Malformed when the
    bytes are not a protobuf message or a location is not UTF-8."""
    with open(onnx_path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            return []
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                return _walk(buf)
            finally:
                buf.release()


def _walk(buf: memoryview) -> list[str]:
    found: list[str] = []
    stack = [("model", 0, len(buf))]
    while stack:
        kind, start, end = stack.pop()
        if kind == "entry":
            if (value := _location(buf, start, end)) is not None:
                try:
                    found.append(value.decode("utf-8"))
                except UnicodeDecodeError:
                    raise Malformed("an external data location is not UTF-8") from None
            continue
        holds = SCHEMA[kind]
        stack.extend((holds[number], a, b) for number, a, b in _fields(buf, start, end) if number in holds)
    return found


def check_external_data(folder: Path, onnx_name: str, listed: set[str]) -> None:
    """Refuse a graph whose external data is anything but files of `listed` (bundle.json's files, which are checked
    inside the folder with their sizes): an absolute path, `..`, a symbolic link or an unlisted file all stop here,
    before ONNX Runtime or TensorRT opens the graph."""
    path = folder / onnx_name
    try:
        locations = external_locations(path)
    except Malformed as exc:
        raise BundleError(f"{path} is not an ONNX file ({exc}); re-export the bundle") from None
    for location in dict.fromkeys(locations):
        name = Path(location).as_posix() if location else ""
        if name not in listed or Path(location).is_absolute() or ".." in Path(location).parts:
            raise BundleError(f"{path} reads tensor data from {location[:200]!r}, which is not a file bundle.json "
                              "lists inside the bundle; a graph may read only its own listed files; re-export the "
                              "bundle")
