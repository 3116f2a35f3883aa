"""Every method's result loads with transformers + PEFT alone and predicts as in fedtune."""

import json

import pytest
import torch
from conftest import fedavg, small_config
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedtune.methods import METHODS, ClientUpdate, get_method
from fedtune.methods.fedkseed import FedKSeed, per_seed_sums
from fedtune.task import load_model, load_splits


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_reloads_with_the_same_predictions(tmp_path, name):
    flora = {"client_ranks": [2, 4, 8]} if METHODS[name].heterogeneous_ranks else {}
    config = small_config(tmp_path, federation={"method": name}, flora=flora)
    method = get_method(config)
    classifier = load_model(config)
    method.server_init(classifier)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two rounds of random updates, so that nothing is at its initial value
        fedavg(method, [
            ClientUpdate(c, _random_uplink(method, c, g), 10 + i) for i, c in enumerate([0, 1, 2])
        ])
    texts = load_splits(config)[1].texts[:16]
    with torch.no_grad():
        expected = method.server_model()(**classifier.encode(texts)).logits

    out = tmp_path / "adapter"
    method.export(out)
    info = json.loads((out / "fedtune.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(
        info["base_model"] or out, num_labels=info["num_labels"], pad_token_id=info["pad_token_id"]
    )
    # Adapter methods export a PEFT adapter; FedKSeed, full-parameter, a whole model.
    model = (PeftModel.from_pretrained(base, out) if (out / "adapter_config.json").is_file() else base).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=info["max_length"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert not torch.allclose(expected, classifier_logits_before(config, texts), atol=1e-3)


def _random_uplink(method, client, g):
    if isinstance(method, FedKSeed):
        seeds = torch.randint(0, method.k, (method.config.train.local_steps,), generator=g)
        return method.encode_scalars(per_seed_sums(seeds, 5 * torch.randn(len(seeds), generator=g), method.k))
    return {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in method.uplink_template(client).items()}


def classifier_logits_before(config, texts):
    fresh = load_model(config)
    with torch.no_grad():
        return fresh.model(**fresh.encode(texts)).logits
