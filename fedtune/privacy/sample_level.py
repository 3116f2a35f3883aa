"""Sample-level DP: DP-SGD inside each client's local training (``dp_sgd``), each
client charged for the rounds it trains. A client keeps its own accountant's
history on its node and never trains past its budget, whatever the server asks."""

from __future__ import annotations

import dataclasses

import torch

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.methods.base import ClientJob, LocalResult, Method
from fedtune.privacy.accounting import Budget
from fedtune.privacy.dp_sgd import DPSGD
from fedtune.privacy.policy import Accounted, ClientPrivacy
from fedtune.privacy.secrets import client_seed
from fedtune.wire import TensorDict

DP_SGD_STREAM = 0xD95  # seeds this client's DP-SGD draws apart from its other private draws
HISTORY = "history"  # the client's accountant history in its privacy memory: (z, q, steps) rows


class SampleLevelDP(Accounted):
    """The server's half: the accounting. The training is private on the clients."""

    mode = "sample"


class SampleLevelClient(ClientPrivacy):
    def __init__(self, config: RunConfig, method: Method, client: int, examples: int, rnd: int) -> None:
        self.client, self.round, self.budget = client, rnd, Budget(config, {client: examples})
        self.clip = config.privacy.clip

    def prepare(self, job: ClientJob, memory: TensorDict) -> ClientJob:
        if HISTORY in memory:
            self.budget.history[self.client] = [(z, q, int(steps)) for z, q, steps in memory[HISTORY].tolist()]
        if reason := self.budget.overspending([self.client]):
            raise FedtuneError(f"privacy budget: {reason}; this client trains no more")
        seed = client_seed(self.client, self.round, DP_SGD_STREAM)
        return dataclasses.replace(job, dp_sgd=DPSGD(self.budget.noise[self.client], self.clip, seed))

    def finish(self, result: LocalResult, job: ClientJob, memory: TensorDict) -> LocalResult:
        self.budget.spend([self.client])
        memory[HISTORY] = torch.tensor(self.budget.history[self.client], dtype=torch.float64)
        return dataclasses.replace(result, metrics={**result.metrics, "epsilon": self.budget.epsilon(self.client)})
