"""The ClientApp: answer enrollment with this client's data summary, and train
rounds with the configured method. What it keeps between messages (the run
config, the method's client state, its own privacy accountant) lives in the node's
Flower context; what is as large as the model (replayed weights, Fed-SB's bases,
error-feedback residuals) lives in the node's replica store, with only its digest
in the context."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.app.messages import RECORD, enrollment_reply, read_train, train_reply
from fedtune.clients import client_name
from fedtune.codecs.link import Codecs
from fedtune.config import RunConfig
from fedtune.devices import free_memory, resolve_device
from fedtune.environment import configure_process
from fedtune.errors import FedtuneError
from fedtune.hardware.profiles import device_names
from fedtune.methods.base import ClientJob
from fedtune.methods.registry import get_method
from fedtune.methods.replicas import ReplicaStore, digest_tensor, run_directory, tensor_digest
from fedtune.privacy.factory import client_privacy
from fedtune.task import client_data, config_from_json, load_model
from fedtune.wire import TensorDict

app = ClientApp()
log = logging.getLogger("fedtune")
STATE = "fedtune.state"  # the method's client state
RESIDUAL = "fedtune.residual"  # the digest of the error feedback of a biased uplink codec
PRIVACY = "fedtune.privacy"  # the client's own privacy state (its DP-SGD accountant)


@app.query()
def enroll(msg: Message, context: Context) -> Message:
    configure_process()
    config_json = str(msg.content[RECORD]["config"])
    context.state[RECORD] = ConfigRecord({"config": config_json})
    config = config_from_json(config_json)
    pid = _partition_id(context, config)
    _check_device(context, config, pid)
    device = _device(context, config)  # a node without the device it is told to use refuses here, in one line
    data = client_data(config, pid)
    histogram = np.bincount(data.labels, minlength=len(data.label_names)).tolist()
    return enrollment_reply(msg, client_name(pid), pid, histogram, free_memory(device))


@app.train()
def train(msg: Message, context: Context) -> Message:
    configure_process()
    config = config_from_json(str(context.state[RECORD]["config"]))
    pid = _partition_id(context, config)
    request = read_train(msg)
    down = wire.decode(request.payload)
    method, data = get_method(config), client_data(config, pid)
    replicas = _replicas(context)
    job = ClientJob(pid, data, request.seed, _load(context, STATE), None, request.local_steps, replicas)
    privacy, memory = client_privacy(config, method, pid, len(data), down.round), _load(context, PRIVACY)
    job = privacy.prepare(job, memory)
    started = time.perf_counter()
    result = method.client_train(load_model(config, _device(context, config)), down.tensors, job)
    result = dataclasses.replace(result, metrics={**result.metrics, "train_time_s": time.perf_counter() - started})
    result = privacy.finish(result, job, memory)
    _save(context, STATE, job.state)
    _save(context, PRIVACY, memory)
    codecs = Codecs.of(config)
    residual = _residual(context, replicas, pid) if codecs.up.biased else None
    up = wire.Payload(down.method, down.round, client_name(pid), result.tensors, result.num_examples)
    payload = codecs.uplink(up, down.tensors, job.seed, residual)
    if residual:
        _save(context, RESIDUAL, {"digest": digest_tensor(replicas.put(f"{pid}-residual", residual))})
    return train_reply(msg, payload, result.metrics)


def _residual(context: Context, replicas: ReplicaStore, pid: int) -> TensorDict:
    """The error feedback this client kept, or none on its first round; a lost one
    (a cleared replica store) restarts from zero, as error feedback may."""
    if RESIDUAL not in context.state:
        return {}
    kept = replicas.get(tensor_digest(_load(context, RESIDUAL)["digest"]))
    if kept is None:
        log.warning("%s: its error-feedback residual is not in its replica store; starting again from zero",
                    client_name(pid))
    return kept or {}


def _load(context: Context, key: str) -> TensorDict:
    return context.state[key].to_torch_state_dict() if key in context.state else {}


def _save(context: Context, key: str, tensors: TensorDict) -> None:
    if tensors:
        context.state[key] = ArrayRecord(torch_state_dict=tensors)


def _replicas(context: Context) -> ReplicaStore:
    """This run's replica store on this node: under its node config's
    ``replica-dir``, else under $FEDTUNE_REPLICA_DIR or the temporary directory
    (which a simulation's clients on one host share)."""
    own = str(context.node_config.get("replica-dir", ""))
    return ReplicaStore(run_directory(context.run_id, Path(own) if own else None))


def _partition_id(context: Context, config: RunConfig) -> int:
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < config.partition.num_clients:
        raise FedtuneError(
            f"this node's partition-id {pid} is outside partition.num_clients={config.partition.num_clients}; "
            "run as many SuperNodes as clients"
        )
    return pid


def _device(context: Context, config: RunConfig) -> torch.device:
    """Where this node trains: its node config's ``torch-device``, else the run's model.device."""
    if own := str(context.node_config.get("torch-device", "")):
        return resolve_device(own, "this node's torch-device")
    return resolve_device(config.model.device)


def _check_device(context: Context, config: RunConfig, pid: int) -> None:
    """A deployed node may say what it is (node config ``device``); the run's
    hardware model, when there is one, must model it as that."""
    declared = context.node_config.get("device")
    if declared and config.hardware.modelled:
        modelled = device_names(config.hardware, config.partition.num_clients, config.run.seed)[pid]
        if declared != modelled:
            raise FedtuneError(f"this node's device is {declared!r} (node config) but the run's [hardware] makes "
                               f"{client_name(pid)} a {modelled!r}; list the nodes' devices in hardware.devices")
