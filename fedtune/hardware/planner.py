"""Which method and LoRA rank each client's device can run.

A device gets the largest rank of hardware.rank_choices whose LoRA training fits
its memory (or, without hardware.plan_ranks, the configured rank if it fits);
one that can run inference but not backpropagation can take part only in
zeroth-order tuning (FedKSeed); one that cannot hold the model is excluded. Each
exclusion carries its reason for the log."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config import RunConfig
from fedtune.hardware.catalogue import DeviceProfile
from fedtune.hardware.cost import ModelShape, peak_memory
from fedtune.methods.base import Footprint


@dataclass(frozen=True)
class Plan:
    device: DeviceProfile
    kind: str  # "adapter", "zeroth_order" or "excluded"
    rank: int = 0  # adapter methods
    memory: float = 0.0  # predicted peak bytes
    reason: str = ""  # why excluded


def plan_client(config: RunConfig, kind: str, shape: ModelShape, device: DeviceProfile, context: int, footprint: Footprint) -> Plan:
    """The plan of a client on ``device`` for a method of ``kind`` ("adapter" or
    "zeroth_order") whose trained parameters ``footprint`` gives."""
    batch, tuned_params = config.train.batch_size, footprint.largest_tuned
    if kind == "zeroth_order":
        need = peak_memory(shape, "zeroth_order", batch, context, tuned_params)
        if need <= device.memory:
            return Plan(device, "zeroth_order", memory=need)
        return Plan(device, "excluded", memory=need, reason=_short(device, need, "zeroth-order tuning"))
    ranks = sorted(config.hardware.rank_choices, reverse=True) if config.hardware.plan_ranks else [config.lora.rank]
    for rank in ranks:
        need = peak_memory(shape, "adapter", config.train.physical_batch, context, footprint.trained_params[rank])
        if need <= device.memory:
            return Plan(device, "adapter", rank, need)
    inference = peak_memory(shape, "zeroth_order", batch, context, tuned_params)
    if inference <= device.memory:
        return Plan(
            device, "zeroth_order", memory=inference,
            reason=f"{_short(device, need, f'LoRA training at rank {ranks[-1]}')}; it could run a zeroth-order method",
        )
    return Plan(device, "excluded", memory=inference, reason=_short(device, inference, "even inference"))


def _short(device: DeviceProfile, need: float, what: str) -> str:
    return f"{device.name} has {device.memory / 1e9:.2f} GB, {what} needs {need / 1e9:.2f} GB"
