"""The run's two codec chains, parsed once, and what "send only the change" means
on each side: a lossy uplink carries the change against what the client received,
with error feedback for a biased chain; the server adds back what it sent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune import wire
from fedtune.codecs.delta import relative
from fedtune.codecs.spec import Chain, parse_chain
from fedtune.codecs.tensor import TensorDict
from fedtune.config import RunConfig


@dataclass(frozen=True)
class Codecs:
    down: Chain
    up: Chain

    @classmethod
    def of(cls, config: RunConfig) -> Codecs:
        return cls(parse_chain(config.compression.down, "compression.down"), parse_chain(config.compression.up, "compression.up"))

    def downlink(self, payload: wire.Payload, seed: int) -> bytes:
        return wire.encode(payload, self.down, torch.Generator().manual_seed(seed))

    def uplink(self, payload: wire.Payload, received: TensorDict, seed: int, residual: TensorDict | None) -> bytes:
        """``payload`` encoded with the uplink chain: with a lossy chain, what changed
        since ``received``; with a biased one, with error feedback from ``residual``
        (updated in place; the caller keeps it between rounds)."""
        if self.up.lossy:
            payload = wire.Payload(payload.method, payload.round, payload.client, relative(payload.tensors, received),
                                   payload.num_examples)
        return wire.encode(payload, self.up, torch.Generator().manual_seed(seed), residual if self.up.biased else None)
