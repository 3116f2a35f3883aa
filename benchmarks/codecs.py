"""Encode and decode throughput of every codec on a real LoRA adapter, against a
plain memory copy of the same tensors.

    .venv/bin/python benchmarks/codecs.py simulations/default.toml

The adapter is FedIT's on the config's model (SmolLM2: rank 8 on q and v, 1.8 MB),
with B drawn at random so that nothing compresses trivially. One thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedtune import wire
from fedtune.codecs.spec import parse_chain
from fedtune.config import load_config
from fedtune.methods import get_method
from fedtune.task import load_model

CHAINS = [
    [], ["float16"], ["bfloat16"], ["int8"], ["int8:row"], ["int4"], ["ternary"], ["topk:0.05"],
    ["randk:0.05"], ["topk:0.05", "int8"], ["int8", "zstd"], ["int8", "deflate"], ["zstd"],
]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    method = get_method(load_config(args.config))
    method.server_init(load_model(method.config))
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(t.shape, generator=g) * 0.01 for n, t in method.server_downlink(0).items()}
    raw_mb = sum(t.numel() * 4 for t in tensors.values()) / 1e6
    copy_s = median_time(lambda: {n: t.clone() for n, t in tensors.items()}, args.repeats)
    print(f"adapter: {len(tensors)} tensors, {raw_mb:.2f} MB float32; memory copy {raw_mb / copy_s:,.0f} MB/s\n")
    print("| chain | bytes | ratio | encode MB/s | decode MB/s | encode / copy time | decode / copy time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for specs in CHAINS:
        chain = parse_chain(specs, "chain")
        payload = wire.Payload("fedit", 1, "client-0", tensors)
        data = wire.encode(payload, chain, torch.Generator().manual_seed(1))
        enc = median_time(lambda: wire.encode(payload, chain, torch.Generator().manual_seed(1)), args.repeats)
        dec = median_time(lambda: wire.decode(data), args.repeats)
        print(f"| {' + '.join(specs) or 'float32'} | {len(data):,} | {raw_mb * 1e6 / len(data):.1f}x "
              f"| {raw_mb / enc:,.0f} | {raw_mb / dec:,.0f} | {enc / copy_s:.0f}x | {dec / copy_s:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
