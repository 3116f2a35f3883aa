"""The hardware model: profiles, time and memory arithmetic on hand-checked cases,
the planner's choices at its edges, a reproducible schedule, and bad input."""

import dataclasses
import json

import pytest
from conftest import small_config

from fedtune.errors import FedtuneError
from fedtune.hardware.catalogue import DeviceProfile, load_catalogue
from fedtune.hardware.cost import FRAMEWORK_BYTES, ModelShape, compute_seconds, peak_memory, transfer_seconds
from fedtune.hardware.fleet import Fleet
from fedtune.hardware.planner import plan_client
from fedtune.hardware.profiles import assign_devices
from fedtune.hardware.schedule import ClientTime, available, failures, round_seconds
from fedtune.methods.base import Footprint
from fedtune.methods.fedit import FedIT
from fedtune.methods.registry import METHODS, get_method
from fedtune.report.run_dir import create_run_dir
from fedtune.rounds.participation import Uniform
from fedtune.simulation import run_simulation
from fedtune.task import load_model

# A 100M-parameter model with 20M embedding parameters, 10 layers of width 500, 5 heads.
SHAPE = ModelShape(params=100_000_000, embedding_params=20_000_000, layers=10, hidden=500, heads=5)


def _device(name="test", memory=4e9, **overrides) -> DeviceProfile:
    values = dict(flops=1e12, memory=memory, downlink=80e6, uplink=8e6, latency=0.1, availability=1.0, failure=0.0)
    return DeviceProfile(name, **{**values, **overrides})


def test_compute_time_by_hand():
    # Per token: 2 * 80M + 2 * 10 layers * 100 context * 500 = 161,000,000 FLOPs forward;
    # adapter training is two forward-equivalents: 1,000 tokens -> 3.22e11 FLOPs at 1e12/s.
    assert SHAPE.forward_flops_per_token(100) == 161_000_000
    assert compute_seconds(SHAPE, "adapter", 1_000, 100, _device()) == pytest.approx(0.322)
    assert compute_seconds(SHAPE, "zeroth_order", 1_000, 100, _device(flops=2e12)) == pytest.approx(0.161)


def test_transfer_time_by_hand():
    # 1 MB over 8 Mbit/s is one second, plus 0.1 s latency.
    assert transfer_seconds(1_000_000, 8e6, 0.1) == pytest.approx(1.1)


def test_memory_by_hand():
    weights = 100_000_000 * 4
    # Inference: weights + two layers' working set of b*s*(4h + a*s) float32 values.
    working = 2 * 8 * 100 * (4 * 500 + 5 * 100) * 4
    assert peak_memory(SHAPE, "inference", 8, 100) == FRAMEWORK_BYTES + weights + working
    assert peak_memory(SHAPE, "zeroth_order", 8, 100, 250_000) == FRAMEWORK_BYTES + weights + working + 1_000_000
    # Adapter training: per layer s*b*h*(34 + 5*a*s/h) 16-bit bytes = 800*500*(34 + 5) = 15.6 MB,
    # doubled for float32, 10 layers; 16 bytes per trained parameter (weight, gradient, two moments).
    activations = 10 * 2 * 8 * 100 * 500 * (34 + 5 * 5 * 100 / 500)
    assert peak_memory(SHAPE, "adapter", 8, 100, 1_000) == FRAMEWORK_BYTES + weights + activations + 16_000


def test_model_shape_of_a_real_model(config):
    model = load_model(config).model
    shape = ModelShape.of(model)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert 0 < shape.embedding_params < shape.params and shape.layers == model.config.num_hidden_layers


# -- planner -------------------------------------------------------------------

RANKS = {64: 64_000_000, 16: 16_000_000, 8: 8_000_000}  # trained parameters per rank


def _plan(tmp_path, memory, method="flora", plan_ranks=True):
    config = small_config(
        tmp_path, federation={"method": method},
        hardware={"devices": ["phone"] * 3, "plan_ranks": plan_ranks and method == "flora", "rank_choices": [64, 16, 8]},
        lora={"rank": 8},
    )
    return plan_client(config, METHODS[method].kind, SHAPE, _device(memory=memory), 100, Footprint(RANKS, 250_000))


