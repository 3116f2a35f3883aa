"""Differential privacy: the accountant's figures, the noise actually added, the
clipping bound, DP-SGD's step through PEFT, the budget, and bad settings."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import small_config, train_lora
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedtune.config import TrainSection
from fedtune.errors import FedtuneError
from fedtune.methods import ClientUpdate, get_method
from fedtune.methods.adapters import trainable_state, wrap_with_lora
from fedtune.privacy.accounting import Budget
from fedtune.privacy.dp_sgd import DPSGD, CPUNoiseDPOptimizer, make_private
from fedtune.privacy.mechanism import Noise, clip_update
from fedtune.report.run_dir import create_run_dir
from fedtune.rounds.release import by_examples
from fedtune.simulation import run_simulation
from fedtune.task import client_data, load_model

CLIENTS = {0: 40, 1: 40, 2: 40}


def _budget(tmp_path, clients=CLIENTS, federation=None, **privacy) -> Budget:
    return Budget(small_config(tmp_path, privacy=privacy, federation=federation or {}), clients)


# -- accounting ----------------------------------------------------------------


@pytest.mark.parametrize("accountant", [RDPAccountant, PRVAccountant])
def test_client_level_epsilon_is_opacus_for_the_same_steps(tmp_path, accountant):
    mechanism = "rdp" if accountant is RDPAccountant else "prv"
    budget = _budget(
        tmp_path, federation={"clients_per_round": 2}, mode="client", noise_multiplier=1.3, epsilon=50.0, accountant=mechanism
    )
    reference = accountant()
    for _ in range(4):
        budget.spend([0, 1])  # client-2 sat out, but sampling is part of its guarantee
        reference.step(noise_multiplier=1.3, sample_rate=2 / 3)
    for client in CLIENTS:
        assert budget.epsilon(client) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


def test_sample_level_epsilon_counts_each_clients_own_steps(tmp_path):
    budget = _budget(tmp_path, {0: 40, 1: 80}, mode="sample", noise_multiplier=1.1, epsilon=50.0)
    budget.spend([0, 1])
    budget.spend([1])
    steps = budget.config.train.local_steps  # 3 per round, batch 4
    for client, rounds, rate in ((0, 1, 4 / 40), (1, 2, 4 / 80)):
        reference = RDPAccountant()
        for _ in range(rounds * steps):
            reference.step(noise_multiplier=1.1, sample_rate=rate)
        assert budget.epsilon(client) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert budget.max_epsilon() == budget.epsilon(0)


def test_calibrated_noise_spends_the_budget_over_the_run_and_no_more(tmp_path):
    budget = _budget(tmp_path, mode="client", epsilon=3.0)  # noise_multiplier 0: calibrate
    rounds = budget.config.run.rounds
    assert budget.noise[0] == get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=1.0, steps=rounds, accountant="rdp"
    )
    for _ in range(rounds):
        assert budget.overspending(list(CLIENTS)) is None
        budget.spend(list(CLIENTS))
    assert 2.95 < budget.max_epsilon() <= 3.0
    assert "would reach epsilon" in budget.overspending(list(CLIENTS))


def test_a_budget_spent_before_the_first_round_is_refused(tmp_path):
    budget = _budget(tmp_path, mode="client", epsilon=1.0, noise_multiplier=0.2)
    with pytest.raises(FedtuneError, match="spent before the first round.*raise privacy.noise_multiplier"):
        budget.check_first_round()


# -- the mechanism ----------------------------------------------------------------


def test_clipping_bounds_the_change_and_leaves_small_ones_alone():
    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(30, 4, generator=g), "b": torch.randn(7, generator=g), "ids": torch.arange(5)}
    big = {n: t + 3 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t for n, t in start.items()}
    clipped, norm = clip_update(big, start, 0.5)
    change = torch.cat([(clipped[n] - start[n]).flatten() for n in ("a", "b")])
    assert norm > 10 and change.norm().item() == pytest.approx(0.5, rel=1e-5)
    assert torch.equal(clipped["ids"], start["ids"])
    # The direction is kept: the clipped change is a positive multiple of the true one.
    true = torch.cat([(big[n] - start[n]).flatten() for n in ("a", "b")])
    assert torch.allclose(change, true * (0.5 / norm), atol=1e-6)
    small = {n: t + 1e-3 if t.is_floating_point() else t for n, t in start.items()}
    unchanged, _ = clip_update(small, start, 0.5)
    assert all(torch.equal(unchanged[n], small[n]) for n in small)


def _aggregate_noise(trials: int, clients: int, noise: Noise) -> torch.Tensor:
    """The aggregate minus the noiseless average, over many rounds of identical updates."""
    update = torch.linspace(-1, 1, 500)
    updates = [ClientUpdate(k, {"w": update}, 1) for k in range(clients)]
    return torch.stack([by_examples(updates, noise).average(updates, "w", update) - update for _ in range(trials)])


def test_server_noise_on_the_average_has_std_z_clip_over_m():
    z, clip, m = 1.7, 0.8, 4
    drawn = _aggregate_noise(200, m, Noise(z * clip, torch.Generator().manual_seed(1)))
    assert drawn.std().item() == pytest.approx(z * clip / m, rel=0.05)
    assert abs(drawn.mean().item()) < 0.01 * z * clip / m * 10


def test_client_shares_add_up_to_the_same_noise():
    z, clip, m = 1.7, 0.8, 4
    noise = Noise(z * clip, torch.Generator().manual_seed(2))
    total = torch.stack([sum(noise.share(m).sample((500,)) for _ in range(m)) for _ in range(200)])
    assert total.std().item() == pytest.approx(z * clip, rel=0.05)  # the noise on the sum


def test_flora_is_refused_under_client_level_dp(tmp_path):
    """FLoRA releases every client's factors on their own: how many there are tells
    who took part, which the sampling analysis does not cover."""
    with pytest.raises(FedtuneError, match="privacy.mode 'client' cannot cover flora.*use privacy.mode 'sample'"):
        get_method(small_config(tmp_path, federation={"method": "flora"}, privacy={"mode": "client"}))
    get_method(small_config(tmp_path, federation={"method": "flora"}, privacy={"mode": "sample"}))


def test_fedkseed_noises_every_seed(tmp_path):
    """Whether a seed's sum is noised must not depend on whether a client drew it."""
    config = small_config(tmp_path, federation={"method": "fedkseed"}, fedkseed={"num_seeds": 4000})
    method = get_method(config)
    method.server_init(load_model(config))
    used = torch.zeros(4000)
    used[:2000] = 1e-9  # scalars too small to matter: what remains is noise
    updates = [ClientUpdate(k, method.encode_scalars(used), 1) for k in range(2)]
    method.apply = lambda tuned, scalars: []  # skip the replay: the released scalars are the point
    method.server_aggregate(updates, by_examples(updates, Noise(2.0, torch.Generator().manual_seed(4))))
    released = method.decode_scalars(method.log.deltas[method.log.latest])
    assert torch.count_nonzero(released) == 4000
    assert released[:2000].std().item() == pytest.approx(2.0 / 2, rel=0.05)
    assert released[2000:].std().item() == pytest.approx(2.0 / 2, rel=0.05)


