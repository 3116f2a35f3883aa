"""FFA-LoRA (Sun et al., 2024): A frozen at a value every party derives from the run
seed, only B (and the learner head) trained, sent and averaged.

With A shared and fixed, the update is linear in B, so FedAvg is exact:
mean_k(B_k) A = mean_k(B_k A). A never crosses the network."""

from __future__ import annotations

from peft import PeftModel

from fedtune.methods.adapters import wrap_with_lora
from fedtune.methods.fedit import FedIT
from fedtune.tasks import Learner


class FFALoRA(FedIT):
    name = "ffa_lora"

    def wrap(self, learner: Learner, seed: int) -> PeftModel:
        # The run seed, not the per-client one: every party draws the same A.
        model = wrap_with_lora(learner, self.config.lora, self.config.run.seed)
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
        return model