def test_planner_gives_the_largest_rank_that_fits(tmp_path):
    need = {r: peak_memory(SHAPE, "adapter", 4, 100, n) for r, n in RANKS.items()}
    assert _plan(tmp_path, need[64]).rank == 64  # exactly enough
    assert _plan(tmp_path, need[64] - 1).rank == 16
    assert _plan(tmp_path, need[16] - 1).rank == 8


def test_planner_falls_back_to_zeroth_order_then_excludes(tmp_path):
    need_8 = peak_memory(SHAPE, "adapter", 4, 100, RANKS[8])
    inference = peak_memory(SHAPE, "zeroth_order", 4, 100, 250_000)
    fallback = _plan(tmp_path, need_8 - 1)
    assert fallback.kind == "zeroth_order" and "could run a zeroth-order method" in fallback.reason
    assert _plan(tmp_path, inference, method="fedkseed").kind == "zeroth_order"
    excluded = _plan(tmp_path, inference - 1)
    assert excluded.kind == "excluded" and "even inference needs" in excluded.reason


def test_without_rank_planning_the_configured_rank_must_fit(tmp_path):
    need_8 = peak_memory(SHAPE, "adapter", 4, 100, RANKS[8])
    assert _plan(tmp_path, 1e12, method="fedit", plan_ranks=False).rank == 8
    assert _plan(tmp_path, need_8 - 1, method="fedit", plan_ranks=False).kind == "zeroth_order"


# -- schedule ------------------------------------------------------------------


def test_same_seed_same_schedule_and_the_rates_hold():
    devices = {i: _device(availability=0.3, failure=0.1) for i in range(200)}
    first = [available(devices, 7, rnd) for rnd in range(1, 30)]
    assert first == [available(devices, 7, rnd) for rnd in range(1, 30)]
    assert first != [available(devices, 8, rnd) for rnd in range(1, 30)]
    share = sum(map(len, first)) / (200 * 29)
    assert 0.27 < share < 0.33
    fails = [failures(devices, list(devices), 7, rnd) for rnd in range(1, 30)]
    assert fails == [failures(devices, list(devices), 7, rnd) for rnd in range(1, 30)]
    assert 0.08 < sum(map(len, fails)) / (200 * 29) < 0.12
    assert all(0 <= at < 1 for f in fails for at in f.values())


def test_round_time_is_the_slowest_or_the_deadline():
    times = {"a": ClientTime(1, 10, 1), "b": ClientTime(2, 30, 3), "c": ClientTime(0.5, 5, 0.5)}
    assert round_seconds(times, 0) == (35, [])
    assert round_seconds(times, 20) == (20, ["b"])
    assert round_seconds(times, 40) == (35, [])


def test_mix_gives_whole_counts_shuffled_by_seed(tmp_path):
    config = small_config(tmp_path, partition={"num_clients": 3}, hardware={"mix": {"phone": 0.5, "laptop": 0.3, "consumer_gpu": 0.2}})
    config10 = small_config(tmp_path, data={"train_size": 200}, partition={"num_clients": 10},
                            hardware={"mix": {"phone": 0.5, "laptop": 0.3, "consumer_gpu": 0.2}})
    names = [d.name for d in assign_devices(config10.hardware, 10, 0)]
    assert sorted(names) == sorted(["phone"] * 5 + ["laptop"] * 3 + ["consumer_gpu"] * 2)
    assert names == [d.name for d in assign_devices(config10.hardware, 10, 0)]
    # 3 clients at 50/30/20 are 1.5, 0.9 and 0.6 devices: floors 1, 0, 0, and the two
    # largest remainders (laptop 0.9, gpu 0.6) get the two clients left.
    assert sorted(d.name for d in assign_devices(config.hardware, 3, 0)) == ["consumer_gpu", "laptop", "phone"]