# -- DP-SGD through PEFT -------------------------------------------------------------


def _one_step(tmp_path, method_name, dp, clip_each=None):
    """The adapter's change after one step on one fixed batch of 4: by DP-SGD when
    ``dp``, else by plain SGD on the mean loss."""
    config = small_config(tmp_path, federation={"method": method_name})
    classifier = load_model(config)
    method = get_method(config)
    if method_name == "fed_sb":
        method.server_init(classifier)
        classifier = load_model(config)
        model = method.wrap(classifier, method.bases, 0)
    else:
        model = wrap_with_lora(classifier, config.lora, 0)
    with torch.no_grad():  # a non-zero lora_B (Fed-SB's R), so that every factor has a gradient
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    data = client_data(config, 0)
    batch = classifier.encode(data.texts[:4])
    labels = torch.as_tensor(data.labels[:4])
    before = trainable_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    forward = model
    if dp is not None:
        forward, optimizer = make_private(model, optimizer, dp, batch_size=4)
    model.train()  # Opacus records activations in training mode only
    for module in model.modules():  # but no dropout: the hand-made step below sees the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    loss = torch.nn.functional.cross_entropy(forward(**batch).logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if dp is not None:
        forward.remove_hooks()
    return {n: trainable_state(model)[n] - before[n] for n in before}, model, before, batch, labels


@pytest.mark.parametrize("method_name", ["fedit", "fed_sb"])
def test_dp_sgd_without_noise_or_clipping_is_plain_sgd(tmp_path, method_name):
    """Rules out Opacus silently corrupting PEFT's adapters: every trainable tensor,
    LoRA's and the head's, moves exactly as a plain SGD step moves it."""
    private, *_ = _one_step(tmp_path, method_name, DPSGD(noise_multiplier=0.0, clip=1e6))
    plain, *_ = _one_step(tmp_path, method_name, None)
    assert private.keys() == plain.keys() and any("lora" in n for n in plain)
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(private[name], plain[name], rtol=1e-4, atol=1e-7)


