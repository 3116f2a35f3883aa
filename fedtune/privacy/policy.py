"""Privacy as one small policy per mode, chosen once from the config, in the spirit
of Opacus' accountants and Flower's DP wrappers. The server half charges rounds to
the accountant and says how updates are released; the client half prepares a
client's local job and finishes its result. The defaults do nothing: no DP."""

from __future__ import annotations

from typing import ClassVar

from fedtune.config import RunConfig
from fedtune.methods.base import ClientJob, ClientUpdate, LocalResult
from fedtune.privacy.accounting import Budget
from fedtune.rounds.participation import Sampler, Uniform
from fedtune.rounds.release import Release, by_examples
from fedtune.wire import TensorDict


class PrivacyPolicy:
    """The server half. Without DP: FedAvg weights, nothing charged, a uniform
    sample of federation.clients_per_round clients drawn from the run seed."""

    # Whether each round releases an aggregate whatever came back: no round is then
    # retried or skipped, as whether it is would depend on who took part.
    releases_every_round: ClassVar[bool] = False

    def __init__(self, config: RunConfig, partition_sizes: dict[int, int], root: int) -> None:
        """``root``: the seed of the server's randomness (the run seed, or under DP its secret)."""
        self.config, self.root = config, root

    def describe(self) -> str | None:
        """A line for the console on what is guaranteed, or None."""
        return None

    def sampler(self) -> Sampler:
        """How each round's clients are drawn from the candidates."""
        c = self.config
        return Uniform(c.federation.clients_per_round or c.partition.num_clients, self.root)

    def check_first_round(self) -> None:
        """Refuse, with a one-line error, a run in which no client could take part."""

    def refuses(self, cohort: list[int]) -> str | None:
        """Why a round with ``cohort`` must not run (the budget), or None."""
        return None

    def charge(self, cohort: list[int]) -> None:
        """Account a round that ``cohort`` trained in, whatever became of their updates."""

    def release(self, updates: list[ClientUpdate], rnd: int, expected_cohort: float) -> Release:
        """How ``updates`` combine; ``expected_cohort``: the sampler's expected cohort size."""
        return by_examples(updates)

    def update_bound(self) -> float | None:
        """A fixed bound on each update's norm, or None for the round's median rule
        (fedtune/rounds/robust.py)."""
        return None

    def epsilon(self) -> float | None:
        """Privacy spent so far (the largest over clients), or None without DP."""
        return None

    def summary_fields(self) -> dict[str, object]:
        """What the run summary says of privacy: nothing without DP."""
        return {}

    def state(self) -> object:
        """What the checkpoint keeps (load_state takes it back)."""
        return None

    def load_state(self, state: object) -> None:
        pass


class Accounted(PrivacyPolicy):
    """A policy with a budget: every round charged to each client's accountant, and
    the run stopped before any client would overspend."""

    mode: ClassVar[str]

    def __init__(self, config: RunConfig, partition_sizes: dict[int, int], root: int) -> None:
        super().__init__(config, partition_sizes, root)
        self.budget = Budget(config, partition_sizes)

    def check_first_round(self) -> None:
        self.budget.check_first_round()

    def refuses(self, cohort: list[int]) -> str | None:
        return self.budget.overspending(cohort)

    def charge(self, cohort: list[int]) -> None:
        self.budget.spend(cohort)

    def epsilon(self) -> float:
        return self.budget.max_epsilon()

    def summary_fields(self) -> dict[str, object]:
        return {"privacy": self.mode, "epsilon": self.epsilon(), "delta": self.config.privacy.delta}

    def state(self) -> object:
        return self.budget.history

    def load_state(self, state: object) -> None:
        self.budget.history = state


class ClientPrivacy:
    """The client half. ``memory`` is this client's own privacy state, kept on its node."""

    def prepare(self, job: ClientJob, memory: TensorDict) -> ClientJob:
        return job

    def finish(self, result: LocalResult, job: ClientJob, memory: TensorDict) -> LocalResult:
        return result

