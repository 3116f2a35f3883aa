"""Client-level DP (DP-FedAvg, McMahan et al., 2018), as its accountant analyses it:

- sampling: each client independently with probability q = clients_per_round /
  num_clients each round (Poisson), drawn from the server's secret;
- release: the sum of the sampled clients' updates, each clipped to L2 norm C,
  plus Gaussian noise of std z*C, divided by the expected cohort size D, a constant
  fixed before the run: new = current + (sum_k (x_k - current) + noise) / D. A round
  is released whatever came back: an empty cohort releases noise alone, and a
  client that sent nothing or was refused adds nothing. No round is retried or
  skipped, as whether it were would depend on who took part;
- accounting: every client, every round, a Poisson-subsampled Gaussian mechanism of
  rate q and noise multiplier z (Opacus' RDP or PRV accountant).

With privacy.noise_on "clients" (for secure aggregation: the server sees only the
sum), every client takes part every round (q = 1), each adds a share of the noise
of std z*C / sqrt(N) from its own secret, and the server adds the shares of
clients that sent nothing."""

from __future__ import annotations

import dataclasses
import math

import torch

from fedtune.config import RunConfig
from fedtune.methods.base import ClientJob, ClientUpdate, LocalResult, Method
from fedtune.privacy.accounting import Budget
from fedtune.privacy.mechanism import Noise
from fedtune.privacy.policy import Accounted, ClientPrivacy
from fedtune.privacy.secrets import client_seed, secret_seed
from fedtune.rounds.participation import Poisson, Sampler
from fedtune.rounds.release import Release
from fedtune.wire import TensorDict

NOISE_STREAM = 0xD9  # seeds the noise generators apart from every other use of a secret


class ClientLevelDP(Accounted):
    mode = "client"
    releases_every_round = True

    def describe(self) -> str:
        p, q, n = self.config.privacy, self.rate, self.config.partition.num_clients
        noise = "by the server" if p.noise_on == "server" else "in shares by the clients"
        return (f"client-level DP: Poisson client sampling, each client with probability {q:g} a round (about "
                f"{q * n:g} of {n}; the cohort varies); updates clipped to {p.clip:g}, noise multiplier "
                f"{self.budget.noise[0]:.3f} {noise}; a budget of epsilon {p.epsilon:g} at delta {p.delta:g}")

    @property
    def rate(self) -> float:
        return self.budget.sample_rate(0)

    def sampler(self) -> Sampler:
        return Poisson(self.rate, self.root)

    def release(self, updates: list[ClientUpdate], rnd: int, expected_cohort: float) -> Release:
        """Each update weighs 1/D in the sum; what the sampled clients did not send
        stays at the current value (``keep``); the noise, std z*C / D."""
        p, d = self.config.privacy, expected_cohort
        z = self.budget.noise[0]
        # With the noise shared out, the server adds the shares of the clients that sent none.
        missing = 1.0 if p.noise_on == "server" else max(0, self.config.partition.num_clients - len(updates)) / self.config.partition.num_clients
        generator = torch.Generator().manual_seed(secret_seed(self.root, rnd, NOISE_STREAM))
        noise = Noise(z * p.clip * math.sqrt(missing), generator)
        return Release([1 / d] * len(updates), noise, 1 / d, keep=1 - len(updates) / d)

    def update_bound(self) -> float:
        """Clients clip to privacy.clip: a larger update is refused. A bound fixed in
        advance, unlike the median rule, depends on no other client's data. With
        the noise shared out, updates carry their noise share: no bound."""
        return self.config.privacy.clip if self.config.privacy.noise_on == "server" else math.inf


class ClientLevelClient(ClientPrivacy):
    """Clip the update; with privacy.noise_on 'clients' add this client's share of
    the noise, drawn from its own secret."""

    def __init__(self, config: RunConfig, method: Method, client: int, examples: int, rnd: int) -> None:
        self.config, self.method, self.client, self.round = config, method, client, rnd
        self.noise_multiplier = Budget(config, {client: examples}).noise[client]

    def finish(self, result: LocalResult, job: ClientJob, memory: TensorDict) -> LocalResult:
        p = self.config.privacy
        result = self.method.clipped(result, p.clip)
        if p.noise_on == "clients":
            noise = Noise(self.noise_multiplier * p.clip, torch.Generator().manual_seed(client_seed(self.client, self.round, NOISE_STREAM)))
            share = noise.share(self.config.partition.num_clients)
            tensors = {n: t + share.sample(t.shape) if t.is_floating_point() else t for n, t in result.tensors.items()}
            result = dataclasses.replace(result, tensors=tensors)
        return result
