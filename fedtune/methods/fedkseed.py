"""FedKSeed (Qin et al., 2024): zeroth-order full-parameter tuning in which a client
sends only (seed index, scalar) pairs.

Every party derives the same K candidate seeds from the run seed. A local step
draws a seed j, estimates the directional derivative g along z(seed_j) from two
forward passes and moves w -= lr g z (`fedtune.zeroth_order`). The server averages
the clients' per-seed sums of g weighted by examples: the global model then equals
the FedAvg of the clients' local models, since every update is linear in z. Each
round's averaged per-seed scalars are a delta every client replays
(`fedtune.methods.replay`): one regeneration per seed that round, not per step.

A client further behind than the server's history (one snapshot's bytes) gets the
snapshot the paper's linearity allows: the K per-seed sums C of every round so far,
which it applies at once to the base weights, w0 - lr sum_j C_j z_j: K floats, and
at most K regenerations, however many rounds it missed. Summed before they are
applied, the scalars round differently than when applied round by round, so such a
copy equals the server's within float32 rounding (tests/test_catchup.py bounds it),
not to the bit; from there it follows the rounds exactly again.

Encodings (`fedkseed.encoding`), both lossless, so they give the same model:
- "paper": up, one (int32 index, float32 scalar) pair per step; down, the dense
  float32 K-vector of per-seed scalars of each round the client has not applied.
- "compact": up and down, a K-bit mask of the seeds used plus one float32 per set
  bit (per-seed sums up, averaged scalars down).

FedKSeed-Pro (`fedkseed.pro`): the server keeps each seed's history of |g| (clipped
to 0.5, as in the reference code; one entry per step with the paper's encoding, per
client and seed with the compact one), min-max normalises its mean and broadcasts
it as K bytes; clients sample seeds with softmax(those values) as probabilities.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedtune import zeroth_order as zo
from fedtune.devices import computing_on
from fedtune.errors import FedtuneError
from fedtune.methods.adapters import lora_layers, temporarily_wrapped
from fedtune.methods.base import ClientJob, ClientUpdate, LocalResult, Method, TensorSpec, UplinkSpec
from fedtune.methods.replay import RoundLog, catch_up, nbytes
from fedtune.rounds.release import Release
from fedtune.task import derive_seed
from fedtune.tasks import Learner
from fedtune.training import TrainStats, batch_order
from fedtune.wire import TensorDict

PROBS = "probs"
AMPLITUDE_CLIP = 0.5


class FedKSeed(Method):
    name = "fedkseed"
    kind = "zeroth_order"
    compressible = False  # fedkseed.encoding instead
    # Client shares of DP noise would have to cover all K sums, making uplinks and replays dense.
    noise_shares = False

    def __init__(self, config) -> None:
        super().__init__(config)
        self.k = config.fedkseed.num_seeds
        self.seeds = [derive_seed(config.run.seed, 0x5EED, j) for j in range(self.k)]

    def tuned(self, learner: Learner) -> list[zo.Tuned]:
        """The tuned parameters of ``learner``, per ``fedkseed.params``."""
        patterns = self.config.fedkseed.params
        names = [n for n, _ in learner.model.named_parameters()]
        head = [n for n in names if learner.head_name and n.startswith(learner.head_name + ".")]
        if not patterns:
            with temporarily_wrapped(learner, self.config.lora, self.config.run.seed) as peft:
                targets = {f"{path}.weight" for path in lora_layers(peft)}
            chosen = [n for n in names if n in targets] + head
        elif "all" in patterns:
            chosen = names
        else:
            chosen = [n for n in names if any(p in n for p in patterns if p != "head") or ("head" in patterns and n in head)]
        if not chosen:
            raise FedtuneError(f"fedkseed.params {patterns} matches no parameter of this model")
        return zo.tuned_parameters(learner.model, chosen)

    def apply(self, tuned: list[zo.Tuned], scalars: torch.Tensor) -> list[str]:
        """Replay one round: w -= lr * s_j * z(seed_j) for every seed with s_j != 0."""
        for j in torch.nonzero(scalars).flatten().tolist():
            zo.move(tuned, self.seeds[j], -self.config.train.lr * float(scalars[j]))
        return [t.name for t in tuned]

    def check(self, learner: Learner) -> None:
        self.tuned(learner)

    # -- server ----------------------------------------------------------------
    def server_init(self, learner: Learner) -> None:
        self.learner = learner
        self.tuned_params = self.tuned(learner)
        self.total = torch.zeros(self.k, dtype=torch.float64)  # every round's scalars, per seed
        self.log = RoundLog(nbytes(self.encode_scalars(torch.ones(self.k))))  # at most a snapshot's bytes of rounds
        # FedKSeed-Pro's history: sum and count of clipped |g| per seed, starting
        # from one zero each (the reference's initial value).
        self.amplitude_sum = torch.zeros(self.k, dtype=torch.float64)
        self.amplitude_count = torch.ones(self.k, dtype=torch.float64)

    def snapshot(self) -> TensorDict:
        return self.encode_scalars(self.total.float())

    def server_downlink(self, client: int) -> TensorDict:
        down = self.log.downlink(client, self.snapshot)
        if self.config.fedkseed.pro:
            mean = self.amplitude_sum / self.amplitude_count
            spread = mean.max() - mean.min()
            normalised = (mean - mean.min()) / spread if spread > 0 else torch.zeros_like(mean)
            down[PROBS] = torch.round(normalised * 255).to(torch.uint8)
        return down

    def uplink_spec(self, client: int) -> UplinkSpec:
        """Per-step pairs (paper: at most train.local_steps, fewer from a partial
        straggler) or the mask and one scalar per seed used (compact: at most K)."""
        if self.config.fedkseed.encoding == "paper":
            steps = (self.config.train.local_steps,)
            return {"seeds": TensorSpec(torch.int32, steps, variable=True), "scalars": TensorSpec(torch.float32, steps, variable=True)}
        return {"mask": TensorSpec(torch.uint8, ((self.k + 7) // 8,)), "scalars": TensorSpec(torch.float32, (self.k,), variable=True)}

    def check_update(self, update: ClientUpdate) -> str | None:
        try:
            self.uplink_pairs(update.tensors)
        except ValueError as exc:
            return str(exc)
        return None

    def update_norm(self, update: ClientUpdate) -> float:
        """The update is the vector of per-seed sums of the client's scalars."""
        return float(per_seed_sums(*self.uplink_pairs(update.tensors), self.k).double().norm())

    def server_aggregate(self, updates: list[ClientUpdate], release: Release) -> None:
        sums = []
        for u in updates:
            seeds, scalars = self.uplink_pairs(u.tensors)
            sums.append(per_seed_sums(seeds, scalars, self.k))
            clipped = scalars.double().clamp(-AMPLITUDE_CLIP, AMPLITUDE_CLIP).abs()
            self.amplitude_sum.index_add_(0, seeds, clipped)
            self.amplitude_count.index_add_(0, seeds, torch.ones_like(clipped))
        # Under client-level DP every one of the K sums is noised, used or not, so
        # what is released does not depend on which seeds the clients drew.
        delta = release.combine(sums, (self.k,))
        self.apply(self.tuned_params, delta)
        self.total += delta.double()
        self.log.append(self.encode_scalars(delta), (u.client for u in updates))

    def client_failed(self, client: int) -> None:
        self.log.forget(client)

    def server_state(self) -> dict[str, object]:
        weights = {t.name: t.param.detach().clone() for t in self.tuned_params}
        return {"weights": weights, "total": self.total, "log": self.log.state(),
                "amplitude_sum": self.amplitude_sum, "amplitude_count": self.amplitude_count}

    def load_server_state(self, state: dict[str, object]) -> None:
        with torch.no_grad():
            for t in self.tuned_params:
                t.param.copy_(state["weights"][t.name])
        self.total = state["total"]
        self.log.load(state["log"])
        self.amplitude_sum, self.amplitude_count = state["amplitude_sum"], state["amplitude_count"]

    def server_model(self) -> nn.Module:
        return self.learner.model

    def export(self, directory: Path) -> None:
        """Full-parameter tuning: a complete Hugging Face model directory."""
        self.learner.model.save_pretrained(directory)
        self.learner.tokenizer.save_pretrained(directory)
        self.learner.export_info(directory, base_model=None)

    def private_release_blocker(self) -> str | None:
        if self.config.fedkseed.pro:
            return "fedkseed.pro cannot run under privacy: its seed probabilities come from each client's raw scalars"
        return None

    def clipped(self, result: LocalResult, bound: float) -> LocalResult:
        """The update is the vector of per-seed sums: scaling every scalar scales it."""
        seeds, scalars = self.uplink_pairs(result.tensors)
        norm = float(per_seed_sums(seeds, scalars, self.k).norm())
        scale = min(1.0, bound / norm) if norm > 0 else 1.0
        return dataclasses.replace(result, tensors={**result.tensors, "scalars": result.tensors["scalars"] * scale})

    # -- encodings ---------------------------------------------------------------
    def encode_scalars(self, dense: torch.Tensor) -> TensorDict:
        if self.config.fedkseed.encoding == "paper":
            return {"scalars": dense}
        used = dense != 0
        mask = np.packbits(used.numpy(), bitorder="little")
        return {"mask": torch.from_numpy(mask), "scalars": dense[used]}

    def decode_scalars(self, tensors: TensorDict) -> torch.Tensor:
        """The dense K-vector from either encoding; ValueError if malformed."""
        scalars = tensors.get("scalars")
        if scalars is None or scalars.dtype != torch.float32 or scalars.dim() != 1:
            raise ValueError("expected a 1-d float32 tensor 'scalars'")
        if not torch.isfinite(scalars).all():
            raise ValueError("non-finite scalar")
        if self.config.fedkseed.encoding == "paper":
            if scalars.numel() != self.k:
                raise ValueError(f"expected {self.k} scalars, got {scalars.numel()}")
            return scalars
        mask = tensors.get("mask")
        if mask is None or mask.dtype != torch.uint8 or mask.shape != ((self.k + 7) // 8,):
            raise ValueError(f"expected a uint8 mask of {(self.k + 7) // 8} bytes")
        used = torch.from_numpy(np.unpackbits(mask.numpy(), bitorder="little").astype(bool))
        if used[self.k :].any():
            raise ValueError(f"mask marks a seed index beyond num_seeds={self.k}")
        if int(used.sum()) != scalars.numel():
            raise ValueError(f"mask marks {int(used.sum())} seeds but {scalars.numel()} scalars came")
        dense = torch.zeros(self.k)
        dense[used[: self.k]] = scalars
        return dense

    def uplink_pairs(self, tensors: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        """(seed indices, scalars) of an uplink; ValueError if malformed."""
        if self.config.fedkseed.encoding == "compact":
            if tensors.keys() != {"mask", "scalars"}:
                raise ValueError(f"expected tensors mask and scalars, got {sorted(tensors)}")
            dense = self.decode_scalars(tensors)
            seeds = torch.nonzero(dense).flatten()
            return seeds, dense[seeds]
        if tensors.keys() != {"seeds", "scalars"}:
            raise ValueError(f"expected tensors seeds and scalars, got {sorted(tensors)}")
        seeds, scalars = tensors["seeds"], tensors["scalars"]
        steps = self.config.train.local_steps  # at most: a partial straggler sends fewer
        if seeds.dtype != torch.int32 or scalars.dtype != torch.float32 or seeds.shape != scalars.shape or not 1 <= len(seeds) <= steps:
            raise ValueError(f"expected 1 to {steps} int32 seeds and as many float32 scalars, got {tuple(seeds.shape)} and {tuple(scalars.shape)}")
        if seeds.numel() and (seeds.min() < 0 or seeds.max() >= self.k):
            raise ValueError(f"seed index out of range [0, {self.k})")
        if not torch.isfinite(scalars).all():
            raise ValueError("non-finite scalar")
        return seeds.long(), scalars

    # -- client ----------------------------------------------------------------
    def client_train(self, learner: Learner, downlink: TensorDict, job: ClientJob) -> LocalResult:
        tuned = self.tuned(learner)

        def replay(scalars: TensorDict) -> list[str]:  # one round's scalars, or a snapshot's sums C on the base
            return self.apply(tuned, self.decode_scalars(scalars))

        catch_up(learner.model, downlink, job.state, job.replicas, str(job.client), replay, replay)
        probs = None
        if PROBS in downlink:
            probs = torch.softmax(downlink[PROBS].double() / 255, 0).numpy()
        t, eps = self.config.train, self.config.fedkseed.eps
        rng = np.random.default_rng(job.seed)
        steps = job.local_steps or t.local_steps
        draws = rng.choice(self.k, size=steps, p=probs)
        model = learner.model.eval()  # no dropout: both forward passes see the same function
        scalars, losses, tokens, sequences = [], [], 0, 0
        with computing_on(model, learner.device):
            for j, idx in zip(draws, batch_order(len(job.data), steps, t.batch_size, job.seed)):
                seen = []  # the token positions of each forward pass

                def batch_loss(idx=idx) -> float:
                    loss, positions = learner.loss(model, job.data, idx)
                    seen.append(positions)
                    return loss.item()

                g, loss = zo.spsa_step(batch_loss, tuned, self.seeds[j], eps, t.lr)
                tokens, sequences = tokens + seen[0], sequences + len(idx)
                scalars.append(g)
                losses.append(loss)
        seeds, values = torch.from_numpy(draws.astype(np.int32)), torch.tensor(scalars, dtype=torch.float32)
        if self.config.fedkseed.encoding == "paper":
            up = {"seeds": seeds, "scalars": values}
        else:
            up = self.encode_scalars(per_seed_sums(seeds.long(), values, self.k))
        return LocalResult(up, len(job.data), TrainStats(float(np.mean(losses)), len(losses), tokens, sequences).metrics())


def per_seed_sums(seeds: torch.Tensor, scalars: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the scalars of each seed, as a dense K-vector (steps in order)."""
    return torch.zeros(k).index_add_(0, seeds, scalars)
