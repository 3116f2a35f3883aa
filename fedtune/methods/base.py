"""The one interface every federated method implements.

A method decides what a client trains and sends, how the server aggregates, and
what each client receives. It speaks only in named tensors (``TensorDict``); the app
turns them into protobuf payloads, counts their bytes and moves them with Flower.
Server and client halves live in one class, as in PEFT's tuners, but they never
share state: the server half runs in the ServerApp, the client half in a ClientApp.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fedtune.codecs.delta import absolute
from fedtune.codecs.spec import parse_chain
from fedtune.config import RunConfig
from fedtune.data import TextDataset
from fedtune.errors import FedtuneError
from fedtune.methods.adapters import adapter_footprint, check_ranks, temporarily_wrapped
from fedtune.methods.replicas import ReplicaStore
from fedtune.privacy.dp_sgd import DPSGD
from fedtune.privacy.mechanism import clip_update
from fedtune.tasks import Learner
from fedtune.wire import TensorDict

if TYPE_CHECKING:
    from fedtune.rounds.release import Release


@dataclass(frozen=True)
class LocalResult:
    """What a client's local training produced: the tensors to send up and its stats."""

    tensors: TensorDict
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    # The tensors' values before local training (client-level DP clips the change);
    # empty when the tensors are the change themselves (FedKSeed's scalars).
    start: TensorDict = field(default_factory=dict)


