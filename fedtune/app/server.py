"""The ServerApp: compose the run's policies once from the config, then play the
rounds. The same code runs under `fedtune run` (simulation) and `flwr run` (any
federation).

A round is a plain sequence over those policies: the participation policy draws
the cohort, the exchange sends downlinks and checks uplinks, the privacy policy
charges the round and says how updates are released, the method aggregates, and
the recorder writes the row. None of them branches on another's mode; the loop
holds no algorithm (docs/architecture.md).
"""

from __future__ import annotations

import logging
import math
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from tqdm import tqdm

from fedtune import checkpoint
from fedtune.app.enrollment import enroll
from fedtune.app.exchange import Exchange, RoundOutcome
from fedtune.clients import client_name
from fedtune.codecs.link import Codecs
from fedtune.config import RunConfig, from_dict, load_config
from fedtune.devices import resolve_device
from fedtune.environment import configure_process
from fedtune.errors import FedtuneError
from fedtune.hardware.fleet import Fleet
from fedtune.methods.base import Method
from fedtune.methods.registry import get_method, method_class
from fedtune.privacy import secrets
from fedtune.privacy.factory import server_privacy
from fedtune.privacy.policy import PrivacyPolicy
from fedtune.report.recorder import Recorder
from fedtune.report.rows import Dropped, RunSummary
from fedtune.report.run_dir import create_run_dir, finish, write_generations
from fedtune.rounds.participation import Participation, Sampler
from fedtune.rounds.robust import Robustness
from fedtune.task import client_partitions, load_model, load_splits
from fedtune.tasks import EvalResult, Examples, Generation, Learner

ADAPTER = "adapter"  # the exported global model, inside the run directory
log = logging.getLogger("fedtune")


@dataclass
class Server:
    config: RunConfig
    run_dir: Path
    method: Method
    learner: Learner
    test: Examples
    exchange: Exchange
    privacy: PrivacyPolicy
    recorder: Recorder
    generations: dict[str, tuple[Generation, ...]] = field(default_factory=dict)  # "zero_shot", "final": where the task generates

    def start(self, saved: dict | None) -> int:
        """The first round to play: after the checkpoint's, or 1 after evaluating the zero-shot model."""
        if saved:
            self.method.load_server_state(saved["method"])
            self.privacy.load_state(saved["privacy"])
            self.exchange.participation.load_state(saved["participation"])
            print(f"resuming {self.run_dir} after round {saved['round']}", flush=True)
            return saved["round"] + 1
        self.recorder.record(0, self._evaluate(0))
        return 1

    def play(self, rnd: int, bar: tqdm) -> str | None:
        """One round; returns why the run stops before it, or None. Too few valid
        updates: sample and train again, up to round_retries times, then skip."""
        fed, outcomes = self.config.federation, []
        tries = 1 if self.privacy.releases_every_round else fed.round_retries + 1
        for attempt in range(tries):
            cohort = self.exchange.participation.cohort(rnd, attempt)
            if reason := self.privacy.refuses(cohort):
                return f"stopped before round {rnd} to stay within the privacy budget: {reason}"
            outcomes.append(self.exchange.train_round(rnd, cohort, lambda: bar.update(1)))
            self.privacy.charge(cohort)  # they trained, whatever became of their updates
            if enough := len(outcomes[-1].updates) >= fed.min_replies or self.privacy.releases_every_round:
                break
            tqdm.write(f"round {rnd}: {len(outcomes[-1].updates)} valid update(s), fewer than federation.min_replies="
                       f"{fed.min_replies}; " + ("retrying" if attempt + 1 < tries else "round skipped, the model is unchanged"))
        updates = outcomes[-1].updates
        if enough:
            release = self.privacy.release(updates, rnd, self.exchange.participation.expected_cohort())
            self.method.server_aggregate(updates, self.exchange.robustness.rule(release))
        self.recorder.record(rnd, self._evaluate(rnd), **_round_fields(outcomes), skipped=not enough, epsilon=self.privacy.epsilon())
        self._checkpoint(rnd)
        return None

    def finish(self, stopped: str | None) -> RunSummary:
        if stopped:
            tqdm.write(stopped)
        _export(self.method, self.run_dir / ADAPTER)
        summary = self.recorder.summary(self.config, stopped, self.privacy.summary_fields())
        finish(self.run_dir, self.recorder.rows, summary)
        if len(self.generations) == 2:
            write_generations(self.run_dir, self.generations["zero_shot"], self.generations["final"])
        return summary

    def _evaluate(self, rnd: int) -> EvalResult:
        """Held-out metrics; generation (instruct) on the zero-shot model, the last
        round and every instruct.generate_every rounds."""
        every = self.config.instruct.generate_every
        generate = rnd in (0, self.config.run.rounds) or bool(every and rnd % every == 0)
        result = self.learner.evaluate(self.method.server_model(), self.test, self.config.train.eval_batch_size, generate)
        if result.generations:
            self.generations["zero_shot" if rnd == 0 else "final"] = result.generations
        return result

    def _checkpoint(self, rnd: int) -> None:
        checkpoint.save(self.run_dir, {
            "round": rnd,
            "method": self.method.server_state(),
            "privacy": self.privacy.state(),
            "participation": self.exchange.participation.state(),
            "root": self.exchange.root,
            "wall_time_s": self.recorder.wall_time(),
        })


