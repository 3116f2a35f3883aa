"""model.device and model.dtype: the device is a parameter everywhere, nothing moves
to another device behind it, reduced precision trains float32 adapters, and the
randomness replicas share does not depend on the device. Tests marked cuda run
where a GPU is (benchmarks/gpu_check.py); the rest run on the CPU."""

import pytest
import torch
from conftest import fedavg, small_config, uplink_rejection
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedtune import zeroth_order as zo
from fedtune.config import TrainSection, from_dict
from fedtune.devices import resolve_device
from fedtune.errors import FedtuneError
from fedtune.methods import METHODS, ClientJob, ClientUpdate, get_method
from fedtune.methods.adapters import trainable_state, wrap_with_lora
from fedtune.privacy.dp_sgd import DPSGD, CPUNoiseDPOptimizer
from fedtune.simulation import gpus_per_client
from fedtune.task import client_data, load_model, load_splits
from fedtune.training import train_steps


def _config(tmp_path, name, **sections):
    extra = {"flora": {"client_ranks": [2, 4, 4]}} if METHODS[name].heterogeneous_ranks else {}
    if name == "fedkseed":
        extra = {"fedkseed": {"num_seeds": 64, "encoding": "paper"}, "train": {"local_steps": 4, "lr": 1e-4}}
    return small_config(tmp_path, federation={"method": name}, **extra, **sections)


def _one_round(config, client_device=None):
    """One round in process: a server on model.server_device and three clients on
    ``client_device``; returns the server, the clients' results and their learners."""
    server = get_method(config)
    server.server_init(load_model(config, resolve_device(config.model.server_device)))
    results, learners = [], []
    for c in range(3):
        learner = load_model(config, client_device)
        job = ClientJob(c, client_data(config, c), seed=10 + c, state={})
        result = server.client_train(learner, server.server_downlink(c), job)
        assert uplink_rejection(server, result.tensors, client=c, rnd=1, partition=len(job.data)) is None
        results.append(result)
        learners.append(learner)
    fedavg(server, [ClientUpdate(c, r.tensors, r.num_examples) for c, r in enumerate(results)])
    return server, results, learners


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cpu_forced_where_a_gpu_would_be_chosen_keeps_everything_on_the_cpu(tmp_path, monkeypatch, name):
    """With a GPU present (pretended: this machine has none, so a tensor sent to it
    would fail), `auto` picks it, and model.device = cpu trains, aggregates and
    evaluates one round of every method without touching it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    config = _config(tmp_path, name, model={"device": "cpu", "server_device": "cpu"})
    server, results, learners = _one_round(config)
    assert all(learner.device == torch.device("cpu") for learner in learners)
    tensors = [t for r in results for t in r.tensors.values()]
    assert all(t.device.type == "cpu" for t in tensors)
    assert {p.device.type for learner in learners for p in learner.model.parameters()} == {"cpu"}
    evaluation = load_model(config).evaluate(server.server_model(), load_splits(config)[1], 20)
    assert 0 <= evaluation.score <= 1


@pytest.mark.parametrize("name", ["fedit", "fed_sb", "flora"])
def test_bfloat16_base_weights_train_float32_adapters_close_to_float32(tmp_path, name):
    """Mixed precision on the CPU: base weights in bfloat16, what is trained and sent
    float32, and (same bases) the round's update within bfloat16's precision of the
    float32 one."""
    updates = {}
    for dtype in ("float32", "bfloat16"):
        config = _config(tmp_path, name, model={"dtype": dtype, "device": "cpu"})
        server, results, learners = _one_round(config)
        base = [p for n, p in learners[0].model.named_parameters() if "query" in n and "lora" not in n]
        assert base and all(p.dtype == getattr(torch, dtype) for p in base)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in results[0].tensors.values())
        updates[dtype] = results[0].tensors
    if name == "fed_sb":
        return  # its bases are the signs of calibration gradients, which bfloat16 flips where they are near zero
    for key, full in updates["float32"].items():
        half = updates["bfloat16"][key]
        assert torch.allclose(half, full, atol=5e-3, rtol=5e-2), key


def test_float16_scales_the_loss_and_trains(tmp_path):
    config = _config(tmp_path, "fedit", model={"dtype": "float16", "device": "cpu"})
    _, results, _ = _one_round(config)
    start = get_method(config)
    start.server_init(load_model(config))
    moved = [not torch.equal(t, start.server_downlink(0)[n]) for n, t in results[0].tensors.items()]
    assert any(moved) and all(torch.isfinite(t).all() for t in results[0].tensors.values())


def test_dp_noise_from_a_cpu_generator_is_opacus_own_on_the_cpu():
    """The device-independent DP optimizer changes where the noise is drawn, not what it is."""
    grads = []
    for optimizer_class in (DPOptimizer, CPUNoiseDPOptimizer):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        module = GradSampleModule(model)
        optimizer = optimizer_class(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.3, max_grad_norm=0.5,
                                    expected_batch_size=4, generator=torch.Generator().manual_seed(7))
        module(torch.randn(4, 6, generator=torch.Generator().manual_seed(1))).square().mean().backward()
        optimizer.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize(("overrides", "key"), [
    ({"model": {"device": "gpu"}}, "model.device"),
    ({"model": {"server_device": "cuda:x"}}, "model.server_device"),
    ({"model": {"dtype": "float64"}}, "model.dtype"),
    ({"model": {"dtype": "bfloat16"}, "privacy": {"mode": "sample"}}, "model.dtype"),
    ({"model": {"dtype": "bfloat16"}, "federation": {"method": "fedkseed"}}, "model.dtype"),
    ({"simulation": {"gpus_per_client": 1.5}}, "simulation.gpus_per_client"),
])
def test_bad_device_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(FedtuneError, match=key.replace(".", r"\.")):
        from_dict(overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_where_there_is_none_is_one_line(tmp_path):
    with pytest.raises(FedtuneError, match=r"model.device = 'cuda' but this machine has no CUDA device"):
        load_model(small_config(tmp_path, model={"device": "cuda"}))
    with pytest.raises(FedtuneError, match="simulation.gpus_per_client = 0.5 but clients train on the CPU"):
        gpus_per_client(small_config(tmp_path, simulation={"gpus_per_client": 0.5}), 2)
    assert gpus_per_client(small_config(tmp_path), 2) == 0.0


# -- on a GPU ------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_a_round_on_cuda(tmp_path, name):
    """Clients on the GPU, the server on the CPU: valid uplinks, a model that moved,
    and every client's model back on the CPU afterwards."""
    config = _config(tmp_path, name, model={"server_device": "cpu"})
    server, results, learners = _one_round(config, torch.device("cuda"))
    assert all(learner.device.type == "cuda" for learner in learners)
    assert {p.device.type for learner in learners for p in learner.model.parameters()} == {"cpu"}
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for r in results for t in r.tensors.values())
    assert all(r.metrics["steps"] > 0 for r in results)


