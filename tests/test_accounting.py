"""The epsilon fedtune reports is a bound for what the run does: its client sampling
is the Poisson sampling the accountant analyses (checked against Google's
dp-accounting, an accountant independent of Opacus), the sample comes from a secret
no client holds, and FedKSeed's released scalars do not tell who took part."""

from __future__ import annotations

import json
import math
import statistics

import dp_accounting
import numpy as np
import pytest
import torch
from conftest import small_config, small_overrides
from dp_accounting import pld, rdp

from fedtune.cli import main
from fedtune.config import from_dict
from fedtune.methods import ClientUpdate, get_method
from fedtune.privacy.factory import server_privacy
from fedtune.rounds.participation import Poisson, Uniform
from fedtune.task import derive_seed, load_model

DELTA = 1e-5


def _policy(clients: int, per_round: int, rounds: int, root: int = 7, **privacy):
    config = from_dict({"partition": {"num_clients": clients}, "federation": {"clients_per_round": per_round},
                        "run": {"rounds": rounds}, "privacy": {"mode": "client", "delta": DELTA, **privacy}})
    return server_privacy(config, dict.fromkeys(range(clients), 50), root)


@pytest.mark.parametrize(("clients", "per_round", "rounds", "privacy"), [
    (100, 10, 100, {"noise_multiplier": 1.0, "epsilon": 50.0}),  # the N=100, m=10, T=100, z=1
    (4, 2, 3, {"epsilon": 3.0}),  # z calibrated to spend epsilon 3 over the run
    (20, 4, 40, {"noise_multiplier": 0.8, "epsilon": 50.0}),
])
def test_reported_epsilon_is_dp_accountings_bound_for_the_sampling_performed(clients, per_round, rounds, privacy):
    policy = _policy(clients, per_round, rounds, **privacy)
    sampler, everyone = policy.sampler(), list(range(clients))
    assert isinstance(sampler, Poisson) and sampler.rate == per_round / clients  # what the run draws with
    for rnd in range(1, rounds + 1):
        policy.charge(sampler(everyone, everyone, rnd, 0))
    z, q = policy.budget.noise[0], per_round / clients
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    independent = rdp.RdpAccountant().compose(event).get_epsilon(DELTA)
    tighter = pld.PLDAccountant().compose(event).get_epsilon(DELTA)
    # Two RDP accountants, two grids of orders: within 1%; PLD is tighter still, so ours is a valid bound.
    assert policy.epsilon() == pytest.approx(independent, rel=0.01)
    assert tighter <= policy.epsilon() * (1 + 1e-3)
    if "noise_multiplier" not in privacy:
        assert policy.epsilon() <= privacy["epsilon"]


def test_fixed_size_sampling_would_need_another_bound():
    """Why fedtune samples by Poisson under client-level DP: for m of N without
    replacement, dp-accounting's bound (replace-one, sensitivity 2C) is ten times
    the Poisson figure at N=100, m=10, T=100, z=1."""
    poisson = rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 100)).get_epsilon(DELTA)
    fixed = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE).compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
            100, 10, dp_accounting.GaussianDpEvent(0.5)), 100)).get_epsilon(DELTA)
    assert poisson == pytest.approx(7.90, abs=0.01) and fixed > 10 * poisson


def test_each_client_is_included_with_the_rate_the_accountant_uses():
    sampler, clients, rounds = _policy(10, 3, 1).sampler(), list(range(10)), 20_000
    counts, sizes = np.zeros(10), []
    for rnd in range(1, rounds + 1):
        cohort = sampler(clients, clients, rnd, 0)
        counts[cohort] += 1
        sizes.append(len(cohort))
    sigma = math.sqrt(0.3 * 0.7 / rounds)
    assert np.all(np.abs(counts / rounds - 0.3) < 4 * sigma), counts / rounds
    assert statistics.pstdev(sizes) == pytest.approx(math.sqrt(10 * 0.3 * 0.7), rel=0.05)  # the cohort size varies
    # A client that is no candidate (an unavailable device) changes no other client's draw.
    assert sampler(clients, clients[1:], 5, 0) == [c for c in sampler(clients, clients, 5, 0) if c != 0]


