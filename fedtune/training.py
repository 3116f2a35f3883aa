"""The local training loop shared by every gradient-based method, for any task's Learner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fedtune.config import TrainSection
from fedtune.devices import computing_on
from fedtune.privacy.dp_sgd import DPSGD, make_private, poisson_batches
from fedtune.tasks import Examples, Learner

OPTIMIZER_CLASSES = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean over the steps
    steps: int
    tokens: int  # token positions processed, padding included: the work done
    sequences: int  # examples processed

    def metrics(self) -> dict[str, float]:
        return {"train_loss": self.loss, "steps": self.steps, "tokens": self.tokens, "sequences": self.sequences}


def batch_order(num_examples: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Indices for ``steps`` batches: passes over seeded permutations, so every local
    example is seen once before any is seen twice."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    order = np.concatenate([rng.permutation(num_examples) for _ in range(-(-needed // num_examples))])
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train_steps(
    model: nn.Module,
    learner: Learner,
    data: Examples,
    steps: int,
    train: TrainSection,
    seed: int,
    progress: bool = False,
    dp: DPSGD | None = None,
) -> TrainStats:
    """Run ``steps`` steps of ``train.optimizer`` on the trainable parameters, each
    on a batch of ``train.batch_size`` taken in chunks of at most
    ``train.physical_batch``, on ``learner.device``. With ``dp``, they are DP-SGD
    steps on Poisson-sampled batches.

    The optimizer is fresh every call: local optimizer state does not survive a
    round, as in FedAvg-style methods."""
    torch.manual_seed(seed)  # dropout
    params = [p for p in model.parameters() if p.requires_grad]
    with computing_on(model, learner.device):
        optimizer = OPTIMIZER_CLASSES[train.optimizer](params, lr=train.lr, weight_decay=train.weight_decay)
        forward, batches = model, batch_order(len(data), steps, train.batch_size, seed)
        if dp is not None:
            forward, optimizer = make_private(model, optimizer, dp, train.batch_size)
            batches = poisson_batches(len(data), steps, train.batch_size, dp.seed)
        # float16 base weights: scale the loss so small gradients survive (bfloat16 has float32's range).
        scaler = torch.amp.GradScaler(learner.device.type) if learner.dtype == torch.float16 else None
        model.train()
        losses, tokens, sequences = [], 0, 0
        for idx in tqdm(batches, desc="steps", leave=False, disable=not progress):
            if not len(idx):  # an empty Poisson sample: nothing to learn, nothing released
                continue
            loss, batch_tokens = _step(forward, optimizer, learner, data, idx, train.physical_batch, dp is not None, scaler)
            losses.append(loss)
            tokens, sequences = tokens + batch_tokens, sequences + len(idx)
        if dp is not None:
            forward.remove_hooks()
        model.eval()
    return TrainStats(float(np.mean(losses)) if losses else float("nan"), len(losses), tokens, sequences)


def _step(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    learner: Learner,
    data: Examples,
    idx: np.ndarray,
    physical: int,
    private: bool,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, int]:
    """One optimizer step on the batch ``idx``, its gradient gathered over chunks of at
    most ``physical`` examples; returns the batch's mean loss and its token positions."""
    chunks = np.array_split(idx, -(-len(idx) // physical))
    loss_sum, tokens = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for i, chunk in enumerate(chunks):
        more = i < len(chunks) - 1
        loss, chunk_tokens = learner.loss(forward, data, chunk)
        loss_sum, tokens = loss_sum + loss.item() * len(chunk), tokens + chunk_tokens
        if private:
            # Opacus' logical batches, as its BatchMemoryManager drives them: a step
            # signalled as skipped only clips this chunk's per-example gradients into
            # the batch's sum, which zero_grad then keeps; the last step adds the noise
            # to that sum, once, and updates.
            optimizer.signal_skip_step(do_skip=more)
        else:
            loss = loss * (len(chunk) / len(idx))  # the chunks' gradients add up to the batch mean's
        (scaler.scale(loss) if scaler else loss).backward()
        if private and more:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss_sum / len(idx), tokens
