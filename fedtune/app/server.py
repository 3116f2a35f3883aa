"""The ServerApp: enroll clients, then per round send each sampled client its
downlink, collect uplinks, let the method aggregate, evaluate, and record.

It holds no algorithm: the method aggregates, the ledger counts, the report writes.
The same code runs under `fedtune run` (simulation) and `flwr run` (any federation).
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from tqdm import tqdm

from fedtune import checkpoint, report, wire
from fedtune.codecs.spec import Chain, parse_chain
from fedtune.config import RunConfig, load_config
from fedtune.data import majority_class_accuracy
from fedtune.errors import FedtuneError
from fedtune.ledger import Ledger, Transfer, content_bytes
from fedtune.methods import ClientUpdate, Method, get_method
from fedtune.hardware.fleet import Fleet
from fedtune.partition import partition_summary
from fedtune.privacy.accounting import Budget
from fedtune.privacy.mechanism import Noise
from fedtune.task import config_to_json, derive_seed, load_model, load_splits, partition_id_of
from fedtune.training import evaluate

log = logging.getLogger("fedtune")
RECORD = "fedtune"  # key of our ConfigRecord in every Flower message
ADAPTER = "adapter"  # the exported global model, inside the run directory


def serve(grid: Grid, config: RunConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run the whole federated job, or with ``resume`` continue it after the last
    round checkpointed in ``run_dir``; returns the summary also written to summary.json."""
    started = time.perf_counter()
    saved = checkpoint.load(run_dir) if resume else None
    train, test = load_splits(config)
    classifier = load_model(config)
    fleet = None
    if config.hardware.modelled:
        fleet = Fleet(config, classifier)
        config = fleet.planned(config)  # before enrollment: the clients train the planned ranks
        print(fleet.describe(), flush=True)
        for client, reason in sorted(fleet.excluded().items()):
            log.warning("%s excluded: %s", client, reason)
    method = get_method(config)
    method.server_init(classifier)
    nodes, sizes = _enroll(grid, config, train.label_names)
    budget = Budget(config, sizes) if config.privacy.mode != "none" else None
    if budget:
        budget.check_first_round()

    ledger = Ledger(run_dir / "ledger.jsonl")
    baselines = {"majority_accuracy": majority_class_accuracy(train.labels, test.labels)}
    rows: list[dict] = []
    first = 1
    if saved:
        method.load_server_state(saved["method"])
        if budget:
            budget.history = saved["privacy"]
        if fleet:
            fleet.load_state(saved["fleet"])
        rows = checkpoint.cut_back(run_dir / "metrics.jsonl", saved["round"])
        ledger = Ledger.resume(run_dir / "ledger.jsonl", saved["round"])
        started -= saved["wall_time_s"]
        first = saved["round"] + 1
        print(f"resuming {run_dir} after round {saved['round']}", flush=True)

    def evaluate_and_record(rnd: int, train_metrics: dict[str, float]) -> None:
        result = evaluate(method.server_model(), classifier, test, config.train.eval_batch_size)
        rows.append(report.round_row(rnd, result, ledger, started, train_metrics))
        report.append_metrics(run_dir, rows[-1])  # each finished round is on disk at once
        report.print_round(rows[-1], baselines)

    def save_checkpoint(rnd: int) -> None:
        checkpoint.save(run_dir, {
            "round": rnd,
            "method": method.server_state(),
            "privacy": budget.history if budget else None,
            "fleet": fleet.state() if fleet else None,
            "wall_time_s": time.perf_counter() - started,
        })

    if not saved:
        evaluate_and_record(0, {})
    baselines["zero_shot_accuracy"] = rows[0]["accuracy"]
    per_round = config.federation.clients_per_round or len(nodes)
    bar = tqdm(total=(config.run.rounds - first + 1) * per_round, desc="client rounds", unit="client", leave=False)
    stopped = ""
    fed = config.federation
    for rnd in range(first, config.run.rounds + 1):
        # Too few valid updates: sample and train again, up to round_retries times, then skip the round.
        for attempt in range(fed.round_retries + 1):
            candidates = fleet.participants(rnd) if fleet else sorted(nodes)
            sampled = _sample_clients(candidates, per_round, config.run.seed, rnd, attempt)
            if budget and (reason := budget.overspending(sampled)):
                stopped = f"stopped before round {rnd} to stay within the privacy budget: {reason}"
                break
            updates, train_metrics = _train_round(grid, config, method, rnd, {c: nodes[c] for c in sampled}, ledger, bar, fleet)
            if budget:
                budget.spend(sampled)  # they trained, whatever became of their updates
                train_metrics["epsilon"] = budget.max_epsilon()
            if len(updates) >= fed.min_replies:
                break
            tqdm.write(f"round {rnd}: {len(updates)} valid update(s), fewer than federation.min_replies={fed.min_replies}; "
                       + ("retrying" if attempt < fed.round_retries else "round skipped, the model is unchanged"))
        if stopped:
            tqdm.write(stopped)
            break
        if len(updates) >= fed.min_replies:
            noise = None
            if budget:
                updates, noise = _client_level_dp(config, budget, updates, rnd)
            method.server_aggregate(updates, noise)
        else:
            train_metrics["skipped"] = 1
        evaluate_and_record(rnd, train_metrics)
        save_checkpoint(rnd)
    bar.close()

    _export(method, run_dir / ADAPTER)
    summary = report.summarize(config, rows, ledger, baselines, time.perf_counter() - started)
    if stopped:
        summary["stopped"] = stopped
    report.finish(run_dir, rows, summary)
    return summary


