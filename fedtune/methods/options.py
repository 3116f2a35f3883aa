"""Each method's own config section, and the default method. This module is light
(no torch, no PEFT): the config is checked before anything loads, and each
section checks itself against the rest of the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedtune.errors import require

if TYPE_CHECKING:
    from fedtune.config import RunConfig

DEFAULT_METHOD = "fedit"


@dataclass(frozen=True)
class FLoRASection:
    # One LoRA rank per client, in partition order; empty: every client uses lora.rank.
    client_ranks: list[int] = field(default_factory=list)

    def validate(self, config: RunConfig) -> None:
        clients = config.partition.num_clients
        require(not self.client_ranks or len(self.client_ranks) == clients, "flora.client_ranks",
                f"empty or one rank per client (partition.num_clients={clients})", self.client_ranks)
        require(all(r >= 1 for r in self.client_ranks), "flora.client_ranks", "ranks >= 1", self.client_ranks)


@dataclass(frozen=True)
class FedSBSection:
    # Server-held examples, disjoint from every client's data and from the test set,
    # whose gradient fixes Fed-SB's A and B (see fedtune/methods/fed_sb.py).
    calibration_size: int = 64

    def validate(self, config: RunConfig) -> None:
        require(self.calibration_size >= 1, "fed_sb.calibration_size", ">= 1", self.calibration_size)


@dataclass(frozen=True)
class FedKSeedSection:
    num_seeds: int = 4096  # K candidate seeds, derived from run.seed
    eps: float = 1e-3  # perturbation scale of the two-point estimate
    # Parameters tuned: substrings of their names; "head" is the classifier head,
    # "all" every parameter. Empty: the layers LoRA would adapt, and the head.
    params: list[str] = field(default_factory=list)
    pro: bool = False  # FedKSeed-Pro: sample seeds by their history of |g|
    encoding: str = "compact"  # "paper": per-step pairs up, dense K-vector down

    def validate(self, config: RunConfig) -> None:
        require(1 <= self.num_seeds <= 2**31 - 1, "fedkseed.num_seeds", "between 1 and 2**31 - 1", self.num_seeds)
        require(self.eps > 0, "fedkseed.eps", "> 0", self.eps)
        require(self.encoding in ("paper", "compact"), "fedkseed.encoding", "'paper' or 'compact'", self.encoding)
        require(config.federation.method != "fedkseed" or config.model.dtype == "float32", "model.dtype",
                "float32 for fedkseed (it tunes the base weights themselves, and a perturbation of fedkseed.eps "
                "vanishes in a 16-bit weight's rounding)", config.model.dtype)
