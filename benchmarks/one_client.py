"""Helpers for benchmarks that measure one client's workload, each in a fresh
process so that its peak RSS is its own (imported by the scripts beside it)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from fedtune.config import RunConfig
from fedtune.methods.adapters import trainable_state, wrap_with_lora
from fedtune.models import Classifier
from fedtune.wire import TensorDict


def in_fresh_process(script: str, config: str, steps: int, mode: str) -> dict:
    """Run ``script CONFIG --steps N --mode MODE`` and read the JSON it prints last."""
    cmd = [sys.executable, script, config, "--steps", str(steps), "--mode", mode]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def initial_adapter(classifier: Classifier, config: RunConfig) -> TensorDict:
    """The adapter FedIT's server sends in round 1, without keeping the wrapper."""
    peft = wrap_with_lora(classifier, config.lora, config.run.seed)
    adapter = trainable_state(peft)
    peft.unload()
    return adapter