def serve(grid: Grid, config: RunConfig, run_dir: Path, resume: bool = False) -> RunSummary:
    """Run the whole federated job, or with ``resume`` continue it after the last
    round checkpointed in ``run_dir``; returns the summary also written to summary.json."""
    saved = checkpoint.load(run_dir) if resume else None
    server = compose(grid, config, run_dir, saved)
    first = server.start(saved)
    per_round = config.federation.clients_per_round or config.partition.num_clients
    bar = tqdm(total=(config.run.rounds - first + 1) * per_round, desc="client rounds", unit="client", leave=False)
    stopped = None
    try:  # closed however the rounds end: a Ctrl-C must not leave half a bar before the CLI's message
        for rnd in range(first, config.run.rounds + 1):
            if stopped := server.play(rnd, bar):
                break
    finally:
        bar.close()
    return server.finish(stopped)


def compose(grid: Grid, config: RunConfig, run_dir: Path, saved: dict | None) -> Server:
    """Every policy of the run, chosen once from the config, and the clients enrolled."""
    train, test = load_splits(config)
    learner = load_model(config, resolve_device(config.model.server_device, "model.server_device"))
    examples = {c: len(p) for c, p in enumerate(client_partitions(config))}  # the server's own count, not the clients'
    root = saved["root"] if saved else secrets.server_root(run_dir, config)
    privacy = server_privacy(config, examples, root)
    enrolled = enroll(grid, config, train.label_names, examples)
    participation, planned = _participation(config, learner, privacy.sampler(), enrolled.device_memory)
    if planned != config:  # the ranks planned from what the clients measured: every client gets them
        enroll(grid, planned, train.label_names, examples, announce=False)
    config = planned
    method = get_method(config)
    method.check(learner)
    method.server_init(learner)
    nodes = enrolled.nodes
    if line := privacy.describe():
        print(line, flush=True)
    privacy.check_first_round()
    recorder = Recorder(run_dir, learner.baseline(train, test),
                        saved["round"] if saved else None, saved["wall_time_s"] if saved else 0.0, learner.metric)
    exchange = Exchange(grid, config, method, nodes, examples, root, Codecs.of(config), participation,
                        Robustness(config.federation, privacy.update_bound()), recorder.ledger)
    return Server(config, run_dir, method, learner, test, exchange, privacy, recorder)


def _participation(
    config: RunConfig, learner: Learner, sampler: Sampler, device_memory: dict[int, int]
) -> tuple[Participation, RunConfig]:
    """Every client a candidate every round, or the simulated fleet ([hardware]), with
    the config it plans (the ranks clients train, where it picks them) from each
    client's measured accelerator memory where it has one."""
    if not config.hardware.modelled:
        return Participation(list(range(config.partition.num_clients)), sampler, config.train.local_steps), config
    fleet = Fleet(config, learner, method_class(config.federation.method), sampler, device_memory)
    print(fleet.describe(), flush=True)
    return fleet, fleet.planned(config)


