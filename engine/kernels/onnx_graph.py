"""A minimal ONNX ModelProto writer: just enough protobuf for the engine's kernel graphs.

The engine builds its graphs itself instead of depending on the `onnx` package: a graph here
is a few nodes over inputs, outputs and initializers (raw bytes, or external data that the
caller hands to onnxruntime as arrays it already holds). Field numbers are those of
onnx/onnx.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# TensorProto.DataType
FLOAT, UINT8, INT8, INT32, INT64, FLOAT16 = 1, 2, 3, 6, 7, 10
_NP_TO_ONNX = {np.dtype(np.float32): FLOAT, np.dtype(np.uint8): UINT8, np.dtype(np.int8): INT8,
               np.dtype(np.int32): INT32, np.dtype(np.int64): INT64,
               np.dtype(np.float16): FLOAT16}


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(num: int, wire: int) -> bytes:
    return _varint(num << 3 | wire)


def _int(num: int, v: int) -> bytes:
    return _key(num, 0) + _varint(v)


def _bytes(num: int, v: bytes) -> bytes:
    return _key(num, 2) + _varint(len(v)) + v


def _str(num: int, v: str) -> bytes:
    return _bytes(num, v.encode())


def _float(num: int, v: float) -> bytes:
    return _key(num, 5) + struct.pack("<f", v)


@dataclass(frozen=True)
class Initializer:
    """A constant tensor: inline bytes, or `length` bytes at `offset` of an external file."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    data: bytes | None = None
    location: str | None = None  # file name relative to the model's directory
    offset: int = 0
    length: int = 0

    def encode(self) -> bytes:
        out = b"".join(_int(1, d) for d in self.shape)
        out += _int(2, _NP_TO_ONNX[np.dtype(self.dtype)]) + _str(8, self.name)
        if self.data is not None:
            return out + _bytes(9, self.data)
        assert self.location is not None
        for k, v in (("location", self.location), ("offset", str(self.offset)),
                     ("length", str(self.length))):
            out += _bytes(13, _str(1, k) + _str(2, v))
        return out + _int(14, 1)


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: Sequence[str]
    outputs: Sequence[str]
    attrs: dict[str, int | float | tuple[int, ...]] = field(default_factory=dict)
    domain: str = ""

    def encode(self) -> bytes:
        out = b"".join(_str(1, i) for i in self.inputs)
        out += b"".join(_str(2, o) for o in self.outputs)
        out += _str(3, self.outputs[0]) + _str(4, self.op_type)
        for name, v in self.attrs.items():
            if isinstance(v, tuple):  # INTS
                attr = _str(1, name) + b"".join(_int(8, i) for i in v) + _int(20, 7)
            elif isinstance(v, float):
                attr = _str(1, name) + _float(2, v) + _int(20, 1)
            else:
                attr = _str(1, name) + _int(3, int(v)) + _int(20, 2)
            out += _bytes(5, attr)
        if self.domain:
            out += _str(7, self.domain)
        return out


def _value_info(name: str, dtype: np.dtype, shape: Sequence[int | str]) -> bytes:
    dims = b"".join(_bytes(1, _str(2, d) if isinstance(d, str) else _int(1, d)) for d in shape)
    tensor_type = _int(1, _NP_TO_ONNX[np.dtype(dtype)]) + _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def model_bytes(
    nodes: Sequence[Node],
    inputs: Sequence[tuple[str, np.dtype, Sequence[int | str]]],
    outputs: Sequence[tuple[str, np.dtype, Sequence[int | str]]],
    initializers: Sequence[Initializer],
) -> bytes:
    """A serialized ModelProto (IR 9, opset 17 + com.microsoft 1) of one graph."""
    graph = b"".join(_bytes(1, n.encode()) for n in nodes) + _str(2, "g")
    graph += b"".join(_bytes(5, t.encode()) for t in initializers)
    graph += b"".join(_bytes(11, _value_info(*i)) for i in inputs)
    graph += b"".join(_bytes(12, _value_info(*o)) for o in outputs)
    model = _int(1, 9) + _str(2, "gemma-lsp")
    model += _bytes(8, _str(1, "") + _int(2, 17))
    model += _bytes(8, _str(1, "com.microsoft") + _int(2, 1))
    return model + _bytes(7, graph)


class Graph:
    """A graph being written: nodes, constants and external weights, then one session.

    `add` names a node's output itself; `external` hands an array the session reads in place
    (kept alive with the session); `const` embeds a small one.
    """

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.inits: list[Initializer] = []
        self._ext_names: list[str] = []
        self._ext_values: list[object] = []
        self._keep: list[object] = []
        self._names: set[str] = set()

    def _fresh(self, tag: str) -> str:
        name, i = tag, 1
        while name in self._names:
            name, i = f"{tag}.{i}", i + 1
        self._names.add(name)
        return name

    def const(self, tag: str, arr: np.ndarray) -> str:
        arr = np.asarray(arr)
        name = self._fresh(tag)
        self.inits.append(Initializer(name, arr.dtype, tuple(arr.shape), arr.tobytes()))
        return name

    def external(self, tag: str, arr: np.ndarray) -> str:
        import onnxruntime as ort

        arr = np.ascontiguousarray(arr)
        name = self._fresh(tag)
        self.inits.append(Initializer(name, arr.dtype, tuple(arr.shape), location=name,
                                      offset=0, length=int(arr.nbytes)))
        value = ort.OrtValue.ortvalue_from_numpy(arr)
        self._keep += [arr, value]
        self._ext_names.append(name)
        self._ext_values.append(value)
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = "",
             **attrs: int | float | tuple[int, ...]) -> None:
        self.nodes.append(Node(op, list(inputs), list(outputs), dict(attrs), domain))

    def add(self, op: str, inputs: Sequence[str], domain: str = "",
            **attrs: int | float | tuple[int, ...]) -> str:
        """A node with one output, named here; returns that name."""
        out = self._fresh(op.lower())
        self.node(op, inputs, [out], domain, **attrs)
        return out

    def split(self, x: str, sizes: Sequence[int], axis: int = 1) -> list[str]:
        outs = [self._fresh("part") for _ in sizes]
        self.node("Split", [x, self.const("sizes", np.array(sizes, dtype=np.int64))], outs,
                  axis=axis)
        return outs

    def rename(self, old: str, new: str) -> None:
        """Make the value `old` the graph output `new`."""
        self._names.add(new)
        self.nodes = [Node(n.op_type, [new if i == old else i for i in n.inputs],
                           [new if o == old else o for o in n.outputs], n.attrs, n.domain)
                      for n in self.nodes]

    def session(self, inputs: Sequence[tuple[str, np.dtype, Sequence[int | str]]],
                outputs: Sequence[tuple[str, np.dtype, Sequence[int | str]]], name: str,
                threads: int) -> tuple[Any, list[object]]:
        """Build the session on `threads` threads: (its bound run call, what it reads from).
        Raises ValueError naming `name` if onnxruntime refuses the graph."""
        import onnxruntime as ort

        proto = model_bytes(self.nodes, inputs, outputs, self.inits)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = False  # outputs are freed, not kept at their largest size
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # no spinning: between calls the numpy side needs the cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.add_external_initializers(self._ext_names, self._ext_values)
        try:
            session = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types
            raise ValueError(f"tensor {name}: onnxruntime refused its kernel ({e})") from e
        return session._sess.run, [session, *self._keep]
