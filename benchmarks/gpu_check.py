"""The GPU check, for a machine with a CUDA device (about 5 minutes; budget 8):

    .venv/bin/python benchmarks/gpu_check.py [--skip-simulations]

1. the tests marked cuda (tests/test_devices.py): every method trains a round on the
   GPU, perturbations are the same there as on the CPU, and a FedKSeed client trained
   on the GPU is replayed to the bit by a CPU server;
2. a one-round simulation of every method (simulations/quick.toml, MiniLM, 3 clients)
   with the clients on the GPU (`model.device = "cuda"`, GPUs shared by Ray);
3. local training speed of the default model (SmolLM2-135M, the classification task)
   on the GPU against the CPU: steps per second of an adapter method (FedIT) and of
   the zeroth-order one (FedKSeed), median of three timings each, and their ratio.

Without a CUDA device it says so and exits 1: nothing here can run on a CPU alone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fedit", "ffa_lora", "flora", "fed_sb", "fedkseed"]


def run(title: str, argv: list[str]) -> bool:
    print(f"\n== {title}\n$ {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    ok = subprocess.run(argv, cwd=ROOT).returncode == 0
    print(f"-> {'ok' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s", flush=True)
    return ok


def steps_per_second(method: str, device: str, steps: int) -> float:
    """Median over three timings of ``steps`` local steps of ``method`` (one client's job)."""
    from fedtune.config import from_dict
    from fedtune.methods import ClientJob, get_method
    from fedtune.task import client_data, load_model

    sections = {"federation": {"method": method}, "model": {"device": device}, "train": {"local_steps": steps}}
    if method == "fedkseed":
        sections["fedkseed"] = {"num_seeds": 1024}
    config = from_dict({**sections, "data": {"test_size": 100, "train_size": 400}})
    server = get_method(config)
    server.server_init(load_model(config, torch.device("cpu")))
    times = []
    for attempt in range(4):  # the first warms up kernels and caches
        learner = load_model(config, torch.device(device))
        job = ClientJob(0, client_data(config, 0), seed=attempt, state={})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        server.client_train(learner, server.server_downlink(0), job)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return steps / statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-simulations", action="store_true", help="only the tests and the speed table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}): this check needs a GPU; the CPU tests cover the rest")
        return 1
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x "
          f"{torch.cuda.get_device_name(0)}, {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free")
    python = sys.executable
    results = {"cuda tests": run("tests marked cuda", [python, "-m", "pytest", "-q", "-m", "cuda", "tests/test_devices.py"])}
    if not args.skip_simulations:
        for method in METHODS:
            argv = [python, "-m", "fedtune.cli", "run", "simulations/quick.toml", "--set", f"federation.method={method}",
                    "--set", "run.rounds=1", "--set", "model.device=cuda", "--set", "run.output_dir=runs/gpu-check"]
            if method == "flora":
                argv += ["--set", "flora.client_ranks=[4,8,16]"]
            results[f"simulation {method}"] = run(f"one-round simulation of {method} on the GPU", argv)

    print("\n== local training speed, SmolLM2-135M classifier, one client's job")
    print(f"{'method':<10}{'steps':>6}{'CPU steps/s':>14}{'GPU steps/s':>14}{'GPU / CPU':>11}")
    for method, steps in (("fedit", 10), ("fedkseed", 20)):
        cpu, gpu = steps_per_second(method, "cpu", steps), steps_per_second(method, "cuda", steps)
        print(f"{method:<10}{steps:>6}{cpu:>14.2f}{gpu:>14.2f}{gpu / cpu:>10.1f}x", flush=True)

    failed = [name for name, ok in results.items() if not ok]
    print("\nall checks passed" if not failed else f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
