"""`fedtune compare`: grid expansion, bad compare files, the report from synthetic
runs with a known Pareto front, and a real grid interrupted and resumed."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL

from fedtune.cli import main
from fedtune.compare.grid import Cell, load_comparison
from fedtune.compare.report import write_report
from fedtune.compare.runner import CellResult, run_order
from fedtune.compare.table import pareto_front
from fedtune.errors import FedtuneError
from fedtune.report.rows import RoundRow, RunSummary, to_json

ROOT = Path(__file__).resolve().parents[1]


def compare_file(tmp_path: Path, body: str, base: str = "") -> Path:
    (tmp_path / "base.toml").write_text(base)
    path = tmp_path / "compare.toml"
    path.write_text(f'[compare]\nconfig = "base.toml"\noutput_dir = "{tmp_path / "out"}"\n{body}')
    return path


def test_grid_is_the_product_of_its_axes(tmp_path):
    path = compare_file(tmp_path, """
[grid]
method = ["fedit", "fed_sb", "fedkseed"]
rank = [4, 8]
privacy = ["none", "sample:8"]
seed = [0, 1]
[methods]
fed_sb = ["lora.alpha=16"]
[axes.batch]
small = ["train.batch_size=4"]
""")
    c = load_comparison(path)
    assert c.axes == ["method", "rank", "privacy", "seed"]  # one-valued axes do not label cells
    # fedit and fed_sb: 2 ranks x 2 privacy x 2 seeds; fedkseed: no rank, and DP-SGD refused.
    assert len(c.cells) == 16 + 2
    assert sorted(c.refused) == ["fedkseed sample DP eps 8 seed 0", "fedkseed sample DP eps 8 seed 1"]
    assert "gradients" in c.refused["fedkseed sample DP eps 8 seed 0"]
    cell = next(x for x in c.cells if x.label == "fed_sb r4 sample DP eps 8 seed 1")
    assert cell.group == "fed_sb r4 sample DP eps 8"
    assert cell.overrides == (
        "federation.method=fed_sb", "lora.alpha=16", "lora.rank=4",
        "privacy.mode=sample", "privacy.epsilon=8", "train.batch_size=4", "run.seed=1",
    )
    assert [x.label for x in c.cells if x.values["method"] == "fedkseed"] == ["fedkseed no DP seed 0", "fedkseed no DP seed 1"]


def test_privacy_modes_add_overrides_to_that_modes_cells(tmp_path):
    c = load_comparison(compare_file(tmp_path, """
[grid]
privacy = ["none", "client:3", "sample:8"]
[privacy_modes]
sample = ["train.batch_size=64", "train.optimizer=sgd"]
"""))
    overrides = {x.label: x.overrides for x in c.cells}
    assert overrides == {
        "no DP": ("privacy.mode=none",),
        "client DP eps 3": ("privacy.mode=client", "privacy.epsilon=3"),
        "sample DP eps 8": ("privacy.mode=sample", "privacy.epsilon=8", "train.batch_size=64", "train.optimizer=sgd"),
    }
    assert len({x.slug for x in c.cells}) == len(c.cells)


def test_cells_run_seed_by_seed(tmp_path):
    """Grid order is method-major; the run order takes whole seeds first."""
    path = compare_file(tmp_path, '[grid]\nmethod = ["fedit", "fed_sb"]\nseed = [3, 1]\n')
    cells = load_comparison(path).cells
    assert [c.label for c in cells] == ["fedit seed 3", "fedit seed 1", "fed_sb seed 3", "fed_sb seed 1"]
    assert [c.label for c in run_order(cells)] == ["fedit seed 3", "fed_sb seed 3", "fedit seed 1", "fed_sb seed 1"]
    assert run_order(cells[:2]) == cells[:2]


def test_codec_and_mix_axes_become_config_values(tmp_path):
    from fedtune.config import load_config

    path = compare_file(tmp_path, """
