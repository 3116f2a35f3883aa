"""PEFT plumbing shared by the methods: wrap a learner with LoRA, find its LoRA
layers, read and write its trainable tensors by name, count what it trains, and
save it where transformers + PEFT load it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.error import NoMatchingPeftModuleError

from fedtune.config import LoraSection, RunConfig
from fedtune.errors import FedtuneError
from fedtune.task import load_model
from fedtune.tasks import Learner
from fedtune.wire import TensorDict

PREFIX = "base_model.model."  # where PeftModel puts the wrapped model's names


def wrap_with_lora(learner: Learner, cfg: LoraSection, seed: int) -> PeftModel:
    """Inject LoRA into ``cfg.target_modules`` (empty: PEFT's default for the
    architecture, the attention query and value projections); a classifier's head
    is trained in full. The seed fixes the random init of A."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) or None,
        modules_to_save=[learner.head_name] if learner.head_name else None,
    )
    try:
        return get_peft_model(learner.model, config)
    except (NoMatchingPeftModuleError, ValueError) as exc:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in learner.model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise FedtuneError(
            f"lora.target_modules {list(cfg.target_modules)} fits no layer of this model "
            f"({type(exc).__name__}); its linear layers are: {', '.join(linear)}"
        ) from None


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


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers, keyed by their path in the unwrapped model."""
    return {n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def check_ranks(config: RunConfig, model: PeftModel) -> None:
    """Refuse every configured rank above the smaller side of a layer ``model``
    adapts: B A there has rank at most that, so a larger rank adds only parameters
    and time (and leaves Fed-SB's truncated SVD short of rows)."""
    path, layer = min(lora_layers(model).items(), key=lambda item: min(item[1].in_features, item[1].out_features))
    limit = min(layer.in_features, layer.out_features)
    named: dict[str, int | list[int]] = {"lora.rank": config.lora.rank, "flora.client_ranks": config.flora.client_ranks}
    if config.hardware.plan_ranks:
        named["hardware.rank_choices"] = config.hardware.rank_choices
    for key, value in named.items():
        if max(value if isinstance(value, list) else [value], default=0) > limit:
            raise FedtuneError(f"config key {key} must be at most {limit}, the smaller side of adapted layer {path} "
                               f"({layer.out_features} x {layer.in_features}), got {value!r}")


@contextmanager
def temporarily_wrapped(learner: Learner, cfg: LoraSection, seed: int) -> Iterator[PeftModel]:
    """The learner wrapped with LoRA inside the block and unwrapped after it: for
    methods that need PEFT's choice of layers but train no standard LoRA."""
    model = wrap_with_lora(learner, cfg, seed)
    try:
        yield model
    finally:
        model.unload()


def adapter_footprint(learner: Learner, cfg: LoraSection, seed: int, ranks: set[int]) -> tuple[dict[int, int], int]:
    """Trained parameters of a LoRA adapter at each rank (rank * (in + out) per
    adapted layer, plus the head), and the largest tensor zeroth-order tuning
    perturbs (an adapted layer's weight or the head)."""
    with temporarily_wrapped(learner, cfg, seed) as peft:
        layers = [layer.base_layer for layer in lora_layers(peft).values()]
    head = sum(p.numel() for p in getattr(learner.model, learner.head_name).parameters()) if learner.head_name else 0
    per_rank = sum(layer.in_features + layer.out_features for layer in layers)
    largest = max([layer.weight.numel() for layer in layers] + [head])
    return {r: r * per_rank + head for r in ranks}, largest


def save_adapter(model: PeftModel, learner: Learner, directory: Path) -> None:
    """A PEFT adapter directory (LoRA weights and any trained head), the tokenizer,
    and fedtune.json with what a loader needs besides (the learner's export_info)."""
    model.save_pretrained(directory)
    learner.tokenizer.save_pretrained(directory)
    learner.export_info(directory, model.peft_config["default"].base_model_name_or_path)


def export_as_lora(config: RunConfig, rank: int, alpha: float, tensors: TensorDict, directory: Path) -> None:
    """Save ``tensors`` (every lora_A, lora_B and head tensor of a standard LoRA
    adapter of this rank and alpha) with :func:`save_adapter`, on a fresh base model."""
    learner = load_model(config)
    model = wrap_with_lora(learner, dataclasses.replace(config.lora, rank=rank, alpha=alpha), config.run.seed)
    load_trainable_state(model, tensors)
    save_adapter(model, learner, directory)
