"""Instruction tuning: supervised fine-tuning of a causal LM on (instruction,
optional context, response) examples, judged by what it generates.

- Prompts are built with the tokenizer's chat template (SmolLM2-Instruct has one),
  or with ``instruct.template``, a format string of {instruction} and {context}.
- The loss is the cross-entropy of the response tokens only (and the end-of-turn
  token that closes them): the prompt's tokens carry none. An example's loss is
  the mean over its response tokens; a batch's, the mean over its examples (the
  per-example loss DP-SGD clips).
- Evaluation: held-out response loss and perplexity every round (teacher forced,
  cheap), and Rouge-L (Google's rouge-score, as FedKSeed reports it) of greedy
  generations on a fixed held-out subset, batched with the KV cache.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from fedtune.config import InstructSection, ModelSection
from fedtune.data import read_frame
from fedtune.devices import DTYPES, autocast, computing_on, device_of
from fedtune.errors import FedtuneError
from fedtune.models import is_decoder_only, resolve_model_path
from fedtune.tasks import EvalResult, Generation

CHATTERBOT = "chatterbot"  # data.source: the English part of chatterbot-corpus (BSD-3)
IGNORE = -100  # a label position that carries no loss


@dataclass(frozen=True, eq=False)
class InstructDataset:
    instructions: list[str]
    contexts: list[str]  # "" where an example has none
    responses: list[str]
    labels: np.ndarray  # int64 category of each example: partitions and tables use it as a label
    label_names: list[str]  # the categories

    def __len__(self) -> int:
        return len(self.instructions)

    def subset(self, indices: Sequence[int] | np.ndarray) -> InstructDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return InstructDataset([self.instructions[i] for i in idx], [self.contexts[i] for i in idx],
                               [self.responses[i] for i in idx], self.labels[idx], self.label_names)


def chatterbot_frame() -> pd.DataFrame:
    """The English conversations of chatterbot-corpus as (instruction, response,
    category) rows: each conversation's first turn and its reply; the category is
    the file's (ai, tech_support, trivia, ...)."""
    import yaml  # only this source needs it

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError("data.source=chatterbot needs the chatterbot-corpus package: "
                           "run pip install --no-deps chatterbot-corpus==1.3.3")
    rows = []
    for path in sorted((Path(list(spec.submodule_search_locations)[0]) / "data" / "english").glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            if len(turns) >= 2 and all(isinstance(t, str) and t.strip() for t in turns[:2]):
                rows.append({"instruction": turns[0].strip(), "response": turns[1].strip(), "category": path.stem})
    return pd.DataFrame(rows)


def load_instruct_dataset(source: str, cfg: InstructSection, split: str = "train") -> InstructDataset:
    """``source``'s (instruction, context, response, category) examples: blank
    instructions and responses dropped, and every prompt kept once (its first
    response), so no held-out prompt is also trained on."""
    path = Path(source).expanduser()
    frame = chatterbot_frame() if source == CHATTERBOT else read_frame(path, split)
    columns = list(frame.columns)
    context = cfg.context_column or next((c for c in ("context", "input") if c in columns), None)
    response = cfg.response_column or next((c for c in ("response", "output") if c in columns), None)
    available = f"available: {', '.join(map(str, columns))}"
    if response is None:
        raise FedtuneError(f"instruct.response_column: {source} has neither a 'response' nor an 'output' column; {available}")
    for key, column in (("instruct.instruction_column", cfg.instruction_column), ("instruct.response_column", response),
                        ("instruct.context_column", context)):
        if column is not None and column not in columns:
            raise FedtuneError(f"{key} {column!r} is not a column of {source}; {available}")

    def text(column: str | None) -> pd.Series:
        return frame[column].fillna("").astype(str).str.strip() if column in columns else pd.Series("", index=frame.index)

    table = pd.DataFrame({"instruction": text(cfg.instruction_column), "context": text(context),
                          "response": text(response), "category": text(cfg.category_column)})
    table = table[(table.instruction != "") & (table.response != "")].drop_duplicates(["instruction", "context"])
    if table.empty:
        raise FedtuneError(f"data.source {source} has no rows with both an instruction and a response")
    names = sorted(table.category.unique())
    labels = table.category.map({n: i for i, n in enumerate(names)}).to_numpy(dtype=np.int64)
    return InstructDataset(table.instruction.tolist(), table.context.tolist(), table.response.tolist(), labels, names)


def load_language_model(model_cfg: ModelSection, cfg: InstructSection, device: torch.device = torch.device("cpu")) -> LanguageModel:
    """A causal LM in eval mode, on the CPU, that trains, evaluates and generates on
    ``device`` (base weights in ``model.dtype``), and how it reads and writes instructions."""
    path = resolve_model_path(model_cfg)
    try:
        config = AutoConfig.from_pretrained(path)
        if not is_decoder_only(config):
            raise FedtuneError(f"model.name={model_cfg.name!r} is a {config.model_type} model, not a decoder-only LM: "
                               "task.kind = 'instruct' needs one (such as 'smollm2')")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[model_cfg.dtype])
    except FedtuneError:
        raise
    except Exception as exc:
        raise FedtuneError(f"cannot load model from {path} as a causal LM: {exc}") from exc
    if tokenizer.eos_token is None:
        raise FedtuneError(f"cannot load model from {path}: its tokenizer has no eos token to end a response")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.template == "chat" and not tokenizer.chat_template:
        raise FedtuneError(f"instruct.template = 'chat' but {path}'s tokenizer has no chat template; "
                           "give a format string of {instruction} and {context}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LanguageModel(model.eval(), tokenizer, model_cfg.max_length, cfg.template, cfg.max_new_tokens, cfg.generate_size,
                         device, DTYPES[model_cfg.dtype])


