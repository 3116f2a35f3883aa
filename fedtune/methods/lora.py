"""LoRA plumbing shared by the adapter methods: wrap a classifier, find its LoRA
layers, read and write its trainable tensors by name, average them (and the
server half of the methods that keep one averaged set), export them."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.error import NoMatchingPeftModuleError

from fedtune.codecs.delta import has_reference
from fedtune.config import LoraSection, RunConfig, TrainSection
from fedtune.errors import FedtuneError
from fedtune.methods.base import ClientJob, ClientUpdate, LocalResult, Method
from fedtune.models import Classifier, export_info
from fedtune.privacy.mechanism import Noise
from fedtune.task import load_model
from fedtune.training import train_steps
from fedtune.wire import TensorDict

PREFIX = "base_model.model."  # where PeftModel puts the wrapped model's names


# peft 0.21 still calls a transformers 5 method that warns of its own rename, once per wrap.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def wrap_with_lora(classifier: Classifier, cfg: LoraSection, seed: int) -> PeftModel:
    """Inject LoRA into ``cfg.target_modules`` (empty: PEFT's default for the
    architecture, the attention query and value projections); the classifier head
    is trained in full. The seed fixes the random init of A."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) or None,
        modules_to_save=[classifier.head_name],
    )
    try:
        return get_peft_model(classifier.model, config)
    except (NoMatchingPeftModuleError, ValueError) as exc:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in classifier.model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise FedtuneError(
            f"lora.target_modules {list(cfg.target_modules)} fits no layer of this model "
            f"({type(exc).__name__}); its linear layers are: {', '.join(linear)}"
        ) from None


def train_adapter(model: PeftModel, classifier: Classifier, job: ClientJob, t: TrainSection) -> LocalResult:
    """Local training of ``model``'s trainable tensors, by DP-SGD if the job says
    so; the result also holds where they started, against which DP clips."""
    start = trainable_state(model)
    stats = train_steps(model, classifier, job.data, job.local_steps or t.local_steps, t, job.seed, dp=job.dp_sgd)
    # FedAvg weights by local dataset size, not by examples processed.
    return LocalResult(trainable_state(model), len(job.data), stats.metrics(), start)


def trainable_state(model: torch.nn.Module) -> TensorDict:
    """Copies of the trainable tensors, keyed by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: TensorDict) -> None:
    """Overwrite trainable parameters in place; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        raise ValueError(f"adapter tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def weighted_average(updates: list[ClientUpdate], noise: Noise | None = None) -> TensorDict:
    """FedAvg: sum_k (n_k / n) * x_k for every tensor name, in a fixed client order.
    Changes against a reference (lossy codecs) are added as they come, sparse ones
    straight into the one dense accumulator: no client's update is densified.
    ``noise`` is scaled like the sum it covers: by the largest client weight."""
    total = sum(u.num_examples for u in updates)
    largest_weight = max(u.num_examples for u in updates) / total
    average = {}
    for name in updates[0].tensors:
        acc = torch.zeros(updates[0].tensors[name].shape)
        for u in updates:
            weight = u.num_examples / total
            acc.add_(u.tensors[name], alpha=weight)
            if has_reference(name, u.tensors[name], u.reference):
                acc.add_(u.reference[name], alpha=weight)
        if noise is not None:
            acc.add_(noise.sample(acc.shape, largest_weight))
        average[name] = acc
    return average


class AveragedAdapter(Method):
    """The server half of a method whose global state is one set of trainable
    tensors (``global_tensors``), the weighted average of the clients', loaded
    into the global ``model``."""

    model: PeftModel
    global_tensors: TensorDict

    def server_aggregate(self, updates: list[ClientUpdate], noise: Noise | None = None) -> None:
        self.global_tensors = weighted_average(updates, noise)
        load_trainable_state(self.model, self.global_tensors)

    def server_state(self) -> dict[str, object]:
        return {"global": self.global_tensors}

    def load_server_state(self, state: dict[str, object]) -> None:
        self.global_tensors = state["global"]
        load_trainable_state(self.model, self.global_tensors)

    def server_model(self) -> PeftModel:
        return self.model


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers, keyed by their path in the unwrapped model."""
    return {n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextmanager
def temporarily_wrapped(classifier: Classifier, cfg: LoraSection, seed: int) -> Iterator[PeftModel]:
    """The classifier wrapped with LoRA inside the block and unwrapped after it: for
    methods that need PEFT's choice of layers but train no standard LoRA."""
    model = wrap_with_lora(classifier, cfg, seed)
    try:
        yield model
    finally:
        model.unload()


def save_adapter(model: PeftModel, classifier: Classifier, directory: Path) -> None:
    """A PEFT adapter directory (LoRA weights and the trained head), the tokenizer,
    and fedtune.json with what a loader needs besides: label count, pad token, prompt."""
    model.save_pretrained(directory)
    classifier.tokenizer.save_pretrained(directory)
    export_info(directory, classifier, model.peft_config["default"].base_model_name_or_path)


def export_as_lora(config: RunConfig, rank: int, alpha: float, tensors: TensorDict, directory: Path) -> None:
    """Save ``tensors`` (every lora_A, lora_B and head tensor of a standard LoRA
    adapter of this rank and alpha) with :func:`save_adapter`, on a fresh base model."""
    classifier = load_model(config)
    model = wrap_with_lora(classifier, dataclasses.replace(config.lora, rank=rank, alpha=alpha), config.run.seed)
    load_trainable_state(model, tensors)
    save_adapter(model, classifier, directory)
