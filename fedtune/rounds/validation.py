"""Every uplink goes through here before it may count, in this order:

1. structure: the Flower message holds our record with bytes under "payload", and
   the metrics a client reports are finite numbers within the round's bounds;
2. size: the payload is no larger than the method's template allows, before it is
   parsed; the codec chain is the configured one before anything is inflated, and
   inflating stops at the template's size;
3. tensors: names, dtypes and shapes are the template's, compared before any
   tensor is allocated (a declared shape is never multiplied out);
4. values: decoded, finite, and whatever the method checks (FedKSeed's seed range);
5. examples: the count the client claims is the size the server knows its
   partition has.

Nothing in here raises: a bad uplink becomes a Rejection naming its stage and
reason, and costs at most a small constant times the template's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Message, MetricRecord

from fedtune import wire
from fedtune.app.messages import METRICS, RECORD
from fedtune.clients import client_name
from fedtune.codecs.dense import FROM_WIRE
from fedtune.codecs.spec import Chain
from fedtune.codecs.tensor import TensorDict, decode_tensor
from fedtune.methods.base import ClientUpdate, Method, UplinkSpec
from fedtune.proto import fedtune_pb2 as pb

REPORTED = ("train_loss", "train_time_s", "steps", "tokens", "sequences")  # what a client reports of its round
OVERHEAD = 4096  # bytes allowed beyond the tensors' values: header, names, shapes, scales


@dataclass(frozen=True)
class Rejection:
    client: int
    stage: str  # structure, size, header, codec, tensors, values, examples, norm, failed
    reason: str

    def __str__(self) -> str:
        return f"{client_name(self.client)} {self.stage}: {self.reason}"


@dataclass(frozen=True)
class Expected:
    """What the server expects of one client's uplink in a round."""

    method: str
    round: int
    client: int
    spec: UplinkSpec
    chain: Chain
    examples: int  # the size of the client's partition, as the server knows it
    local_steps: int  # at most this many steps
    reference: Callable[[], TensorDict]  # what the client was sent (a lossy uplink holds changes against it)
    check: Callable[[ClientUpdate], str | None]  # the method's own checks of the values

    @classmethod
    def of(cls, method: Method, chain: Chain, rnd: int, client: int, examples: int, local_steps: int) -> Expected:
        return cls(method.name, rnd, client, method.uplink_spec(client), chain, examples, local_steps,
                   lambda: method.server_downlink(client), method.check_update)

    @property
    def limit(self) -> int:
        """The most bytes an honest payload of this spec can take, any chain: 8 bytes
        per value covers float32 or int64 data and a sparse entry's index and value."""
        return 8 * sum(s.numel for s in self.spec.values()) + 64 * len(self.spec) + OVERHEAD