def _round_fields(outcomes: list[RoundOutcome]) -> dict[str, object]:
    """What a round's row says of its exchanges (every attempt's drops, the last
    attempt's training; nothing of training if no valid uplink came)."""
    last, rejections = outcomes[-1], [r for o in outcomes for r in o.rejections]
    stages = sorted({r.stage for r in rejections})
    fields = {
        "sampled": sum(o.sampled for o in outcomes),
        "attempts": len(outcomes) if len(outcomes) > 1 else None,
        "rejected": {s: sum(r.stage == s for r in rejections) for s in stages} or None,
        "dropped": [Dropped(client_name(r.client), r.stage, r.reason) for r in rejections] or None,
        "hardware": last.hardware,
    }
    if not last.losses:
        return fields
    trained = [loss for loss in last.losses if math.isfinite(loss)]  # a client that took no step has none
    return fields | {
        "aggregated": len(last.updates),
        "train_loss": float(np.mean(trained)) if trained else None,
        "round_train_time_s": last.round_train_time_s,
        "client_train_time_s": last.client_train_time_s,
    }


def _export(method: Method, target: Path) -> None:
    """Export beside ``target`` and rename: a crash never leaves a half-written model."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    method.export(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


# -- entry points ----------------------------------------------------------------

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run`: the app's run config names a run directory that `fedtune deploy`
    prepared (its config.toml, and to resume, its checkpoint), or a config and
    overrides, the run then sized to the SuperNodes present. A user's mistake is
    one logged line, not a traceback."""
    configure_process()
    run_config = context.run_config
    try:
        if run_dir := str(run_config.get("run-dir", "")):
            serve(grid, load_config(Path(run_dir) / "config.toml"), Path(run_dir), bool(run_config.get("resume", False)))
            return
        overrides = shlex.split(str(run_config.get("overrides", "")))
        config = sized_to_federation(grid, load_config(str(run_config["config"]), overrides), overrides)
        run_dir = create_run_dir(config)
        print(f"run directory: {run_dir.resolve()}", flush=True)
        serve(grid, config, run_dir)
    except FedtuneError as exc:
        log.error("error: %s", exc)
        raise SystemExit(2) from None


def sized_to_federation(grid: Grid, config: RunConfig, overrides: list[str], settle_s: float = 5.0,
                        wait_s: float = 60.0) -> RunConfig:
    """``config`` with one client per SuperNode connected, once their number has
    not changed for ``settle_s`` (a federation of a given size is not configured in
    the app but in Flower's connection, options.num-supernodes)."""
    count, since, deadline = -1, time.monotonic(), time.monotonic() + wait_s
    while time.monotonic() < deadline and (count < 1 or time.monotonic() - since < settle_s):
        if (now := len(grid.get_node_ids())) != count:
            count, since = now, time.monotonic()
        time.sleep(0.5)
    asked = next((o.partition("=")[2] for o in overrides if o.startswith("partition.num_clients=")), None)
    if not count:
        raise FedtuneError(f"no SuperNode connected within {wait_s:.0f} s; start the federation's SuperNodes first")
    if asked is not None and int(asked) != count:
        raise FedtuneError(
            f"the federation has {count} SuperNodes but the overrides ask for partition.num_clients={asked}; set the "
            "connection's options.num-supernodes in Flower's config.toml (FLWR_HOME) to the clients you want"
        )
    print(f"federation: {count} SuperNodes, one client each (partition.num_clients={count})", flush=True)
    raw = config.to_dict()
    raw["partition"]["num_clients"] = count
    return from_dict(raw)


def make_server_app(config: RunConfig, run_dir: Path, outcome: dict, resume: bool = False) -> ServerApp:
    """`fedtune run`: a ServerApp bound to an already validated config. ``outcome``
    receives the summary, or the exception, since the simulation swallows both."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = serve(grid, config, run_dir, resume)
        except BaseException as exc:  # handed to the CLI thread, which reports it
            outcome["error"] = exc

    return server
