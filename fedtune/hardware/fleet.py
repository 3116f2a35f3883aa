"""The simulated hardware of one run, kept by the server: each client's device
and plan, who is available and who fails in a round, how many local steps a
client can do before the deadline, and the simulated clock. It is the round
loop's participation policy when [hardware] is set."""

from __future__ import annotations

import dataclasses
import logging
import math

from fedtune.clients import client_name
from fedtune.config import RunConfig
from fedtune.hardware.catalogue import DeviceProfile
from fedtune.hardware.cost import ModelShape, compute_seconds, transfer_seconds
from fedtune.hardware.planner import Plan, plan_client
from fedtune.hardware.profiles import assign_devices
from fedtune.hardware.schedule import ClientTime, available, failures, round_seconds
from fedtune.methods.base import Method
from fedtune.report.rows import HardwareRow
from fedtune.rounds.participation import ClientReport, Participation, Sampler
from fedtune.tasks import Learner

log = logging.getLogger("fedtune")


class Fleet(Participation):
    def __init__(
        self, config: RunConfig, learner: Learner, method: type[Method], sampler: Sampler, device_memory: dict[int, int] | None = None
    ) -> None:
        """``device_memory``: bytes free on the accelerator of each client that measured
        one, which replaces its profile's memory in its plan."""
        clients = list(range(config.partition.num_clients))  # partition ids
        super().__init__(clients, sampler, config.train.local_steps)
        self.config, self.method = config, method
        self.kind = method.kind
        self.measured = device_memory or {}
        profiles = assign_devices(config.hardware, len(clients), config.run.seed)
        self.devices: dict[int, DeviceProfile] = {
            c: dataclasses.replace(d, memory=float(self.measured[c])) if c in self.measured else d for c, d in zip(clients, profiles)
        }
        self.shape = ModelShape.of(learner.model)
        footprint = method.footprint(config, learner, {*config.hardware.rank_choices, config.lora.rank})
        context = config.model.max_length  # the worst case: every sequence padded to the limit
        self.plans: dict[int, Plan] = {c: plan_client(config, self.kind, self.shape, d, context, footprint) for c, d in self.devices.items()}
        self.clock = 0.0
        self.attempts: dict[int, int] = {}  # tries of each round so far (federation.round_retries)
        self.tokens_per_step = {c: config.train.batch_size * context for c in clients}  # until measured
        self.sequence_length = {c: float(context) for c in clients}

    def state(self) -> dict[str, object]:
        return {"clock": self.clock, "tokens_per_step": self.tokens_per_step, "sequence_length": self.sequence_length}

    def load_state(self, state: dict[str, object]) -> None:
        self.clock, self.tokens_per_step, self.sequence_length = state["clock"], state["tokens_per_step"], state["sequence_length"]

    def planned(self, config: RunConfig) -> RunConfig:
        """``config`` with the planned rank of each client written out for the method
        (hardware.plan_ranks then done); a client that cannot train gets the smallest
        rank and is never sampled."""
        if not self.config.hardware.plan_ranks:
            return config
        smallest = min(self.config.hardware.rank_choices)
        ranks = [self.plans[c].rank or smallest for c in self.clients]
        config = self.method.with_client_ranks(config, ranks)
        return dataclasses.replace(config, hardware=dataclasses.replace(config.hardware, plan_ranks=False))

    def eligible(self) -> list[int]:
        return sorted(c for c, p in self.plans.items() if p.kind == self.kind)

    def describe(self) -> str:
        for c, reason in sorted(self.excluded().items()):
            log.warning("%s excluded: %s", client_name(c), reason)
        lines = [f"{'client':<10}{'device':<16}{'plan':<22}predicted peak memory"]
        for c in self.clients:
            p = self.plans[c]
            plan = f"LoRA rank {p.rank}" if p.kind == "adapter" else p.kind.replace("_", "-")
            if p.kind != self.kind:
                plan = "excluded"
            measured = f" of {self.measured[c] / 1e9:.2f} GB free (measured)" if c in self.measured else ""
            lines.append(f"{client_name(c):<10}{p.device.name:<16}{plan:<22}{p.memory / 1e9:.2f} GB{measured}")
        return "\n".join(lines)

    def excluded(self) -> dict[int, str]:
        """Clients that cannot take part in this run's method, with the reason."""
        reasons = {}
        for c, p in self.plans.items():
            if p.kind != self.kind:
                reasons[c] = p.reason or f"{p.device.name} runs {p.kind.replace('_', '-')} only"
        return reasons

    def expected_cohort(self) -> float:
        """Over the clients the method can run on, each available as often as its device is."""
        return self.sampler.expected(sum(self.devices[c].availability for c in self.eligible()))

    def candidates(self, rnd: int) -> list[int]:
        """Eligible clients whose devices are available this round. Availability is
        drawn for every device, so a device is up in the same rounds whichever
        method (and so whichever set of eligible clients) a run has."""
        eligible = set(self.eligible())
        return [c for c in available(self.devices, self.config.run.seed, rnd) if c in eligible]

    def steps(self, client: int, down_bytes: int) -> int:
        """Local steps ``client`` can finish before hardware.deadline_s (partial
        stragglers), from the work per step it last reported; the uplink is assumed
        as large as the downlink."""
        h, steps = self.config.hardware, self.config.train.local_steps
        if not h.deadline_s or h.stragglers != "partial":
            return steps
        device = self.devices[client]
        talk = transfer_seconds(down_bytes, device.downlink, device.latency) + transfer_seconds(down_bytes, device.uplink, device.latency)
        per_step = compute_seconds(self.shape, self.kind, self.tokens_per_step[client], self.sequence_length[client], device)
        return max(0, min(steps, math.floor((h.deadline_s - talk) / per_step)))

    def client_time(self, client: int, down_bytes: int, up_bytes: int, metrics: dict[str, float]) -> ClientTime:
        """The simulated time of ``client``'s round from the work it reported."""
        device = self.devices[client]
        tokens, sequences = int(metrics["tokens"]), max(1, int(metrics["sequences"]))
        self.sequence_length[client] = tokens / sequences
        self.tokens_per_step[client] = tokens / max(1, int(metrics.get("steps", self.config.train.local_steps)))
        return ClientTime(
            transfer_seconds(down_bytes, device.downlink, device.latency),
            compute_seconds(self.shape, self.kind, tokens, tokens / sequences, device),
            transfer_seconds(up_bytes, device.uplink, device.latency),
        )

    def settle(self, rnd: int, reports: dict[int, ClientReport]) -> tuple[list[int], HardwareRow]:
        times = {c: self.client_time(c, r.down_bytes, r.up_bytes, r.metrics) for c, r in reports.items()}
        return self.settle_times(rnd, times)

    def settle_times(self, rnd: int, times: dict[int, ClientTime]) -> tuple[list[int], HardwareRow]:
        """Apply this round's simulated failures and deadline to the clients that
        replied: (the clients whose updates count, the round on the hardware)."""
        attempt = self.attempts[rnd] = self.attempts.get(rnd, -1) + 1
        failed = failures(self.devices, list(times), self.config.run.seed, rnd, attempt)
        for client, at in failed.items():
            log.warning("round %d: %s dropped: its %s failed %.0f%% into the round (simulated)", rnd, client_name(client),
                        self.devices[client].name, 100 * at)
        finished = {c: t for c, t in times.items() if c not in failed}
        seconds, stragglers = round_seconds(finished, self.config.hardware.deadline_s)
        for client in stragglers:
            log.warning("round %d: %s dropped: %.0f s past the %.0f s deadline (simulated %s)", rnd, client_name(client),
                        times[client].total_s - self.config.hardware.deadline_s, self.config.hardware.deadline_s, self.devices[client].name)
        if failed and not finished:  # everyone failed: the server waited for the last failure, or the deadline
            seconds = max(times[c].total_s * at for c, at in failed.items())
            seconds = min(seconds, self.config.hardware.deadline_s or seconds)
        self.clock += seconds
        kept = sorted(c for c in finished if c not in stragglers)
        took_part = {name: sum(self.devices[c].name == name for c in kept) for name in sorted({d.name for d in self.devices.values()})}
        return kept, HardwareRow(seconds, self.clock, len(failed), len(stragglers), took_part)

