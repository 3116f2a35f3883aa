"""Client-level DP (DP-FedAvg, McMahan et al., 2018): each client clips its update to
L2 norm privacy.clip; every released sum of updates carries Gaussian noise of std
z * clip, drawn by the server, or in shares by the clients (privacy.noise_on).
Every client counts the same in the sums, and every client is charged every round."""

from __future__ import annotations

import dataclasses

import torch

from fedtune.config import RunConfig
from fedtune.methods.base import ClientJob, ClientUpdate, LocalResult, Method
from fedtune.privacy.accounting import Budget
from fedtune.privacy.mechanism import Noise
from fedtune.privacy.policy import Accounted, ClientPrivacy
from fedtune.rounds.release import Release
from fedtune.task import derive_seed
from fedtune.wire import TensorDict

NOISE_STREAM = 0xD9  # seeds the noise generators apart from every other use of a seed


class ClientLevelDP(Accounted):
    mode = "client"

    def release(self, updates: list[ClientUpdate], rnd: int) -> Release:
        """Every client weighs the same, so one client moves the average by at most clip / m."""
        weight = 1 / len(updates)
        noise = None
        if self.config.privacy.noise_on == "server":
            z = self.budget.noise[updates[0].client]
            generator = torch.Generator().manual_seed(derive_seed(self.config.run.seed, rnd, NOISE_STREAM))
            noise = Noise(z * self.config.privacy.clip, generator)
        return Release([weight] * len(updates), noise, weight)


class ClientLevelClient(ClientPrivacy):
    """Clip the update; with privacy.noise_on 'clients' add this client's share of
    the noise (the whole of it for a tensor the server releases on its own)."""

    def __init__(self, config: RunConfig, method: Method, client: int, examples: int) -> None:
        self.config, self.method = config, method
        self.noise_multiplier = Budget(config, {client: examples}).noise[client] if config.privacy.noise_on == "clients" else 0.0

    def finish(self, result: LocalResult, job: ClientJob, memory: TensorDict) -> LocalResult:
        p = self.config.privacy
        result = self.method.clipped(result, p.clip)
        if p.noise_on == "clients":
            noise = Noise(self.noise_multiplier * p.clip, torch.Generator().manual_seed(derive_seed(job.seed, NOISE_STREAM)))
            share = noise.share(self.config.federation.clients_per_round or self.config.partition.num_clients)
            tensors = {
                n: t + (noise if self.method.released_alone(n) else share).sample(t.shape) if t.is_floating_point() else t
                for n, t in result.tensors.items()
            }
            result = dataclasses.replace(result, tensors=tensors)
        return result