def _export(method: Method, target: Path) -> None:
    """Export beside ``target`` and rename: a crash never leaves a half-written model."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    method.export(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _enroll(grid: Grid, config: RunConfig, label_names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Hand every node the run config; learn which client (partition) each node is,
    and how many examples it holds: (client -> node id, client -> examples)."""
    wanted = config.partition.num_clients
    deadline = time.monotonic() + config.federation.timeout_s
    while len(node_ids := sorted(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise FedtuneError(f"only {len(node_ids)} of {wanted} clients connected within federation.timeout_s")
        time.sleep(1.0)
    content = RecordDict({RECORD: ConfigRecord({"config": config_to_json(config)})})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    nodes, sizes, parts, labels = {}, {}, [], []
    replies = _collect(grid, messages, config.federation.timeout_s)
    if failed := next((r for _, r in replies if r.has_error()), None):
        raise FedtuneError(f"a client failed to enroll: {failed.error.reason}")
    # Summary rows in partition order, whatever order the replies came in.
    for node, reply in sorted(replies, key=lambda r: int(r[1].content[RECORD]["partition_id"])):
        record = reply.content[RECORD]
        nodes[str(record["client"])] = node
        histogram = np.asarray(record["histogram"], dtype=np.int64)
        sizes[str(record["client"])] = int(histogram.sum())
        parts.append(np.arange(len(labels), len(labels) + histogram.sum()))
        labels.extend(np.repeat(np.arange(len(histogram)), histogram))
    if len(nodes) < wanted:
        raise FedtuneError(f"only {len(nodes)} of {wanted} clients enrolled within federation.timeout_s")
    print(partition_summary(parts, np.asarray(labels, dtype=np.int64), label_names), flush=True)
    return nodes, sizes


def _client_level_dp(
    config: RunConfig, budget: Budget, updates: list[ClientUpdate], rnd: int
) -> tuple[list[ClientUpdate], Noise | None]:
    """Under client-level DP every client weighs the same (so one client moves the
    average by at most clip / m), and the server draws the noise unless the
    clients added it. (Sample-level DP needs neither: the clients' training is private.)"""
    p = config.privacy
    if p.mode != "client":
        return updates, None
    updates = [dataclasses.replace(u, num_examples=1) for u in updates]
    if p.noise_on == "clients":
        return updates, None
    z = budget.noise[updates[0].client]
    return updates, Noise(z * p.clip, torch.Generator().manual_seed(derive_seed(config.run.seed, rnd, 0xD9)))


def _sample_clients(clients: list[str], count: int, seed: int, rnd: int, attempt: int = 0) -> list[str]:
    if count >= len(clients):
        return clients
    rng = np.random.default_rng([seed, rnd, attempt] if attempt else [seed, rnd])
    return sorted(rng.choice(clients, size=count, replace=False).tolist())


def _train_round(
    grid: Grid,
    config: RunConfig,
    method: Method,
    rnd: int,
    clients: dict[str, int],
    ledger: Ledger,
    bar: tqdm,
    fleet: Fleet | None = None,
) -> tuple[list[ClientUpdate], dict[str, float]]:
    chain_down = parse_chain(config.compression.down, "compression.down")
    chain_up = parse_chain(config.compression.up, "compression.up")
    messages, name_of, down_bytes, times = [], {}, {}, {}
    for client, node_id in clients.items():
        generator = torch.Generator().manual_seed(derive_seed(config.run.seed, rnd, partition_id_of(client)))
        payload = wire.encode(wire.Payload(method.name, rnd, client, method.server_downlink(client)), chain_down, generator)
        record = {"payload": payload, "round": rnd}
        if fleet and (steps := fleet.steps_within_deadline(client, len(payload))) < config.train.local_steps:
            if not steps:
                log.warning("round %d: %s skipped: not one local step fits before the deadline (simulated)", rnd, client)
                continue
            record["local_steps"] = steps  # a partial straggler: what fits before the deadline
        content = RecordDict({RECORD: ConfigRecord(record)})
        down_bytes[client] = content_bytes(content)
        ledger.record(Transfer(rnd, client, "down", len(payload), down_bytes[client]))
        messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(rnd)))
        name_of[node_id] = client

    updates, losses, train_times = [], [], []
    started = time.perf_counter()
    replies = _collect(grid, messages, config.federation.timeout_s, on_reply=lambda: bar.update(1))
    # Arrival order varies from run to run; everything downstream sees client order.
    for node, reply in sorted(replies, key=lambda r: name_of[r[0]]):
        client = name_of[node]
        if reply.has_error():
            log.warning("round %d: %s dropped: %s", rnd, client, reply.error.reason)
            continue
        data = reply.content[RECORD]["payload"]
        up_bytes = content_bytes(reply.content)
        ledger.record(Transfer(rnd, client, "up", len(data), up_bytes))
        update, reason = check_uplink(method, chain_up, rnd, client, data)
        if reason:
            log.warning("round %d: %s dropped: %s", rnd, client, reason)
            continue
        metrics = reply.content["metrics"]
        if fleet:
            times[client] = fleet.client_time(client, down_bytes[client], up_bytes, metrics)
        updates.append(update)
        losses.append(float(metrics["train_loss"]))
        train_times.append(float(metrics["train_time_s"]))
    hardware = {}
    if fleet:
        kept, hardware = fleet.settle(rnd, times)
        updates = [u for u in updates if u.client in kept]
    if not losses:
        return updates, hardware
    return updates, hardware | {
        "aggregated": len(updates),  # "clients" in the row counts every uplink, rejected ones too
        "train_loss": float(np.mean(losses)),
        # Wall time of the training phase against the clients' own training time:
        # their ratio is the framework's overhead (benchmarks/round_overhead.py).
        "round_train_time_s": round(time.perf_counter() - started, 3),
        "client_train_time_s": round(float(np.sum(train_times)), 3),
    }


