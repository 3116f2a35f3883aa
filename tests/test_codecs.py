"""Codecs: unbiased quantizers, lossless error feedback, round trips, exact byte
counts, and clear errors for bad chains and corrupt payloads."""

import zlib

import pytest
import torch

from fedtune import wire
from fedtune.codecs.spec import parse_chain
from fedtune.codecs.tensor import decode_tensor, encode_tensor
from fedtune.errors import FedtuneError
from fedtune.proto import fedtune_pb2 as pb

CHAINS = [
    [], ["float16"], ["bfloat16"], ["int8"], ["int4"], ["int4:row"], ["int2"], ["ternary"],
    ["topk:0.1"], ["randk:0.2"], ["topk:0.05", "int8"], ["topk:0.1", "ternary"], ["int8", "zstd"],
    ["topk:0.1", "float16", "deflate"], ["zstd"],
]


def _roundtrip(chain_specs, tensors, seed=0, residual=None):
    chain = parse_chain(chain_specs, "compression.up")
    data = wire.encode(wire.Payload("fedit", 3, "client-1", tensors, 40), chain, torch.Generator().manual_seed(seed), residual)
    return data, wire.decode(data)


@pytest.mark.parametrize("specs", CHAINS, ids=lambda s: "+".join(s) or "plain")
def test_every_codec_roundtrips_names_shapes_dtypes(specs):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "a.lora_A.weight": torch.randn(8, 64, generator=g),
        "half": torch.randn(4, 5, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(0.25),
        "empty": torch.zeros(0, 3),
        "seeds": torch.arange(7, dtype=torch.int32),  # integers always travel exactly
    }
    _, out = _roundtrip(specs, tensors)
    assert out.codec == tuple(specs) and (out.method, out.round, out.client, out.num_examples) == ("fedit", 3, "client-1", 40)
    assert list(out.tensors) == list(tensors)
    for name, t in tensors.items():
        assert out.tensors[name].dtype == t.dtype and out.tensors[name].shape == t.shape
    assert torch.equal(out.tensors["seeds"], tensors["seeds"])
    if not specs or specs == ["zstd"]:
        assert all(torch.equal(out.tensors[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("specs", [["int8"], ["int4"], ["int4:row"], ["int2"]])
def test_stochastic_quantizers_are_unbiased(specs):
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    chain = parse_chain(specs, "compression.up")
    draws = 3000
    g = torch.Generator().manual_seed(1)
    mean = sum(decode_tensor(encode_tensor("x", x, chain, g)) for _ in range(draws)) / draws
    # Each draw's error is within one step s and has variance <= s^2 / 4.
    step = x.abs().max() / (2 ** (chain.bits - 1) - 1)
    assert (mean - x).abs().max() < 5 * step / (2 * draws**0.5)
    single = decode_tensor(encode_tensor("x", x, chain, g))
    assert not torch.equal(single, x) and (single - x).abs().max() <= step * (1 + 1e-5)


@pytest.mark.parametrize("specs", [["topk:0.05"], ["randk:0.1"], ["topk:0.1", "ternary"], ["topk:0.1", "int4"]])
def test_error_feedback_loses_nothing_over_time(specs):
    g = torch.Generator().manual_seed(2)
    updates = [{"w": torch.randn(16, 32, generator=g), "b": torch.randn(32, generator=g)} for _ in range(25)]
    residual, sent = {}, {"w": torch.zeros(16, 32), "b": torch.zeros(32)}
    for i, u in enumerate(updates):
        _, out = _roundtrip(specs, u, seed=i, residual=residual)
        for n in sent:
            sent[n] += out.tensors[n]
    for n in sent:  # everything sent plus what is still owed equals everything produced
        torch.testing.assert_close(sent[n] + residual[n], sum(u[n] for u in updates), rtol=0, atol=1e-4)
        assert residual[n].abs().sum() > 0  # the codec really dropped something each round


def test_ledger_sized_payloads_shrink_as_the_codec_says():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    size = {tuple(s): len(_roundtrip(s, {"w": w})[0]) for s in ([], ["float16"], ["int8"], ["int4"], ["topk:0.1"], ["topk:0.1", "int8"])}
    raw = w.numel() * 4
    assert raw < size[()] < raw + 60
    assert size[("float16",)] == pytest.approx(raw / 2, abs=60)
    assert size[("int8",)] == pytest.approx(raw / 4 + 4, abs=60)
    assert size[("int4",)] == pytest.approx(raw / 8 + 4, abs=60)
    kept = round(0.1 * w.numel())
    assert size[("topk:0.1",)] == pytest.approx(kept * 8, abs=100)  # uint32 index + float32 value
    assert size[("topk:0.1", "int8")] == pytest.approx(kept * 5, abs=100)


@pytest.mark.parametrize(
    "specs, message",
    [
        (["int9"], "codec 'int9' has 9 bits; use 2 to 8"),
        (["int1"], "codec 'int1' has 1 bits; use 2 to 8"),
        (["gzip"], "unknown codec 'gzip'"),
        (["topk"], "codec 'topk' needs a kept fraction in (0, 1]"),
        (["topk:1.5"], "codec 'topk:1.5' needs a kept fraction in (0, 1]"),
        (["int8", "topk:0.1"], "codec 'topk:0.1' is out of place (a sparsifier comes first)"),
        (["zstd", "int8"], "codec 'int8' is out of place"),
        (["int8", "float16"], "codec 'float16' is out of place"),
    ],
)
def test_bad_chains_are_one_line_errors(specs, message):
    with pytest.raises(FedtuneError, match="^config key compression.up: " + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_chain(specs, "compression.up")


def test_downlink_may_not_drop_the_model(tmp_path):
    from conftest import small_config

    with pytest.raises(FedtuneError, match="config key compression.down must be free of sparsifiers and ternary"):
        small_config(tmp_path, compression={"down": ["topk:0.1"]})
    with pytest.raises(FedtuneError, match="does not apply to federation.method 'fedkseed'"):
        from fedtune.methods import get_method

        get_method(small_config(tmp_path, federation={"method": "fedkseed"}, compression={"up": ["int8"]}))


def _tamper(data: bytes, edit) -> bytes:
    msg = pb.Payload()
    msg.ParseFromString(data)
    edit(msg)
    return msg.SerializeToString()


def test_corrupt_encoded_payloads_are_refused():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    quantized, _ = _roundtrip(["int4"], {"w": w})
    sparse, _ = _roundtrip(["topk:0.25"], {"w": w})
    packed, _ = _roundtrip(["int8", "zstd"], {"w": w})
    cases = {
        "bytes of 4-bit codes": _tamper(quantized, lambda m: setattr(m.tensors[0].quantized, "packed", m.tensors[0].quantized.packed[:-1])),
        "bytes of scales": _tamper(quantized, lambda m: setattr(m.tensors[0].quantized, "scales", b"")),
        "17-bit codes": _tamper(quantized, lambda m: setattr(m.tensors[0].quantized, "bits", 17)),
        "sparse indices not ascending": _tamper(sparse, lambda m: setattr(m.tensors[0].sparse, "indices", (500).to_bytes(4, "little") * 32)),
        "values for 31 indices": _tamper(sparse, lambda m: setattr(m.tensors[0].sparse, "indices", m.tensors[0].sparse.indices[:-4])),
        # Inflated as a stream, never more than the bound: a cut frame yields bytes that do not parse.
        "compressed tensors do not parse: Error": _tamper(packed, lambda m: setattr(m, "compressed", m.compressed[:-5])),
        "zstd payload does not decompress": _tamper(packed, lambda m: setattr(m, "compressed", b"\x01\x02\x03\x04" * 4)),
        "deflate payload does not decompress": _tamper(packed, lambda m: (m.header.codec.__setitem__(1, "deflate"))),
        "unknown codec 'lz4'": _tamper(packed, lambda m: m.header.codec.__setitem__(1, "lz4")),
        "compressed tensors do not parse": _tamper(packed, lambda m: setattr(m, "compressed", __import__("zstandard").ZstdCompressor().compress(b"\xff" * 9))),
        "not a fedtune payload": packed[:-3],
    }
    for reason, data in cases.items():
        with pytest.raises(wire.PayloadError, match=reason):
            wire.decode(data)
    bomb = _tamper(packed, lambda m: (m.header.codec.__setitem__(1, "deflate"), setattr(m, "compressed", zlib.compress(b"\0" * 10_000_000))))
    old, wire.MAX_DECOMPRESSED = wire.MAX_DECOMPRESSED, 1_000_000
    try:
        with pytest.raises(wire.PayloadError, match="inflates beyond 1,000,000 bytes"):
            wire.decode(bomb)
    finally:
        wire.MAX_DECOMPRESSED = old


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_roundtrips_any_length(bits):
    import numpy as np

    from fedtune.codecs.quantize import pack, unpack

    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 1001):
        codes = rng.integers(0, 2**bits, n).astype(np.uint8)
        data = pack(codes, bits)
        assert len(data) == -(-n * bits // 8)
        assert np.array_equal(unpack(data, bits, n), codes)


def test_payload_over_the_message_limit_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(wire, "MAX_PAYLOAD", 10_000)
    big = {"w": torch.randn(50, 100)}
    with pytest.raises(wire.PayloadTooLarge, match=r"fedit payload for client-1 in round 3 would be 20,0\d\d bytes, over the 10,000-byte limit"):
        _roundtrip([], big)
    assert len(_roundtrip(["int8"], big)[0]) < 10_000  # a codec brings it under


def test_methods_that_rebuild_server_state_refuse_a_lossy_downlink(tmp_path):
    from conftest import small_config

    from fedtune.methods import get_method

    for method in ("flora", "fed_sb"):
        with pytest.raises(FedtuneError, match=f"compression.down \\['int8'\\] is lossy, but federation.method '{method}'"):
            get_method(small_config(tmp_path, federation={"method": method}, compression={"down": ["int8"]}))
        get_method(small_config(tmp_path, federation={"method": method}, compression={"down": ["zstd"], "up": ["int8"]}))


def test_sparse_updates_are_averaged_without_densifying_them():
    from fedtune.codecs import delta
    from fedtune.methods import ClientUpdate
    from fedtune.rounds.release import by_examples

    g = torch.Generator().manual_seed(5)
    reference = {"w": torch.randn(16, 32, generator=g), "head": torch.randn(2, 8, generator=g)}
    chain = parse_chain(["topk:0.1", "int8"], "compression.up")
    updates, expected = [], {n: torch.zeros_like(t) for n, t in reference.items()}
    for k, n in enumerate([10, 30, 60]):
        local = {name: t + 0.1 * torch.randn(t.shape, generator=g) for name, t in reference.items()}
        data = wire.encode(wire.Payload("fedit", 1, f"client-{k}", delta.relative(local, reference), n), chain, g)
        sparse = wire.decode(data, keep_sparse=True).tensors
        dense = wire.decode(data).tensors
        assert all(t.is_sparse for t in sparse.values())
        assert sparse["w"].coalesce().values().numel() == round(0.1 * 16 * 32)
        updates.append(ClientUpdate(k, sparse, n, reference))
        for name in expected:
            expected[name] += n / 100 * (reference[name] + dense[name])
            torch.testing.assert_close(updates[-1].dense(name), reference[name] + dense[name])
    average = {n: by_examples(updates).average(updates, n, reference[n]) for n in updates[0].tensors}
    for name in expected:
        torch.testing.assert_close(average[name], expected[name])
