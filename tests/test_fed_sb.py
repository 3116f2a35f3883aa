"""Fed-SB beyond the aggregation math: where its bases come from and how they travel."""

import pytest
import torch
from conftest import fedavg, small_config

from fedtune.errors import FedtuneError
from fedtune.methods import ClientJob, ClientUpdate, get_method
from fedtune.methods.replicas import ReplicaStore
from fedtune.task import client_data, load_model, load_splits, server_data

RANK = 4


@pytest.fixture
def fed_sb(tmp_path):
    config = small_config(tmp_path, federation={"method": "fed_sb"}, lora={"rank": RANK}, fed_sb={"calibration_size": 16})
    method = get_method(config)
    method.server_init(load_model(config))
    return method


def test_bases_are_orthonormal_deterministic_and_from_server_data_only(fed_sb):
    eye = torch.eye(RANK)
    for name, basis in fed_sb.bases.items():
        gram = basis @ basis.T if name.endswith(".A") else basis.T @ basis
        torch.testing.assert_close(gram, eye, atol=1e-5, rtol=0)
    again = get_method(fed_sb.config)
    again.server_init(load_model(fed_sb.config))
    assert all(torch.equal(again.bases[n], b) for n, b in fed_sb.bases.items())

    calibration = set(server_data(fed_sb.config, 16).texts)
    train, test = load_splits(fed_sb.config)
    assert len(calibration) == 16 and not calibration & (set(train.texts) | set(test.texts))


def test_model_starts_as_the_base_model(fed_sb):
    classifier = load_model(fed_sb.config)
    batch = classifier.encode(load_splits(fed_sb.config)[1].texts[:8])
    with torch.no_grad():
        torch.testing.assert_close(fed_sb.server_model()(**batch).logits, classifier.model(**batch).logits)


def test_bases_travel_once_and_clients_train_only_r(fed_sb, tmp_path):
    store = ReplicaStore(tmp_path / "replicas")
    first = fed_sb.server_downlink(0)
    assert {n.removeprefix("basis/") for n in first if n.startswith("basis/")} == fed_sb.bases.keys()
    job = ClientJob(0, client_data(fed_sb.config, 0), seed=3, replicas=store)
    result = fed_sb.client_train(load_model(fed_sb.config), first, job)
    # The node state keeps a digest; the bases themselves are in the replica store.
    assert job.state.keys() == {"bases_digest"} and job.state["bases_digest"].numel() == 32
    r_names = [n for n in result.tensors if "lora" in n]
    assert r_names and all(result.tensors[n].shape == (RANK, RANK) for n in r_names)
    assert any(not torch.equal(result.tensors[n], first[n]) for n in r_names)

    fedavg(fed_sb, [ClientUpdate(0, result.tensors, result.num_examples)])
    later = fed_sb.server_downlink(0)
    assert not any(n.startswith("basis/") for n in later)
    assert any(n.startswith("basis/") for n in fed_sb.server_downlink(1))  # not confirmed yet
    # Next round starts from the global R, with the bases the client kept: the same
    # R trained from the same seed as a client sent the bases again.
    kept = fed_sb.client_train(load_model(fed_sb.config), later, job)
    resent = fed_sb.client_train(load_model(fed_sb.config), later | fed_sb.server_downlink(1),
                                 ClientJob(0, client_data(fed_sb.config, 0), seed=3))
    assert all(torch.equal(kept.tensors[n], resent.tensors[n]) for n in r_names)

    # Clients of one host share one copy of the bases.
    other = ClientJob(1, client_data(fed_sb.config, 1), seed=4, replicas=store)
    fed_sb.client_train(load_model(fed_sb.config), fed_sb.server_downlink(1), other)
    assert store.blobs() == 1

    stranger = ClientJob(2, client_data(fed_sb.config, 2), seed=3, replicas=store)
    with pytest.raises(FedtuneError, match="client-2 holds no Fed-SB bases .* the server sends them next time"):
        fed_sb.client_train(load_model(fed_sb.config), later, stranger)


def test_a_client_that_lost_its_bases_is_sent_them_again(fed_sb, tmp_path):
    job = ClientJob(0, client_data(fed_sb.config, 0), seed=3, replicas=ReplicaStore(tmp_path / "a"))
    result = fed_sb.client_train(load_model(fed_sb.config), fed_sb.server_downlink(0), job)
    fedavg(fed_sb, [ClientUpdate(0, result.tensors, result.num_examples)])
    cleared = ClientJob(0, job.data, seed=4, state=job.state, replicas=ReplicaStore(tmp_path / "b"))
    with pytest.raises(FedtuneError, match="client-0 holds no Fed-SB bases \\(its replica store was cleared"):
        fed_sb.client_train(load_model(fed_sb.config), fed_sb.server_downlink(0), cleared)
    fed_sb.client_failed(0)  # what the server does with a failed reply
    fed_sb.client_train(load_model(fed_sb.config), fed_sb.server_downlink(0), cleared)


def test_config_errors(tmp_path):
    config = small_config(tmp_path, federation={"method": "fed_sb"}, lora={"rank": 500})
    with pytest.raises(FedtuneError, match=r"config key lora.rank must be at most 384, the smaller side of adapted layer .* \(384 x 384\), got 500"):
        get_method(config).check(load_model(config))
    config = small_config(tmp_path, federation={"method": "fed_sb"}, data={"train_size": 0})
    with pytest.raises(FedtuneError, match="data.train_size = 0 gives every example to the clients"):
        get_method(config).server_init(load_model(config))
    with pytest.raises(FedtuneError, match="fed_sb.calibration_size must be >= 1"):
        small_config(tmp_path, fed_sb={"calibration_size": 0})
