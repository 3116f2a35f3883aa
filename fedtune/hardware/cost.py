"""What a client's round costs on a device: time (compute from the work really
done, communication from the ledger's bytes) and peak memory.

Compute: FLOPs per token of a forward pass after Kaplan et al. (2020),
2 * (non-embedding parameters) + 2 * layers * context * hidden, times the passes a
method makes per token: LoRA-style training is a forward and a backward through
the activations (the frozen weights need no weight gradient), about two forwards;
a zeroth-order step is two forwards. Activation memory stored for the backward
pass after Korthikanti et al. (2022), s*b*h*(34 + 5*a*s/h) bytes per layer in 16
bits, doubled for float32.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedtune.hardware.catalogue import DeviceProfile

PASSES = {"adapter": 2.0, "zeroth_order": 2.0}  # forward-pass equivalents per token
BYTES = 4  # float32 weights and activations, as fedtune trains
OPTIMIZER_STATE = 4  # AdamW: the adapter weight, its gradient and two moments
# Peak RSS of the Python process with torch, transformers and a tokenizer loaded
# and no model: 558 MB measured on Linux x86-64 (benchmarks/hardware_calibration.py).
FRAMEWORK_BYTES = 0.55e9


@dataclass(frozen=True)
class ModelShape:
    params: int
    embedding_params: int  # looked up, not multiplied: no FLOPs
    layers: int
    hidden: int
    heads: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        c = model.config
        embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
        return cls(sum(p.numel() for p in model.parameters()), embedding, c.num_hidden_layers, c.hidden_size, c.num_attention_heads)

    def forward_flops_per_token(self, context: float) -> float:
        return 2 * (self.params - self.embedding_params) + 2 * self.layers * context * self.hidden


def compute_seconds(shape: ModelShape, kind: str, tokens: int, context: float, device: DeviceProfile) -> float:
    """Seconds to process ``tokens`` token positions (padding included) of
    sequences ``context`` long, by a method of ``kind`` ("adapter" or "zeroth_order")."""
    return tokens * shape.forward_flops_per_token(context) * PASSES[kind] / device.flops


def transfer_seconds(num_bytes: int, bits_per_second: float, latency: float) -> float:
    return latency + 8 * num_bytes / bits_per_second


def peak_memory(shape: ModelShape, kind: str, batch: int, context: int, trained_params: int = 0) -> float:
    """Peak bytes of one client process: the framework, the weights, and for
    "adapter" the activations kept for backward and the adapter's optimizer state;
    for "zeroth_order" and "inference" one layer's working activations, and for
    "zeroth_order" a perturbation buffer the size of the largest tuned tensor
    (``trained_params``)."""
    weights = shape.params * BYTES
    working = 2 * batch * context * (4 * shape.hidden + shape.heads * context) * BYTES
    if kind == "adapter":
        per_layer = batch * context * shape.hidden * (34 + 5 * shape.heads * context / shape.hidden)
        # Korthikanti et al. count 16-bit bytes; float32 doubles them.
        return FRAMEWORK_BYTES + weights + 2 * shape.layers * per_layer + trained_params * BYTES * OPTIMIZER_STATE
    if kind == "zeroth_order":
        return FRAMEWORK_BYTES + weights + working + trained_params * BYTES
    if kind == "inference":
        return FRAMEWORK_BYTES + weights + working
    raise ValueError(f"unknown kind {kind!r}")
