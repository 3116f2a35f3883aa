"""Do runs still give the same numbers? Record a set of runs' metrics, ledgers and
summaries, then after a change run them again and diff: every value must be
identical (floats to the bit), except the wall-clock timings.

    python benchmarks/reproduce.py record OUT        # at the commit before the change
    python benchmarks/reproduce.py check OUT         # after it: exit 1 on any difference

The jobs: the main job (simulations/default.toml), simulations/quick.toml, and the
grid simulations/compare_methods_quick.toml (every method on quick.toml). `--only`
picks some of them. Each job runs in its own `fedtune` process under OUT/runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "main": ["run", "simulations/default.toml"],
    "quick": ["run", "simulations/quick.toml"],
    "grid": ["compare", "simulations/compare_methods_quick.toml"],
}
TIMINGS = {"wall_time_s", "round_train_time_s", "client_train_time_s"}  # differ from run to run
FILES = ("metrics.jsonl", "ledger.jsonl", "summary.json")


def run_job(name: str, out: Path) -> Path:
    """Run job ``name`` with its outputs under OUT/runs/NAME; returns that folder."""
    target = out / "runs" / name
    shutil.rmtree(target, ignore_errors=True)
    command, config = JOBS[name]
    where = ["--set", f"run.output_dir={json.dumps(str(target))}"] if command == "run" else []
    if command == "compare":  # a compare file names its own output folder: point it here
        source = (ROOT / config).read_text().replace('output_dir = "runs/', f'output_dir = "{target}/')
        target.mkdir(parents=True)
        (target / "compare.toml").write_text(source.replace('config = "', f'config = "{ROOT / "simulations"}/'))
        config = str(target / "compare.toml")
    print(f"{name}: fedtune {command} {config}", flush=True)
    subprocess.run([sys.executable, "-m", "fedtune.cli", command, config, *where], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return target


def outputs(folder: Path) -> dict[str, object]:
    """Every run's files under ``folder``, keyed by their path below the run
    directory's parent (the timestamped run directory name left out), timings removed."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.name not in FILES:
            continue
        key = str(path.parent.parent.relative_to(folder) / path.name)
        text = path.read_text()
        records = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]
        found[key] = [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]
    return found


def differences(recorded: dict, now: dict) -> list[str]:
    lines = [f"missing now: {k}" for k in recorded.keys() - now.keys()]
    lines += [f"new now: {k}" for k in now.keys() - recorded.keys()]
    for key in sorted(recorded.keys() & now.keys()):
        for i, (a, b) in enumerate(zip(recorded[key], now[key])):
            for field in sorted(a.keys() | b.keys()):
                if a.get(field, "<absent>") != b.get(field, "<absent>"):
                    lines.append(f"{key} record {i} {field}: {a.get(field, '<absent>')!r} -> {b.get(field, '<absent>')!r}")
        if len(recorded[key]) != len(now[key]):
            lines.append(f"{key}: {len(recorded[key])} records -> {len(now[key])}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("out", type=Path, help="where the recorded figures are (record: written, check: read)")
    parser.add_argument("--only", nargs="+", choices=list(JOBS), default=list(JOBS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.only:
        figures = outputs(run_job(name, args.out / args.action))
        reference = args.out / f"{name}.json"
        if args.action == "record":
            reference.write_text(json.dumps(figures, indent=1) + "\n")
            print(f"{name}: recorded {len(figures)} files", flush=True)
            continue
        diff = differences(json.loads(reference.read_text()), figures)
        print(f"{name}: {len(figures)} files, {'identical' if not diff else f'{len(diff)} differences'}", flush=True)
        for line in diff[:40]:
            print(f"  {line}")
        failed += bool(diff)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
