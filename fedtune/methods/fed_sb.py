"""Fed-SB (Singhal et al., 2025) on LoRA-SB (Ponkshe et al., 2024): each LoRA layer's
update is B R A with B and A fixed and only the r x r matrix R trained, sent and
averaged. The update is linear in R, so averaging is exact: B mean(R) A = mean(B R A).

B and A come from a truncated SVD of an approximate first full-fine-tuning update,
-lr * sign(sum of gradients) (Adam's first step), as in LoRA-SB's reference. That
gradient is taken on calibration examples only the server holds, disjoint from every
client's data and the test set: the bases depend on no client's data, so they reveal
nothing about it and cost no privacy budget under DP. R starts at zero (the model
starts as the base model) and each round every client starts from the global R.

A client receives the bases once, on its first round, and keeps them in its
replica store (the clients of one host share one file: the bases are the same for
all), with only their digest in its node state; after that its downlink is only R
and the head. A client that lost them fails one round and is sent them again.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from fedtune.clients import client_name
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.methods.adapters import (
    PREFIX,
    export_as_lora,
    load_trainable_state,
    lora_layers,
    temporarily_wrapped,
    trainable_state,
    wrap_with_lora,
)
from fedtune.methods.base import ClientJob, ClientUpdate, LocalResult
from fedtune.methods.lora import AveragedAdapter, train_adapter
from fedtune.methods.replicas import digest_tensor, tensor_digest
from fedtune.rounds.release import Release
from fedtune.task import server_data
from fedtune.tasks import Examples, Learner
from fedtune.wire import TensorDict

BASIS = "basis/"
BASES = "bases_digest"  # client state: the digest of its bases in its replica store


class FedSB(AveragedAdapter):
    name = "fed_sb"
    lossy_downlink = False

    def wrap(self, learner: Learner, bases: TensorDict, seed: int) -> PeftModel:
        """LoRA with A and B fixed to ``bases`` and R (zero) trainable in each layer:
        PEFT's lora_B becomes the plain linear layers R then B, which Opacus'
        per-example gradients support as they are."""
        model = wrap_with_lora(learner, self.config.lora, seed)
        rank = self.config.lora.rank
        for path, layer in lora_layers(model).items():
            a = layer.lora_A["default"]
            with torch.no_grad():
                a.weight.copy_(bases[f"{path}.A"])
            a.weight.requires_grad_(False)
            r, b = nn.Linear(rank, rank, bias=False), nn.Linear(rank, bases[f"{path}.B"].shape[0], bias=False)
            nn.init.zeros_(r.weight)
            b.weight = nn.Parameter(bases[f"{path}.B"].clone(), requires_grad=False)
            layer.lora_B["default"] = nn.Sequential(OrderedDict(R=r, B=b))
        return model

    def check(self, learner: Learner) -> None:
        server_data(self.config, self.config.fed_sb.calibration_size)
        super().check(learner)

    # -- server ----------------------------------------------------------------
    def server_init(self, learner: Learner) -> None:
        self.learner = learner
        calibration = server_data(self.config, self.config.fed_sb.calibration_size)
        self.bases = _bases_from_first_update(learner, calibration, self.config)
        self.model = self.wrap(learner, self.bases, self.config.run.seed)
        self.global_tensors = trainable_state(self.model)
        self.has_bases: set[int] = set()

    def server_downlink(self, client: int) -> TensorDict:
        if client in self.has_bases:
            return self.global_tensors
        return self.global_tensors | {BASIS + n: t for n, t in self.bases.items()}

    def uplink_template(self, client: int) -> TensorDict:
        return self.global_tensors

    def server_aggregate(self, updates: list[ClientUpdate], release: Release) -> None:
        super().server_aggregate(updates, release)
        self.has_bases.update(u.client for u in updates)

    def client_failed(self, client: int) -> None:
        self.has_bases.discard(client)

    def export(self, directory: Path) -> None:
        """As a standard LoRA adapter: lora_A = A, lora_B = B R, same scaling."""
        tensors = {n: t for n, t in self.global_tensors.items() if "lora_B" not in n}
        for path, layer in lora_layers(self.model).items():
            sandwich = layer.lora_B["default"]
            tensors[f"{PREFIX}{path}.lora_B.default.weight"] = (sandwich.B.weight @ sandwich.R.weight).detach()
            tensors[f"{PREFIX}{path}.lora_A.default.weight"] = self.bases[f"{path}.A"]
        export_as_lora(self.config, self.config.lora.rank, self.config.lora.alpha, tensors, directory)

    # -- client ----------------------------------------------------------------
    def client_train(self, learner: Learner, downlink: TensorDict, job: ClientJob) -> LocalResult:
        model = self.wrap(learner, _client_bases(downlink, job), job.seed)
        load_trainable_state(model, {n: t for n, t in downlink.items() if not n.startswith(BASIS)})
        return train_adapter(model, learner, job, self.config.train)


def _client_bases(downlink: TensorDict, job: ClientJob) -> TensorDict:
    """The bases the server sent, kept for later rounds, or the ones kept before."""
    sent = {n.removeprefix(BASIS): t for n, t in downlink.items() if n.startswith(BASIS)}
    if sent:
        job.state.clear()
        job.state[BASES] = digest_tensor(job.replicas.put(f"{job.client}-bases", sent))
        return sent
    bases = job.replicas.get(tensor_digest(job.state[BASES])) if BASES in job.state else None
    if bases is None:
        raise FedtuneError(f"{client_name(job.client)} holds no Fed-SB bases (its replica store was cleared, or it "
                           "never received them) and the server sent none; the server sends them next time")
    return bases


def _bases_from_first_update(learner: Learner, data: Examples, config: RunConfig) -> TensorDict:
    """Per LoRA layer, A (r x in) and B (out x r): the top-r right and left singular
    vectors of -sign(sum of the calibration gradients of its base weight). (Adam's
    first step also has the factor lr, which changes no singular vector.)"""
    rank = config.lora.rank
    with temporarily_wrapped(learner, config.lora, config.run.seed) as peft:
        weights = {path: layer.base_layer.weight for path, layer in lora_layers(peft).items()}
        for p in peft.parameters():
            p.requires_grad_(False)
        try:
            for w in weights.values():
                w.requires_grad_(True)
            batch = config.train.physical_batch  # summed: the chunking bounds memory only
            for start in range(0, len(data), batch):  # eval mode: no dropout, the same bases every time
                idx = np.arange(start, min(start + batch, len(data)))
                (learner.loss(peft, data, idx)[0] * len(idx)).backward()
        finally:
            for w in weights.values():
                w.requires_grad_(False)
    bases = {}
    for path, w in weights.items():
        u, _, vh = torch.linalg.svd(-torch.sign(w.grad).float(), full_matrices=False)
        bases[f"{path}.A"], bases[f"{path}.B"] = vh[:rank].contiguous(), u[:, :rank].contiguous()
        w.grad = None
    return bases

