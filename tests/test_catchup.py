"""Bounded catch-up for the methods whose clients replay rounds (FLoRA, FedKSeed):
the server holds at most a snapshot's bytes of history, a client far behind gets a
snapshot, client copies live in a content-addressed store and the node state keeps
40 bytes per client."""

import json

import pytest
import torch
from conftest import fedavg, kept_copy, small_config
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedtune.errors import FedtuneError
from fedtune.methods import ClientJob, ClientUpdate, get_method
from fedtune.methods.fedkseed import per_seed_sums
from fedtune.methods.replay import CATCHUP, SNAPSHOT, RoundLog, nbytes
from fedtune.methods.replicas import ReplicaStore
from fedtune.task import client_data, load_model, load_splits

# A copy rebuilt from FedKSeed's summed scalars differs from the round-by-round
# server model by float32 rounding only: measured 1.1e-6 at most after 50 rounds of
# 10 seed steps (weights of magnitude 0.15, whose float32 spacing is 1.5e-8).
SUMS_TOLERANCE = 1e-5


def _server(config):
    method = get_method(config)
    method.server_init(load_model(config))
    return method


def _fake_update(method, client, g):
    if method.name == "fedkseed":
        seeds = torch.randint(0, method.k, (method.config.train.local_steps,), generator=g)
        scalars = torch.randn(len(seeds), generator=g)
        if method.config.fedkseed.encoding == "paper":
            return ClientUpdate(client, {"seeds": seeds.int(), "scalars": scalars}, 40)
        return ClientUpdate(client, method.encode_scalars(per_seed_sums(seeds, scalars, method.k)), 40)
    return ClientUpdate(client, {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in method.uplink_template(client).items()}, 40)


def test_round_log_holds_at_most_a_snapshot_and_sends_the_cheaper():
    log, snapshot = RoundLog(cap=100), {"w": torch.zeros(25)}  # 100 B
    for rnd in range(1, 6):
        log.append({"d": torch.full((10,), float(rnd))}, [0] if rnd == 3 else [1] if rnd == 5 else [])
        assert sum(map(nbytes, log.deltas.values())) <= 100
    assert sorted(log.deltas) == [4, 5]
    # client-0 applied round 2 (it sent in round 3): rounds 3-5 are not all held.
    assert log.downlink(0, lambda: snapshot)[CATCHUP].tolist() == [-1, 5]
    assert set(log.downlink(0, lambda: snapshot)) == {CATCHUP, SNAPSHOT + "w"}
    down = log.downlink(1, lambda: snapshot)  # applied round 4: round 5 alone, 40 B
    assert down[CATCHUP].tolist() == [4, 5] and set(down) == {CATCHUP, "round5/d"}
    assert log.downlink(1, lambda: {"w": torch.zeros(5)})[CATCHUP].tolist() == [-1, 5]  # a cheaper snapshot wins
    log.forget(1)
    assert log.downlink(1, lambda: snapshot)[CATCHUP].tolist() == [-1, 5]


def test_flora_client_that_missed_50_rounds_gets_the_merged_weights(tmp_path):
    config = small_config(tmp_path, federation={"method": "flora"}, flora={"client_ranks": [2, 4, 8]})
    server, g, store = _server(config), torch.Generator().manual_seed(0), ReplicaStore(tmp_path / "replicas")
    job = ClientJob(0, client_data(config, 0), seed=1, replicas=store)
    result = server.client_train(load_model(config), server.server_downlink(0), job)
    fedavg(server, [ClientUpdate(0, result.tensors, result.num_examples), _fake_update(server, 1, g)])
    snapshot_bytes = nbytes(server.snapshot())
    for _ in range(50):  # client-0 sits out 50 rounds
        fedavg(server, [_fake_update(server, 1, g), _fake_update(server, 2, g)])
        assert sum(map(nbytes, server.log.deltas.values())) <= snapshot_bytes
    assert 1 not in server.log.deltas and server.log.latest == 51

    down = server.server_downlink(0)
    head = sum(nbytes({n: t}) for n, t in down.items() if n.startswith("head/"))
    assert down[CATCHUP].tolist() == [-1, 51]
    assert nbytes(down) == snapshot_bytes + head + 16  # the weights, the head, [base, latest]
    job = ClientJob(0, client_data(config, 0), seed=2, state=job.state, replicas=store)
    server.client_train(load_model(config), down, job)
    kept = kept_copy(job)
    assert kept.keys() == server.snapshot().keys()
    assert all(torch.equal(kept[n], w) for n, w in server.snapshot().items())  # exact: the weights themselves
    assert int(job.state["synced_round"]) == 51


