"""The ClientApp as a SuperNode runs it, driven with real Flower messages and node
context: what it keeps between rounds stays small in the context, and what is as
large as the model goes to the node's replica store."""

import logging

import pytest
from conftest import small_config
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune import wire
from fedtune.app import client as client_app
from fedtune.app.messages import RECORD, TrainRequest, enrollment, train_content
from fedtune.codecs.link import Codecs
from fedtune.methods import get_method
from fedtune.methods.replicas import ReplicaStore, run_directory
from fedtune.task import config_to_json, load_model


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """What Flower's runtimes set in a process before an app makes messages."""
    for key, value in {"_task_id": 1, "_run_id": 7, "_node_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, key, value, raising=False)


def _node(tmp_path, config, pid=0):
    context = Context(run_id=7, node_id=pid + 1, node_config={"partition-id": pid, "replica-dir": str(tmp_path / "node")},
                      state=RecordDict(), run_config={})
    client_app.enroll(enrollment(config_to_json(config), pid + 1), context)
    return context


def _train(context, config, method, rnd):
    payload = Codecs.of(config).downlink(wire.Payload(method.name, rnd, "client-0", method.server_downlink(0)), rnd)
    msg = Message(train_content(TrainRequest(payload, rnd, 100 + rnd)), dst_node_id=context.node_id,
                  message_type=MessageType.TRAIN)
    reply = client_app.train(msg, context)
    return wire.decode(reply.content[RECORD]["payload"])


def _context_bytes(context):
    return sum(t.numel() * t.element_size() for key in context.state.array_records
               for t in context.state[key].to_torch_state_dict().values())


def test_error_feedback_residual_lives_in_the_replica_store(tmp_path, caplog):
    config = small_config(tmp_path, compression={"up": ["topk:0.1"]})
    method = get_method(config)
    method.server_init(load_model(config))
    context = _node(tmp_path, config)
    store = ReplicaStore(run_directory(7, tmp_path / "node"))

    _train(context, config, method, 1)
    digest = bytes(context.state[client_app.RESIDUAL].to_torch_state_dict()["digest"].tolist())
    residual = store.get(digest)
    adapted = sum(t.numel() for t in method.server_downlink(0).values())
    assert sum(t.numel() for t in residual.values()) == adapted  # what top-k held back, for every tensor
    assert any(t.abs().sum() > 0 for t in residual.values())
    assert _context_bytes(context) == 32  # the residual's digest only

    # Next round: what was held back is sent with the new change, and a new residual replaces it.
    _train(context, config, method, 2)
    assert store.get(digest) is None and store.blobs() == 1

    # A cleared store restarts error feedback from zero, with a warning, not a failed round.
    for blob in (run_directory(7, tmp_path / "node") / "blobs").iterdir():
        blob.unlink()
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        _train(context, config, method, 3)
    assert "client-0: its error-feedback residual is not in its replica store; starting again from zero" in caplog.text
    assert store.blobs() == 1


def test_unbiased_codecs_keep_no_residual(tmp_path):
    config = small_config(tmp_path, compression={"up": ["int8"]})
    method = get_method(config)
    method.server_init(load_model(config))
    context = _node(tmp_path, config)
    _train(context, config, method, 1)
    assert client_app.RESIDUAL not in context.state and _context_bytes(context) == 0
