import pytest

from fedtune.config import RunConfig, check_override, from_dict, load_config
from fedtune.errors import FedtuneError


def test_defaults_are_valid_and_typed():
    config = load_config(None)
    assert config == RunConfig()
    assert config.partition.num_clients == 4 and config.model.name == "smollm2"


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[run]\nrounds = 5\n[lora]\nrank = 4\ntarget_modules = ["q_proj"]\n')
    config = load_config(path, ["lora.rank=16", "train.lr=1e-3", "data.source=my file.csv", "run.name=x"])
    assert config.run.rounds == 5
    assert config.lora.rank == 16 and config.lora.target_modules == ["q_proj"]
    assert config.train.lr == 1e-3
    assert config.data.source == "my file.csv"  # bare words are strings


@pytest.mark.parametrize(
    "text, name",
    [("nan", "nan"), ("inf", "inf"), ("123", "123"), ("1e3", "1e3"), ("true", "true"), ("[1, 2]", "[1, 2]"),
     ('"quoted"', "quoted"), ("'single'", "single"), ('"123"', "123"), ("my run", "my run")],
)
def test_a_str_key_takes_the_override_text(text, name):
    # TOML reads nan, 123 and true as a float, an int and a bool; run.name is a str.
    assert load_config(None, [f"run.name={text}"]).run.name == name
    check_override(f"run.name={text}")  # the `compare` grid's check of each override


def test_other_keys_still_read_override_text_as_toml():
    config = load_config(None, ["run.rounds=7", "train.lr=2e-3", "run.centralized_baseline=true", "flora.client_ranks=[1, 2, 3, 4]",
                                "federation.method=flora", "hardware.mix={phone = 1.0}"])
    assert (config.run.rounds, config.train.lr, config.run.centralized_baseline) == (7, 2e-3, True)
    assert config.flora.client_ranks == [1, 2, 3, 4] and config.hardware.mix == {"phone": 1.0}
    with pytest.raises(FedtuneError, match="config key run.rounds must be int, got str 'seven'"):
        check_override("run.rounds=seven")
    with pytest.raises(FedtuneError, match="config key lora.target_modules must be a list of str"):
        check_override("lora.target_modules=nan")


def test_int_accepted_for_float():
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"nope": {}}, "[nope]"),
        ({"run": {"roundz": 3}}, "run.roundz"),
        ({"run": {"rounds": "3"}}, "run.rounds"),
        ({"run": {"rounds": True}}, "run.rounds"),
        ({"run": {"rounds": 0}}, "run.rounds"),
        ({"run": {"target_accuracy": 1.5}}, "run.target_accuracy"),
        ({"run": {"target_accuracy": -0.1}}, "run.target_accuracy"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"lora": {"rank": -2}}, "lora.rank"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"physical_batch_size": -1}}, "train.physical_batch_size"),
        ({"partition": {"scheme": "random"}}, "partition.scheme"),
        ({"partition": {"alpha": 0.0}}, "partition.alpha"),
        ({"partition": {"num_clients": 0}}, "partition.num_clients"),
        ({"federation": {"clients_per_round": 9}}, "federation.clients_per_round"),
        ({"data": {"prompt": "no placeholder"}}, "data.prompt"),
        ({"data": {"label_words": [" a"]}}, "data.label_words"),
        ({"run": 3}, "[run]"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(FedtuneError) as info:
        from_dict(raw)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FedtuneError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds=")
    with pytest.raises(FedtuneError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(FedtuneError, match="section.key=value"):
        load_config(None, ["rounds=3"])
