"""What the adapter methods share besides PEFT plumbing (``adapters``): local
training of an adapter, and the server half of the methods whose global state is
one averaged set of trainable tensors (FedIT, FFA-LoRA, Fed-SB)."""

from __future__ import annotations

from peft import PeftModel

from fedtune.config import TrainSection
from fedtune.methods.adapters import load_trainable_state, trainable_state
from fedtune.methods.base import ClientJob, ClientUpdate, LocalResult, Method
from fedtune.rounds.release import Release
from fedtune.tasks import Learner
from fedtune.training import train_steps
from fedtune.wire import TensorDict


def train_adapter(model: PeftModel, learner: Learner, job: ClientJob, t: TrainSection) -> LocalResult:
    """Local training of ``model``'s trainable tensors, by DP-SGD if the job says
    so; the result also holds where they started, against which DP clips."""
    start = trainable_state(model)
    stats = train_steps(model, learner, job.data, job.local_steps or t.local_steps, t, job.seed, dp=job.dp_sgd)
    # FedAvg weights by local dataset size, not by examples processed.
    return LocalResult(trainable_state(model), len(job.data), stats.metrics(), start)


class AveragedAdapter(Method):
    """The server half of a method whose global state is one set of trainable
    tensors (``global_tensors``), the weighted average of the clients', loaded
    into the global ``model``."""

    model: PeftModel
    global_tensors: TensorDict

    def server_aggregate(self, updates: list[ClientUpdate], release: Release) -> None:
        self.global_tensors = {name: release.average(updates, name, t) for name, t in self.global_tensors.items()}
        load_trainable_state(self.model, self.global_tensors)

    def server_state(self) -> dict[str, object]:
        return {"global": self.global_tensors}

    def load_server_state(self, state: dict[str, object]) -> None:
        self.global_tensors = state["global"]
        load_trainable_state(self.model, self.global_tensors)

    def server_model(self) -> PeftModel:
        return self.model
