"""The server's payload path under fuzzing: thousands of random and mutated
uplinks, none of which may crash it, and none of which may reach the aggregate
unless it is a well-formed update within the norm bound."""

import random

import pytest
import torch
from conftest import small_config

from fedtune import wire
from fedtune.codecs.spec import parse_chain
from fedtune.methods import ClientUpdate, get_method
from fedtune.rounds.release import by_examples
from fedtune.rounds.robust import Robustness
from fedtune.rounds.validation import Expected, validate_payload
from fedtune.task import load_model

BOUND = 5.0
ROUND, CLIENT, CLIENT_NAME = 3, 1, "client-1"


def _server(tmp_path, method, **sections):
    config = small_config(tmp_path, federation={"method": method, "max_update_norm": BOUND}, **sections)
    server = get_method(config)
    server.server_init(load_model(config))
    return server


def _encode(method, tensors, rnd=ROUND, client=CLIENT_NAME, name=None, num_examples=40) -> bytes:
    payload = wire.Payload(name or method.name, rnd, client, tensors, num_examples)
    return wire.encode(payload, parse_chain([], "compression.up"), torch.Generator().manual_seed(0))


def check_uplink(method, chain, rnd, client, data, honest=()):
    """The server's path for one uplink: validation, then the norm screen among the
    round's updates (the honest ones alongside): (update, "") or (None, why not)."""
    update, rejection = validate_payload(data, Expected.of(method, chain, rnd, client, 40, method.config.train.local_steps))
    if rejection:
        return None, rejection.reason
    kept, screened = Robustness(method.config.federation).screen(method, [*honest, update])
    return (update, "") if any(u is update for u in kept) else (None, screened[-1].reason)


def weighted_average(updates):
    return {n: by_examples(updates).average(updates, n, t) for n, t in updates[0].tensors.items()}


def _honest(method, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in method.uplink_template(CLIENT).items()}


def _mutations(method, good: dict, rng: random.Random):
    """(kind, payload bytes, whether it must be rejected)."""
    data = _encode(method, good)
    name = rng.choice(sorted(good))
    yield "truncated", data[: rng.randrange(len(data))], True
    flipped = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    yield "bit-flipped", bytes(flipped), False  # may still be a valid update: then it must pass every check
    yield "garbage", rng.randbytes(rng.randrange(1, 2000)), False
    t = good[name]
    yield "wrong shape", _encode(method, {**good, name: t.flatten()[: max(1, t.numel() - 1)]}), True
    poisoned = t.clone().flatten()
    poisoned[rng.randrange(poisoned.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    yield "non-finite", _encode(method, {**good, name: poisoned.view(t.shape)}), True
    yield "huge norm", _encode(method, {n: v * 1e4 if v.is_floating_point() else v for n, v in good.items()}), True
    yield "wrong dtype", _encode(method, {**good, name: t.half()}), True
    yield "missing tensor", _encode(method, {n: v for n, v in good.items() if n != name}), True
    yield "extra tensor", _encode(method, {**good, "intruder": torch.ones(3)}), True
    yield "stale round", _encode(method, good, rnd=ROUND - 1), True
    yield "other client", _encode(method, good, client="client-0"), True
    yield "other method", _encode(method, good, name="flora"), True
    yield "no examples", _encode(method, good, num_examples=0), True
    yield "claims 2**62 examples", _encode(method, good, num_examples=2**62), True


def _well_formed(method, update: ClientUpdate) -> bool:
    """An independent check of what the server accepted."""
    template = method.uplink_template(CLIENT)
    if update.tensors.keys() != template.keys():
        return False
    squared = 0.0
    for n, t in update.tensors.items():
        if t.shape != template[n].shape or t.dtype != template[n].dtype or not torch.isfinite(t).all():
            return False
        squared += float((t.double() - template[n].double()).square().sum())
    return squared <= BOUND**2 and update.num_examples >= 1


def test_fedit_payload_path_survives_fuzzing(tmp_path):
    method = _server(tmp_path, "fedit")
    chain = parse_chain([], "compression.up")
    honest = [ClientUpdate(0, _honest(method, 0), 40), ClientUpdate(2, _honest(method, 2), 40)]
    honest_average = weighted_average(honest)
    rng = random.Random(0)
    seen, rejected = 0, {}
    for case in range(80):
        good = _honest(method, 100 + case)
        for kind, data, must_reject in _mutations(method, good, rng):
            update, reason = check_uplink(method, chain, ROUND, CLIENT, data, honest)
            seen += 1
            if update is None:
                assert reason, kind
                rejected[kind] = rejected.get(kind, 0) + 1
                # A rejected payload never reaches the aggregate: the round's average is the honest one.
                included = honest
            else:
                assert not must_reject, f"{kind} accepted"
                assert _well_formed(method, update), kind
                included = honest + [update]
            average = weighted_average(included)
            if update is None:
                assert all(torch.equal(average[n], honest_average[n]) for n in average)
            else:  # an accepted update moves the average, from where the template would put it, by its weight times the bound at most
                n = update.num_examples
                base = weighted_average(honest + [ClientUpdate(CLIENT, method.uplink_template(CLIENT), n)])
                moved = sum(float((average[k] - base[k]).double().square().sum()) for k in average) ** 0.5
                assert moved <= BOUND * n / (80 + n) + 1e-4
    assert seen >= 1000
    assert rejected["truncated"] == rejected["wrong shape"] == rejected["huge norm"] == 80
    assert rejected["garbage"] >= 79  # random bytes are practically never a valid payload


@pytest.mark.parametrize("encoding", ["paper", "compact"])
def test_fedkseed_rejects_out_of_range_seeds_and_huge_scalars(tmp_path, encoding):
    method = _server(tmp_path, "fedkseed", fedkseed={"num_seeds": 60, "encoding": encoding}, train={"local_steps": 5})
    chain = parse_chain([], "compression.up")
    rng = random.Random(1)
    for case in range(150):
        seeds = torch.tensor([rng.randrange(60) for _ in range(5)], dtype=torch.int32)
        scalars = torch.randn(5, generator=torch.Generator().manual_seed(case)) * 0.1
        if encoding == "paper":
            good = {"seeds": seeds, "scalars": scalars}
            bad_seeds = {"seeds": seeds.clone().index_fill_(0, torch.tensor([case % 5]), 60 + case), "scalars": scalars}
        else:
            good = method.encode_scalars(torch.zeros(60).index_add_(0, seeds.long(), scalars))
            mask = good["mask"].clone()
            mask[-1] |= 1 << (4 + case % 4)  # seeds 60-63: bits of the mask's last byte past num_seeds
            bad_seeds = {"mask": mask, "scalars": torch.cat([good["scalars"], torch.ones(1)])}
        huge = {**good, "scalars": good["scalars"] * 1e6}
        assert check_uplink(method, chain, ROUND, CLIENT, _encode(method, good))[1] == ""
        _, reason = check_uplink(method, chain, ROUND, CLIENT, _encode(method, bad_seeds))
        assert "out of range" in reason or "beyond num_seeds" in reason
        _, reason = check_uplink(method, chain, ROUND, CLIENT, _encode(method, huge))
        assert "federation.max_update_norm" in reason
        data = _encode(method, good)
        for cut in (1, len(data) // 2, len(data) - 1):
            update, reason = check_uplink(method, chain, ROUND, CLIENT, data[:cut])
            assert update is None and reason
