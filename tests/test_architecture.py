"""The shape docs/architecture.md describes, kept: no method named outside
fedtune/methods/, no branching on privacy.mode outside the privacy package and the
config check, short functions in the Flower glue, no import cycles, no module
that changes the process's state on import."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from fedtune.methods.registry import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "fedtune"


def _sources(under: Path = PACKAGE):
    return {p: p.read_text() for p in sorted(under.rglob("*.py")) if "proto" not in p.parts}


def test_no_method_is_named_outside_the_methods_package():
    quoted = re.compile("|".join(f'"{name}"' for name in METHODS))
    offenders = [f"{p}:{n}" for p, text in _sources().items() if "methods" not in p.parts
                 for n, line in enumerate(text.splitlines(), 1) if quoted.search(line)]
    assert offenders == []


def test_privacy_mode_is_read_only_by_the_privacy_package_and_the_config_check():
    offenders = [f"{p}:{n}" for p, text in _sources().items() if "privacy" not in p.parts and p.name != "config.py"
                 for n, line in enumerate(text.splitlines(), 1) if re.search(r"privacy\.mode\b", line)]
    assert offenders == []


def test_the_flower_glue_has_no_long_function():
    lengths = {f"{p.name}:{node.name}": node.end_lineno - node.lineno + 1
               for p, text in _sources(PACKAGE / "app").items()
               for node in ast.walk(ast.parse(text)) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert max(lengths.values()) < 40, max(lengths, key=lengths.get)


def _imports(path: Path) -> set[str]:
    """The fedtune modules ``path`` imports at module level (not inside functions or TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedtune"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fedtune")}
    return found


def test_no_import_cycles():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in _sources()}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert cycles == []


def test_importing_fedtune_changes_no_process_state():
    # The libraries first: what they do on import is theirs.
    probe = ("import os, warnings, flwr.app, flwr.clientapp, flwr.serverapp, flwr.simulation, opacus, peft, transformers; "
             "env = dict(os.environ); filters = list(warnings.filters); "
             "import fedtune.cli, fedtune.app.server, fedtune.app.client, fedtune.deploy.worker; "
             "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items()); "
             "assert list(warnings.filters) == filters, 'warnings filters changed'")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
