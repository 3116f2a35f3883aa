"""Shared fixtures: a fast real model (MiniLM) and small configs that use it; the
docker-compose services' file systems on this machine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fedtune.config import RunConfig, TrainSection, from_dict
from fedtune.environment import configure_process
from fedtune.methods import get_method
from fedtune.methods.adapters import trainable_state, wrap_with_lora
from fedtune.privacy.dp_sgd import DPSGD
from fedtune.rounds.release import by_examples
from fedtune.task import client_data, load_model
from fedtune.training import train_steps
from fedtune.wire import TensorDict

configure_process()  # what every fedtune entry point does first


SMALL = {  # MiniLM on 120 Rotten Tomatoes snippets, 3 clients: seconds per round
    "run": {"rounds": 2},
    "model": {"name": "minilm", "max_length": 64},
    "data": {"test_size": 60, "train_size": 120},
    "partition": {"num_clients": 3},
    "train": {"local_steps": 3, "batch_size": 4, "lr": 1e-3},
}


def small_config(tmp_path, **sections) -> RunConfig:
    raw = {name: dict(values) for name, values in SMALL.items()}
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


def small_overrides(tmp_path=None) -> list[str]:
    """SMALL as `fedtune run --set` arguments; runs go to TMP_PATH/runs, or without it
    to the default, "runs" in the working directory."""
    args = [f"run.output_dir={tmp_path / 'runs'}"] if tmp_path else []
    args += [f"{s}.{k}={json.dumps(v)}" for s, values in SMALL.items() for k, v in values.items()]
    return [a for arg in args for a in ("--set", arg)]


@pytest.fixture
def config(tmp_path) -> RunConfig:
    return small_config(tmp_path)


def train_lora(config: RunConfig, train: TrainSection, steps: int, dp: DPSGD | None = None) -> tuple[TensorDict, list[int]]:
    """How ``steps`` of train_steps on client 0's data move the trainable tensors of a
    fresh MiniLM with LoRA, and the size of every batch it forwarded. lora_B starts non-zero, so that every factor
    has a gradient, and dropout is off, so that the chunking changes no function."""
    classifier = load_model(config)
    model = wrap_with_lora(classifier, config.lora, 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    sizes, encode = [], classifier.encode
    classifier.encode = lambda texts, device=None: sizes.append(len(texts)) or encode(texts, device)
    before = trainable_state(model)
    train_steps(model, classifier, client_data(config, 0), steps, train, seed=0, dp=dp)
    return {n: t - before[n] for n, t in trainable_state(model).items()}, sizes


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field_len(n: int) -> int:
    """Tag byte + length prefix + body for a length-delimited field (tags < 16)."""
    return 1 + _varint_len(n) + n


def expected_payload_size(method: str, rnd: int, client: str, tensors, num_examples: int = 0) -> int:
    """The protobuf wire size of a fedtune.Payload, computed by hand from the encoding
    rules, independently of the protobuf library."""
    header = _field_len(len(method)) + _field_len(len(client)) + (1 + _varint_len(rnd) if rnd else 0)
    size = _field_len(header)
    for name, t in tensors.items():
        shape_body = sum(_varint_len(d) for d in t.shape)
        body = (
            _field_len(len(name.encode()))
            + 2  # dtype enum: tag + one-byte value
            + (_field_len(shape_body) if t.dim() else 0)
            + _field_len(t.numel() * t.element_size())
        )
        size += _field_len(body)
    return size + (1 + _varint_len(num_examples) if num_examples else 0)


def assert_fedit_payload_sizes(config: RunConfig, ledger: list[dict]) -> None:
    """Every transfer of a FedIT run on SMALL is exactly the payload holding the
    adapter: downlinks carry no example count, each uplink its client's 40 of the 120."""
    method = get_method(config)
    method.server_init(load_model(config))
    adapter = method.server_downlink(0)
    for t in ledger:
        n = 40 if t["direction"] == "up" else 0
        assert t["payload_bytes"] == expected_payload_size("fedit", t["round"], t["client"], adapter, n)


