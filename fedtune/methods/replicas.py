"""Where clients keep their caught-up copy of the global model between rounds.

FLoRA and FedKSeed clients rebuild the server's weights by replaying rounds
(`fedtune.methods.replay`), and keep what they rebuilt. Kept in the node's Flower
context, that is a full weight copy per registered client in the simulation's
memory; here it goes to disk instead, and the context keeps only the round and a
32-byte digest.

The store is content-addressed: a copy's file is named by the SHA-256 of its
bytes, so the clients of one host synced to the same round (bit-identical copies)
share one file, and a deployed node keeps its own in its own directory. Each
owner (a client) holds a reference; a file no reference names any more is
deleted, under a lock, since a simulation's clients run in several processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load, save

from fedtune.wire import TensorDict

# Where a node keeps its copies when its node config names no replica-dir: a
# simulation points it at a directory it removes when the run ends.
REPLICA_DIR = "FEDTUNE_REPLICA_DIR"
_MEMO = "~snapshot"  # the owner holding the latest snapshot's rebuilt copy (clients are numbers)


def run_directory(run_id: int, root: Path | None = None) -> Path:
    """This run's store under ``root``, else $FEDTUNE_REPLICA_DIR, else the
    temporary directory: one per run, so runs sharing a node never share copies."""
    root = root or os.environ.get(REPLICA_DIR) or Path(tempfile.gettempdir()) / "fedtune-replicas"
    return Path(root) / f"run-{run_id}"


class ReplicaStore:
    """Content-addressed tensor files under ``directory``; None keeps them in this
    process's memory (a method driven directly, as in tests and tools)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._memory: dict[bytes, bytes] = {}
        self._memory_refs: dict[str, bytes] = {}
        self._memo_key: bytes | None = None
        if directory is not None:
            (directory / "refs").mkdir(parents=True, exist_ok=True)
            (directory / "blobs").mkdir(exist_ok=True)

    def put(self, owner: str, tensors: TensorDict) -> bytes:
        """Keep ``tensors`` as ``owner``'s copy, in place of the one it held; its digest."""
        data = _serialize(tensors)
        digest = hashlib.sha256(data).digest()
        if self.directory is None:
            self._memory[digest] = data
            self._point(owner, digest)
            return digest
        with self._locked():
            blob = self._blob(digest)
            if not blob.exists():
                tmp = blob.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(data)
                tmp.rename(blob)  # never a half-written copy under a digest
            self._point(owner, digest)
        return digest

    def remember(self, key: bytes, digest: bytes) -> None:
        """Note that the copy built from ``key`` (a snapshot's hash) is ``digest``, so
        the next client handed the same snapshot loads it instead of rebuilding it:
        in a simulation, every client sampled after missing rounds gets the same
        snapshot, and FedKSeed's rebuild regenerates up to K perturbations. Only the
        latest note is kept (it holds its copy, like an owner)."""
        if self.directory is None:
            self._memo_key = key
            self._point(_MEMO, digest)
            return
        with self._locked():
            (self.directory / "memo").write_text(key.hex())
            self._point(_MEMO, digest)

    def recall(self, key: bytes) -> TensorDict | None:
        """The copy noted for ``key`` by `remember`, or None."""
        if self.directory is None:
            digest = self._memory_refs.get(_MEMO) if self._memo_key == key else None
        else:
            with self._locked():
                memo, ref = self.directory / "memo", self.directory / "refs" / _MEMO
                noted = memo.exists() and ref.exists() and memo.read_text() == key.hex()
                digest = bytes.fromhex(ref.read_text()) if noted else None
        return None if digest is None else self.get(digest)

    def get(self, digest: bytes) -> TensorDict | None:
        """The copy with ``digest``, or None if this store does not hold it (another
        host's store, a cleared directory) or it is not what was stored."""
        if self.directory is None:
            data = self._memory.get(digest)
        else:
            blob = self._blob(digest)
            data = blob.read_bytes() if blob.exists() else None
        if data is None or hashlib.sha256(data).digest() != digest:
            return None
        return load(data)

    def blobs(self) -> int:
        """How many distinct copies are kept."""
        return len(self._memory) if self.directory is None else len(list((self.directory / "blobs").glob("*.st")))

    def _blob(self, digest: bytes) -> Path:
        return self.directory / "blobs" / f"{digest.hex()}.st"

    def _point(self, owner: str, digest: bytes) -> None:
        """Make ``owner`` hold ``digest``, dropping the copy it held if no one else
        does (on disk: called under the lock)."""
        if self.directory is None:
            old = self._memory_refs.get(owner)
            self._memory_refs[owner] = digest
            if old is not None and old not in self._memory_refs.values():
                del self._memory[old]
            return
        ref = self.directory / "refs" / owner
        old = bytes.fromhex(ref.read_text()) if ref.exists() else None
        ref.write_text(digest.hex())
        if old is not None and old != digest and not self._referenced(old):
            self._blob(old).unlink(missing_ok=True)

    def _referenced(self, digest: bytes) -> bool:
        hexed = digest.hex()
        return any(ref.read_text() == hexed for ref in (self.directory / "refs").iterdir())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _serialize(tensors: TensorDict) -> bytes:
    return save({n: t.detach().contiguous().cpu() for n, t in tensors.items()})


def content_digest(tensors: TensorDict) -> bytes:
    """The SHA-256 of ``tensors`` as the store would keep them."""
    return hashlib.sha256(_serialize(tensors)).digest()


def digest_tensor(digest: bytes) -> torch.Tensor:
    """A digest as the uint8 tensor the node context keeps."""
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8)


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """The digest a node context's uint8 tensor stands for."""
    return bytes(tensor.tolist())

