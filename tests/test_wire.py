import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import expected_payload_size

from fedtune import wire

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8]


def _payload(**tensors) -> wire.Payload:
    return wire.Payload("fedit", 7, "client-2", tensors, num_examples=300)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, generator=g) * 50).to(dtype)
    out = wire.decode(wire.encode(_payload(x=t, scalar=t[0, 0].clone(), empty=t[:0])))
    assert (out.method, out.round, out.client, out.num_examples) == ("fedit", 7, "client-2", 300)
    for name, ref in {"x": t, "scalar": t[0, 0], "empty": t[:0]}.items():
        assert out.tensors[name].dtype == dtype and out.tensors[name].shape == ref.shape
        assert torch.equal(out.tensors[name].reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


def test_serialized_size_matches_hand_computed_encoding():
    tensors = {"base_model.lora_A.weight": torch.zeros(8, 576), "head": torch.ones(2, 576, dtype=torch.bfloat16)}
    data = wire.encode(_payload(**tensors))
    assert len(data) == expected_payload_size("fedit", 7, "client-2", tensors, 300)
    raw = 8 * 576 * 4 + 2 * 576 * 2
    assert raw < len(data) < raw + 120  # names, shapes and tags are the only overhead


def test_non_contiguous_tensor_is_sent_in_logical_order():
    t = torch.arange(6.0).reshape(2, 3).T
    assert torch.equal(wire.decode(wire.encode(_payload(t=t))).tensors["t"], t)


def test_corrupt_payloads_raise_payload_error():
    data = wire.encode(_payload(x=torch.ones(4, 4)))
    with pytest.raises(wire.PayloadError, match="not a fedtune payload"):
        wire.decode(data[:-7])  # truncated inside the tensor bytes
    with pytest.raises(wire.PayloadError):
        wire.decode(b"\xff\xff\xff\xff")
    from fedtune.proto import fedtune_pb2 as pb

    msg = pb.Payload.FromString(data)
    msg.tensors[0].shape[:] = [4, 5]
    with pytest.raises(wire.PayloadError, match="expected 80"):
        wire.decode(msg.SerializeToString())
    msg.tensors[0].shape[:] = [4, 4]
    msg.tensors[0].dtype = 99
    with pytest.raises(wire.PayloadError, match="unknown dtype"):
        wire.decode(msg.SerializeToString())
    msg.tensors[0].dtype = pb.FLOAT32
    msg.tensors.append(msg.tensors[0])
    with pytest.raises(wire.PayloadError, match="twice"):
        wire.decode(msg.SerializeToString())


def test_unsupported_dtype_is_refused_on_encode():
    with pytest.raises(TypeError, match="no wire encoding"):
        wire.encode(_payload(x=torch.ones(2, dtype=torch.complex64)))


def test_generated_code_matches_proto(tmp_path):
    """fedtune/proto/*_pb2.py* are committed; they must be what protoc makes of the .proto."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", str(ROOT / "proto" / "fedtune.proto")],
        check=True,
    )
    for name in ("fedtune_pb2.py", "fedtune_pb2.pyi"):
        assert filecmp.cmp(tmp_path / name, ROOT / "fedtune" / "proto" / name, shallow=False), name