@dataclass(frozen=True)
class ClientJob:
    """What a client's local round works with, besides its model and downlink."""

    client: int  # partition id
    data: TextDataset
    seed: int  # unique per (run, round, client), so that every run is reproducible
    # The client's own memory between rounds: the method reads and updates it in
    # place, the app keeps it on the node. It is never sent.
    state: TensorDict = field(default_factory=dict)
    dp_sgd: DPSGD | None = None  # sample-level DP: train with DP-SGD
    local_steps: int = 0  # > 0: fewer steps than train.local_steps (a partial straggler's share)
    # Where the client keeps copies too large for its node state (replayed weights).
    replicas: ReplicaStore = field(default_factory=ReplicaStore)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's decoded uplink, as the server aggregates it.

    With a lossy codec, a tensor whose name is in ``reference`` (what the client was
    sent) is the change against it, possibly a sparse tensor; ``dense(name)`` gives
    the value it stands for, and :meth:`fedtune.rounds.release.Release.average`
    averages without materializing it."""

    client: int  # partition id
    tensors: TensorDict
    num_examples: int
    reference: TensorDict = field(default_factory=dict)

    def dense(self, name: str) -> torch.Tensor:
        return absolute(name, self.tensors[name], self.reference)


@dataclass(frozen=True)
class TensorSpec:
    """What one uplink tensor must be: its dtype and shape, or for a ``variable``
    tensor, 1-d with at most ``shape[0]`` entries (FedKSeed's per-step pairs)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    variable: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def admits(self, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
        if dtype != self.dtype:
            return False
        if self.variable:
            return len(shape) == 1 and 0 <= shape[0] <= self.shape[0]
        return shape == self.shape

    def describe(self) -> str:
        return f"{self.dtype} {'1-d of at most ' if self.variable else ''}{self.shape}"


UplinkSpec = dict[str, TensorSpec]


@dataclass(frozen=True)
class Footprint:
    """What the hardware planner needs of a method: the parameters it trains at each
    LoRA rank, and the largest tensor a zeroth-order step perturbs."""

    trained_params: dict[int, int]
    largest_tuned: int


class Method(ABC):
    name: ClassVar[str]
    # "adapter": trains a LoRA-style adapter by backpropagation; "zeroth_order":
    # forward passes only (what the hardware model charges and who can run it).
    kind: ClassVar[str] = "adapter"

    # Whether clients may train adapters of different ranks (a rank per client).
    heterogeneous_ranks: ClassVar[bool] = False
    # Whether the payloads are float tensors that the codecs of [compression] apply to.
    compressible: ClassVar[bool] = True
    # Whether the downlink may be rounded by a lossy codec: not when clients must
    # rebuild the server's state exactly (replayed rounds, fixed bases).
    lossy_downlink: ClassVar[bool] = True
    # Whether clients can add shares of client-level DP noise (privacy.noise_on "clients").
    noise_shares: ClassVar[bool] = True
    # Whether the server stacks the clients' tensors side by side rather than
    # averaging them: then no robust rule applies, and each client's are released alone.
    stacks_clients: ClassVar[bool] = False

    def __init__(self, config: RunConfig) -> None:
        if config.federation.aggregator != "mean" and self.stacks_clients:
            raise FedtuneError(
                f"federation.aggregator {config.federation.aggregator!r} combines averaged tensors coordinate by "
                f"coordinate, but federation.method {self.name!r} stacks each client's tensors; use aggregator 'mean'"
            )
        if config.hardware.plan_ranks and not self.heterogeneous_ranks:
            raise FedtuneError(
                f"hardware.plan_ranks gives each client its own rank, but federation.method {self.name!r} "
                "trains one rank for all clients; use a method with a rank per client (flora)"
            )
        if (config.compression.up or config.compression.down) and not self.compressible:
            raise FedtuneError(
                f"[compression] does not apply to federation.method {self.name!r}, which has its own encodings"
            )
        if parse_chain(config.compression.down, "compression.down").lossy and not self.lossy_downlink:
            raise FedtuneError(
                f"compression.down {config.compression.down} is lossy, but federation.method {self.name!r} needs "
                "its downlink exact (clients rebuild the server's state from it); use zstd or deflate only"
            )
        self.config = config

    @classmethod
    def with_client_ranks(cls, config: RunConfig, ranks: list[int]) -> RunConfig:
        """``config`` with one LoRA rank per client (hardware.plan_ranks' plan), for
        methods with ``heterogeneous_ranks``."""
        raise NotImplementedError(f"{cls.name} trains one rank for all clients")

    @classmethod
    def footprint(cls, config: RunConfig, learner: Learner, ranks: set[int]) -> Footprint:
        """What the hardware planner charges: a LoRA adapter at each rank in ``ranks``,
        and zeroth-order tuning of the layers LoRA would adapt."""
        return Footprint(*adapter_footprint(learner, config.lora, config.run.seed, ranks))

    def private_release_blocker(self) -> str | None:
        """Why this method, as configured, cannot run under differential privacy, or None."""
        return None

    def clipped(self, result: LocalResult, bound: float) -> LocalResult:
        """``result`` with its update, the change of its float tensors from
        ``result.start`` taken as one vector, scaled to L2 norm at most ``bound``."""
        return dataclasses.replace(result, tensors=clip_update(result.tensors, result.start, bound)[0])

    def check(self, learner: Learner) -> None:
        """Raise, before server_init and without its cost, the one-line error a user's
        mistake would meet later (the CLI's preflight, the ServerApp): by default,
        that LoRA fits the model at every configured rank."""
        with temporarily_wrapped(learner, self.config.lora, self.config.run.seed) as peft:
            check_ranks(self.config, peft)

    # -- server half ---------------------------------------------------------
    @abstractmethod
    def server_init(self, learner: Learner) -> None:
        """Build the global state from the base model (loaded with the run seed)."""

    @abstractmethod
    def server_downlink(self, client: int) -> TensorDict:
        """What ``client`` receives at the start of a round (may differ per client)."""

    @abstractmethod
    def server_aggregate(self, updates: list[ClientUpdate], release: Release) -> None:
        """Fold one round's updates (sorted by client) into the global state, with
        the weights and noise of ``release``."""

    def client_failed(self, client: int) -> None:
        """``client`` sent no update (it failed or vanished): it may have lost what
        it kept between rounds."""

    def uplink_template(self, client: int) -> TensorDict:
        """Tensors with the names, shapes and dtypes ``client`` must send (values
        unused). By default: what it was sent."""
        return self.server_downlink(client)

    def uplink_spec(self, client: int) -> UplinkSpec:
        """What ``client`` must send, checked before anything is decoded: by default
        the names, dtypes and shapes of its uplink template."""
        return {n: TensorSpec(t.dtype, tuple(t.shape)) for n, t in self.uplink_template(client).items()}

    def check_update(self, update: ClientUpdate) -> str | None:
        """Why the values of a well-formed, finite update are still not acceptable, or None."""
        return None

    def update_norm(self, update: ClientUpdate) -> float:
        """L2 norm of the update: its change from the template's values (what the
        client was sent), over its float tensors taken as one vector."""
        template = self.uplink_template(update.client)
        return math.sqrt(sum(
            float((update.dense(n) - template[n].detach()).double().square().sum()) for n, t in update.tensors.items() if t.is_floating_point()
        ))

    @abstractmethod
    def server_state(self) -> dict[str, object]:
        """Everything the server half needs to continue after a restart (tensors,
        lists and numbers, for torch.save); client state is not in it."""

    @abstractmethod
    def load_server_state(self, state: dict[str, object]) -> None:
        """Continue from :meth:`server_state`, after :meth:`server_init`. Clients
        may have lost their state too: the method must resend what they need."""

    @abstractmethod
    def server_model(self) -> nn.Module:
        """The current global model, ready to evaluate."""

    @abstractmethod
    def export(self, directory: Path) -> None:
        """Save the global model where the standard libraries load it (see README)."""

    # -- client half ---------------------------------------------------------
    @abstractmethod
    def client_train(self, learner: Learner, downlink: TensorDict, job: ClientJob) -> LocalResult:
        """Start from ``downlink``, train locally on ``job.data``, return what to send up.

        ``learner`` is a freshly loaded base model the method may modify.
        """
