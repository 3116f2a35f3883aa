"""The instruction task: prompts, loss masking, Rouge-L, every method on it, export."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fedavg, instruct_config, uplink_rejection
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.config import InstructSection
from fedtune.errors import FedtuneError
from fedtune.methods import METHODS, ClientJob, ClientUpdate, get_method
from fedtune.methods.adapters import trainable_state, wrap_with_lora
from fedtune.methods.replicas import ReplicaStore
from fedtune.privacy.dp_sgd import DPSGD, make_private
from fedtune.report.run_dir import create_run_dir
from fedtune.simulation import run_simulation
from fedtune.task import client_data, load_model, load_splits
from fedtune.tasks.instruct import IGNORE, InstructDataset, load_instruct_dataset, rouge_l


def _data(*rows) -> InstructDataset:
    return InstructDataset([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], np.zeros(len(rows), dtype=np.int64), ["all"])


def test_prompt_uses_the_chat_template_or_the_configured_one(tmp_path, tiny_lm):
    lm = load_model(instruct_config(tmp_path, tiny_lm))
    chat = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True, tokenize=False)
    assert lm.prompt("Who are you?", "") == chat and chat.endswith("<|im_start|>assistant\n")
    assert "Who are you?\n\nA robot" in lm.prompt("Who are you?", "A robot")
    lm.template = "### Q: {instruction} ({context})\n### A:"
    assert lm.prompt("Who?", "ctx") == "### Q: Who? (ctx)\n### A:"


def test_only_response_tokens_carry_loss(tmp_path, tiny_lm):
    lm = load_model(instruct_config(tmp_path, tiny_lm))
    data = _data(("What is AI?", "", "A field of study."), ("Hi", "some context", "Hello there, friend."))
    batch = lm.encode(data, [0, 1])
    for row in range(2):
        prompt, response = lm.example_ids(data, row)
        n = len(prompt) + len(response)
        assert batch["labels"][row, : len(prompt)].eq(IGNORE).all()  # the prompt: no loss
        assert batch["labels"][row, len(prompt) : n].tolist() == response  # the response and its end-of-turn token
        assert response[-1] == lm.tokenizer.eos_token_id
        assert batch["labels"][row, n:].eq(IGNORE).all() and batch["attention_mask"][row, n:].eq(0).all()
    # The loss is the mean over examples of each one's mean over its response tokens, nothing else.
    with torch.no_grad():
        loss, tokens = lm.loss(lm.model, data, [0, 1])
        expected = []
        for row in range(2):
            prompt, response = lm.example_ids(data, row)
            ids = torch.tensor([prompt + response])
            logits = lm.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            expected.append(F.cross_entropy(logits, torch.tensor(response)))
    assert tokens == batch["input_ids"].numel()
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-5)


def test_rouge_l_against_hand_computed_values():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the
    # mat": 5 of 6 tokens each side, F = 5/6. No common token: 0. Stemming: "running"
    # and "runs" both stem to "run": 2 of 2 tokens, F = 1.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l(["a b c"], ["x y"]) == 0
    assert rouge_l(["dogs running"], ["dog runs"]) == pytest.approx(1.0)
    assert rouge_l(["the cat sat on the mat", "a b c"], ["the cat is on the mat", "x y"]) == pytest.approx(5 / 12)


def test_dolly_and_alpaca_layouts_load_as_they_are(tmp_path):
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Sum 2 and 2", "context": "", "response": "4", "category": "math"},
        {"instruction": "Name a colour", "context": "primary", "response": "Red", "category": "open_qa"},
        {"instruction": "Name a colour", "context": "primary", "response": "Blue", "category": "open_qa"},  # a prompt twice
        {"instruction": " ", "context": "", "response": "blank prompt", "category": "x"},
    ]))
    ds = load_instruct_dataset(str(dolly), InstructSection())
    assert ds.instructions == ["Sum 2 and 2", "Name a colour"] and ds.contexts == ["", "primary"]
    assert ds.responses == ["4", "Red"] and ds.label_names == ["math", "open_qa"] and ds.labels.tolist() == [0, 1]
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text("instruction,input,output\nGreet,,Hello\nTranslate,chat,cat\n")
    ds = load_instruct_dataset(str(alpaca), InstructSection())
    assert ds.contexts == ["", "chat"] and ds.responses == ["Hello", "cat"] and ds.label_names == [""]
    with pytest.raises(FedtuneError, match=r"instruct.response_column .answer. is not a column .* available: instruction, input, output"):
        load_instruct_dataset(str(alpaca), InstructSection(response_column="answer"))


def test_chatterbot_is_embedded_with_its_categories():
    ds = load_instruct_dataset("chatterbot", InstructSection())
    assert len(ds) == 749 and len(ds.label_names) == 21 and "trivia" in ds.label_names
    assert len(set(zip(ds.instructions, ds.contexts))) == len(ds)  # no prompt twice: none both trained and held out


def test_test_source_is_the_held_out_set(tmp_path, tiny_lm):
    held_out = tmp_path / "test.jsonl"
    held_out.write_text("\n".join(json.dumps({"instruction": f"Question {i}?", "response": f"Answer {i}."}) for i in range(5)))
    config = instruct_config(tmp_path, tiny_lm, data={"test_source": str(held_out), "test_size": 0, "train_size": 50})
    train, test = load_splits(config)
    assert test.instructions == [f"Question {i}?" for i in range(5)] and len(train) == 50


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_on_the_instruction_task(tmp_path, tiny_lm, name):
    """Two federated rounds in process (server and three clients, the real wire
    checks): every uplink is valid, the global model moves, and for the gradient
    methods the held-out response loss falls."""
    sections = {"flora": {"client_ranks": [2, 4, 4]}} if METHODS[name].heterogeneous_ranks else {}
    if name == "fedkseed":
        sections = {"fedkseed": {"num_seeds": 64}, "train": {"local_steps": 6, "lr": 1e-3}}
    config = instruct_config(tmp_path, tiny_lm, federation={"method": name}, **sections)
    server, learner = get_method(config), load_model(config)
    server.server_init(learner)
    test = load_splits(config)[1]
    before = learner.evaluate(server.server_model(), test, 8)
    weights = [p.detach().clone() for p in server.server_model().parameters()]
    states, store = {c: {} for c in range(3)}, ReplicaStore()
    for rnd in (1, 2):
        updates = []
        for c in range(3):
            job = ClientJob(c, client_data(config, c), seed=rnd * 10 + c, state=states[c], replicas=store)
            result = server.client_train(load_model(config), server.server_downlink(c), job)
            assert uplink_rejection(server, result.tensors, client=c, rnd=rnd, partition=len(job.data)) is None
            updates.append(ClientUpdate(c, result.tensors, result.num_examples))
        fedavg(server, updates)
    after = learner.evaluate(server.server_model(), test, 8)
    assert any(not torch.equal(w, p) for w, p in zip(weights, server.server_model().parameters()))
    assert 0 <= after.score <= 1 and len(after.generations) == 8 and after.perplexity == pytest.approx(np.exp(after.loss))
    if name != "fedkseed":  # zeroth-order steps this small move the loss by less than noise
        assert after.loss < before.loss


@pytest.mark.parametrize("name", ["fedit", "fedkseed"])
def test_export_reloads_and_generates_identically(tmp_path, tiny_lm, name):
    config = instruct_config(tmp_path, tiny_lm, federation={"method": name}, fedkseed={"num_seeds": 64})
    server, learner = get_method(config), load_model(config)
    server.server_init(learner)
    job = ClientJob(0, client_data(config, 0), seed=1)
    fedavg(server, [ClientUpdate(0, server.client_train(load_model(config), server.server_downlink(0), job).tensors, 30)])
    test = load_splits(config)[1].subset(range(6))
    expected = learner.generate(server.server_model(), test, batch_size=3, progress=False)

    out = tmp_path / "export"
    server.export(out)
    info = json.loads((out / "fedtune.json").read_text())
    assert info["task"] == "instruct" and info["template"] == "chat"
    base = AutoModelForCausalLM.from_pretrained(info["base_model"] or out)
    model = (PeftModel.from_pretrained(base, out) if (out / "adapter_config.json").is_file() else base).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    outputs = []
    for instruction in test.instructions:  # one prompt at a time, as a user would, no fedtune code
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = model.generate(**prompt, max_new_tokens=info["max_new_tokens"], do_sample=False)
        outputs.append(tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert outputs == expected
    with torch.no_grad():  # what was exported is the trained model, not the base one
        trained, fresh = model(**prompt).logits, load_model(config).model(**prompt).logits
    assert not torch.allclose(trained, fresh, atol=1e-4)


@pytest.mark.integration
def test_instruction_run_through_flower(tmp_path, tiny_lm, capsys):
    """The real stack (Flower simulation) on the instruction task, Dirichlet over
    categories: the response loss every round, Rouge-L at the zero-shot model, every
    instruct.generate_every rounds and the last, and the sample generations on disk."""
    config = instruct_config(tmp_path, tiny_lm, run={"rounds": 3}, instruct={"generate_every": 2},
                             partition={"scheme": "dirichlet", "alpha": 0.5})
    run_dir = create_run_dir(config)
    summary = run_simulation(config, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["metric"] == "rouge_l" for r in rows)
    assert ["score" in r for r in rows] == [True, False, True, True]
    assert all(r["perplexity"] == pytest.approx(np.exp(r["loss"])) for r in rows)
    assert summary.metric == "rouge_l" and summary.final_score == rows[3]["score"] and summary.majority_score is None
    assert summary.zero_shot_loss == rows[0]["loss"] and summary.final_loss == rows[3]["loss"]
    samples = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    test = load_splits(config)[1]
    assert len(samples) == 8 and [s["reference"] for s in samples] == test.responses[:8]
    assert set(samples[0]) == {"prompt", "reference", "zero_shot", "final"} and test.instructions[0] in samples[0]["prompt"]
    assert (run_dir / "rouge_l_vs_bytes.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "Rouge-L" in out and "perplexity" in out and "accuracy" not in out


def test_dp_sgd_clips_each_example_of_a_padded_batch(tmp_path, tiny_lm):
    """DP-SGD on the instruction task: one step on a batch of responses of different
    lengths (right-padded) is the mean of each example's clipped gradient, each
    computed alone and unpadded, as the analysis of sample-level DP requires."""
    config = instruct_config(tmp_path, tiny_lm)
    learner, data, clip = load_model(config), client_data(config, 0), 1e-3
    model = wrap_with_lora(learner, config.lora, 0)
    with torch.no_grad():  # a non-zero lora_B, so that lora_A has a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    before, idx = trainable_state(model), np.arange(4)
    assert len({sum(len(part) for part in learner.example_ids(data, i)) for i in idx}) > 1  # padding is exercised
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in idx:
        grads = torch.autograd.grad(learner.loss(model, data, [i])[0], list(params.values()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        assert norm > clip
        for n, g in zip(params, grads):
            expected[n] -= 0.1 * g * clip / norm / len(idx)
    forward, optimizer = make_private(model, torch.optim.SGD(list(params.values()), lr=0.1), DPSGD(0.0, clip), 4)
    model.train()
    optimizer.zero_grad()
    learner.loss(forward, data, idx)[0].backward()
    optimizer.step()
    forward.remove_hooks()
    for n, p in params.items():
        torch.testing.assert_close(p.detach() - before[n], expected[n], rtol=1e-3, atol=5e-8)  # the whole step is at most lr * clip = 1e-4 long


def test_an_encoder_is_refused_for_instruction_tuning(tmp_path):
    config = instruct_config(tmp_path, "minilm")
    with pytest.raises(FedtuneError, match=r"model.name='minilm' is a bert model, not a decoder-only LM: task.kind = 'instruct' needs one"):
        load_model(config)
