import dataclasses

import numpy as np
import torch
from conftest import train_lora

from fedtune.config import TrainSection
from fedtune.methods.adapters import wrap_with_lora
from fedtune.task import load_model, load_splits
from fedtune.training import batch_order, train_steps


def test_batch_order_sees_every_example_once_per_pass():
    batches = batch_order(num_examples=10, steps=5, batch_size=4, seed=3)  # 2 passes
    flat = np.concatenate(batches)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert sorted(flat[:10]) == list(range(10))
    assert np.array_equal(flat, np.concatenate(batch_order(10, 5, 4, seed=3)))
    assert not np.array_equal(flat, np.concatenate(batch_order(10, 5, 4, seed=4)))


def test_training_fits_a_small_set(config):
    train, _ = load_splits(config)
    few = train.subset(np.arange(16))
    classifier = load_model(config)
    model = wrap_with_lora(classifier, config.lora, seed=0)
    before = classifier.evaluate(model, few, batch_size=8)
    stats = train_steps(model, classifier, few, steps=30, train=TrainSection(batch_size=8, lr=3e-3), seed=0)
    after = classifier.evaluate(model, few, batch_size=8)
    batches = [classifier.encode([few.texts[i] for i in idx]) for idx in batch_order(16, 30, 8, 0)]
    assert stats.tokens == sum(b["input_ids"].numel() for b in batches) and stats.sequences == 240
    assert after.loss < before.loss * 0.5
    assert after.score == 1.0


def test_sgd_takes_plain_gradient_steps(config):
    """train.optimizer = "sgd": the adapter moves by exactly -lr * gradient."""
    train, _ = load_splits(config)
    few = train.subset(np.arange(4))
    classifier = load_model(config)
    model = wrap_with_lora(classifier, config.lora, seed=0)
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    lora_b.data.normal_()  # B starts at zero, where A has no gradient
    idx = batch_order(4, 1, 4, 0)[0]
    model.train()
    torch.manual_seed(0)  # the same dropout masks as train_steps draws
    torch.nn.functional.cross_entropy(model(**classifier.encode([few.texts[i] for i in idx])).logits, torch.as_tensor(few.labels[idx])).backward()
    expected = {n: p.detach() - 0.1 * p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    train_steps(model, classifier, few, steps=1, train=TrainSection(optimizer="sgd", batch_size=4, lr=0.1), seed=0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-4, atol=1e-6)


def test_a_batch_in_physical_chunks_takes_the_same_step(config):
    """Without DP, train.physical_batch_size accumulates the chunks' gradients into
    the step the whole batch takes."""
    train = TrainSection(optimizer="sgd", batch_size=12, lr=0.1)
    whole, whole_sizes = train_lora(config, train, steps=2)
    chunked, sizes = train_lora(config, dataclasses.replace(train, physical_batch_size=5), steps=2)
    assert whole_sizes == [12, 12] and sizes == [4, 4, 4, 4, 4, 4]
    for name in whole:
        assert whole[name].abs().max() > 0, name
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-7)
