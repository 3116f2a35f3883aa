import pytest
import torch
from conftest import fedavg, uplink_rejection

from fedtune.errors import FedtuneError
from fedtune.methods import ClientJob, ClientUpdate, get_method
from fedtune.methods.adapters import load_trainable_state, trainable_state
from fedtune.rounds.release import by_examples
from fedtune.task import client_data, load_model


def weighted_average(updates):
    return {n: by_examples(updates).average(updates, n, t) for n, t in updates[0].tensors.items()}


def test_weighted_average_is_exact_fedavg():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 4, generator=g) for _ in range(3)]
    counts = [10, 30, 60]
    updates = [ClientUpdate(i, {"w": x}, n) for i, (x, n) in enumerate(zip(xs, counts))]
    expected = 0.1 * xs[0] + 0.3 * xs[1] + 0.6 * xs[2]
    torch.testing.assert_close(weighted_average(updates)["w"], expected, rtol=0, atol=1e-6)


def test_fedit_is_not_exact_for_the_product():
    """Averaging A and B separately is not averaging B A: the gap FFA-LoRA, FLoRA and Fed-SB close."""
    g = torch.Generator().manual_seed(2)
    a = [torch.randn(4, 16, generator=g) for _ in range(2)]
    b = [torch.randn(16, 4, generator=g) for _ in range(2)]
    ups = [ClientUpdate(i, {"A": a[i], "B": b[i]}, 1) for i in range(2)]
    avg = weighted_average(ups)
    gap = (avg["B"] @ avg["A"] - (b[0] @ a[0] + b[1] @ a[1]) / 2).norm()
    assert gap > 1.0


def test_client_training_moves_only_the_adapter_and_server_aggregates(config):
    method = get_method(config)
    method.server_init(load_model(config))
    down = method.server_downlink(0)
    assert any("lora_A" in n for n in down) and any("lora_B" in n for n in down)
    assert any("classifier" in n for n in down)  # the head is trained and shared too
    assert all(torch.count_nonzero(t) == 0 for n, t in down.items() if "lora_B" in n)

    data = client_data(config, 0)
    result = method.client_train(load_model(config), down, ClientJob(0, data, seed=5))
    assert result.tensors.keys() == down.keys()
    assert result.num_examples == len(data)
    assert any(not torch.equal(result.tensors[n], down[n]) for n in down)
    again = method.client_train(load_model(config), down, ClientJob(0, data, seed=5))
    assert all(torch.equal(again.tensors[n], result.tensors[n]) for n in down)  # deterministic

    fedavg(method, [ClientUpdate(0, result.tensors, 40), ClientUpdate(1, down, 40)])
    model_state = trainable_state(method.server_model())
    for n in down:
        torch.testing.assert_close(model_state[n], (result.tensors[n] + down[n]) / 2)


def test_mismatched_adapter_is_refused(config):
    method = get_method(config)
    method.server_init(load_model(config))
    down = dict(method.server_downlink(0))
    down.pop(next(iter(down)))
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(method.server_model(), down)


def test_unknown_method_and_bad_target_modules(tmp_path):
    from conftest import small_config

    with pytest.raises(FedtuneError, match="federation.method 'fedsgd'.*fedit"):
        get_method(small_config(tmp_path, federation={"method": "fedsgd"}))
    config = small_config(tmp_path, lora={"target_modules": ["q_proj"]})
    with pytest.raises(FedtuneError, match="lora.target_modules.*query"):
        get_method(config).server_init(load_model(config))


def test_the_server_refuses_malformed_updates(config):
    method = get_method(config)
    method.server_init(load_model(config))
    down = method.server_downlink(0)
    name = next(n for n in down if "lora_A" in n)
    assert uplink_rejection(method, dict(down)) is None
    cases = {
        "names differ": {n: t for n, t in down.items() if n != name},
        "expected torch.float32 (8, 384)": {**down, name: torch.zeros(4, 384)},  # another rank
        "expected torch.float32": {**down, name: down[name].half()},
        "non-finite": {**down, name: torch.full_like(down[name], float("nan"))},
    }
    for reason, tensors in cases.items():
        assert reason in uplink_rejection(method, tensors)
    assert "examples: claims 0 examples; its partition holds 40" == uplink_rejection(method, dict(down), num_examples=0)