@pytest.mark.cuda
def test_perturbations_are_the_same_on_cuda_as_on_the_cpu():
    like = torch.empty(64, 33)
    assert torch.equal(zo.noise(123, 4, like.cuda()).cpu(), zo.noise(123, 4, like))


@pytest.mark.cuda
def test_a_fedkseed_client_trained_on_cuda_is_replayed_bit_exactly_by_a_cpu_server(tmp_path):
    """The paper's uplink is the (seed, g) of every step: a CPU replaying those moves
    from the same start rebuilds the GPU client's local model to the bit."""
    config = _config(tmp_path, "fedkseed")
    server = get_method(config)
    server.server_init(load_model(config, torch.device("cpu")))
    learner = load_model(config, torch.device("cuda"))
    result = server.client_train(learner, server.server_downlink(0), ClientJob(0, client_data(config, 0), seed=3, state={}))
    replica = load_model(config, torch.device("cpu"))
    tuned = server.tuned(replica)
    for j, g in zip(result.tensors["seeds"].tolist(), result.tensors["scalars"].tolist()):
        zo.move(tuned, server.seeds[j], -config.train.lr * g)
    trained = dict(learner.model.named_parameters())
    assert all(torch.equal(t.param, trained[t.name]) for t in tuned)
    fresh = server.tuned(load_model(config, torch.device("cpu")))
    assert any(not torch.equal(t.param, f.param) for t, f in zip(tuned, fresh))  # the steps moved it


@pytest.mark.cuda
def test_dp_sgd_trains_on_cuda_with_noise_drawn_on_the_cpu(tmp_path):
    config = small_config(tmp_path)
    learner = load_model(config, torch.device("cuda"))
    model = wrap_with_lora(learner, config.lora, 0)
    before = trainable_state(model)
    stats = train_steps(model, learner, client_data(config, 0), 2, TrainSection(batch_size=8), 0, dp=DPSGD(1.0, 0.5, seed=3))
    after = trainable_state(model)
    assert stats.steps > 0 and all(t.device.type == "cpu" and torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)
