"""Where tensors live and in which precision: `model.device` and `model.dtype`.

The frozen base weights are stored in ``model.dtype``; what a client trains (adapters,
a classifier head, Fed-SB's R) stays float32, and forward passes in a reduced dtype
run under autocast, so optimizer steps and everything sent over the wire are float32
whatever the device. Randomness every party must reproduce (FedKSeed's
perturbations, DP noise) is drawn by CPU generators and then moved, so it does not
depend on the device either."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from fedtune.errors import FedtuneError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def valid_device(name: str) -> bool:
    return bool(_DEVICE.match(name))


def resolve_device(name: str, key: str = "model.device") -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU; ``cpu``;
    ``cuda`` or ``cuda:N``, refused with a one-line error naming the setting ``key``
    where it does not exist."""
    if not valid_device(name):
        raise FedtuneError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FedtuneError(f"{key} = {name!r} but this machine has no CUDA device (torch {torch.__version__}); "
                               "use 'auto' or 'cpu'")
        if (device.index or 0) >= torch.cuda.device_count():
            raise FedtuneError(f"{key} = {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextmanager
def computing_on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` on ``device`` inside the block and back on the CPU after it: training,
    evaluation and generation run on the accelerator, while what the methods keep,
    merge, replay and send stays on the CPU, the same on every party."""
    if device.type == "cpu":
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


def device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters are (its inputs must go there)."""
    return next(module.parameters()).device


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision for a forward pass whose base weights are ``dtype``; none at float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def free_memory(device: torch.device) -> int:
    """Bytes free on an accelerator, as its driver reports them; 0 on the CPU."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
