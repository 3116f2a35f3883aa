"""Quantizers: unbiased stochastic int<B> with per-tensor or per-row scales, and
ComPEFT's ternary sign-times-scale. Codes are unsigned and packed B bits each."""

from __future__ import annotations

import numpy as np
import torch

from fedtune.codecs.dense import PayloadError
from fedtune.proto import fedtune_pb2 as pb


def quantize(x: torch.Tensor, bits: int, per_row: bool, generator: torch.Generator) -> pb.Quantized:
    """Symmetric, L = 2^(B-1) - 1 levels each side of zero: q = floor(x / s + u),
    u ~ U[0, 1), so E[q s] = x exactly (stochastic rounding is unbiased)."""
    levels = 2 ** (bits - 1) - 1
    rows = x.reshape(x.shape[0], -1) if per_row and x.dim() > 1 else x.reshape(1, -1)
    scale = rows.abs().amax(dim=1, keepdim=True) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    noise = torch.rand(rows.shape, generator=generator)
    codes = torch.floor(rows / scale + noise).clamp_(-levels, levels).to(torch.int16) + levels
    return pb.Quantized(bits=bits, per_row=rows.shape[0] > 1, scales=scale.flatten().float().numpy().tobytes(),
                        offset=levels, packed=pack(codes.flatten().numpy().astype(np.uint8), bits))


def ternarize(x: torch.Tensor) -> pb.Quantized:
    """ComPEFT: sign(x) times the mean magnitude of the non-zero entries (2-bit codes)."""
    flat = x.flatten()
    nonzero = flat != 0
    scale = flat[nonzero].abs().mean() if nonzero.any() else torch.tensor(1.0)
    codes = (torch.sign(flat).to(torch.int16) + 1).numpy().astype(np.uint8)
    return pb.Quantized(bits=2, scales=scale.float().numpy().tobytes(), offset=1, packed=pack(codes, 2))


def dequantize(q: pb.Quantized, shape: tuple[int, ...], name: str) -> torch.Tensor:
    n = int(np.prod(shape, dtype=np.int64))
    if not 2 <= q.bits <= 8 or q.offset >= 2**q.bits:
        raise PayloadError(f"tensor {name!r}: {q.bits}-bit codes with offset {q.offset}")
    rows = shape[0] if q.per_row and len(shape) > 1 else 1
    if len(q.scales) != 4 * rows:
        raise PayloadError(f"tensor {name!r}: {len(q.scales)} bytes of scales, expected {4 * rows}")
    if len(q.packed) != -(-n * q.bits // 8):
        raise PayloadError(f"tensor {name!r}: {len(q.packed)} bytes of {q.bits}-bit codes for {n} values")
    codes = torch.from_numpy(unpack(q.packed, q.bits, n).astype(np.float32)) - q.offset
    scales = torch.from_numpy(np.frombuffer(q.scales, dtype=np.float32).copy())
    return (codes.reshape(rows, -1) * scales[:, None]).reshape(shape)


def pack(codes: np.ndarray, bits: int) -> bytes:
    """The low ``bits`` bits of each uint8 code, concatenated little-endian."""
    if 8 % bits == 0:  # whole codes per byte: shift and or, 10x faster than bit planes
        per_byte = 8 // bits
        padded = np.zeros(-(-len(codes) // per_byte) * per_byte, dtype=np.uint8)
        padded[: len(codes)] = codes
        lanes = padded.reshape(-1, per_byte)
        return np.bitwise_or.reduce(lanes << (np.arange(per_byte, dtype=np.uint8) * bits), axis=1).astype(np.uint8).tobytes()
    planes = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes, bits: int, n: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        lanes = (raw[:, None] >> (np.arange(per_byte, dtype=np.uint8) * bits)) & (2**bits - 1)
        return lanes.reshape(-1)[:n]
    planes = np.unpackbits(raw, bitorder="little")[: n * bits]
    return np.packbits(planes.reshape(n, bits), axis=1, bitorder="little")[:, 0]
