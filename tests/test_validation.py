"""The server's uplink validation under 10,000 generated payloads: well-formed ones
pass; shapes at the edge of int64, wrong dtypes and encodings, sparse and quantized
fields that lie about their sizes, zstd and deflate streams that inflate a
thousandfold, truncated and random bytes are each refused by a check that foresaw
them (never by the catch-all), and no exception escapes. Peak memory and time per
rejected payload: benchmarks/validation.py."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
import zstandard

from fedtune import wire
from fedtune.codecs.spec import parse_chain
from fedtune.methods.base import TensorSpec
from fedtune.proto import fedtune_pb2 as pb
from fedtune.rounds.validation import Expected, validate_payload

SPEC = {
    "a": TensorSpec(torch.float32, (8, 16)),
    "b": TensorSpec(torch.float32, (16,)),
    "ids": TensorSpec(torch.int32, (4,)),
}
OVERFLOWING = [[2**32, 2**32], [2**62, 4], [2**63 - 1], [2**31, 2**31, 4], [8, 2**61], [0, 8], [8, 16, 1], [128], []]


def _expected(chain_specs: list[str]) -> Expected:
    reference = {"a": torch.zeros(8, 16), "b": torch.zeros(16), "ids": torch.zeros(4, dtype=torch.int32)}
    return Expected("fedit", 3, 1, SPEC, parse_chain(chain_specs, "compression.up"), 40, 3, lambda: reference, lambda u: None)


def _honest(rng: random.Random) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return {"a": torch.randn(8, 16, generator=g), "b": torch.randn(16, generator=g), "ids": torch.arange(4, dtype=torch.int32)}


def _message(tensors: list[pb.Tensor], chain: list[str], compressed: bytes = b"", examples: int = 40, **header) -> bytes:
    h = pb.Header(**{"method": "fedit", "round": 3, "client": "client-1", "codec": chain} | header)
    msg = pb.Payload(header=h, num_examples=examples)
    if compressed:
        msg.compressed = compressed
    else:
        msg.tensors.extend(tensors)
    return msg.SerializeToString()


def _valid(rng: random.Random, chain: list[str]) -> bytes:
    payload = wire.Payload("fedit", 3, "client-1", _honest(rng), 40)
    return wire.encode(payload, parse_chain(chain, "compression.up"), torch.Generator().manual_seed(rng.randrange(999)))


def _lying_tensors(rng: random.Random) -> list[pb.Tensor]:
    """Tensor messages whose declared shapes, dtypes or encodings do not add up."""
    good = {n: m for n, m in zip(SPEC, pb.Payload.FromString(_valid(rng, [])).tensors)}
    name = rng.choice(sorted(SPEC))
    bad = pb.Tensor()
    bad.CopyFrom(good[name])
    kind = rng.randrange(7)
    if kind == 0:
        del bad.shape[:]
        bad.shape.extend(rng.choice(OVERFLOWING))
    elif kind == 1:
        bad.dtype = rng.choice([c for c in range(20) if c != bad.dtype])
    elif kind == 2:  # sparse values that claim huge counts
        bad.ClearField("data")
        k = rng.choice([2**62, 2**31, 129, 3])
        bad.sparse.indices = bytes(range(4 * min(k, 8)))[::-1]  # and descending, for a count that fits
        bad.sparse.values.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[k], data=b"\0" * 4 * min(k, 8)))
    elif kind == 3:  # quantized codes with impossible bits, offsets, scales
        bad.ClearField("data")
        bad.quantized.CopyFrom(pb.Quantized(bits=rng.choice([0, 1, 9, 255, 2**31]), offset=rng.randrange(2**32),
                                            scales=rng.randbytes(rng.randrange(12)), packed=rng.randbytes(rng.randrange(300))))
    elif kind == 4:  # data of the wrong length, or a cast that is not one
        bad.data = rng.randbytes(2 * rng.randrange(500) + 1)  # odd: no whole number of values
        bad.stored = rng.randrange(0, 9)
    elif kind == 5:
        bad.name = rng.choice(["", "intruder", name * 3, *(n for n in SPEC if n != name)])
    else:  # two encodings at once
        bad.quantized.CopyFrom(pb.Quantized(bits=8, packed=b"\1" * 128, scales=b"\0" * 4))
    return [bad if n == name else m for n, m in good.items()]


def _bomb(rng: random.Random, kind: str) -> bytes:
    """A stream that inflates a thousandfold or more, past any template's size."""
    raw = b"\0" * rng.choice([2**20, 2**22]) if rng.random() < 0.5 else pb.Tensors(tensors=[
        pb.Tensor(name="a", dtype=pb.FLOAT32, shape=[8, 16], data=b"\0" * rng.choice([2**20, 2**22]))]).SerializeToString()
    return zstandard.ZstdCompressor(level=rng.choice([1, 3, 19])).compress(raw) if kind == "zstd" else zlib.compress(raw, 9)


