"""The centralized reference: the same model, LoRA and data, pooled on one machine,
trained on as many examples as the whole federated run processes."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.methods.adapters import wrap_with_lora
from fedtune.task import derive_seed, load_model, load_splits
from fedtune.tasks import EvalResult
from fedtune.training import train_steps


def centralized_steps(config: RunConfig) -> int:
    """Optimizer steps that process the federated run's examples: rounds x sampled
    clients x local steps, at the same batch size."""
    clients = config.federation.clients_per_round or config.partition.num_clients
    return config.run.rounds * clients * config.train.local_steps


def run_centralized(config: RunConfig) -> EvalResult:
    train, test = load_splits(config)
    learner = load_model(config)
    model = wrap_with_lora(learner, config.lora, config.run.seed)
    t = config.train
    seed = derive_seed(config.run.seed, 0, 1 << 20)  # not any client's (round, partition) seed
    steps = centralized_steps(config)
    train_steps(model, learner, train, steps, t, seed, progress=True)
    return learner.evaluate(model, test, t.eval_batch_size)