def test_the_sample_cannot_be_recomputed_from_the_run_config():
    config_seed, rounds = 0, 50
    ours = _policy(10, 3, rounds, root=2**100 + 12345).sampler()
    clients = list(range(10))
    actual = [ours(clients, clients, r, 0) for r in range(1, rounds + 1)]
    # What a holder of the config could compute: the run seed in the sampler's place.
    for guess in (Poisson(0.3, config_seed), Uniform(3, config_seed)):
        recomputed = [guess(clients, clients, r, 0) for r in range(1, rounds + 1)]
        assert sum(a == b for a, b in zip(actual, recomputed)) < rounds / 4
    assert [ours(clients, clients, r, 0) for r in range(1, rounds + 1)] == actual  # same secret, same sample


def test_fedkseed_released_scalars_do_not_tell_who_took_part(tmp_path):
    """The support attack: a client's seeds are drawn from public values, so an
    observer who sees which seeds' sums are non-zero names the sampled clients.
    Under client-level DP every one of the K sums is noised every round, and the
    seed draws come from the server's secret: the attack guesses no better than chance."""
    k, steps, clients, rounds = 256, 8, 4, 60
    config = small_config(tmp_path, federation={"method": "fedkseed", "clients_per_round": 2},
                          fedkseed={"num_seeds": k}, train={"local_steps": steps}, partition={"num_clients": clients},
                          run={"rounds": rounds}, privacy={"mode": "client", "noise_multiplier": 1.0, "epsilon": 1e3})
    method = get_method(config)
    method.server_init(load_model(config))
    method.apply = lambda tuned, scalars: []  # the released scalars are the point, not the replay
    policy = server_privacy(config, dict.fromkeys(range(clients), 40), root=2**90 + 1)
    sampler, everyone, hits, guesses = policy.sampler(), list(range(clients)), 0, 0
    for rnd in range(1, rounds + 1):
        cohort = sampler(everyone, everyone, rnd, 0)
        updates = []
        for c in cohort:  # the client's real draws: from its job seed, which the server's secret sets
            draws = np.random.default_rng(derive_seed(policy.root, rnd, c)).choice(k, size=steps)
            sums = torch.zeros(k).index_add_(0, torch.from_numpy(draws), torch.full((steps,), 0.01))
            updates.append(ClientUpdate(c, method.encode_scalars(sums), 40))
        method.server_aggregate(updates, policy.release(updates, rnd, policy.rate * clients))
        released = method.decode_scalars(method.log.deltas[method.log.latest])
        assert torch.count_nonzero(released) == k  # dense: the support is every seed
        for c in everyone:  # the observer's guess, from the draws it can compute: the public job seed
            public = np.random.default_rng(derive_seed(config.run.seed, rnd, c)).choice(k, size=steps)
            guess = bool((released[public].abs() > released.abs().median()).float().mean() > 0.5)
            hits += guess == (c in cohort)
            guesses += 1
    assert abs(hits / guesses - 0.5) < 0.1, hits / guesses


@pytest.mark.integration
def test_two_runs_with_the_same_secret_are_identical_and_the_config_alone_is_not_enough(tmp_path):
    private = ["--set", "privacy.mode=client", "--set", "privacy.epsilon=30", "--set", "federation.clients_per_round=2",
               "--set", "partition.num_clients=4", "--set", "data.train_size=160"]
    runs = {}
    for name, extra in (("first", []), ("again", ["--reuse-secret"]), ("fresh", [])):
        if extra:
            extra.append(str(runs["first"]))
        assert main(["run", *small_overrides(tmp_path), *private, "--set", f"run.name={name}", *extra]) == 0
        (runs[name],) = (tmp_path / "runs").glob(f"{name}-*")

    def sampled(run_dir):
        ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
        return [sorted(t["client"] for t in ledger if t["round"] == r and t["direction"] == "down") for r in (1, 2)]

    def metrics(run_dir):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert metrics(runs["again"]) == metrics(runs["first"]) and sampled(runs["again"]) == sampled(runs["first"])
    assert (runs["first"] / "private" / "secret.json").stat().st_mode & 0o077 == 0  # the server's alone
    assert "secret" not in (runs["first"] / "config.toml").read_text()  # nothing of it in what clients receive
    assert sampled(runs["fresh"]) != sampled(runs["first"]) or metrics(runs["fresh"]) != metrics(runs["first"])