[grid]
uplink = ["none", "topk:0.05,int8"]
mix = ["fleet"]
[mixes]
fleet = {phone = 0.5, laptop = 0.5}
""")
    c = load_comparison(path)
    configs = [load_config(c.base_config, list(cell.overrides)) for cell in c.cells]
    assert [x.compression.up for x in configs] == [[], ["topk:0.05", "int8"]]
    assert all(x.hardware.mix == {"phone": 0.5, "laptop": 0.5} for x in configs)


@pytest.mark.parametrize("body, message", [
    ("", "the grid is empty"),
    ("[grid]\nmethod = []", "grid.method must be a non-empty list"),
    ("[grid]\nmethods = [\"fedit\"]", "unknown axis grid.methods"),
    ("[grid]\nmethod = [\"fedit\"]\n[plots]\nx = 1", "unknown table plots"),
    ("target_accuracy = 1.5\n[grid]\nseed = [0]", "compare.target_accuracy must be in [0, 1]"),
    ("target_accuracy = -0.1\n[grid]\nseed = [0]", "compare.target_accuracy must be in [0, 1]"),
    ("[grid]\nmix = [\"fleet\"]", "not a [mixes] table"),
    ("[grid]\nprivacy = [\"8\"]", "MODE:EPSILON"),
    ("[grid]\nmethod = [\"fedit\"]\n[methods]\nfed_sb = []", "which grid.method does not list"),
    ("[grid]\nprivacy = [\"none\", \"client:3\"]\n[privacy_modes]\nsample = []", "which no grid.privacy value uses"),
    ("[grid]\nmethod = [\"fedit\"]\n[axes.x]\na = [\"lora.rnak=4\"]", "unknown config key lora.rnak"),
    ("[grid]\nmethod = [\"fedkseed\"]\nprivacy = [\"sample:1\"]", "no cell of the grid is a valid run config"),
    ("baseline = \"none\"\n[grid]\nprivacy = [\"none\", \"client:3\"]", "must name one axis and its value"),
    ("baseline = {seed = 0}\n[grid]\nprivacy = [\"none\", \"client:3\"]\nseed = [0, 1]", "other than seed with more than one value"),
    ("baseline = {method = \"fedit\"}\n[grid]\nmethod = [\"fedit\"]", "other than seed with more than one value"),
    ("baseline = {privacy = \"off\"}\n[grid]\nprivacy = [\"none\", \"client:3\"]", "'off' is not one of grid.privacy's values"),
])
def test_bad_compare_files_are_one_line_errors(tmp_path, body, message, capsys):
    path = compare_file(tmp_path, body)
    with pytest.raises(FedtuneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_comparison(path)
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def _synthetic_run(root: Path, name: str, accuracy: list[float], bytes_per_round: int, seed: int) -> Path:
    run_dir = root / name / f"run-{seed}"
    run_dir.mkdir(parents=True)
    rows = [
        RoundRow(round=r, score=a, loss=0.5, bytes_down=0, bytes_up=0, cum_bytes_down=r * bytes_per_round // 2,
                 cum_bytes_up=r * bytes_per_round // 2, clients=4, wall_time_s=10.0 * r)
        for r, a in enumerate(accuracy)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(to_json(r)) + "\n" for r in rows))
    total = len(accuracy[1:]) * bytes_per_round
    reached = next((r for r, a in enumerate(accuracy) if r and a >= 0.8), None)
    summary = RunSummary(
        method=name, model="synthetic", rounds=len(accuracy) - 1, final_score=accuracy[-1], best_score=max(accuracy[1:]),
        final_loss=0.5, majority_score=0.5, zero_shot_score=accuracy[0],
        total_bytes_down=total // 2, total_bytes_up=total // 2,
        bytes_per_client_round_down=total // 8, bytes_per_client_round_up=total // 8,
        message_bytes_down=total // 2, message_bytes_up=total // 2, client_rounds=8, wall_time_s=30.0,
        target_accuracy=0.8, rounds_to_target=reached, bytes_to_target=reached * bytes_per_round if reached else None,
    )
    (run_dir / "summary.json").write_text(json.dumps(to_json(summary)))
    return run_dir


def test_report_from_synthetic_runs_has_the_known_front(tmp_path):
    # (final accuracy per seed, bytes per round): C costs more than B and is less
    # accurate, so it is off the front; A is cheapest, B most accurate.
    cells = {"A": ([0.70, 0.72], 1_000), "B": ([0.86, 0.84], 100_000), "C": ([0.80, 0.80], 1_000_000), "D": ([0.85, 0.85], 200_000)}
    path = compare_file(tmp_path, "byte_budget = 150000\n[grid]\nmethod = [\"fedit\"]\n")
    comparison = load_comparison(path)
    results = []
    for name, (finals, per_round) in cells.items():
        for seed, final in enumerate(finals):
            run_dir = _synthetic_run(tmp_path / "runs", name, [0.5, 0.6, final], per_round, seed)
            results.append(CellResult(Cell(f"{name} seed {seed}", name, {"method": name, "seed": str(seed)}, ()), run_dir))
    results.append(CellResult(Cell("E seed 0", "E", {"method": "E", "seed": "0"}, ()), None, "ValueError: boom"))
    comparison.output_dir.mkdir(parents=True)
    report = write_report(comparison, results)

    table = (comparison.output_dir / "table.md").read_text()
    rows = {line.split(" | ")[0].strip("| ").split(" (")[0]: line for line in table.splitlines() if line.startswith("| ") and "seeds" in line}
    assert [name for name, line in rows.items() if line.rstrip().endswith("| yes |")] == ["A", "B"]
    assert "0.850 ± 0.014" in rows["B"] and "0.850 ± 0.000" in rows["D"]
    # At 150 KB: A has sent all it will (its final), B its first round's 100 KB (0.6), C nothing (zero-shot).
    assert "| 0.710 ± 0.014 (0.010) |" in rows["A"] and "| 0.600 ± 0.000 (0.000) |" in rows["B"] and "| 0.500 ± 0.000 (0.000) |" in rows["C"]
    assert "Rouge-L at 150.00 KB" not in table and "accuracy at 150.00 KB" in table
    # B reached 0.8 in round 2 with both seeds, after 200 KB; A never; no fleet, so no simulated time.
    assert "| 2.0 | 200.00 KB | - |" in rows["B"] and "| not reached | not reached | - |" in rows["A"]
    # B leads D by 0.000 in the mean: not a win; it beats A and C by more than the spreads.
    assert "Highest mean final accuracy: B" in table and "not beaten by it: D." in table and "| final loss |" in table
    assert "Failed: E seed 0: ValueError: boom" in table
    # Every pair, the higher-scoring first: B's 0.000 lead over D is inside 2 SE
    # (2 * hypot(0.010, 0)), its leads over C and A are not; equal losses differ by 0.
    pairs = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if " − " in line}
    assert list(pairs) == ["B − D", "B − C", "B − A", "D − C", "D − A", "C − A"]
    assert "| +0.000 (0.020) | +0.000 (0.000) |" in pairs["B − D"]
    assert "| **+0.050 (0.020)** |" in pairs["B − C"] and "| **+0.140 (0.028)** |" in pairs["B − A"]
    with (comparison.output_dir / "table.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 8 and {r["seed"] for r in csv_rows} == {"0", "1"}
    assert float(next(r for r in csv_rows if r["cell"] == "C")["total_bytes_up"]) == 1_000_000
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 3 and "[grid]" in page
    assert page.count("<tr>") == 5 + 7 and "<td><b>+0.140 (0.028)</b></td>" in page and "<td>B (2 seeds)</td><td>0.850 ± 0.014 (0.010)</td>" in page
    for name in ("pareto.png", "score_vs_bytes.png", "score_vs_time.png"):
        assert (comparison.output_dir / name).read_bytes()[:4] == b"\x89PNG"

    # A target set in the compare file after the runs finished applies to them:
    # at 0.6 every cell reaches it in round 1, after one round's bytes.
    comparison = dataclasses.replace(comparison, target_accuracy=0.6)
    write_report(comparison, results)
    table = (comparison.output_dir / "table.md").read_text()
    rows = {line.split(" | ")[0].strip("| ").split(" (")[0]: line for line in table.splitlines() if line.startswith("| ") and "seeds" in line}
    assert "| 1.0 | 1.00 KB | - |" in rows["A"] and "| 1.0 | 100.00 KB | - |" in rows["B"]


def test_changes_from_a_baseline_say_which_cell_loses_least(tmp_path):
    # X loses 0.20 under DP (2 SE: 2 * hypot(0.010, 0.010) = 0.028), Y 0.03
    # (2 * hypot(0.020, 0) = 0.040); Y - X: +0.170, 2 SE hypot(0.028, 0.040) = 0.049.
    finals = {("fedit", "none"): [0.80, 0.82], ("fedit", "sample:8"): [0.60, 0.62],
              ("fed_sb", "none"): [0.85, 0.85], ("fed_sb", "sample:8"): [0.80, 0.84]}
    path = compare_file(tmp_path, 'baseline = {privacy = "none"}\n[grid]\nmethod = ["fedit", "fed_sb"]\nprivacy = ["none", "sample:8"]\nseed = [0, 1]\n')
    comparison = load_comparison(path)
    assert comparison.baseline == ("privacy", "none")
    results = []
    for cell in comparison.cells:
        final = finals[cell.values["method"], cell.values["privacy"]][int(cell.values["seed"])]
        results.append(CellResult(cell, _synthetic_run(comparison.output_dir / "cells", cell.slug, [0.5, final], 1000, 0)))
    write_report(comparison, results)
    table = (comparison.output_dir / "table.md").read_text()
    assert "| cell | final accuracy: change from privacy = none (2 SE) |" in table
    assert "| fedit sample DP eps 8 | **-0.200 (0.028)** |" in table and "| fed_sb sample DP eps 8 | -0.030 (0.040) |" in table
    assert "| fed_sb sample DP eps 8 − fedit sample DP eps 8 | **+0.170 (0.049)** |" in table
    # The pairwise table holds the pairs that differ in one axis: 4 of the 6.
    pairs = [line.split(" | ")[0].strip("| ") for line in table.split("| pair | final accuracy")[1].split("\n\n")[0].splitlines()[2:]]
    assert pairs == ["fed_sb no DP − fed_sb sample DP eps 8", "fed_sb no DP − fedit no DP",
                     "fed_sb sample DP eps 8 − fedit sample DP eps 8", "fedit no DP − fedit sample DP eps 8"]
    assert "| fedit no DP |" not in table.split("change from privacy")[1]  # the baseline cells have no change
    # With one seed the changes are shown without a spread, and none is in bold.
    write_report(comparison, [r for r in results if r.cell.values["seed"] == "0"])
    table = (comparison.output_dir / "table.md").read_text()
    assert "| fedit sample DP eps 8 | -0.200 (one seed) |" in table and "| fed_sb sample DP eps 8 | -0.050 (one seed) |" in table
    assert "| fed_sb sample DP eps 8 − fedit sample DP eps 8 | +0.150 (one seed) |" in table


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.7), (4.0, 0.9), (0.5, 0.1)]
    assert pareto_front(points) == [5, 0, 1, 4]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # equal points do not dominate each other


def test_report_of_a_grid_run_in_pieces_has_the_finished_cells_and_names_the_rest(tmp_path, capsys):
    path = compare_file(tmp_path, '[grid]\nmethod = ["fedit", "fed_sb"]\nseed = [0, 1]\n')
    comparison = load_comparison(path)
    assert main(["compare", str(path), "--report"]) == 2
    assert capsys.readouterr().err.startswith("error: no cell of the comparison has finished; see the run.log files")
    for seed, cell in enumerate(comparison.cells[:3]):  # fedit seeds 0 and 1, fed_sb seed 0
        _synthetic_run(comparison.output_dir / "cells", cell.slug, [0.5, 0.7 + seed / 10], 1000, seed)
    assert main(["compare", str(path), "--report"]) == 0  # runs nothing: the fourth cell has no run directory after it
    out = capsys.readouterr().out
    assert "3 of 4 cells finished" in out and not list((comparison.output_dir / "cells").glob("fed_sb-seed-1*"))
    assert "| fedit (2 seeds) | 0.750 ± 0.071 (0.050) |" in out and "| fed_sb (1 seed) | 0.900 |" in out
    assert "Not run yet (1; `fedtune compare` runs them): fed_sb seed 1." in out
    with (comparison.output_dir / "table.csv").open() as f:
        assert [(r["cell"], r["seed"]) for r in csv.DictReader(f)] == [("fedit", "0"), ("fedit", "1"), ("fed_sb", "0")]


def test_only_runs_the_cells_it_names_and_reports_every_finished_one(tmp_path, capsys):
    path = compare_file(tmp_path, '[grid]\nmethod = ["fedit", "fed_sb"]\nseed = [0, 1]\n')
    comparison = load_comparison(path)
    for seed, cell in enumerate(comparison.cells[:2]):  # fedit seeds 0 and 1
        _synthetic_run(comparison.output_dir / "cells", cell.slug, [0.5, 0.7 + seed / 10], 1000, seed)
    assert main(["compare", str(path), "--only", "fedit"]) == 0  # both finished: nothing runs
    out = capsys.readouterr().out
    assert "[1/2] fedit seed 0: finished earlier" in out and "[2/2] fedit seed 1: finished earlier" in out
    assert "running" not in out and not list((comparison.output_dir / "cells").glob("fed_sb*"))
    assert "2 of 4 cells finished" in out and "Not run yet (2; `fedtune compare` runs them): fed_sb seed 0, fed_sb seed 1." in out
    assert main(["compare", str(path), "--only", "fedkseed"]) == 2
    assert capsys.readouterr().err == "error: --only 'fedkseed' matches no cell's label; --list shows them\n"


@pytest.mark.integration
def test_interrupted_grid_resumes_where_it_stopped(tmp_path):
    """SIGKILL `fedtune compare` while its second cell runs; rerun it: the first cell
    is not run again, the second resumes from its checkpoint, the report has both."""
    base = "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) for s, values in SMALL.items())
    path = compare_file(tmp_path, "target_accuracy = 0.5\n[grid]\nmethod = [\"fedit\", \"fed_sb\"]\n", base)
    cmd = [sys.executable, "-m", "fedtune.cli", "compare", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "out" / "cells"
    deadline = time.monotonic() + 600
    while not list(out.glob("fed_sb/*/checkpoint.pt")):
        assert first.poll() is None and time.monotonic() < deadline, "the grid ended before its second cell checkpointed"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    fedit_summary = next(out.glob("fedit/*/summary.json"))
    stamp = fedit_summary.stat().st_mtime_ns
    assert not list(out.glob("fed_sb/*/summary.json"))

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "[1/2] fedit: finished earlier" in second.stdout
    assert "[2/2] fed_sb: resuming" in second.stdout and "[2/2] fed_sb: round 2: accuracy" in second.stdout
    assert fedit_summary.stat().st_mtime_ns == stamp
    with (tmp_path / "out" / "table.csv").open() as f:
        assert [r["cell"] for r in csv.DictReader(f)] == ["fedit", "fed_sb"]
    resumed = json.loads(next(out.glob("fed_sb/*/summary.json")).read_text())
    assert resumed["rounds"] == SMALL["run"]["rounds"]