def check_uplink(method: Method, chain: Chain, rnd: int, client: str, data: bytes) -> tuple[ClientUpdate | None, str]:
    """Decode and validate one client's uplink before it may touch the global
    state: (the update, "") or (None, why it is rejected)."""
    try:
        up = wire.decode(data, keep_sparse=True)
    except wire.PayloadError as exc:
        return None, f"malformed payload: {exc}"
    if (up.method, up.round, up.client) != (method.name, rnd, client):
        return None, f"header says {up.method} round {up.round} from {up.client!r}"
    if up.codec != chain.specs:
        return None, f"codec chain {list(up.codec)}, configured {list(chain.specs)}"
    # A lossy uplink holds changes against what the client was sent.
    reference = method.server_downlink(client) if chain.lossy else {}
    update = ClientUpdate(client, up.tensors, up.num_examples, reference)
    reason = method.server_check(update)
    return (None, reason) if reason else (update, "")


def _collect(
    grid: Grid, messages: list[Message], timeout: float, on_reply: Callable[[], None] = lambda: None
) -> list[tuple[int, Message]]:
    """Push messages, pull replies as they arrive (so progress shows per client):
    (node the message went to, its reply) pairs. Replies are matched by message
    id, since the error reply for a node that went offline comes from the SuperLink."""
    sent = {i: m.metadata.dst_node_id for i, m in zip(grid.push_messages(messages), messages) if i}
    pending = set(sent)
    deadline = time.monotonic() + timeout
    replies = []
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append((sent[reply.metadata.reply_to_message_id], reply))
            on_reply()
        time.sleep(0.05)
    if pending:
        log.warning("%d client(s) did not reply within %.0f s", len(pending), timeout)
    return replies


# -- entry points ----------------------------------------------------------------

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run`: the app's run config names a run directory that `fedtune deploy`
    prepared (its config.toml, and to resume, its checkpoint), or a config path and overrides."""
    run_config = context.run_config
    if run_dir := str(run_config.get("run-dir", "")):
        serve(grid, load_config(Path(run_dir) / "config.toml"), Path(run_dir), bool(run_config.get("resume", False)))
        return
    overrides = shlex.split(str(run_config.get("overrides", "")))
    config = load_config(str(run_config["config"]), overrides)
    serve(grid, config, report.create_run_dir(config))


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
