"""FLoRA (Wang et al., 2024): clients train LoRA adapters of different ranks and the
server stacks them, which sums their products exactly. With p_k client k's share of
the examples and s_k = alpha / r_k its PEFT scaling,

    B = [B_1 ... B_K],   A = [p_1 s_1 A_1; ...; p_K s_K A_K]   =>   B A = sum_k p_k s_k B_k A_k.

Each round the stacked product is merged into the base weights and clients start
fresh adapters on the merged model; the head, trained in full, is averaged.

A client rebuilds the merged model from the stacked factors of every round it has
not applied yet (`fedtune.methods.replay`) and keeps the merged weights in its
replica store. The downlink so grows with the participants' total rank and with
the rounds a client sat out, up to the size of the merged weights themselves: a
client further behind receives those (the snapshot), and the server keeps no
older rounds.
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
from fedtune.methods.replay import RoundLog, catch_up, nbytes
from fedtune.rounds.release import Release
from fedtune.task import load_model
from fedtune.tasks import Learner
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
        self.log = RoundLog(nbytes(self.snapshot()))  # the latest rounds' stacked factors

    def snapshot(self) -> TensorDict:
        """The merged weights of the adapted layers: all a client needs besides the head."""
        return {f"{path}.weight": self.params[f"{path}.weight"].detach() for path in self.targets}

    def server_downlink(self, client: int) -> TensorDict:
        head = {HEAD + _plain(n): self.params[_plain(n)].detach() for n in self.head_names}
        return self.log.downlink(client, self.snapshot) | head

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

    def client_failed(self, client: int) -> None:
        self.log.forget(client)

    def server_state(self) -> dict[str, object]:
        weights = {n: t.clone() for n, t in self.snapshot().items()}
        head = {n: self.params[_plain(n)].detach().clone() for n in self.head_names}
        return {"weights": weights, "head": head, "log": self.log.state()}

    def load_server_state(self, state: dict[str, object]) -> None:
        with torch.no_grad():
            for name, value in state["weights"].items():
                self.params[name].copy_(value)
            for name, value in state["head"].items():
                self.params[_plain(name)].copy_(value)
        self.log.load(state["log"])

    def server_model(self) -> nn.Module:
        return self.model

    def export(self, directory: Path) -> None:
        """One standard LoRA adapter (scaling 1) whose product is the total merged
        change: all rounds' stacked factors side by side while the server holds
        them, else the change itself as B = [W - W0, 0], A = [I; 0]."""
        tensors = {n: self.params[_plain(n)].detach() for n in self.head_names}
        rounds = [self.log.deltas.get(t) for t in range(1, self.log.latest + 1)]
        if all(d is not None for d in rounds):
            factors = {p: (torch.cat([d[f"{p}.A"] for d in rounds]), torch.cat([d[f"{p}.B"] for d in rounds], 1)) for p in self.targets}
        else:
            base = dict(load_model(self.config).model.named_parameters())
            width = max(layer.in_features for layer in self.targets.values())
            factors = {p: _as_factors(self.params[f"{p}.weight"].detach() - base[f"{p}.weight"].detach(), width) for p in self.targets}
        for path, (a, b) in factors.items():
            tensors[f"{PREFIX}{path}.lora_A.default.weight"], tensors[f"{PREFIX}{path}.lora_B.default.weight"] = a, b
        rank = next(iter(factors.values()))[0].shape[0]
        export_as_lora(self.config, rank, float(rank), tensors, directory)

    # -- client ----------------------------------------------------------------
    def client_train(self, learner: Learner, downlink: TensorDict, job: ClientJob) -> LocalResult:
        params = dict(learner.model.named_parameters())
        catch_up(learner.model, downlink, job.state, job.replicas, str(job.client),
                 lambda factors: _merge(params, factors), lambda weights: _copy(params, weights))
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


def _copy(params: dict[str, nn.Parameter], weights: TensorDict) -> list[str]:
    """A snapshot's merged weights, as they are."""
    for name, value in weights.items():
        params[name].copy_(value)
    return list(weights)


def _as_factors(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [I; 0] (rank x in), B = [change, 0] (out x rank): B A = change, exactly."""
    out_features, in_features = change.shape
    a = torch.eye(rank, in_features)
    b = torch.cat([change, torch.zeros(out_features, rank - in_features)], dim=1)
    return a, b


def _plain(peft_name: str) -> str:
    """A head parameter's name in the unwrapped model."""
    return peft_name.removeprefix(PREFIX).replace(".modules_to_save.default", "")

