"""What a rejected uplink costs the server: peak memory and time per payload of each
attack family, against the template's size (the stated bound: memory at most a
small constant times the template's float32 bytes).

    .venv/bin/python benchmarks/validation.py [--values 461952] [--repeat 20]

The template is the size of FedIT's adapter on SmolLM2-135M at rank 8 (461,952
float32 values, 1.85 MB) unless --values says otherwise. Each family runs in a
fresh process, so its peak resident memory is its own: the table shows the growth
over that process's baseline (imports, the template, the payload once built; the peak
is restarted there) and the median time per payload.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
import zlib

import torch
import zstandard

from fedtune import wire
from fedtune.codecs.spec import parse_chain
from fedtune.methods.base import TensorSpec
from fedtune.proto import fedtune_pb2 as pb
from fedtune.rounds.validation import Expected, validate_payload

FAMILIES = ["valid", "valid zstd", "shape overflow", "oversized", "zstd bomb", "deflate bomb", "random bytes",
            "claims 2**62 examples", "non-finite"]


def spec(values: int) -> dict[str, TensorSpec]:
    """Four tensors holding ``values`` float32 values between them, like an adapter's layers."""
    rows = values // (4 * 576)
    return {f"layer{i}.lora": TensorSpec(torch.float32, (rows, 576)) for i in range(4)}


def payload(family: str, shapes: dict[str, TensorSpec]) -> tuple[bytes, list[str]]:
    tensors = {n: torch.randn(s.shape) * 0.01 for n, s in shapes.items()}
    plain = wire.encode(wire.Payload("fedit", 1, "client-0", tensors, 40))
    template = 4 * sum(s.numel for s in shapes.values())
    if family == "valid":
        return plain, []
    if family == "valid zstd":
        return wire.encode(wire.Payload("fedit", 1, "client-0", tensors, 40), parse_chain(["zstd"], "up")), ["zstd"]
    if family == "shape overflow":
        msg = pb.Payload(header=pb.Header(method="fedit", round=1, client="client-0"), num_examples=40)
        msg.tensors.extend(pb.Tensor(name=n, dtype=pb.FLOAT32, shape=[2**32, 2**32]) for n in shapes)
        return msg.SerializeToString(), []
    if family == "oversized":
        return plain + plain + plain, []
    if family in ("zstd bomb", "deflate bomb"):
        inner = pb.Tensors(tensors=[pb.Tensor(name=n, dtype=pb.FLOAT32, shape=list(s.shape), data=b"\0" * (256 * template // 4))
                                    for n, s in list(shapes.items())[:1]]).SerializeToString()  # 64x the template
        kind = family.split()[0]
        packed = zstandard.ZstdCompressor(level=19).compress(inner) if kind == "zstd" else zlib.compress(inner, 9)
        msg = pb.Payload(header=pb.Header(method="fedit", round=1, client="client-0", codec=[kind]), num_examples=40, compressed=packed)
        return msg.SerializeToString(), [kind]
    if family == "random bytes":
        return torch.randint(0, 256, (len(plain),), dtype=torch.uint8).numpy().tobytes(), []
    if family == "claims 2**62 examples":
        return wire.encode(wire.Payload("fedit", 1, "client-0", tensors, 2**62)), []
    tensors[next(iter(tensors))][0, 0] = float("nan")
    return wire.encode(wire.Payload("fedit", 1, "client-0", tensors, 40)), []


def reset_peak() -> None:
    """Restart this process's peak resident memory at its current size (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        sys.exit("benchmarks/validation.py: cannot reset the peak RSS (/proc/self/clear_refs), so cannot measure")


def measure(family: str, values: int, repeat: int) -> dict:
    """In this process: peak RSS growth and median seconds per payload of ``family``."""
    shapes = spec(values)
    data, chain = payload(family, shapes)
    expected = Expected("fedit", 1, 0, shapes, parse_chain(chain, "up"), 40, 10, dict, lambda u: None)
    # Building a payload can peak far above what validating it costs (a bomb's inflated
    # stream is 64x the template): free that, and restart the high-water mark from here,
    # or it would hide the validation's own peak.
    gc.collect()
    reset_peak()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, stage = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        _, rejection = validate_payload(data, expected)
        times.append(time.perf_counter() - started)
        stage = rejection.stage if rejection else "accepted"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"family": family, "payload_bytes": len(data), "template_bytes": 4 * values, "outcome": stage,
            "peak_growth_bytes": peak - baseline, "median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=461_952)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--family", help=argparse.SUPPRESS)  # one family, in a child process
    args = parser.parse_args()
    if args.family:
        print(json.dumps(measure(args.family, args.values, args.repeat)))
        return
    print(f"template: {args.values:,} float32 values ({4 * args.values / 1e6:.2f} MB); {args.repeat} payloads per family")
    print(f"{'family':<22} {'payload':>12} {'outcome':<10} {'peak growth':>12} {'/ template':>10} {'median ms':>10}")
    for family in FAMILIES:
        out = subprocess.run([sys.executable, __file__, "--family", family, "--values", str(args.values),
                              "--repeat", str(args.repeat)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        print(f"{family:<22} {r['payload_bytes']:>12,} {r['outcome']:<10} {r['peak_growth_bytes'] / 1e6:>10.2f}MB "
              f"{r['peak_growth_bytes'] / r['template_bytes']:>10.2f} {1000 * r['median_s']:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