def test_flora_exports_the_merged_change_once_rounds_are_dropped(tmp_path):
    config = small_config(tmp_path, federation={"method": "flora"}, flora={"client_ranks": [2, 4, 8]})
    server, g = _server(config), torch.Generator().manual_seed(1)
    server.log.cap = 0  # keep no round: the export cannot stack the factors
    for _ in range(2):
        fedavg(server, [_fake_update(server, c, g) for c in (0, 1, 2)])
    learner = load_model(config)
    texts = load_splits(config)[1].texts[:16]
    with torch.no_grad():
        expected = server.server_model()(**learner.encode(texts)).logits
    out = tmp_path / "adapter"
    server.export(out)
    info = json.loads((out / "fedtune.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(info["base_model"], num_labels=info["num_labels"],
                                                              pad_token_id=info["pad_token_id"])
    model = PeftModel.from_pretrained(base, out).eval()
    batch = AutoTokenizer.from_pretrained(out)(texts, padding=True, truncation=True, max_length=info["max_length"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encoding", ["paper", "compact"])
def test_fedkseed_client_that_missed_50_rounds_applies_the_k_sums(tmp_path, encoding):
    config = small_config(tmp_path, federation={"method": "fedkseed"}, train={"local_steps": 5, "lr": 1e-4},
                          fedkseed={"num_seeds": 64, "encoding": encoding})
    server, g, store = _server(config), torch.Generator().manual_seed(0), ReplicaStore(tmp_path / "replicas")
    for _ in range(50):
        fedavg(server, [_fake_update(server, 1, g), _fake_update(server, 2, g)])
        assert sum(map(nbytes, server.log.deltas.values())) <= 64 * 4 + 8
    down = server.server_downlink(0)
    assert down[CATCHUP].tolist() == [-1, 50]
    assert nbytes(down) <= 64 * 4 + 8 + 16  # K floats (and a mask) however many rounds were missed
    job = ClientJob(0, client_data(config, 0), seed=3, replicas=store)
    result = server.client_train(load_model(config), down, job)
    kept, params = kept_copy(job), dict(server.server_model().named_parameters())
    fresh = dict(load_model(config).model.named_parameters())
    for t in server.tuned_params:
        assert (kept[t.name] - params[t.name]).abs().max() <= SUMS_TOLERANCE
        assert (kept[t.name] - fresh[t.name]).abs().max() > 10 * SUMS_TOLERANCE  # it did move

    # From there, a round it misses is replayed: the copy follows the server's rounds.
    fedavg(server, [ClientUpdate(0, result.tensors, result.num_examples), _fake_update(server, 1, g)])
    fedavg(server, [_fake_update(server, 1, g)])
    down = server.server_downlink(0)
    assert down[CATCHUP].tolist()[0] == 50 or encoding == "paper"  # paper: two rounds cost more than the sums


def test_clients_handed_the_same_snapshot_rebuild_it_once(tmp_path, monkeypatch):
    """In a simulation every client sampled after missing rounds gets the same
    snapshot; the first rebuilds it (FedKSeed: one perturbation per seed), the
    others load its copy from the shared store, bit for bit."""
    config = small_config(tmp_path, federation={"method": "fedkseed"}, train={"local_steps": 2, "lr": 1e-4},
                          fedkseed={"num_seeds": 64, "encoding": "compact"})
    server, g, store = _server(config), torch.Generator().manual_seed(0), ReplicaStore(tmp_path / "replicas")
    for _ in range(5):
        fedavg(server, [_fake_update(server, 1, g), _fake_update(server, 2, g)])
    replayed, apply = [], server.apply
    monkeypatch.setattr(server, "apply", lambda tuned, scalars: replayed.append(scalars) or apply(tuned, scalars))

    def join(client):
        job = ClientJob(client, client_data(config, client % 3), seed=client, replicas=store)
        down = server.server_downlink(client)
        assert down[CATCHUP].tolist()[0] == -1
        return job, server.client_train(load_model(config), down, job)

    (first, _), (second, _) = join(10), join(11)
    assert len(replayed) == 1  # the second client replayed nothing
    assert torch.equal(first.state["replica_digest"], second.state["replica_digest"])
    fedavg(server, [_fake_update(server, 1, g)])  # the server replays the round on its own model
    replayed.clear()
    join(12)
    assert len(replayed) == 1  # a new round's snapshot is rebuilt again


def test_a_lost_copy_is_one_error_and_the_server_starts_the_client_afresh(tmp_path):
    config = small_config(tmp_path, federation={"method": "fedkseed"}, train={"local_steps": 3, "lr": 1e-4},
                          fedkseed={"num_seeds": 64, "encoding": "compact"})
    server, store = _server(config), ReplicaStore(tmp_path / "replicas")
    job = ClientJob(0, client_data(config, 0), seed=1, replicas=store)
    first = server.client_train(load_model(config), server.server_downlink(0), job)
    fedavg(server, [ClientUpdate(0, first.tensors, first.num_examples)])
    second = server.client_train(load_model(config), server.server_downlink(0), job)
    fedavg(server, [ClientUpdate(0, second.tensors, second.num_examples)])
    assert server.server_downlink(0)[CATCHUP].tolist() == [1, 2]

    moved = ClientJob(0, client_data(config, 0), seed=3, state=job.state, replicas=ReplicaStore(tmp_path / "elsewhere"))
    with pytest.raises(FedtuneError, match="copy of round 1 is not in its replica store"):
        server.client_train(load_model(config), server.server_downlink(0), moved)
    server.client_failed(0)  # what the exchange does with a failed reply
    assert server.server_downlink(0)[CATCHUP].tolist()[0] in (-1, 0)
    server.client_train(load_model(config), server.server_downlink(0), moved)
    assert int(moved.state["synced_round"]) == 2


def test_200_registered_clients_keep_40_bytes_each_and_share_copies(tmp_path):
    """200 registered clients, 10 sampled per round: what a simulation's process
    holds per client is its node state, a round and a digest (40 B; 8 KB for all),
    and the server's record of it, one number; the weights are on disk, one file per
    round the clients are synced to, or two where some rebuilt it from FedKSeed's sums."""
    config = small_config(tmp_path, federation={"method": "fedkseed"}, train={"local_steps": 2, "lr": 1e-4},
                          fedkseed={"num_seeds": 64, "encoding": "compact"})
    server, store = _server(config), ReplicaStore(tmp_path / "replicas")
    states = {c: {} for c in range(200)}
    rng = torch.Generator().manual_seed(0)
    for rnd in range(1, 5):
        cohort = sorted(torch.randperm(200, generator=rng)[:10].tolist())
        updates = []
        for c in cohort:
            job = ClientJob(c, client_data(config, c % 3), seed=rnd * 1000 + c, state=states[c], replicas=store)
            result = server.client_train(load_model(config), server.server_downlink(c), job)
            updates.append(ClientUpdate(c, result.tensors, result.num_examples))
        fedavg(server, updates)
    assert max(nbytes(s) for s in states.values()) == 40
    assert sum(map(nbytes, states.values())) <= 200 * 40
    assert len(server.log.synced) <= 200 and sum(map(nbytes, server.log.deltas.values())) <= server.log.cap
    synced_rounds = {int(s["synced_round"]) for s in states.values() if s}
    assert len(synced_rounds) <= store.blobs() <= 2 * len(synced_rounds) <= 6  # clients synced alike share a file


@pytest.mark.parametrize("on_disk", [True, False])
def test_replica_store_shares_identical_copies_and_drops_unreferenced_ones(tmp_path, on_disk):
    store = ReplicaStore(tmp_path if on_disk else None)
    a, b = {"w": torch.ones(3)}, {"w": torch.zeros(3)}
    digest = store.put("0", a)
    assert store.put("1", {"w": torch.ones(3)}) == digest and store.blobs() == 1
    assert store.put("0", b) != digest and store.blobs() == 2  # client-1 still holds a's file
    store.put("1", b)
    assert store.blobs() == 1 and store.get(digest) is None
    assert torch.equal(store.get(store.put("0", b))["w"], b["w"])


def test_replica_store_refuses_a_corrupted_copy(tmp_path):
    store = ReplicaStore(tmp_path)
    digest = store.put("0", {"w": torch.ones(3)})
    blob = tmp_path / "blobs" / f"{digest.hex()}.st"
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x01")
    assert store.get(digest) is None
