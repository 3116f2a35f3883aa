"""FedIT: plain LoRA on every client, FedAvg of A and B separately (Zhang et al., 2024).

Averaging A and B separately is not the average of the products B_k A_k; the
exact methods (FFA-LoRA, FLoRA, Fed-SB) exist because of that gap."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from fedtune.methods.adapters import (
    load_trainable_state,
    save_adapter,
    trainable_state,
    wrap_with_lora,
)
from fedtune.methods.base import ClientJob, LocalResult
from fedtune.methods.lora import AveragedAdapter, train_adapter
from fedtune.models import Classifier
from fedtune.wire import TensorDict


class FedIT(AveragedAdapter):
    name = "fedit"

    def wrap(self, classifier: Classifier, seed: int) -> PeftModel:
        """The classifier with this method's trainable adapter."""
        return wrap_with_lora(classifier, self.config.lora, seed)

    def server_init(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.model = self.wrap(classifier, self.config.run.seed)
        self.global_tensors = trainable_state(self.model)

    def server_downlink(self, client: int) -> TensorDict:
        return self.global_tensors

    def export(self, directory: Path) -> None:
        save_adapter(self.model, self.classifier, directory)

    def client_train(self, classifier: Classifier, downlink: TensorDict, job: ClientJob) -> LocalResult:
        model = self.wrap(classifier, job.seed)
        load_trainable_state(model, downlink)
        return train_adapter(model, classifier, job, self.config.train)