def test_dp_sgd_step_is_the_mean_of_clipped_per_example_gradients(tmp_path):
    clip = 0.05
    private, model, before, batch, labels = _one_step(tmp_path, "fedit", DPSGD(noise_multiplier=0.0, clip=clip))
    # Per-example gradients by hand, from the starting adapter.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in before:
                p.copy_(before[n])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(4):
        example = {k: v[i : i + 1] for k, v in batch.items()}
        loss = torch.nn.functional.cross_entropy(model(**example).logits, labels[i : i + 1])
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
        norms.append(norm)
        for (n, _), g in zip(params.items(), grads):
            total[n] += g * min(1.0, clip / norm)
    assert min(norms) > clip  # every example was clipped
    for n in params:
        torch.testing.assert_close(private[n], -0.1 * total[n] / 4, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_dp_sgd_logical_batch_in_physical_chunks_is_one_step(tmp_path, monkeypatch, noise):
    """Poisson samples of expected size 16, taken 5 examples at a time, move the
    adapter as when each is taken whole: every example clipped on its own, and with
    noise exactly one draw (from the same seeded generator) per logical step."""
    config = small_config(tmp_path)
    dp = DPSGD(noise_multiplier=noise, clip=0.05)  # clips every example (see above)
    draws = []
    add_noise = CPUNoiseDPOptimizer.add_noise
    monkeypatch.setattr(CPUNoiseDPOptimizer, "add_noise", lambda self: draws.append(1) or add_noise(self))
    train = TrainSection(optimizer="sgd", batch_size=16, lr=0.1)
    whole, whole_sizes = train_lora(config, train, steps=2, dp=dp)
    chunked, sizes = train_lora(config, dataclasses.replace(train, physical_batch_size=5), steps=2, dp=dp)
    assert len(draws) == 4  # 2 steps, each run
    assert max(sizes) <= 5 < max(whole_sizes) and sum(sizes) == sum(whole_sizes)
    for name in whole:
        assert whole[name].abs().max() > 0, name
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-7)


# -- bad settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("privacy", "message"),
    [
        ({"epsilon": 0.0}, "privacy.epsilon must be > 0"),
        ({"epsilon": -1.0}, "privacy.epsilon must be > 0"),
        ({"delta": 0.0}, r"privacy.delta must be in \(0, 1\)"),
        ({"delta": 1.5}, r"privacy.delta must be in \(0, 1\)"),
        ({"noise_multiplier": -0.5}, "privacy.noise_multiplier must be >= 0"),
        ({"clip": 0.0}, "privacy.clip must be > 0"),
        ({"mode": "local"}, "privacy.mode must be one of none, client, sample"),
        ({"accountant": "gdp"}, "privacy.accountant must be 'rdp' or 'prv'"),
    ],
)
def test_bad_privacy_settings_are_one_line_errors(tmp_path, privacy, message):
    with pytest.raises(FedtuneError, match=message):
        small_config(tmp_path, privacy={"mode": "client", **privacy})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "sample"}, "DP-SGD, which needs gradients"),
        ({"mode": "client", "noise_on": "clients"}, "noise_on 'server' only"),
    ],
)
def test_fedkseed_refuses_the_dp_it_cannot_give(tmp_path, settings, message):
    with pytest.raises(FedtuneError, match=message):
        get_method(small_config(tmp_path, federation={"method": "fedkseed"}, privacy=settings))


# -- the real stack ----------------------------------------------------------------


@pytest.mark.integration
def test_dp_sgd_run_reports_opacus_epsilon_and_stops_within_budget(tmp_path):
    """z = 1 at sample rate 4/40, 3 steps a round: epsilon 2.61, 3.03, then 3.35,
    so a budget of 3.2 allows two of the three rounds."""
    config = small_config(
        tmp_path, run={"rounds": 3}, privacy={"mode": "sample", "noise_multiplier": 1.0, "epsilon": 3.2}
    )
    run_dir = create_run_dir(config)
    summary = run_simulation(config, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert [r["round"] for r in rows] == [0, 1, 2] and summary.rounds == 2
    for row in rows[1:]:
        reference = RDPAccountant()
        for _ in range(row["round"] * 3):
            reference.step(noise_multiplier=1.0, sample_rate=0.1)
        assert row["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert summary.epsilon == rows[-1]["epsilon"] <= 3.2
    assert "stopped before round 3" in summary.stopped and "3.346" in summary.stopped
    assert (run_dir / "adapter" / "adapter_config.json").is_file()  # the model trained so far is saved


@pytest.mark.integration
def test_client_level_run_with_noise_from_the_clients(tmp_path):
    config = small_config(tmp_path, privacy={"mode": "client", "noise_on": "clients", "epsilon": 5.0, "clip": 0.5})
    run_dir = create_run_dir(config)
    summary = run_simulation(config, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    z = get_noise_multiplier(target_epsilon=5.0, target_delta=1e-5, sample_rate=1.0, steps=2, accountant="rdp")
    for row in rows[1:]:
        reference = RDPAccountant()
        for _ in range(row["round"]):
            reference.step(noise_multiplier=z, sample_rate=1.0)
        assert row["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
        assert row["aggregated"] == 3
    assert summary.rounds == 2 and summary.stopped is None and 4.9 < summary.epsilon <= 5.0