class Invalid(Exception):
    """Internal: one check failed, with the stage it belongs to."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage


def validate_reply(reply: Message, expected: Expected) -> tuple[ClientUpdate | None, dict[str, float], Rejection | None]:
    """(the update, the client's reported metrics, None), or (None, {}, why not)."""
    try:
        record, metrics = _structure(reply, expected)
        return _payload(record["payload"], expected), metrics, None
    except Exception as exc:
        return None, {}, _rejection(expected, exc)


def validate_payload(data: bytes, expected: Expected) -> tuple[ClientUpdate | None, Rejection | None]:
    """(the update in ``data``, None), or (None, why not)."""
    try:
        return _payload(data, expected), None
    except Exception as exc:
        return None, _rejection(expected, exc)


def _rejection(expected: Expected, exc: Exception) -> Rejection:
    if isinstance(exc, Invalid):
        return Rejection(expected.client, exc.stage, str(exc))
    # No check foresaw it: still only this client's rejection, never the run's end.
    return Rejection(expected.client, "error", f"{type(exc).__name__}: {exc}")


def _payload(data: bytes, expected: Expected) -> ClientUpdate:
    if len(data) > expected.limit:
        raise Invalid("size", f"{len(data):,} bytes, more than the {expected.limit:,} its template allows")
    try:
        msg = wire.parse(data)
    except wire.PayloadError as exc:
        raise Invalid("structure", str(exc)) from None
    h = msg.header
    if (h.method, h.round, h.client) != (expected.method, expected.round, client_name(expected.client)):
        raise Invalid("header", f"header says {h.method} round {h.round} from {h.client!r}")
    if tuple(h.codec) != expected.chain.specs:
        raise Invalid("codec", f"codec chain {list(h.codec)}, configured {list(expected.chain.specs)}")
    try:
        messages = wire.tensor_messages(msg, expected.chain, expected.limit)
    except wire.PayloadError as exc:
        raise Invalid("size" if "inflates beyond" in str(exc) else "structure", str(exc)) from None
    tensors = _tensors(messages, expected.spec)
    update = ClientUpdate(expected.client, tensors, expected.examples, expected.reference() if expected.chain.lossy else {})
    if reason := _nonfinite(tensors) or expected.check(update):
        raise Invalid("values", reason)
    if msg.num_examples != expected.examples:
        raise Invalid("examples", f"claims {msg.num_examples:,} examples; its partition holds {expected.examples:,}")
    return update


def _structure(reply: Message, expected: Expected) -> tuple[ConfigRecord, dict[str, float]]:
    content = reply.content
    record = content.get(RECORD) if RECORD in content else None
    if not isinstance(record, ConfigRecord) or not isinstance(record.get("payload"), bytes):
        raise Invalid("structure", f"no {RECORD!r} record with bytes under 'payload'")
    metrics = content.get(METRICS) if METRICS in content else None
    if not isinstance(metrics, MetricRecord):
        raise Invalid("structure", f"no {METRICS!r} record")
    reported = {}
    for key in REPORTED:
        value = metrics.get(key)
        # A client that took no step (DP-SGD's Poisson batches all empty) has no loss to report.
        untrained = key == "train_loss" and metrics.get("steps") == 0 and isinstance(value, float) and math.isnan(value)
        if not untrained and (isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or value == math.inf):
            raise Invalid("structure", f"metric {key!r} is {value!r}, not a finite number >= 0")
        reported[key] = float(value)
    if reported["steps"] > expected.local_steps:
        raise Invalid("structure", f"reports {reported['steps']:.0f} steps, more than the {expected.local_steps} asked")
    return record, reported


def _tensors(messages: list[pb.Tensor], spec: UplinkSpec) -> TensorDict:
    """Every message's name, dtype and declared shape against ``spec``, then the values."""
    names = [m.name for m in messages]
    if sorted(names) != sorted(spec):
        missing, extra = sorted(set(spec) - set(names)), sorted(set(names) - set(spec))
        twice = sorted({n for n in names if names.count(n) > 1})
        raise Invalid("tensors", f"tensor names differ from the {len(spec)} expected: missing {missing[:3]}, "
                                 f"unexpected {extra[:3]}, repeated {twice[:3]}")
    for m in messages:
        dtype, shape = FROM_WIRE.get(m.dtype), tuple(m.shape)
        if dtype is None or not spec[m.name].admits(dtype, shape):
            raise Invalid("tensors", f"{m.name}: {dtype or f'dtype code {m.dtype}'} {shape}, expected {spec[m.name].describe()}")
        if m.HasField("sparse"):  # the kept values declare a shape of their own: bounded like the tensor's
            kept = tuple(m.sparse.values.shape)
            if len(kept) != 1 or kept[0] > math.prod(shape) or len(m.sparse.indices) != 4 * kept[0]:
                raise Invalid("tensors", f"{m.name}: {len(m.sparse.indices)} bytes of indices for {kept} kept values")
    try:
        return {m.name: decode_tensor(m, keep_sparse=True) for m in messages}
    except wire.PayloadError as exc:
        raise Invalid("tensors", str(exc)) from None


def _nonfinite(tensors: TensorDict) -> str | None:
    for name, t in tensors.items():
        values = t.coalesce().values() if t.is_sparse else t
        if t.is_floating_point() and not torch.isfinite(values).all():
            return f"{name}: non-finite values"
    return None
