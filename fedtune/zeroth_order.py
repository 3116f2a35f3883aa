"""Zeroth-order training with regenerated perturbations (SPSA, as in MeZO), the
engine of FedKSeed.

A perturbation z ~ N(0, I) over the tuned parameters is never stored: each
parameter's slice is regenerated from (seed, parameter index) by a CPU generator
whenever it is needed, so any party can rebuild it, and then moved to the
parameter's device: the same z on a GPU as on the CPU. A step costs two forward
passes and three regenerations; it keeps no copy of the parameters, no optimizer
state and no activations.

Updates are applied as two correctly rounded operations, w + (alpha * z), never
as one fused multiply-add (which a GPU kernel may use and the CPU may not), so a
CPU replica replays a GPU client's moves to the bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Tuned:
    """One tuned parameter, where it lives, and its index in the tuned order."""

    name: str
    module: nn.Module
    attr: str
    index: int

    @property
    def param(self) -> nn.Parameter:
        return self.module._parameters[self.attr]


def tuned_parameters(model: nn.Module, names: list[str]) -> list[Tuned]:
    """The named parameters, in ``names`` order (which fixes every party's z)."""
    modules = dict(model.named_modules())
    tuned = []
    for index, name in enumerate(names):
        path, _, attr = name.rpartition(".")
        tuned.append(Tuned(name, modules[path], attr, index))
    return tuned


def noise(seed: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """Parameter ``index``'s slice of the perturbation drawn from ``seed``, on ``like``'s device."""
    generator = torch.Generator().manual_seed(seed * 65_536 + index)
    z = torch.empty(like.shape, dtype=like.dtype).normal_(generator=generator)
    return z.to(like.device)


@contextmanager
def perturbed(tuned: list[Tuned], seed: int, scale: float) -> Iterator[None]:
    """Inside the block, each tuned parameter w reads as w + scale * z while its
    module runs forward. The perturbed tensor exists for one module at a time and w
    is never written, so leaving the block restores the model exactly."""
    by_module: dict[nn.Module, list[tuple[Tuned, nn.Parameter]]] = {}
    for t in tuned:
        by_module.setdefault(t.module, []).append((t, t.param))

    def swap_in(module: nn.Module, args: tuple) -> None:
        for t, param in by_module[module]:
            module._parameters[t.attr] = param + noise(seed, t.index, param).mul_(scale)

    def swap_out(module: nn.Module, args: tuple, output: object) -> None:
        for t, param in by_module[module]:
            module._parameters[t.attr] = param

    handles = [m.register_forward_pre_hook(swap_in) for m in by_module]
    handles += [m.register_forward_hook(swap_out) for m in by_module]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, entries in by_module.items():  # also after an exception mid-forward
            for t, param in entries:
                module._parameters[t.attr] = param


@torch.no_grad()
def move(tuned: list[Tuned], seed: int, alpha: float) -> None:
    """w += alpha * z(seed), in place. Every replica applies updates through this."""
    for t in tuned:
        t.param.add_(noise(seed, t.index, t.param).mul_(alpha))


@torch.no_grad()
def spsa_step(loss: Callable[[], float], tuned: list[Tuned], seed: int, eps: float, lr: float) -> tuple[float, float]:
    """One two-point step along z(seed): g = (L(w + eps z) - L(w - eps z)) / (2 eps),
    then w -= lr * g * z. Returns (g, mean of the two losses)."""
    with perturbed(tuned, seed, eps):
        plus = loss()
    with perturbed(tuned, seed, -eps):
        minus = loss()
    g = (plus - minus) / (2 * eps)
    move(tuned, seed, -lr * g)
    return g, (plus + minus) / 2
