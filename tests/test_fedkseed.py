"""FedKSeed: exact perturbations, bit-identical replicas, byte budgets, bad payloads."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fedavg, kept_copy, small_config, uplink_rejection

from fedtune import wire
from fedtune import zeroth_order as zo
from fedtune.errors import FedtuneError
from fedtune.methods import ClientJob, ClientUpdate, get_method
from fedtune.methods.fedkseed import per_seed_sums
from fedtune.methods.replicas import ReplicaStore
from fedtune.task import client_data, load_model, load_splits


def _config(tmp_path, **fedkseed):
    return small_config(
        tmp_path,
        federation={"method": "fedkseed"},
        train={"local_steps": 5, "lr": 1e-5},
        fedkseed={"num_seeds": 64, **fedkseed},
    )


def _server(config):
    method = get_method(config)
    method.server_init(load_model(config))
    return method


def _batch(config, classifier):
    data = load_splits(config)[0]
    return classifier.encode(data.texts[:4]), torch.as_tensor(data.labels[:4])


def test_perturbation_is_exact_and_restored_bit_for_bit(tmp_path):
    config = _config(tmp_path)
    method = get_method(config)
    classifier = load_model(config)
    tuned = method.tuned(classifier)
    batch, _ = _batch(config, classifier)
    before = {t.name: t.param.clone() for t in tuned}
    with torch.no_grad(), zo.perturbed(tuned, seed=11, scale=1e-2):
        inside = classifier.model(**batch).logits
    assert all(torch.equal(t.param, before[t.name]) for t in tuned)

    # The same forward with w + eps z written into the weights explicitly.
    zo.move(tuned, seed=11, alpha=1e-2)
    with torch.no_grad():
        explicit = classifier.model(**batch).logits
    torch.testing.assert_close(inside, explicit)
    assert not torch.allclose(inside, load_model(config).model(**batch).logits)


def test_spsa_step_estimates_the_directional_derivative(tmp_path):
    config = _config(tmp_path)
    classifier = load_model(config)
    model = classifier.model
    tuned = get_method(config).tuned(classifier)
    batch, labels = _batch(config, classifier)

    def loss():
        return F.cross_entropy(model(**batch).logits, labels).item()

    # Autograd's directional derivative along z matches the two-point estimate.
    for p in model.parameters():
        p.requires_grad_(False)
    for t in tuned:
        t.param.requires_grad_(True)
    F.cross_entropy(model(**batch).logits, labels).backward()
    exact = sum((t.param.grad * zo.noise(5, t.index, t.param)).sum().item() for t in tuned)
    for t in tuned:
        t.param.requires_grad_(False)
    start = {t.name: t.param.clone() for t in tuned}
    g, _ = zo.spsa_step(loss, tuned, seed=5, eps=1e-3, lr=1e-4)
    assert g == pytest.approx(exact, rel=0.05)
    for t in tuned:  # w moved by exactly -lr g z, as w + (alpha z): two roundings, no fused multiply-add
        expected = start[t.name] + zo.noise(5, t.index, t.param) * (-1e-4 * g)
        assert torch.equal(t.param, expected)


@pytest.mark.parametrize("encoding", ["paper", "compact"])
def test_server_and_client_replicas_are_bit_identical(tmp_path, encoding):
    config = _config(tmp_path, encoding=encoding, pro=True)
    server = _server(config)
    states, store = {c: {} for c in (0, 1, 2)}, ReplicaStore()
    schedule = [[0, 1, 2], [0, 2], [0, 1]]  # client-1 gets round 2 within the sums (tests/test_catchup.py)
    for rnd, clients in enumerate(schedule, start=1):
        updates = []
        for c in clients:
            pid = c
            job = ClientJob(c, client_data(config, pid), seed=rnd * 10 + pid, state=states[c], replicas=store)
            result = server.client_train(load_model(config), server.server_downlink(c), job)
            assert uplink_rejection(server, result.tensors, client=c, rnd=rnd, num_examples=result.num_examples) is None
            updates.append(ClientUpdate(c, result.tensors, result.num_examples))
        fedavg(server, updates)

    # client-0 took part in round 3 with round 2 applied: it replays round 3 alone.
    job = ClientJob(0, client_data(config, 0), seed=99, state=states[0], replicas=store)
    server.client_train(load_model(config), server.server_downlink(0), job)
    global_params, kept = dict(server.server_model().named_parameters()), kept_copy(job)
    diffs = [(kept[t.name] - global_params[t.name]).abs().max().item() for t in server.tuned_params]
    assert max(diffs) == 0
    assert any(not torch.equal(kept[t.name], p) for t, p in zip(server.tuned_params, _fresh_params(config)))
    assert int(job.state["synced_round"]) == 3


def _fresh_params(config):
    classifier = load_model(config)
    return [t.param for t in get_method(config).tuned(classifier)]


def test_both_encodings_build_the_same_model(tmp_path):
    models = []
    for encoding in ("paper", "compact"):
        config = _config(tmp_path, encoding=encoding)
        server = _server(config)
        for rnd in (1, 2):
            updates = []
            for pid in (0, 1):
                job = ClientJob(pid, client_data(config, pid), seed=rnd * 10 + pid)
                r = server.client_train(load_model(config), server.server_downlink(pid), job)
                updates.append(ClientUpdate(pid, r.tensors, r.num_examples))
            fedavg(server, updates)
        models.append([t.param.clone() for t in server.tuned_params])
    assert all(torch.equal(a, b) for a, b in zip(*models))


def _round_bytes(config, clients=4, steps=200):
    """Payload bytes per client-round, up and down, for one round of real seed draws."""
    method = get_method(config)
    method.k = config.fedkseed.num_seeds
    rng = np.random.default_rng(0)
    up, ups = 0, []
    for pid in range(clients):
        seeds = torch.from_numpy(rng.choice(method.k, size=steps).astype(np.int32))
        scalars = torch.from_numpy(rng.standard_normal(steps).astype(np.float32))
        if config.fedkseed.encoding == "paper":
            tensors = {"seeds": seeds, "scalars": scalars}
        else:
            tensors = method.encode_scalars(per_seed_sums(seeds.long(), scalars, method.k))
        up += len(wire.encode(wire.Payload("fedkseed", 2, f"client-{pid}", tensors, 500)))
        ups.append(per_seed_sums(seeds.long(), scalars, method.k) / clients)
    delta = method.encode_scalars(sum(ups))
    down = len(wire.encode(wire.Payload("fedkseed", 3, "client-0", {f"round2/{n}": t for n, t in delta.items()})))
    return up / clients, down


def test_bytes_per_client_round_at_k4096_and_200_steps(tmp_path):
    base = {"federation": {"method": "fedkseed"}, "train": {"local_steps": 200}, "partition": {"num_clients": 4}}
    paper_up, paper_down = _round_bytes(small_config(tmp_path, **base, fedkseed={"encoding": "paper"}))
    compact_up, compact_down = _round_bytes(small_config(tmp_path, **base, fedkseed={"encoding": "compact"}))
    assert paper_up + paper_down <= 18 * 1024  # the paper's headline: under 18 KB per round
    assert paper_down > 4096 * 4 and paper_up > 200 * 8
    assert compact_up + compact_down <= (paper_up + paper_down) / 2


def test_malformed_uplinks_are_rejected(tmp_path):
    paper = _server(_config(tmp_path, encoding="paper"))
    ok = {"seeds": torch.arange(5, dtype=torch.int32), "scalars": torch.ones(5)}
    assert uplink_rejection(paper, ok) is None
    partial = {"seeds": ok["seeds"][:2], "scalars": ok["scalars"][:2]}  # a straggler's first steps
    assert uplink_rejection(paper, partial) is None
    cases = {
        "seed index out of range [0, 64)": {**ok, "seeds": torch.tensor([0, 1, 2, 3, 64], dtype=torch.int32)},
        "scalars: non-finite values": {**ok, "scalars": torch.tensor([1.0, float("nan"), 1, 1, 1])},
        "seeds: torch.int32 (6,), expected torch.int32 1-d of at most (5,)": {
            "seeds": torch.arange(6, dtype=torch.int32), "scalars": torch.ones(6)
        },
        "expected 1 to 5 int32 seeds and as many float32 scalars, got (4,) and (5,)": {**ok, "seeds": ok["seeds"][:4]},
        "tensor names differ from the 2 expected: missing ['scalars']": {"seeds": ok["seeds"]},
    }
    for reason, tensors in cases.items():
        assert reason in uplink_rejection(paper, tensors)

    compact = _server(_config(tmp_path, encoding="compact"))
    good = compact.encode_scalars(per_seed_sums(torch.tensor([3, 9]), torch.tensor([0.5, -1.0]), 64))
    assert uplink_rejection(compact, good) is None
    cases = {
        "mask marks 2 seeds but 1 scalars came": {**good, "scalars": good["scalars"][:1]},
        "mask: torch.uint8 (7,), expected torch.uint8 (8,)": {**good, "mask": good["mask"][:7]},
        "scalars: non-finite values": {**good, "scalars": torch.tensor([float("inf"), 1.0])},
    }
    for reason, tensors in cases.items():
        assert reason in uplink_rejection(compact, tensors)


def test_pro_probabilities_follow_the_history_of_g(tmp_path):
    server = _server(_config(tmp_path, pro=True, encoding="paper"))
    assert torch.equal(server.server_downlink(0)["probs"], torch.zeros(64, dtype=torch.uint8))  # uniform
    tensors = {"seeds": torch.tensor([1, 1, 2, 3, 3], dtype=torch.int32), "scalars": torch.tensor([0.4, -0.4, 0.1, 9.0, 9.0])}
    fedavg(server, [ClientUpdate(0, tensors, 40)])
    probs = server.server_downlink(0)["probs"]
    # seed 3: |g| clipped to 0.5 twice -> highest; seed 1: 0.4 twice; seed 2: 0.1; unseen: 0.
    assert probs[3] == 255 and probs[1] == round(255 * (0.8 / 3) / (1.0 / 3)) and probs[0] == 0
    assert probs[1] > probs[2] > probs[0]


def test_tuned_parameter_selection(tmp_path):
    classifier = load_model(_config(tmp_path))
    default = [t.name for t in get_method(_config(tmp_path)).tuned(classifier)]
    assert default[-2:] == ["classifier.weight", "classifier.bias"]
    assert all(n.endswith(("query.weight", "value.weight")) for n in default[:-2]) and len(default) == 14
    only_head = [t.name for t in get_method(_config(tmp_path, params=["head"])).tuned(classifier)]
    assert only_head == ["classifier.weight", "classifier.bias"]
    everything = get_method(_config(tmp_path, params=["all"])).tuned(classifier)
    assert len(everything) == len(list(classifier.model.parameters()))
    with pytest.raises(FedtuneError, match=r"fedkseed.params \['q_proj'\] matches no parameter"):
        get_method(_config(tmp_path, params=["q_proj"])).tuned(classifier)


def test_uplinks_from_another_round_method_or_client_are_rejected(tmp_path):
    from fedtune.codecs.tensor import PLAIN
    from fedtune.rounds.validation import Expected, validate_payload

    server = _server(_config(tmp_path, encoding="paper"))
    tensors = {"seeds": torch.arange(5, dtype=torch.int32), "scalars": torch.ones(5)}
    expected = Expected.of(server, PLAIN, 3, 1, 40, 5)

    def uplink(method="fedkseed", rnd=3, client="client-1"):
        return wire.encode(wire.Payload(method, rnd, client, tensors, 40))

    update, rejection = validate_payload(uplink(), expected)
    assert rejection is None and update.num_examples == 40
    for data, why in [
        (uplink(rnd=2), "header says fedkseed round 2 from 'client-1'"),
        (uplink(method="fedit"), "header says fedit round 3"),
        (uplink(client="client-2"), "from 'client-2'"),
        (uplink()[:-7], "not a fedtune payload"),
    ]:
        update, rejection = validate_payload(data, expected)
        assert update is None and why in rejection.reason
