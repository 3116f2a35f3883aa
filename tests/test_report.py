import dataclasses
import json

from fedtune.config import load_config
from fedtune.ledger import Transfer
from fedtune.report.console import human_bytes, summary_table
from fedtune.report.recorder import Recorder
from fedtune.report.rows import (
    SUMMARY,
    Dropped,
    HardwareRow,
    RoundRow,
    RunSummary,
    append_row,
    read_rows,
    read_summary,
    to_json,
)
from fedtune.report.run_dir import create_run_dir, finish
from fedtune.tasks import EvalResult


def test_run_dir_config_reloads_identically(config):
    first, second = create_run_dir(config), create_run_dir(config)
    assert first != second  # same second, no collision
    assert load_config(first / "config.toml") == config  # prompt newline, leading spaces survive


def test_rows_summary_and_plot_from_a_known_ledger(config, tmp_path):
    recorder = Recorder(tmp_path, majority=0.52)
    rows = [recorder.record(0, EvalResult(0.5, 0.7))]
    for rnd, acc in ((1, 0.6), (2, 0.55)):
        for client in ("client-0", "client-1"):
            recorder.ledger.record(Transfer(rnd, client, "down", 1000, 1100))
            recorder.ledger.record(Transfer(rnd, client, "up", 900 + rnd, 990))
        rows.append(recorder.record(rnd, EvalResult(acc, 0.6), train_loss=0.4))

    assert (rows[2].bytes_down, rows[2].bytes_up) == (2000, 1804)
    assert (rows[2].cum_bytes_down, rows[2].cum_bytes_up) == (4000, 3606)
    assert rows[1].clients == 2
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == 8
    assert read_rows(tmp_path) == rows  # metrics.jsonl holds them as they were recorded

    summary = recorder.summary(config, None)
    assert summary.final_score == 0.55 and summary.best_score == 0.6
    assert summary.bytes_per_client_round_down == 1000 and summary.bytes_per_client_round_up == 901
    assert summary.message_bytes_up == 4 * 990 and summary.client_rounds == 4

    finish(tmp_path, rows, summary)
    assert read_summary(tmp_path) == summary
    assert json.loads((tmp_path / "summary.json").read_text()) == to_json(summary)
    assert (tmp_path / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    table = summary_table(summary)
    assert "final accuracy" in table and "0.550" in table and "1.00 KB / 901 B" in table


def test_refusals_survive_the_json_round_trip(config, tmp_path):
    """A round's refusals are records, the summary's are counts by stage: both reload as written."""
    row = RoundRow(1, 0.6, 0.5, 10, 20, 10, 20, 3, 1.0, rejected={"size": 1}, dropped=[Dropped("client-2", "size", "too big")])
    append_row(tmp_path, row)
    assert read_rows(tmp_path) == [row]
    recorder = Recorder(tmp_path, majority=0.5)
    recorder.record(0, EvalResult(0.5, 0.7))
    recorder.record(1, EvalResult(0.6, 0.5))
    summary = dataclasses.replace(recorder.summary(config, None), dropped={"size": 1, "failed": 2})
    finish(tmp_path, [row], summary)
    assert read_summary(tmp_path) == summary


def test_a_summary_without_a_majority_baseline_reloads(config, tmp_path):
    """The instruction task has no majority class: its summary leaves the baseline out
    of summary.json (as every None) and must still reload, as `fedtune compare` does."""
    recorder = Recorder(tmp_path, majority=None, metric="rouge_l")
    recorder.record(0, EvalResult(0.09, 2.4, perplexity=11.0))
    recorder.record(1, EvalResult(0.12, 1.9, perplexity=6.7))
    summary = recorder.summary(config, None)
    finish(tmp_path, [], summary)
    assert "majority_score" not in json.loads((tmp_path / SUMMARY).read_text())
    assert read_summary(tmp_path) == summary and summary.majority_score is None


def test_human_bytes():
    assert [human_bytes(n) for n in (999, 1000, 1_858_357, 3e9)] == ["999 B", "1.00 KB", "1.86 MB", "3.00 GB"]


def test_target_accuracy_and_simulated_hardware_in_the_summary(tmp_path):
    from conftest import small_config

    config = small_config(tmp_path, run={"target_accuracy": 0.58})
    recorder = Recorder(tmp_path, majority=0.5)
    recorder.record(0, EvalResult(0.5, 0.7))
    for rnd, acc, took_part in ((1, 0.55, (1, 0)), (2, 0.6, (1, 1)), (3, 0.62, (0, 1))):
        recorder.ledger.record(Transfer(rnd, "client-0", "down", 1000, 1000))
        recorder.ledger.record(Transfer(rnd, "client-0", "up", 500, 500))
        hardware = HardwareRow(10.0, 10.0 * rnd, int(rnd == 3), 0, {"phone": took_part[0], "laptop": took_part[1]})
        recorder.record(rnd, EvalResult(acc, 0.6), hardware=hardware)
    summary = recorder.summary(config, None)
    assert summary.rounds_to_target == 2 and summary.bytes_to_target == 3000
    assert summary.sim_time_to_target_s == 20.0 and summary.sim_time_s == 30.0
    assert summary.client_rounds_by_device == {"laptop": 2, "phone": 2} and summary.failed == 1
    table = summary_table(summary)
    assert "round 2, 3.00 KB, 20.0 s simulated" in table and "laptop 2, phone 2" in table

    unreached = recorder.summary(small_config(tmp_path, run={"target_accuracy": 0.9}), None)
    assert unreached.rounds_to_target is None and "not reached" in summary_table(unreached)
    assert isinstance(unreached, RunSummary)
