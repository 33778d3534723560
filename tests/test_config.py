"""Config: presets, files on top of presets, overrides, and one-line errors naming the key."""

import pytest

from stemdl.harness.config import RunConfig, load_config, presets
from stemdl.harness.errors import StemdlError


def test_every_preset_loads_and_derives_batch_and_lr():
    for name in presets():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
    ref = load_config("reference")
    assert (ref.model, ref.image_size, ref.batch_size, ref.view) == ("resnet50", 128, 32, "single")
    assert ref.global_batch_size(8) == 256 and ref.learning_rate(8) == pytest.approx(8e-3)


def test_file_starts_from_its_preset_and_command_line_wins(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: smoke\nepochs: 7\nbase_lr: 0.01\n")
    cfg = load_config(str(path), {"epochs": 9, "seed": None})
    assert (cfg.epochs, cfg.base_lr, cfg.image_size) == (9, 0.01, load_config("smoke").image_size)
    assert cfg.seed == load_config("smoke").seed, "None means: not given on the command line"


@pytest.mark.parametrize("overrides, key", [({"epochs": "two"}, "epochs"), ({"amp": 1}, "amp"),
                                            ({"batch_size": 2.5}, "batch_size"), ({"target": 1.5}, "target"),
                                            ({"view": "all"}, "view"), ({"nope": 1}, "nope"),
                                            ({"submission_division": "closed", "target": 0.5}, "target")])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(StemdlError, match=f"'{key}'"):
        load_config("smoke", overrides)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(StemdlError, match="neither a preset"):
        load_config(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(StemdlError, match="mapping"):
        load_config(str(bad))
