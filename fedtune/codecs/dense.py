"""Dense tensors <-> raw little-endian bytes of a wire dtype."""

from __future__ import annotations

import numpy as np
import torch

from fedtune.proto import fedtune_pb2 as pb

# torch dtype <-> wire dtype. bfloat16 has no numpy type, so it travels as its raw
# 16-bit pattern.
TO_WIRE = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int64: pb.INT64,
    torch.int32: pb.INT32,
    torch.int8: pb.INT8,
    torch.uint8: pb.UINT8,
}
FROM_WIRE = {wire: dtype for dtype, wire in TO_WIRE.items()}


class PayloadError(ValueError):
    """A payload that cannot be decoded: corrupt bytes, unknown dtype, size mismatch."""


def to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def wire_dtype(code: int, name: str) -> torch.dtype:
    if code not in FROM_WIRE:
        raise PayloadError(f"tensor {name!r}: unknown dtype code {code}")
    return FROM_WIRE[code]


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> torch.Tensor:
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
    if len(data) != expected:
        raise PayloadError(f"tensor {name!r}: {len(data)} bytes for shape {list(shape)} of {dtype}, expected {expected}")
    # Copy: frombuffer over protobuf bytes is read-only.
    values = torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(shape)
    return values.view(torch.bfloat16) if dtype == torch.bfloat16 else values
