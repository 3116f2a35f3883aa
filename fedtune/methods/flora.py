"""FLoRA (Wang et al., 2024): clients train LoRA adapters of different ranks and the
server stacks them, which sums their products exactly. With p_k client k's share of
the examples and s_k = alpha / r_k its PEFT scaling,

    B = [B_1 ... B_K],   A = [p_1 s_1 A_1; ...; p_K s_K A_K]   =>   B A = sum_k p_k s_k B_k A_k.

Each round the stacked product is merged into the base weights and clients start
fresh adapters on the merged model; the head, trained in full, is averaged.

A client rebuilds the merged model from the stacked factors of every round it has
not applied yet and keeps the merged weights as its client state. The downlink so
grows with the participants' total rank, and with the rounds a client sat out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from fedtune.config import RunConfig
from fedtune.methods.adapters import (
    PREFIX,
    export_as_lora,
    lora_layers,
    temporarily_wrapped,
    trainable_state,
    wrap_with_lora,
)
from fedtune.methods.base import ClientJob, ClientUpdate, LocalResult, Method
from fedtune.methods.lora import train_adapter
from fedtune.methods.replay import RoundLog, catch_up
from fedtune.tasks import Learner
from fedtune.rounds.release import Release
from fedtune.wire import TensorDict

HEAD = "head/"


class FLoRA(Method):
    name = "flora"
    heterogeneous_ranks = True
    lossy_downlink = False
    stacks_clients = True

    @classmethod
    def with_client_ranks(cls, config: RunConfig, ranks: list[int]) -> RunConfig:
        return dataclasses.replace(config, flora=dataclasses.replace(config.flora, client_ranks=ranks))

    def rank(self, client: int) -> int:
        ranks = self.config.flora.client_ranks
        return ranks[client] if ranks else self.config.lora.rank

    # -- server ----------------------------------------------------------------
    def server_init(self, learner: Learner) -> None:
        # PEFT's layer and head names; the global model is the plain one, into
        # which each round is merged.
        with temporarily_wrapped(learner, self.config.lora, self.config.run.seed) as peft:
            self.targets = {path: layer.base_layer for path, layer in lora_layers(peft).items()}
            self.head_names = [n for n in trainable_state(peft) if "lora_" not in n]
        self.model = learner.model
        self.params = dict(self.model.named_parameters())
        self.log = RoundLog()  # each round's stacked factors

    def server_downlink(self, client: int) -> TensorDict:
        head = {HEAD + _plain(n): self.params[_plain(n)].detach() for n in self.head_names}
        return self.log.missed(client) | head

    def uplink_template(self, client: int) -> TensorDict:
        r = self.rank(client)
        template = {n: self.params[_plain(n)] for n in self.head_names}
        for path, base in self.targets.items():
            template[f"{PREFIX}{path}.lora_A.default.weight"] = torch.zeros(r, base.in_features)
            template[f"{PREFIX}{path}.lora_B.default.weight"] = torch.zeros(base.out_features, r)
        return template

    def server_aggregate(self, updates: list[ClientUpdate], release: Release) -> None:
        factors = {}
        with torch.no_grad():
            for path in self.targets:
                a = torch.cat([
                    weight * (self.config.lora.alpha / self.rank(u.client))
                    * u.dense(f"{PREFIX}{path}.lora_A.default.weight")
                    for u, weight in zip(updates, release.weights)
                ])
                b = torch.cat([u.dense(f"{PREFIX}{path}.lora_B.default.weight") for u in updates], dim=1)
                factors[f"{path}.A"], factors[f"{path}.B"] = a, b
            _merge(self.params, factors)
            for name in self.head_names:
                self.params[_plain(name)].copy_(release.average(updates, name, self.params[_plain(name)].detach()))
        self.log.append(factors, (u.client for u in updates))

    def server_state(self) -> dict[str, object]:
        return {"deltas": self.log.deltas, "head": {n: self.params[_plain(n)].detach().clone() for n in self.head_names}}

    def load_server_state(self, state: dict[str, object]) -> None:
        for factors in state["deltas"]:  # the merges, in order: the same weights to the bit
            _merge(self.params, factors)
            self.log.append(factors, ())  # no client is known to be in sync: each gets every round
        with torch.no_grad():
            for name, value in state["head"].items():
                self.params[_plain(name)].copy_(value)

    def server_model(self) -> nn.Module:
        return self.model

    def export(self, directory: Path) -> None:
        """All rounds' stacked factors side by side are one standard LoRA adapter
        (scaling 1) whose product is the total merged change."""
        tensors = {n: self.params[_plain(n)].detach() for n in self.head_names}
        for path in self.targets:
            tensors[f"{PREFIX}{path}.lora_A.default.weight"] = torch.cat([d[f"{path}.A"] for d in self.log.deltas])
            tensors[f"{PREFIX}{path}.lora_B.default.weight"] = torch.cat([d[f"{path}.B"] for d in self.log.deltas], 1)
        rank = sum(d[f"{path}.A"].shape[0] for d in self.log.deltas)
        export_as_lora(self.config, rank, float(rank), tensors, directory)

    # -- client ----------------------------------------------------------------
    def client_train(self, learner: Learner, downlink: TensorDict, job: ClientJob) -> LocalResult:
        params = dict(learner.model.named_parameters())
        catch_up(learner.model, downlink, job.state, lambda factors: _merge(params, factors))
        with torch.no_grad():
            for name, tensor in downlink.items():
                if name.startswith(HEAD):
                    params[name.removeprefix(HEAD)].copy_(tensor)

        lora = dataclasses.replace(self.config.lora, rank=self.rank(job.client))
        model = wrap_with_lora(learner, lora, job.seed)
        return train_adapter(model, learner, job, self.config.train)


def _merge(params: dict[str, nn.Parameter], factors: TensorDict) -> list[str]:
    """W += B A for every layer of one round's stacked factors; the server and every
    client merge through this, so their weights stay bit-identical."""
    paths = [name.removesuffix(".A") for name in factors if name.endswith(".A")]
    with torch.no_grad():
        for path in paths:
            params[f"{path}.weight"] += factors[f"{path}.B"] @ factors[f"{path}.A"]
    return [f"{path}.weight" for path in paths]


def _plain(peft_name: str) -> str:
    """A head parameter's name in the unwrapped model."""
    return peft_name.removeprefix(PREFIX).replace(".modules_to_save.default", "")

