"""The hardware model against this machine: predicted against measured time of a
local round and peak memory, for LoRA training (FedIT) and zeroth-order steps
(FedKSeed) on the configured model.

    .venv/bin/python benchmarks/hardware_calibration.py simulations/default.toml

This machine becomes a device profile whose compute throughput is measured, not
assumed: the FLOP/s of single-threaded float32 matrix products shaped like the
model's linear layers (one thread, as a simulated client has). The time model then
predicts each workload from the tokens it really processed; the memory model from
the model's shape. Each workload runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from one_client import in_fresh_process, initial_adapter, peak_rss_bytes
from transformers import AutoTokenizer

from fedtune.config import load_config
from fedtune.hardware.catalogue import DeviceProfile
from fedtune.hardware.cost import FRAMEWORK_BYTES, ModelShape, compute_seconds, peak_memory
from fedtune.methods import ClientJob, get_method
from fedtune.models import resolve_model_path
from fedtune.task import client_data, load_model

KINDS = {"lora": ("fedit", "adapter"), "zo": ("fedkseed", "zeroth_order")}


def matmul_flops(hidden: int, rows: int = 512, repeats: int = 20) -> float:
    """Median FLOP/s of (rows x hidden) @ (hidden x 4 hidden) products, one thread."""
    a, w = torch.randn(rows, hidden), torch.randn(hidden, 4 * hidden)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ w
        times.append(time.perf_counter() - started)
    return 2 * rows * hidden * 4 * hidden / statistics.median(times)


def workload(config_path: str, mode: str, steps: int) -> dict:
    torch.set_num_threads(1)
    method_name, _ = KINDS.get(mode, ("fedit", ""))
    config = load_config(config_path, [f"train.local_steps={steps}", f"federation.method={method_name}"])
    if mode == "framework":  # torch, transformers and the tokenizer, as a client process has them, no weights
        AutoTokenizer.from_pretrained(resolve_model_path(config.model))
        return {"peak_rss": peak_rss_bytes()}
    classifier = load_model(config)
    method = get_method(config)
    data = client_data(config, 0)
    downlink = initial_adapter(classifier, config) if mode == "lora" else {}
    started = time.perf_counter()
    result = method.client_train(classifier, downlink, ClientJob(0, data, seed=1))
    elapsed = time.perf_counter() - started
    shape = ModelShape.of(classifier.model)
    trained = sum(t.numel() for t in result.tensors.values()) if mode == "lora" else max(
        t.param.numel() for t in method.tuned(classifier)
    )
    return {
        "seconds": elapsed,
        "tokens": int(result.metrics["tokens"]),
        "context": result.metrics["tokens"] / result.metrics["sequences"],
        "peak_rss": peak_rss_bytes(),
        "trained": trained,
        "shape": [shape.params, shape.embedding_params, shape.layers, shape.hidden, shape.heads],
        "flops": matmul_flops(shape.hidden),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mode", choices=["lora", "zo", "framework"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(workload(args.config, args.mode, args.steps)))
        return

    def run(mode: str) -> dict:
        return in_fresh_process(__file__, args.config, args.steps, mode)

    framework = run("framework")["peak_rss"]
    print(f"framework alone (torch, transformers, the tokenizer): peak RSS {framework / 1e6:,.0f} MB; "
          f"the memory model assumes {FRAMEWORK_BYTES / 1e6:,.0f} MB")
    config = load_config(args.config)
    print("\n| workload | tokens | measured s | predicted s | predicted / measured | measured peak MB | predicted peak MB | predicted / measured |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, (method_name, kind) in KINDS.items():
        r = run(mode)
        shape = ModelShape(*r["shape"])
        device = DeviceProfile("this machine", r["flops"], 1e12, 1e9, 1e9, 0.0, 1.0, 0.0)
        predicted_s = compute_seconds(shape, kind, r["tokens"], r["context"], device)
        # Memory: the longest batch sets the peak; the model takes the configured batch at that length.
        predicted_rss = peak_memory(shape, kind, config.train.batch_size, round(r["context"]), r["trained"])
        print(f"| {method_name} ({kind}), {args.steps} steps | {r['tokens']:,} | {r['seconds']:.1f} | {predicted_s:.1f} "
              f"| {predicted_s / r['seconds']:.2f} | {r['peak_rss'] / 1e6:,.0f} | {predicted_rss / 1e6:,.0f} "
              f"| {predicted_rss / r['peak_rss']:.2f} |")
    print(f"\nthis machine: {r['flops'] / 1e9:.1f} GFLOP/s measured on float32 matrix products, one thread")


if __name__ == "__main__":
    main()
