"""One tensor <-> one ``fedtune.Tensor`` message, through a chain of an optional
sparsifier and an optional value codec (the lossless stage is payload-wide, in
:mod:`fedtune.wire`). Decoding needs no configuration: every message says how it
was encoded."""

from __future__ import annotations

import numpy as np
import torch

from fedtune.codecs.dense import TO_WIRE, PayloadError, from_bytes, to_bytes, wire_dtype
from fedtune.codecs.quantize import dequantize, quantize, ternarize
from fedtune.codecs.spec import Chain
from fedtune.proto import fedtune_pb2 as pb

PLAIN = Chain()
TensorDict = dict[str, torch.Tensor]  # named tensors: what methods speak and payloads carry


def encode_tensor(name: str, t: torch.Tensor, chain: Chain, generator: torch.Generator | None = None) -> pb.Tensor:
    if t.dtype not in TO_WIRE:
        raise TypeError(f"tensor {name!r}: dtype {t.dtype} has no wire encoding")
    msg = pb.Tensor(name=name, dtype=TO_WIRE[t.dtype], shape=list(t.shape))
    if not chain.lossy or not t.is_floating_point() or t.numel() == 0:
        msg.data = to_bytes(t)  # integers (seed indices, masks) always travel exactly
        return msg
    generator = generator or torch.Generator().manual_seed(0)
    values = t.detach().float()
    if chain.sparsifier and t.dim() > 0:
        flat = values.flatten()
        k = max(1, round(chain.fraction * flat.numel()))
        if chain.sparsifier == "topk":
            kept = torch.topk(flat.abs(), k, sorted=False).indices
        else:
            kept = torch.randperm(flat.numel(), generator=generator)[:k]
        kept = kept.sort().values
        msg.sparse.indices = kept.to(torch.int32).numpy().astype("<u4").tobytes()
        msg.sparse.values.CopyFrom(pb.Tensor(dtype=TO_WIRE[t.dtype], shape=[k]))  # unnamed: saves bytes
        _encode_values(msg.sparse.values, flat[kept], t.dtype, chain, generator)
    else:
        _encode_values(msg, values, t.dtype, chain, generator)
    return msg


def _encode_values(msg: pb.Tensor, values: torch.Tensor, dtype: torch.dtype, chain: Chain, generator) -> None:
    if chain.cast:
        cast = getattr(torch, chain.cast)
        msg.stored = TO_WIRE[cast]
        msg.data = to_bytes(values.to(cast))
    elif chain.bits:
        msg.quantized.CopyFrom(quantize(values, chain.bits, chain.per_row, generator))
    elif chain.ternary:
        msg.quantized.CopyFrom(ternarize(values))
    else:
        msg.data = to_bytes(values.to(dtype))


def decode_tensor(msg: pb.Tensor, nested: bool = False, keep_sparse: bool = False) -> torch.Tensor:
    """The tensor ``msg`` holds; PayloadError if it is malformed. With ``keep_sparse``
    a sparsified tensor stays a torch sparse COO tensor (for aggregation without
    densifying each client's update)."""
    dtype = wire_dtype(msg.dtype, msg.name)
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise PayloadError(f"tensor {msg.name!r}: negative dimension in shape {list(shape)}")
    encodings = [bool(msg.data) or msg.stored != 0, msg.HasField("quantized"), msg.HasField("sparse")]
    if sum(encodings) > 1:
        raise PayloadError(f"tensor {msg.name!r}: more than one encoding")
    if msg.HasField("sparse"):
        if nested:
            raise PayloadError(f"tensor {msg.name!r}: sparse values may not be sparse again")
        return _decode_sparse(msg, dtype, shape, keep_sparse)
    if msg.HasField("quantized"):
        return dequantize(msg.quantized, shape, msg.name).to(dtype)
    stored = wire_dtype(msg.stored, msg.name) if msg.stored else dtype
    return from_bytes(msg.data, stored, shape, msg.name).to(dtype)


def _decode_sparse(msg: pb.Tensor, dtype: torch.dtype, shape: tuple[int, ...], keep_sparse: bool) -> torch.Tensor:
    n = int(np.prod(shape, dtype=np.int64))
    raw = msg.sparse.indices
    if len(raw) % 4:
        raise PayloadError(f"tensor {msg.name!r}: {len(raw)} bytes of uint32 indices")
    indices = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    if len(indices) and (indices[-1] >= n or np.any(np.diff(indices) <= 0)):
        raise PayloadError(f"tensor {msg.name!r}: sparse indices not ascending within {n} entries")
    msg.sparse.values.name = msg.name  # for error messages
    values = decode_tensor(msg.sparse.values, nested=True)
    if values.shape != (len(indices),):
        raise PayloadError(f"tensor {msg.name!r}: {tuple(values.shape)} values for {len(indices)} indices")
    if keep_sparse and shape:
        coords = torch.from_numpy(np.stack(np.unravel_index(indices, shape)))
        # Indices were checked above (ascending, in range), so skip torch's own checks.
        return torch.sparse_coo_tensor(coords, values.to(dtype), shape, is_coalesced=True, check_invariants=False)
    dense = torch.zeros(n, dtype=dtype)
    dense[torch.from_numpy(indices)] = values.to(dtype)
    return dense.reshape(shape)
