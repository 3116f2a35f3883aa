"""A ClientApp that attacks the server: fedtune's own client, whose replies a Flower
mod replaces with one attack a round. Tests plant it in simulation and, as a
deployed SuperNode's worker, through `fedtune deploy local`.

Each attack takes the train message and the honest reply and returns what is sent
instead. The deployed worker reads its schedule from FEDTUNE_HOSTILE: the
attacks of its rounds 1, 2, ... for the partitions in FEDTUNE_HOSTILE_CLIENTS."""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Callable
from functools import cache

import torch
import zstandard
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.app import client
from fedtune.app.messages import METRICS, RECORD
from fedtune.codecs.spec import parse_chain
from fedtune.proto import fedtune_pb2 as pb


def _reply(msg: Message, record: object, metrics: object = "honest", honest: Message | None = None) -> Message:
    content = RecordDict({RECORD: record})
    if metrics is not None:
        content[METRICS] = honest.content[METRICS] if metrics == "honest" else metrics
    return Message(content, reply_to=msg)


def _payload(msg: Message, honest: Message, tensors: Callable[[dict, dict], dict], examples: int | None = None) -> bytes:
    """An uplink built from what the client was sent and what it honestly trained."""
    down, up = wire.decode(msg.content[RECORD]["payload"]), wire.decode(honest.content[RECORD]["payload"])
    chain = parse_chain(list(up.codec), "compression.up")
    payload = wire.Payload(up.method, up.round, up.client, tensors(down.tensors, up.tensors), examples or up.num_examples)
    return wire.encode(payload, chain)


def _header(honest: Message, codec: list[str]) -> pb.Header:
    up = wire.decode(honest.content[RECORD]["payload"])
    return pb.Header(method=up.method, round=up.round, client=up.client, codec=codec)


def _overflow(msg: Message, honest: Message) -> Message:
    """The 121-byte uplink: shapes whose element count wraps in int64, no data, in
    the configured codec chain."""
    up = pb.Payload.FromString(honest.content[RECORD]["payload"])
    lossless = up.header.codec[-1] if up.compressed else None
    inner = pb.Tensors.FromString(wire.inflate(lossless, up.compressed, 2**31)) if lossless else up
    tensors = pb.Tensors(tensors=[pb.Tensor(name=t.name, dtype=t.dtype, shape=[2**32, 2**32]) for t in inner.tensors])
    bad = pb.Payload(header=up.header, num_examples=up.num_examples)
    if lossless:
        bad.compressed = _compress(lossless, tensors.SerializeToString())
    else:
        bad.tensors.extend(tensors.tensors)
    return _reply(msg, ConfigRecord({"payload": bad.SerializeToString()}), honest=honest)


def _compress(kind: str, raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(raw) if kind == "zstd" else zlib.compress(raw, 9)


@cache
def _inflating(kind: str) -> bytes:
    """64 MiB of zeros, compressed: a ratio of about 1,000 (deflate) to 30,000 (zstd)."""
    return _compress(kind, b"\0" * 2**26)


def _bomb(kind: str) -> Callable[[Message, Message], Message]:
    def attack(msg: Message, honest: Message) -> Message:
        bad = pb.Payload(header=_header(honest, [kind]), num_examples=40, compressed=_inflating(kind))
        return _reply(msg, ConfigRecord({"payload": bad.SerializeToString()}), honest=honest)
    return attack


def _tensors(change: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], examples: int | None = None):
    def attack(msg: Message, honest: Message) -> Message:
        data = _payload(msg, honest, lambda d, u: {n: change(d[n], t) if t.is_floating_point() else t for n, t in u.items()}, examples)
        return _reply(msg, ConfigRecord({"payload": data}), honest=honest)
    return attack


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten().clone()
    flat[0], flat[-1] = float("nan"), float("inf")
    return flat.view(t.shape)


def _bytes(cut: Callable[[bytes], bytes]):
    def attack(msg: Message, honest: Message) -> Message:
        return _reply(msg, ConfigRecord({"payload": cut(honest.content[RECORD]["payload"])}), honest=honest)
    return attack


ATTACKS: dict[str, Callable[[Message, Message], Message]] = {
    "overflow": _overflow,
    "no-metrics": lambda msg, honest: _reply(msg, honest.content[RECORD], metrics=None),
    "payload-str": lambda msg, honest: _reply(msg, ConfigRecord({"payload": "not bytes"}), honest=honest),
    "no-payload": lambda msg, honest: _reply(msg, ConfigRecord({"load": b"\0"}), honest=honest),
    "zstd-bomb": _bomb("zstd"),
    "deflate-bomb": _bomb("deflate"),
    "reversed-2**62": _tensors(lambda down, up: 2 * down - up, examples=2**62),
    "times-1e6": _tensors(lambda down, up: down + 1e6 * (up - down)),
    "reversed": _tensors(lambda down, up: 2 * down - up),  # well formed, an honest norm: only a robust rule helps
    "nan-inf": _tensors(lambda down, up: _poisoned(up)),
    "truncated": _bytes(lambda data: data[: len(data) // 2]),
    "random": _bytes(lambda data: random.Random(len(data)).randbytes(len(data))),
    "metrics-nan": lambda msg, honest: _reply(msg, honest.content[RECORD], MetricRecord(
        {**dict(honest.content[METRICS]), "train_loss": float("nan")})),
    "crash": lambda msg, honest: _raise(RuntimeError("simulated crash")),
}


def _raise(exc: Exception) -> Message:
    raise exc


def hostile_app(attack_of: Callable[[int, int], str | None]) -> ClientApp:
    """fedtune's ClientApp, replying in round r of client c with ATTACKS[attack_of(c, r)] (None: honestly)."""

    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        attack = attack_of(int(context.node_config["partition-id"]), int(msg.content[RECORD]["round"]))
        return ATTACKS[attack](msg, reply) if attack else reply

    app = ClientApp(mods=[mod])
    app.query()(client.enroll)
    app.train()(client.train)
    return app


def _from_environment(pid: int, rnd: int) -> str | None:
    schedule = os.environ.get("FEDTUNE_HOSTILE", "").split(",")
    clients = {int(c) for c in os.environ.get("FEDTUNE_HOSTILE_CLIENTS", "").split(",") if c}
    return schedule[rnd - 1] if pid in clients and rnd <= len(schedule) and schedule[rnd - 1] else None


app = hostile_app(_from_environment)  # the deployed worker's (fedtune.deploy.worker --app hostile:app)