def kept_copy(job) -> dict:
    """The weights a replaying client (FLoRA, FedKSeed) kept after its round."""
    from fedtune.methods.replay import DIGEST

    return job.replicas.get(bytes(job.state[DIGEST].tolist()))


def fedavg(method, updates) -> None:
    """The server half aggregates ``updates`` as plain FedAvg (no DP, no robust rule)."""
    method.server_aggregate(updates, by_examples(updates))


def uplink_rejection(method, tensors, client=0, rnd=1, num_examples=None, chain_specs=(), partition=40, **payload):
    """Why the server refuses ``tensors`` as ``client``'s uplink in round ``rnd``
    (encoded as a real payload and checked as the server checks it, the client's
    partition holding ``partition`` examples), or None."""
    from fedtune import wire
    from fedtune.clients import client_name
    from fedtune.codecs.spec import parse_chain
    from fedtune.rounds.validation import Expected, validate_payload

    chain = parse_chain(list(chain_specs), "compression.up")
    examples = partition if num_examples is None else num_examples
    header = {"method": method.name, "round": rnd, "client": client_name(client)} | payload
    data = wire.encode(wire.Payload(header["method"], header["round"], header["client"], tensors, examples), chain)
    _, rejection = validate_payload(data, Expected.of(method, chain, rnd, client, partition, method.config.train.local_steps))
    return None if rejection is None else f"{rejection.stage}: {rejection.reason}"


REPO = Path(__file__).resolve().parents[1]
APP = "/app"  # the Dockerfile's WORKDIR, where it copies this repository's files


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(volume, path in the container, read-only) for each of a compose service's volumes."""
    return [(source, target, mode == ["ro"]) for source, target, *mode in (v.split(":") for v in service.get("volumes", []))]


class ComposeFiles:
    """docker-compose.yml's named volumes as directories ROOT/volumes/NAME, and each
    service's file system as ROOT/rootfs/SERVICE, where each of its mounts is a
    symlink to its volume and /app one to this repository: what a container sees."""

    def __init__(self, compose: dict, root: Path) -> None:
        self.volumes = {name: root / "volumes" / name for name in compose["volumes"]}
        for path in self.volumes.values():
            path.mkdir(parents=True)
        self.rootfs = {name: root / "rootfs" / name for name in compose["services"]}
        for name, service in compose["services"].items():
            for target, source in [(APP, REPO), *((t, self.volumes[s]) for s, t, _ in mounts(service))]:
                link = self.rootfs[name] / target.lstrip("/")
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source, target_is_directory=True)

    def local(self, service: str, text: str) -> str:
        """TEXT (an argument, a variable) with SERVICE's container paths as paths here."""
        rootfs = self.rootfs[service]
        tops = "|".join(re.escape(path.name) for path in rootfs.iterdir())
        return re.sub(rf"(?<![\w.-])/({tops})(?![\w-])", lambda m: f"{rootfs}/{m[1]}", text)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny random Llama saved by save_pretrained, with SmolLM2-Instruct's tokenizer
    (and so its chat template): instruction tuning in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedtune.config import ModelSection
    from fedtune.models import resolve_model_path

    path = tmp_path_factory.mktemp("tiny-lm")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path(ModelSection(name="smollm2"))).save_pretrained(path)
    return path


def instruct_config(tmp_path, tiny_lm: Path, **sections) -> RunConfig:
    """The instruction task on chatterbot-corpus with the tiny LM, 3 clients."""
    base = {
        "task": {"kind": "instruct"},
        "model": {"name": str(tiny_lm), "max_length": 48},
        "data": {"source": "chatterbot", "test_size": 24, "train_size": 90},
        "instruct": {"max_new_tokens": 6, "generate_size": 8},
        "lora": {"rank": 4},
        "train": {"local_steps": 4, "batch_size": 6, "lr": 1e-2},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return small_config(tmp_path, **base)


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda run only where torch sees a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here (benchmarks/gpu_check.py runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
