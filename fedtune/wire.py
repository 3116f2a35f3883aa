"""Named tensors <-> the ``fedtune.Payload`` protobuf message (proto/fedtune.proto).

Everything a method sends crosses the network as these bytes, and the ledger
counts exactly ``len()`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from google.protobuf.message import DecodeError

from fedtune.proto import fedtune_pb2 as pb

TensorDict = dict[str, torch.Tensor]

# torch dtype <-> wire dtype. bfloat16 has no numpy type, so it travels as its raw
# 16-bit pattern (see _to_bytes / _from_bytes).
_TO_WIRE = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int64: pb.INT64,
    torch.int32: pb.INT32,
    torch.int8: pb.INT8,
    torch.uint8: pb.UINT8,
}
_FROM_WIRE = {wire: dtype for dtype, wire in _TO_WIRE.items()}


class PayloadError(ValueError):
    """A payload that cannot be decoded: corrupt bytes, unknown dtype, size mismatch."""


@dataclass(frozen=True)
class Payload:
    method: str
    round: int
    client: str
    tensors: TensorDict
    num_examples: int = 0


def encode(payload: Payload) -> bytes:
    msg = pb.Payload(
        header=pb.Header(method=payload.method, round=payload.round, client=payload.client),
        tensors=[_tensor_to_proto(name, t) for name, t in payload.tensors.items()],
        num_examples=payload.num_examples,
    )
    return msg.SerializeToString()


def decode(data: bytes) -> Payload:
    msg = pb.Payload()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise PayloadError(f"not a fedtune payload: {exc}") from None
    tensors: TensorDict = {}
    for t in msg.tensors:
        if t.name in tensors:
            raise PayloadError(f"tensor {t.name!r} appears twice")
        tensors[t.name] = _tensor_from_proto(t)
    h = msg.header
    return Payload(h.method, h.round, h.client, tensors, msg.num_examples)


def _tensor_to_proto(name: str, t: torch.Tensor) -> pb.Tensor:
    if t.dtype not in _TO_WIRE:
        raise TypeError(f"tensor {name!r}: dtype {t.dtype} has no wire encoding")
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return pb.Tensor(name=name, dtype=_TO_WIRE[t.dtype], shape=list(t.shape), data=raw.numpy().tobytes())


def _tensor_from_proto(t: pb.Tensor) -> torch.Tensor:
    dtype = _FROM_WIRE.get(t.dtype)
    if dtype is None:
        raise PayloadError(f"tensor {t.name!r}: unknown dtype code {t.dtype}")
    if any(d < 0 for d in t.shape):
        raise PayloadError(f"tensor {t.name!r}: negative dimension in shape {list(t.shape)}")
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    expected = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
    if len(t.data) != expected:
        raise PayloadError(
            f"tensor {t.name!r}: {len(t.data)} bytes for shape {list(t.shape)} of {dtype}, expected {expected}"
        )
    # Copy: frombuffer over protobuf bytes is read-only.
    values = torch.from_numpy(np.frombuffer(t.data, dtype=np_dtype).copy()).reshape(tuple(t.shape))
    return values.view(torch.bfloat16) if dtype == torch.bfloat16 else values