def test_the_built_in_catalogue_loads():
    catalogue = load_catalogue()
    assert {"phone", "laptop", "edge_board", "consumer_gpu", "datacenter_gpu"} <= catalogue.keys()
    assert catalogue["phone"].memory < catalogue["laptop"].memory < catalogue["datacenter_gpu"].memory


# -- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hardware", "message"),
    [
        ({"mix": {"phone": 0.5, "laptop": 0.3}}, "hardware.mix must be shares summing to 1"),
        ({"mix": {"phone": 1.2, "laptop": -0.2}}, "hardware.mix must be shares >= 0"),
        ({"mix": {"toaster": 1.0}}, "hardware.mix must be names of profiles in the catalogue"),
        ({"devices": ["phone", "laptop", "fridge"]}, "hardware.devices must be names of profiles in the catalogue"),
        ({"devices": ["phone"]}, "hardware.devices must be empty or one profile per client"),
        ({"mix": {"phone": "half"}}, "hardware.mix must be a table of numbers"),
        ({"deadline_s": -1.0}, "hardware.deadline_s must be >= 0"),
        ({"stragglers": "wait"}, "hardware.stragglers must be 'drop' or 'partial'"),
        ({"plan_ranks": True}, "hardware.plan_ranks must be false unless hardware.mix or hardware.devices is set"),
    ],
)
def test_bad_hardware_settings_are_one_line_errors(tmp_path, hardware, message):
    with pytest.raises(FedtuneError, match=message):
        small_config(tmp_path, hardware=hardware)


def test_rank_planning_needs_a_method_with_a_rank_per_client(tmp_path):
    config = small_config(tmp_path, hardware={"plan_ranks": True, "mix": {"phone": 1.0}})
    with pytest.raises(FedtuneError, match="hardware.plan_ranks gives each client its own rank, but federation.method 'fedit'"):
        get_method(config)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("uplink = 0", "device profile bad.uplink must be > 0, got 0"),
        ("downlink = -5e6", "device profile bad.downlink must be > 0, got -5000000.0"),
        ("availability = 1.5", r"device profile bad.availability must be a probability in \[0, 1\]"),
        ("latency = -0.1", "device profile bad.latency must be >= 0"),
    ],
)
def test_bad_profiles_are_one_line_errors(tmp_path, line, message):
    good = dict(flops="1e12", memory="4e9", downlink="80e6", uplink="8e6", latency="0.1", availability="1.0", failure="0.0")
    key = line.split(" = ")[0]
    body = "\n".join(line if k == key else f"{k} = {v}" for k, v in good.items())
    path = tmp_path / "devices.toml"
    path.write_text(f"[bad]\n{body}\n")
    with pytest.raises(FedtuneError, match=message):
        load_catalogue(str(path))
    with pytest.raises(FedtuneError, match=message):  # caught by the config check, before anything loads
        small_config(tmp_path, hardware={"catalogue": str(path), "mix": {"bad": 1.0}})


# -- the fleet in a run ----------------------------------------------------------------

# Two classes that differ only in compute, always available, never failing.
CATALOGUE = "".join(
    f"[{name}]\nflops = {flops}\nmemory = 8e9\ndownlink = 100e6\nuplink = 100e6\n"
    "latency = 0.0\navailability = 1.0\nfailure = 0.0\n"
    for name, flops in (("slow", 1e9), ("fast", 1e13))
)


def _fleet_config(tmp_path, **hardware):
    path = tmp_path / "devices.toml"
    path.write_text(CATALOGUE)
    return small_config(tmp_path, hardware={"catalogue": str(path), "devices": ["slow", "fast", "fast"], **hardware})


