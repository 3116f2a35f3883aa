"""Named tensors <-> the ``fedtune.Payload`` protobuf message (proto/fedtune.proto).

Everything a method sends crosses the network as these bytes, and the ledger
counts exactly ``len()`` of them. Tensors are encoded by a codec chain
(:mod:`fedtune.codecs`); its lossless stage, if any, compresses them all at once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import zstandard
from google.protobuf.message import DecodeError

from fedtune.codecs.dense import PayloadError
from fedtune.codecs.spec import Chain, parse_chain
from fedtune.codecs.tensor import PLAIN, TensorDict, decode_tensor, encode_tensor
from fedtune.errors import FedtuneError
from fedtune.proto import fedtune_pb2 as pb

MAX_DECOMPRESSED = 2**31  # bytes: a larger inflated payload is refused, not allocated
MAX_PAYLOAD = 2**31 - 2**20  # bytes: protobuf and Flower's gRPC channels stop at 2 GiB
UNKNOWN_SIZE = 2**64 - 1  # a zstd frame header's content size when the frame does not declare it


class PayloadTooLarge(FedtuneError):
    """A payload over what one protobuf message and one gRPC message can carry."""

__all__ = ["Payload", "PayloadError", "PayloadTooLarge", "TensorDict", "decode", "encode"]


@dataclass(frozen=True)
class Payload:
    method: str
    round: int
    client: str
    tensors: TensorDict
    num_examples: int = 0
    codec: tuple[str, ...] = ()  # the chain the tensors were encoded with


def encode(
    payload: Payload,
    chain: Chain = PLAIN,
    generator: torch.Generator | None = None,
    residual: TensorDict | None = None,
) -> bytes:
    """Serialize ``payload`` with ``chain``. With ``residual`` (error feedback), each
    tensor is sent with its residual added, and the residual becomes what the
    encoding lost: sent + new residual = tensor + old residual, exactly."""
    tensors = []
    for name, t in payload.tensors.items():
        if residual is not None and t.is_floating_point():
            t = t + residual[name] if name in residual else t
            msg = encode_tensor(name, t, chain, generator)
            residual[name] = t - decode_tensor(msg)
        else:
            msg = encode_tensor(name, t, chain, generator)
        tensors.append(msg)
    header = pb.Header(method=payload.method, round=payload.round, client=payload.client, codec=chain.specs)
    msg = pb.Payload(header=header, num_examples=payload.num_examples)
    if chain.lossless:
        inner = pb.Tensors(tensors=tensors)
        _check_size(inner.ByteSize(), payload)
        msg.compressed = _compress(chain.lossless, inner.SerializeToString())
    else:
        msg.tensors.extend(tensors)
    _check_size(msg.ByteSize(), payload)
    return msg.SerializeToString()


def _check_size(size: int, payload: Payload) -> None:
    if size > MAX_PAYLOAD:
        raise PayloadTooLarge(
            f"the {payload.method} payload for {payload.client or 'the server'} in round {payload.round} would be "
            f"{size:,} bytes, over the {MAX_PAYLOAD:,}-byte limit of a protobuf/gRPC message; "
            "compress it ([compression] up/down) or tune fewer parameters"
        )


def decode(data: bytes, keep_sparse: bool = False) -> Payload:
    """The payload in ``data``; PayloadError if it is malformed. For what a client
    sends, the server uses :mod:`fedtune.rounds.validation`, which bounds every size
    by what it expects first. ``keep_sparse``: see :func:`fedtune.codecs.tensor.decode_tensor`."""
    msg = parse(data)
    h = msg.header
    try:
        chain = parse_chain(list(h.codec), "header.codec")
    except FedtuneError as exc:
        raise PayloadError(str(exc)) from None
    tensors: TensorDict = {}
    for t in tensor_messages(msg, chain, MAX_DECOMPRESSED):
        if t.name in tensors:
            raise PayloadError(f"tensor {t.name!r} appears twice")
        tensors[t.name] = decode_tensor(t, keep_sparse=keep_sparse)
    return Payload(h.method, h.round, h.client, tensors, msg.num_examples, tuple(h.codec))


def parse(data: bytes) -> pb.Payload:
    msg = pb.Payload()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise PayloadError(f"not a fedtune payload: {exc}") from None
    return msg


def tensor_messages(msg: pb.Payload, chain: Chain, limit: int) -> list[pb.Tensor]:
    """The payload's tensor messages, inflated first (at most ``limit`` bytes) if the
    chain has a lossless stage."""
    if not msg.compressed:
        if chain.lossless and len(msg.tensors):
            raise PayloadError(f"the header's chain compresses with {chain.lossless}, but the tensors are not")
        return list(msg.tensors)
    if not chain.lossless or len(msg.tensors):
        raise PayloadError("compressed tensors without a lossless codec in the header, or both forms")
    inner = pb.Tensors()
    try:
        inner.ParseFromString(inflate(chain.lossless, msg.compressed, limit))
    except DecodeError as exc:
        raise PayloadError(f"compressed tensors do not parse: {exc}") from None
    return list(inner.tensors)


def _compress(kind: str, raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(raw) if kind == "zstd" else zlib.compress(raw, 6)


def inflate(kind: str, data: bytes, limit: int) -> bytes:
    """Decompress ``data``, allocating at most ``limit`` bytes (and a zstd window no
    larger): a stream that inflates beyond is refused, not decompressed."""
    try:
        if kind == "zstd":
            window = max(1 << 10, 1 << max(0, limit - 1).bit_length())
            frame = zstandard.get_frame_parameters(data)
            declared = frame.content_size if frame.content_size != UNKNOWN_SIZE else 0
            if declared > limit or frame.window_size > window:
                raise PayloadError(f"zstd payload inflates beyond {limit:,} bytes (its frame declares "
                                   f"{declared:,} bytes and a {frame.window_size:,}-byte window)")
            reader = zstandard.ZstdDecompressor(max_window_size=window).stream_reader(data, read_across_frames=True)
            raw = reader.read(limit + 1)
        else:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(data, limit + 1)
    except (zstandard.ZstdError, zlib.error) as exc:
        raise PayloadError(f"{kind} payload does not decompress: {exc}") from None
    if len(raw) > limit:
        raise PayloadError(f"{kind} payload inflates beyond {limit:,} bytes")
    return raw