@dataclass
class LanguageModel:
    """The instruct task's Learner (fedtune/tasks): a causal LM fine-tuned on
    instructions; how its examples become tokens, its loss, its evaluation and its
    generations."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    template: str  # "chat": the tokenizer's chat template; else a format string of {instruction}, {context}
    max_new_tokens: int
    generate_size: int  # held-out examples generated for Rouge-L (0: all)
    device: torch.device = torch.device("cpu")  # where it trains, evaluates and generates
    dtype: torch.dtype = torch.float32  # of the frozen base weights
    head_name = None  # nothing is trained in full beside the adapters
    metric = "rouge_l"

    def evaluate(self, model: nn.Module, data: InstructDataset, batch_size: int, generate: bool = True) -> EvalResult:
        """Response loss and perplexity on ``data``; with ``generate``, Rouge-L of the
        greedy responses to its first generate_size prompts."""
        with computing_on(model, self.device):
            loss = self.response_loss(model, data, batch_size)
            if not generate:
                return EvalResult(score=None, loss=loss, perplexity=perplexity(loss))
            shown = data.subset(np.arange(min(self.generate_size or len(data), len(data))))
            outputs = self.generate(model, shown, batch_size)
        samples = tuple(Generation(self.prompt(i, c), r, o) for i, c, r, o in
                        zip(shown.instructions, shown.contexts, shown.responses, outputs))
        return EvalResult(score=rouge_l(outputs, shown.responses), loss=loss, perplexity=perplexity(loss), generations=samples)

    def baseline(self, train: InstructDataset, test: InstructDataset) -> None:
        return None  # no trivial generator to compare with: the zero-shot model is the baseline

    def export_info(self, directory: Path, base_model: str | None) -> None:
        info = {"task": "instruct", "base_model": base_model, "template": self.template, "max_length": self.max_length,
                "max_new_tokens": self.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        (directory / "fedtune.json").write_text(json.dumps(info, indent=2) + "\n")

    def prompt(self, instruction: str, context: str) -> str:
        if self.template != "chat":
            return self.template.format(instruction=instruction, context=context)
        user = f"{instruction}\n\n{context}" if context else instruction
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)

    def example_ids(self, data: InstructDataset, i: int) -> tuple[list[int], list[int]]:
        """(prompt tokens, response tokens closed by the end-of-turn token), cut to
        max_length: the response's end first, then the prompt's beginning."""
        prompt = self.tokenizer(self.prompt(data.instructions[i], data.contexts[i]), add_special_tokens=False)["input_ids"]
        response = self.tokenizer(data.responses[i], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        response = response[: max(1, self.max_length - min(len(prompt), self.max_length // 2))]
        return prompt[-(self.max_length - len(response)):], response

    def encode(self, data: InstructDataset, idx: Sequence[int], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """A right-padded batch on ``device``: input_ids, attention_mask, and labels
        that are the response tokens where the model predicts them, IGNORE elsewhere."""
        pairs = [self.example_ids(data, i) for i in idx]
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), width), self.tokenizer.pad_token_id)
        labels = torch.full((len(pairs), width), IGNORE)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (prompt, response) in enumerate(pairs):
            n = len(prompt) + len(response)
            ids[row, :n] = torch.tensor(prompt + response)
            labels[row, len(prompt) : n] = torch.tensor(response)
            mask[row, :n] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def token_losses(self, forward: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: the summed cross-entropy of its response tokens, and their number."""
        with autocast(batch["input_ids"].device, self.dtype):
            logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
        counted = targets != IGNORE
        return (losses * counted).sum(dim=1), counted.sum(dim=1)

    def loss(self, forward: nn.Module, data: InstructDataset, idx: Sequence[int]) -> tuple[torch.Tensor, int]:
        """The batch's mean over examples of each one's mean response-token loss, and
        the token positions it processed."""
        batch = self.encode(data, idx, device_of(forward))
        sums, counts = self.token_losses(forward, batch)
        return (sums / counts.clamp(min=1)).mean(), batch["input_ids"].numel()

    @torch.no_grad()
    def response_loss(self, model: nn.Module, data: InstructDataset, batch_size: int) -> float:
        """Mean cross-entropy per response token over ``data`` (its exp is the perplexity)."""
        model.eval()
        order = np.argsort([len(r) + len(i) for r, i in zip(data.responses, data.instructions)], kind="stable")
        total, tokens = 0.0, 0
        for start in range(0, len(order), batch_size):
            sums, counts = self.token_losses(model, self.encode(data, order[start : start + batch_size], device_of(model)))
            total, tokens = total + float(sums.sum()), tokens + int(counts.sum())
        return total / max(tokens, 1)

    @torch.no_grad()
    def generate(self, model: nn.Module, data: InstructDataset, batch_size: int, progress: bool = True) -> list[str]:
        """Greedy responses to ``data``'s prompts, in its order; batched, left-padded,
        with the KV cache; at most instruct.max_new_tokens tokens each."""
        model.eval()
        prompts = [self.tokenizer(self.prompt(i, c), add_special_tokens=False)["input_ids"][-(self.max_length - 1):]
                   for i, c in zip(data.instructions, data.contexts)]
        out = [""] * len(prompts)
        order = np.argsort([len(p) for p in prompts], kind="stable")
        for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", leave=False, disable=not progress):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            device = device_of(model)
            ids = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
            with autocast(device, self.dtype):
                generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                           do_sample=False, use_cache=True, pad_token_id=self.tokenizer.pad_token_id,
                                           eos_token_id=self.tokenizer.eos_token_id)
            for row, i in enumerate(idx):
                out[i] = self.tokenizer.decode(generated[row, width:].tolist(), skip_special_tokens=True).strip()
        return out


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean Rouge-L F-measure (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer  # loads nltk: only where generations are scored

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
