"""FedIT: plain LoRA on every client, FedAvg of A and B separately (Zhang et al., 2024).

Averaging A and B separately is not the average of the products B_k A_k; the
exact methods (FFA-LoRA, FLoRA, Fed-SB) exist because of that gap."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from fedtune.methods.adapters import load_trainable_state, save_adapter, trainable_state, wrap_with_lora
from fedtune.methods.base import ClientJob, LocalResult
from fedtune.methods.lora import AveragedAdapter, train_adapter
from fedtune.tasks import Learner
from fedtune.wire import TensorDict


class FedIT(AveragedAdapter):
    name = "fedit"

    def wrap(self, learner: Learner, seed: int) -> PeftModel:
        """The learner with this method's trainable adapter."""
        return wrap_with_lora(learner, self.config.lora, seed)

    def server_init(self, learner: Learner) -> None:
        self.learner = learner
        self.model = self.wrap(learner, self.config.run.seed)
        self.global_tensors = trainable_state(self.model)

    def server_downlink(self, client: int) -> TensorDict:
        return self.global_tensors

    def export(self, directory: Path) -> None:
        save_adapter(self.model, self.learner, directory)

    def client_train(self, learner: Learner, downlink: TensorDict, job: ClientJob) -> LocalResult:
        model = self.wrap(learner, job.seed)
        load_trainable_state(model, downlink)
        return train_adapter(model, learner, job, self.config.train)
