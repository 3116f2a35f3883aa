"""FLoRA beyond the aggregation math: client replicas, resent rounds, rank checks."""

import pytest
import torch
from conftest import fedavg, kept_copy, small_config, uplink_rejection

from fedtune.errors import FedtuneError
from fedtune.methods import ClientJob, ClientUpdate, get_method
from fedtune.methods.replicas import ReplicaStore
from fedtune.task import client_data, load_model


def _random_update(method, client, seed, n=40):
    g = torch.Generator().manual_seed(seed)
    return ClientUpdate(client, {k: torch.randn(t.shape, generator=g) * 0.05 for k, t in method.uplink_template(client).items()}, n)


@pytest.fixture
def flora(tmp_path):
    config = small_config(tmp_path, federation={"method": "flora"}, flora={"client_ranks": [2, 4, 8]})
    method = get_method(config)
    method.server_init(load_model(config))
    return method


def test_client_rebuilds_the_server_model_bit_for_bit(flora):
    fedavg(flora, [_random_update(flora, 0, 1), _random_update(flora, 1, 2, n=80)])
    fedavg(flora, [_random_update(flora, 0, 3)])  # client-1 sits round 2 out

    down = flora.server_downlink(1)
    assert {n.split("/")[0] for n in down if n.startswith("round")} == {"round1", "round2"}
    assert {n.split("/")[0] for n in flora.server_downlink(0) if n.startswith("round")} == {"round2"}

    job = ClientJob(1, client_data(flora.config, 1), seed=7, replicas=ReplicaStore())
    result = flora.client_train(load_model(flora.config), down, job)
    merged = kept_copy(job)
    for path, base in flora.targets.items():
        assert torch.equal(merged[f"{path}.weight"], base.weight)
    assert int(job.state["synced_round"]) == 2
    assert result.tensors.keys() == flora.uplink_template(1).keys()

    # A resent round (the client's last update was lost) is not merged twice.
    flora.client_train(load_model(flora.config), down, job)
    assert all(torch.equal(kept_copy(job)[n], merged[n]) for n in merged)


def test_downlink_grows_with_participants_ranks(flora):
    def size(client):
        return sum(t.numel() for n, t in flora.server_downlink(client).items() if n.startswith("round"))

    assert size(2) == 0
    fedavg(flora, [_random_update(flora, 0, 1)])
    one = size(2)
    fedavg(flora, [_random_update(flora, c, i) for i, c in enumerate([0, 1, 2])])
    # client-2 merged round 1 before training in round 2; round 2 stacks ranks
    # 2 + 4 + 8 against round 1's 2 alone.
    assert size(2) == 7 * one


def test_each_client_must_send_its_own_rank(flora):
    wrong = _random_update(flora, 1, 1)  # rank 4 tensors...
    assert uplink_rejection(flora, wrong.tensors, client=0) is not None  # ...from the rank-2 client
    assert "expected torch.float32 (2, 384)" in uplink_rejection(flora, wrong.tensors, client=0)
    assert uplink_rejection(flora, _random_update(flora, 0, 1).tensors, client=0) is None


def test_client_ranks_config_errors(tmp_path):
    with pytest.raises(FedtuneError, match=r"flora.client_ranks must be empty or one rank per client \(partition.num_clients=3\)"):
        small_config(tmp_path, federation={"method": "flora"}, flora={"client_ranks": [2, 4]})
    with pytest.raises(FedtuneError, match="flora.client_ranks must be ranks >= 1"):
        small_config(tmp_path, federation={"method": "flora"}, flora={"client_ranks": [2, 0, 4]})