def _generated(rng: random.Random):
    """(payload, chain, whether it must pass) for one random case of each family."""
    yield _valid(rng, []), [], True
    yield _valid(rng, ["int8", "zstd"]), ["int8", "zstd"], True
    yield _valid(rng, ["topk:0.25", "int4", "deflate"]), ["topk:0.25", "int4", "deflate"], True
    yield _message(_lying_tensors(rng), []), [], False
    yield _message([], ["zstd"], _bomb(rng, "zstd")), ["zstd"], False
    yield _message([], ["deflate"], _bomb(rng, "deflate")), ["deflate"], False
    yield _message([], ["zstd"], rng.randbytes(rng.randrange(1, 200))), ["zstd"], False
    yield _message([], [], _bomb(rng, "zstd")), [], False  # compressed, but the configured chain does not compress
    yield _valid(rng, [])[: rng.randrange(1, 200)], [], False
    yield rng.randbytes(rng.randrange(1, 3000)), [], False
    yield _message(list(pb.Payload.FromString(_valid(rng, [])).tensors), [], examples=rng.choice([0, 39, 2**62, 2**64 - 1])), [], False
    yield _message(list(pb.Payload.FromString(_valid(rng, [])).tensors), ["int8"]), [], False  # another chain than configured
    yield b"\x0a" + bytes([0xFF] * 9) + rng.randbytes(20), [], False  # a length prefix near 2**64


def test_ten_thousand_generated_payloads(tmp_path):
    rng = random.Random(0)
    seen, passed, stages = 0, 0, {}
    expectations = {tuple(c): _expected(c) for c in ([], ["int8", "zstd"], ["topk:0.25", "int4", "deflate"], ["zstd"], ["deflate"])}
    while seen < 10_000:
        for data, chain, must_pass in _generated(rng):
            update, rejection = validate_payload(data, expectations[tuple(chain)])
            seen += 1
            if must_pass:
                assert rejection is None, rejection
                assert {n: (t.dtype, tuple(t.shape)) for n, t in update.tensors.items()} == {
                    n: (s.dtype, s.shape) for n, s in SPEC.items()}
                passed += 1
            else:
                assert update is None and rejection.stage != "error", rejection  # every refusal was foreseen
                stages[rejection.stage] = stages.get(rejection.stage, 0) + 1
    assert passed > 2000
    assert {"size", "structure", "codec", "tensors", "examples"} <= set(stages), stages


@pytest.mark.parametrize("shape", OVERFLOWING[:5])
def test_a_declared_shape_is_compared_never_multiplied(shape):
    """The 121-byte uplink that crashed a run: a shape whose element count wraps in int64."""
    data = _message([pb.Tensor(name=n, dtype=pb.FLOAT32 if n != "ids" else pb.INT32, shape=shape) for n in SPEC], [])
    update, rejection = validate_payload(data, _expected([]))
    assert update is None and rejection.stage == "tensors" and str(tuple(shape)) in rejection.reason
