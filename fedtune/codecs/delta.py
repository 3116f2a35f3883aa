"""Lossy codecs compress what a client changed, not the model: an uplink tensor
that the client also received travels as its difference from the received value,
and the server adds it back to what it sent."""

from __future__ import annotations

import torch

from fedtune.codecs.tensor import TensorDict


def has_reference(name: str, t: torch.Tensor, reference: TensorDict) -> bool:
    ref = reference.get(name)
    return ref is not None and t.is_floating_point() and ref.shape == t.shape and ref.dtype == t.dtype


def relative(tensors: TensorDict, reference: TensorDict) -> TensorDict:
    return {n: t - reference[n] if has_reference(n, t, reference) else t for n, t in tensors.items()}


def absolute(name: str, t: torch.Tensor, reference: TensorDict) -> torch.Tensor:
    """The value ``t`` (dense or sparse) stands for: reference + t, or t itself."""
    if has_reference(name, t, reference):
        return reference[name] + t
    return t.to_dense() if t.is_sparse else t
