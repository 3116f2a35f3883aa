"""The randomness privacy depends on comes from secrets, never from the run seed that
every client receives in the config: otherwise anyone holding the config could
recompute who was sampled, or the noise, and subtract it.

- The server's secret draws the client sample, the per-client job seeds (FedKSeed's
  seed draws among them) and the server's DP noise. It is kept in
  RUN_DIR/private/secret.json (mode 0600) and in the checkpoint, so a run resumes
  and reproduces exactly; `fedtune run --reuse-secret RUN_DIR` repeats a run.
- A client's secret draws what it must hide from the server too: DP-SGD's batches
  and noise, and its share of the noise under privacy.noise_on "clients". A
  deployed client draws its own; in a simulation, where one operator runs every
  party, the clients' secret is kept beside the server's and handed to the client
  processes in FEDTUNE_CLIENT_SECRET.

Without DP nothing is secret: the run seed is the root of everything, as before.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from functools import cache
from pathlib import Path

import numpy as np

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError

PRIVATE = "private"  # the part of the run directory that never leaves the server
SECRET = "secret.json"
CLIENT_SECRET = "FEDTUNE_CLIENT_SECRET"  # a simulation's clients' secret, for the client processes


def ensure(run_dir: Path, config: RunConfig) -> dict[str, int]:
    """The run's secrets: read from RUN_DIR/private/secret.json, or drawn and written
    there when the run has DP and none exist yet; none without DP."""
    path = run_dir / PRIVATE / SECRET
    if path.is_file():
        return {k: int(v, 16) for k, v in json.loads(path.read_text()).items()}
    if config.privacy.mode == "none":
        return {}
    drawn = {"server": secrets.randbits(128), "clients": secrets.randbits(128)}
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({k: f"{v:032x}" for k, v in drawn.items()}, f)
    return drawn


def reuse(source: Path, run_dir: Path) -> None:
    """Give ``run_dir`` the secret of the run in ``source``."""
    path = source / PRIVATE / SECRET
    if not path.is_file():
        raise FedtuneError(f"{source} has no {PRIVATE}/{SECRET}: only a run with differential privacy keeps a secret")
    (run_dir / PRIVATE).mkdir(mode=0o700)
    shutil.copy2(path, run_dir / PRIVATE / SECRET)


def server_root(run_dir: Path, config: RunConfig) -> int:
    """The root of the server's randomness: its secret under DP, else the run seed."""
    return ensure(run_dir, config).get("server", config.run.seed)


def share_with_clients(run_dir: Path, config: RunConfig) -> None:
    """Simulation: hand the clients' secret to the client processes (started after this)."""
    if root := ensure(run_dir, config).get("clients"):
        os.environ[CLIENT_SECRET] = f"{root:032x}"


def secret_seed(*parts: int) -> int:
    """A 64-bit seed from a secret and the parts that set it apart (round, stream):
    too many to search for the one that explains a released value."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def client_seed(client: int, rnd: int, stream: int) -> int:
    """A seed for ``client``'s private draws in round ``rnd``, from its own secret."""
    return secret_seed(_client_root(client), rnd, stream)


@cache
def _client_root(client: int) -> int:
    shared = os.environ.get(CLIENT_SECRET)
    return secret_seed(int(shared, 16), client) if shared else secrets.randbits(128)
