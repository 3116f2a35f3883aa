"""The ClientApp: answer enrollment with this client's data summary, and train
rounds with the configured method. Its only state, the run config, lives in the
node's Flower context."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.codecs import delta
from fedtune.codecs.spec import parse_chain
from fedtune.app.server import RECORD
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.hardware.profiles import device_names
from fedtune.methods import ClientJob, LocalResult, Method, get_method
from fedtune.privacy.accounting import Budget
from fedtune.privacy.dp_sgd import DPSGD
from fedtune.privacy.mechanism import Noise, clip_update
from fedtune.task import client_data, client_name, config_from_json, derive_seed, load_model

app = ClientApp()
STATE = "fedtune.state"  # the method's client state, kept on the node between rounds
RESIDUAL = "fedtune.residual"  # error feedback of a biased uplink codec, kept likewise
PRIVACY = "fedtune.privacy"  # the DP-SGD accountant's history of this client, likewise


def _partition_id(context: Context, config: RunConfig) -> int:
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < config.partition.num_clients:
        raise FedtuneError(
            f"this node's partition-id {pid} is outside partition.num_clients={config.partition.num_clients}; "
            "run as many SuperNodes as clients"
        )
    return pid


def _check_device(context: Context, config: RunConfig, pid: int) -> None:
    """A deployed node may say what it is (node config ``device``); the run's
    hardware model, when there is one, must model it as that."""
    declared = context.node_config.get("device")
    if declared and config.hardware.modelled:
        modelled = device_names(config.hardware, config.partition.num_clients, config.run.seed)[pid]
        if declared != modelled:
            raise FedtuneError(f"this node's device is {declared!r} (node config) but the run's [hardware] makes "
                               f"{client_name(pid)} a {modelled!r}; list the nodes' devices in hardware.devices")


def _config(context: Context) -> RunConfig:
    return config_from_json(str(context.state[RECORD]["config"]))


@app.query()
def enroll(msg: Message, context: Context) -> Message:
    config_json = str(msg.content[RECORD]["config"])
    context.state[RECORD] = ConfigRecord({"config": config_json})
    config = config_from_json(config_json)
    pid = _partition_id(context, config)
    _check_device(context, config, pid)
    data = client_data(config, pid)
    histogram = np.bincount(data.labels, minlength=len(data.label_names))
    reply = ConfigRecord({"client": client_name(pid), "partition_id": pid, "histogram": histogram.tolist()})
    return Message(RecordDict({RECORD: reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = _config(context)
    pid = _partition_id(context, config)
    down = wire.decode(msg.content[RECORD]["payload"])
    method = get_method(config)
    state = context.state[STATE].to_torch_state_dict() if STATE in context.state else {}
    seed = derive_seed(config.run.seed, down.round, pid)
    client, data = client_name(pid), client_data(config, pid)
    p = config.privacy
    # The noise multiplier (a calibration per message) only where this client uses it.
    shares = p.mode == "client" and p.noise_on == "clients"
    budget = Budget(config, {client: len(data)}) if p.mode == "sample" or shares else None
    dp_sgd = _dp_sgd(config, context, budget, client) if p.mode == "sample" else None
    steps = int(msg.content[RECORD].get("local_steps", 0))
    job = ClientJob(client, data, seed, state, dp_sgd, steps)
    classifier = load_model(config)
    started = time.perf_counter()
    result = method.client_train(classifier, down.tensors, job)
    metrics = {**result.metrics, "train_time_s": time.perf_counter() - started}
    if dp_sgd is not None:
        budget.spend([client])
        context.state[PRIVACY] = ArrayRecord(torch_state_dict={"history": torch.tensor(budget.history[client], dtype=torch.float64)})
        metrics["epsilon"] = budget.epsilon(client)
    if p.mode == "client" and result.start:
        result = _clip(config, method, result, budget.noise[client] if budget else 0.0, seed)
    if job.state:
        context.state[STATE] = ArrayRecord(torch_state_dict=job.state)
    content = RecordDict({RECORD: ConfigRecord({"payload": _uplink(config, context, down, result, job)}),
                          "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def _dp_sgd(config: RunConfig, context: Context, budget: Budget, client: str) -> DPSGD:
    """DP-SGD's settings for this round, after checking the client's own
    accountant: a client never trains past its budget, whatever the server asks."""
    if PRIVACY in context.state:
        history = context.state[PRIVACY].to_torch_state_dict()["history"].tolist()
        budget.history[client] = [(z, q, int(steps)) for z, q, steps in history]
    if reason := budget.overspending([client]):
        raise FedtuneError(f"privacy budget: {reason}; this client trains no more")
    return DPSGD(budget.noise[client], config.privacy.clip)


def _clip(config: RunConfig, method: Method, result: LocalResult, noise_multiplier: float, seed: int) -> LocalResult:
    """Client-level DP on the client: clip the update, and with privacy.noise_on
    'clients' add this client's share of the noise (the whole of it for a tensor
    the server releases on its own)."""
    p = config.privacy
    tensors, norm = clip_update(result.tensors, result.start, p.clip)
    if p.noise_on == "clients":
        noise = Noise(noise_multiplier * p.clip, torch.Generator().manual_seed(derive_seed(seed, 0xD9)))
        share = noise.share(config.federation.clients_per_round or config.partition.num_clients)
        tensors = {
            n: t + (noise if method.released_alone(n) else share).sample(t.shape) if t.is_floating_point() else t
            for n, t in tensors.items()
        }
    return dataclasses.replace(result, tensors=tensors, metrics={**result.metrics, "update_norm": norm})


def _uplink(config: RunConfig, context: Context, down: wire.Payload, result: LocalResult, job: ClientJob) -> bytes:
    """The encoded uplink: with a lossy codec, what changed since the downlink, and
    for a biased one with error feedback from the residual kept on the node."""
    chain = parse_chain(config.compression.up, "compression.up")
    tensors, residual = result.tensors, None
    if chain.lossy:
        tensors = delta.relative(tensors, down.tensors)
    if chain.biased:
        residual = context.state[RESIDUAL].to_torch_state_dict() if RESIDUAL in context.state else {}
    up = wire.Payload(down.method, down.round, job.client, tensors, result.num_examples)
    data = wire.encode(up, chain, torch.Generator().manual_seed(job.seed), residual)
    if residual is not None:
        context.state[RESIDUAL] = ArrayRecord(torch_state_dict=residual)
    return data
