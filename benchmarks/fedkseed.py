"""FedKSeed on one client: local steps per second, peak memory against LoRA training
and plain inference, and the cost of replaying a round against one forward pass.

    .venv/bin/python benchmarks/fedkseed.py simulations/fedkseed.toml

Each memory figure is the peak RSS of a fresh process that loads the model and runs
only that workload (one thread, as a simulated client has), so they compare directly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from one_client import in_fresh_process, initial_adapter, peak_rss_bytes

from fedtune.config import load_config
from fedtune.methods import ClientJob, get_method
from fedtune.task import client_data, load_model, load_splits


def workload(config_path: str, mode: str, steps: int) -> dict:
    torch.set_num_threads(1)
    overrides = [f"train.local_steps={steps}"]
    if mode == "lora":
        overrides.append("federation.method=fedit")
    config = load_config(config_path, overrides)
    method = get_method(config)
    classifier = load_model(config)
    data = client_data(config, 0)
    loaded = peak_rss_bytes()
    started = time.perf_counter()
    if mode == "inference":  # the forward passes of `steps` zeroth-order steps, no training
        with torch.no_grad():
            for i in range(2 * steps):
                classifier.model(**classifier.encode(data.texts[i * 8 % len(data) :][: config.train.batch_size]))
    else:
        # FedKSeed's first round has nothing to replay; FedIT's brings the initial adapter.
        downlink = initial_adapter(classifier, config) if mode == "lora" else {}
        method.client_train(classifier, downlink, ClientJob(0, data, seed=1))
    elapsed = time.perf_counter() - started
    return {"peak_rss_mb": peak_rss_bytes() / 2**20, "loaded_mb": loaded / 2**20,
            "steps_per_s": steps / elapsed}


def replay_cost(config_path: str, rounds: int) -> None:
    """Server side: replaying one round (4 clients x local_steps draws) against one forward pass."""
    torch.set_num_threads(1)
    config = load_config(config_path)
    method = get_method(config)
    classifier = load_model(config)
    method.server_init(classifier)
    rng = np.random.default_rng(0)
    draws = rng.choice(method.k, size=4 * config.train.local_steps)
    delta = torch.zeros(method.k).index_add_(0, torch.from_numpy(draws), torch.full((len(draws),), 1e-3))
    texts = load_splits(config)[1].texts[: config.train.batch_size]
    forward, replay = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        with torch.no_grad():
            classifier.model(**classifier.encode(texts))
        forward.append(time.perf_counter() - started)
        started = time.perf_counter()
        method.apply(method.tuned_params, delta)
        replay.append(time.perf_counter() - started)
    tuned = sum(t.param.numel() for t in method.tuned_params)
    print(f"replay of one round: {int((delta != 0).sum())} distinct seeds of {method.k}, {tuned:,} tuned parameters")
    print(f"  median replay {statistics.median(replay):.2f} s, median forward pass (batch {len(texts)}) "
          f"{statistics.median(forward):.3f} s, ratio {statistics.median(replay) / statistics.median(forward):.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", choices=["inference", "lora", "zo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(workload(args.config, args.mode, args.steps)))
        return

    results = {}
    for mode in ("inference", "lora", "zo"):
        results[mode] = in_fresh_process(__file__, args.config, args.steps, mode)
    print(f"{'workload':<28} {'peak RSS MB':>12} {'after load MB':>14} {'steps/s':>8}")
    names = {"inference": "inference (2 fwd per step)", "lora": "LoRA training (FedIT)", "zo": "zeroth-order (FedKSeed)"}
    for mode, r in results.items():
        print(f"{names[mode]:<28} {r['peak_rss_mb']:>12.0f} {r['loaded_mb']:>14.0f} {r['steps_per_s']:>8.2f}")
    base = results["inference"]["peak_rss_mb"]
    print(f"peak RSS over inference: LoRA {results['lora']['peak_rss_mb'] / base:.2f}x, "
          f"FedKSeed {results['zo']['peak_rss_mb'] / base:.2f}x")
    replay_cost(args.config, rounds=1)


if __name__ == "__main__":
    main()