def test_partial_stragglers_get_the_steps_that_fit(tmp_path):
    fleet = Fleet(_fleet_config(tmp_path, deadline_s=20.0, stragglers="partial"), load_model(small_config(tmp_path)), FedIT, Uniform(3, 0))
    fleet.tokens_per_step[0], fleet.sequence_length[0] = 200, 50.0
    per_step = 200 * fleet.shape.forward_flops_per_token(50.0) * 2 / 1e9
    talk = 2 * 8 * 1_000_000 / 100e6
    assert fleet.steps(0, 1_000_000) == min(3, int((20.0 - talk) // per_step))
    assert fleet.steps(1, 1_000_000) == 3  # fast: the full round fits


def test_a_device_is_up_in_the_same_rounds_whoever_else_is_eligible(tmp_path):
    """Methods that exclude different devices still see the same availability
    schedule for the devices they share: a fair comparison."""
    fleet = Fleet(_fleet_config(tmp_path), load_model(small_config(tmp_path)), FedIT, Uniform(3, 0))
    for device in fleet.devices.values():
        object.__setattr__(device, "availability", 0.5)
    before = {rnd: fleet.candidates(rnd) for rnd in range(1, 40)}
    fleet.plans[0] = dataclasses.replace(fleet.plans[0], kind="excluded")
    after = {rnd: fleet.candidates(rnd) for rnd in range(1, 40)}
    assert after == {rnd: [c for c in clients if c != 0] for rnd, clients in before.items()}
    assert any(0 in clients for clients in before.values())


@pytest.mark.parametrize("deadline_s", [0.0, 20.0])
def test_when_every_client_fails_the_round_lasts_until_the_last_failure_or_the_deadline(tmp_path, deadline_s):
    fleet = Fleet(_fleet_config(tmp_path, deadline_s=deadline_s), load_model(small_config(tmp_path)), FedIT, Uniform(3, 0))
    for device in fleet.devices.values():
        object.__setattr__(device, "failure", 1.0)
    times = {0: ClientTime(1, 40, 1), 1: ClientTime(1, 10, 1)}
    at = failures(fleet.devices, list(times), fleet.config.run.seed, 1)
    kept, hardware = fleet.settle_times(1, times)
    last_failure = max(times[c].total_s * at[c] for c in times)
    assert kept == [] and hardware.failed == 2
    assert hardware.sim_round_s == pytest.approx(min(last_failure, deadline_s or last_failure))
    assert deadline_s == 0 or last_failure > deadline_s  # the seed makes the cap bite


@pytest.mark.integration
def test_a_deadline_drops_the_slow_device_every_round(tmp_path):
    config = _fleet_config(tmp_path, deadline_s=5.0)
    run_dir = create_run_dir(config)
    summary = run_simulation(config, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        # The slow device (1 GFLOP/s) needs well over 5 s for its steps: dropped; the round lasts the deadline.
        hardware = row["hardware"]
        assert (hardware["stragglers"], hardware["took_part"], row["aggregated"]) == (1, {"fast": 2, "slow": 0}, 2)
        assert hardware["sim_round_s"] == 5.0
    assert summary.sim_time_s == 10.0 and summary.client_rounds_by_device == {"fast": 4, "slow": 0}


def test_a_client_on_an_accelerator_is_planned_by_the_memory_it_measured(tmp_path):
    """Clients 0 and 1 report what their GPUs have free at enrollment: 0 too little
    to train (excluded, the reason naming the measured bytes), 1 plenty; client 2,
    on its CPU, keeps its profile's 8 GB."""
    learner = load_model(small_config(tmp_path))
    catalogue_only = Fleet(_fleet_config(tmp_path), learner, FedIT, Uniform(3, 0))
    need = catalogue_only.plans[0].memory
    fleet = Fleet(_fleet_config(tmp_path), learner, FedIT, Uniform(3, 0), {0: int(need) - 1, 1: 10**12})
    assert fleet.eligible() == [1, 2] and catalogue_only.eligible() == [0, 1, 2]
    assert f"{(int(need) - 1) / 1e9:.2f} GB" in fleet.excluded()[0]
    assert fleet.devices[1].memory == 1e12 and fleet.devices[2].memory == 8e9
    assert "GB free (measured)" in fleet.describe().splitlines()[2] and "measured" not in fleet.describe().splitlines()[3]
