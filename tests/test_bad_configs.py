"""Bad configs, table-driven: each is refused by `fedtune run` with one line naming
the key and exit code 2, before any model or data loads."""

import pytest

from fedtune.cli import main

BAD = [
    ("[run]\nrounds = 0", "run.rounds"),
    ("[run]\nrounds = 'three'", "run.rounds"),
    ("[run]\ntarget_accuracy = 1.2", "run.target_accuracy"),
    ("[run]\nseeds = 1", "run.seeds"),
    ("[model]\nmax_length = 4", "model.max_length"),
    ("[data]\nprompt = 'no placeholder'", "data.prompt"),
    ("[data]\nlabel_words = [' a']", "data.label_words"),
    ("[partition]\nscheme = 'random'", "partition.scheme"),
    ("[partition]\nalpha = 0", "partition.alpha"),
    ("[federation]\nclients_per_round = 9", "federation.clients_per_round"),
    ("[federation]\nmax_update_norm = -1", "federation.max_update_norm"),
    ("[federation]\ntimeout_s = 0", "federation.timeout_s"),
    ("[train]\nbatch_size = 0", "train.batch_size"),
    ("[train]\nlr = -0.1", "train.lr"),
    ("[train]\noptimizer = \"adam\"", "train.optimizer"),
    ("[lora]\ndropout = 1.0", "lora.dropout"),
    ("[flora]\nclient_ranks = [4, 8]", "flora.client_ranks"),
    ("[fedkseed]\nencoding = 'dense'", "fedkseed.encoding"),
    ("[fedkseed]\nnum_seeds = 0", "fedkseed.num_seeds"),
    ("[compression]\nup = ['int9']", "compression.up"),
    ("[compression]\ndown = ['topk:0.1']", "compression.down"),
    ("[privacy]\nmode = 'client'\nepsilon = 0", "privacy.epsilon"),
    ("[privacy]\nmode = 'client'\ndelta = 1", "privacy.delta"),
    ("[privacy]\nmode = 'sample'\nnoise_multiplier = -1", "privacy.noise_multiplier"),
    ("[hardware]\nmix = {phone = 0.6, laptop = 0.6}", "hardware.mix"),
    ("[hardware]\ndevices = ['phone', 'abacus', 'phone', 'phone']", "hardware.devices"),
    ("[simulation]\ncpus_per_client = 0", "simulation.cpus_per_client"),
    ("[simulation]\nray_address = 'ray://head:10001'", "simulation.ray_address"),
    ("[simulation]\nray_address = 'head'", "simulation.ray_address"),
    ("[simulation]\nray_address = 'head:6379'\nmax_parallel_clients = 2", "simulation.max_parallel_clients"),
    ("[nope]\nx = 1", "[nope]"),
    ("[run\nrounds = 1", "not valid TOML"),
]


@pytest.mark.parametrize(("toml", "key"), BAD, ids=[key for _, key in BAD])
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, toml, key):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert key in err, err
