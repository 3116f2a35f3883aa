"""Method registry: adding a method is one module plus one line here."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.methods.base import Method
from fedtune.methods.fed_sb import FedSB
from fedtune.methods.fedit import FedIT
from fedtune.methods.fedkseed import FedKSeed
from fedtune.methods.ffa_lora import FFALoRA
from fedtune.methods.flora import FLoRA
from fedtune.privacy.factory import check_method

METHODS: dict[str, type[Method]] = {m.name: m for m in (FedIT, FFALoRA, FLoRA, FedSB, FedKSeed)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise FedtuneError(f"unknown federation.method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(config: RunConfig) -> Method:
    method = method_class(config.federation.method)(config)
    check_method(config, method)
    return method
