"""Config: presets, files on top of presets, sections, overrides, and one-line errors naming the key."""

import pytest

from stemdl.harness.config import RunConfig, load_config, parse_set
from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.workload import WORKLOAD


def load(name="default", overrides=None):
    return load_config(WORKLOAD, name, overrides)


def test_every_preset_loads_and_derives_batch_and_lr():
    for name in WORKLOAD.presets():
        cfg = load(name)
        assert isinstance(cfg, RunConfig) and cfg.benchmark == "stemdl"
        assert cfg.harness.target == WORKLOAD.target_value and cfg.harness.eval_every == WORKLOAD.eval_every
    ref = load("reference")
    w, h = ref.workload, ref.harness
    assert (w.model, w.image_size, h.batch_size, w.view) == ("resnet50", 128, 32, "single")
    assert ref.global_batch_size(8) == 256 and ref.learning_rate(8) == pytest.approx(8e-3)


def test_file_starts_from_its_preset_and_command_line_wins(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: smoke\nepochs: 7\nbase_lr: 0.01\nworkload:\n  model: resnet18\n")
    cfg = load(str(path), {"epochs": 9, "seed": None})
    assert (cfg.harness.epochs, cfg.harness.base_lr) == (9, 0.01)
    assert (cfg.workload.model, cfg.workload.image_size) == ("resnet18", load("smoke").workload.image_size)
    assert cfg.harness.seed == load("smoke").harness.seed, "None means: not given on the command line"


def test_keys_bare_dotted_or_nested_reach_their_section():
    cfg = load("smoke", {"harness.batch_size": 3, "workload.view": "single", "loss": "focal"})
    assert (cfg.harness.batch_size, cfg.workload.view, cfg.workload.loss) == (3, "single", "focal")
    assert set(cfg.to_dict()) == {"benchmark", "harness", "workload"}
    assert cfg.flat()["harness.batch_size"] == 3 and cfg.flat()["workload.loss"] == "focal"


@pytest.mark.parametrize("overrides, key", [({"epochs": "two"}, "epochs"), ({"amp": 1}, "amp"),
                                            ({"batch_size": 2.5}, "batch_size"), ({"target": 1.5}, "target"),
                                            ({"view": "all"}, "view"), ({"nope": 1}, "nope"),
                                            ({"friedel": "half"}, "friedel"),
                                            ({"harness.model": "x"}, "harness.model"),
                                            ({"model": "resnet7"}, "model"), ({"pipeline": "fast"}, "pipeline"),
                                            ({"sampler": "x"}, "sampler"), ({"tasks": "space_group,x"}, "tasks"),
                                            ({"image_size": 7}, "image_size"), ({"seed": -1}, "seed"),
                                            ({"loader_workers": -1}, "loader_workers"),
                                            ({"synth_preset": "huge"}, "synth_preset"),
                                            ({"submission_division": "closed", "target": 0.5}, "target")])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(StemdlError, match=f"'{key}'"):
        load("smoke", overrides)


def test_model_input_channels_follow_the_view_and_the_friedel_split():
    channels = {(view, how): load("smoke", {"view": view, "friedel": how}).workload.in_channels
                for view in ("stack", "single") for how in ("keep", "average", "split")}
    assert channels == {("stack", "keep"): 3, ("stack", "average"): 3, ("stack", "split"): 6,
                        ("single", "keep"): 1, ("single", "average"): 1, ("single", "split"): 2}


def test_a_float_written_as_users_write_it():
    assert load("smoke", parse_set(["base_lr=1e-3"])).harness.base_lr == 1e-3  # YAML 1.1 reads "1e-3" as text


def test_missing_empty_malformed_or_repeating_file(tmp_path):
    with pytest.raises(StemdlError, match="neither a preset"):
        load(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(StemdlError, match="mapping"):
        load(str(bad))
    bad.write_text("")
    with pytest.raises(StemdlError, match="empty"):
        load(str(bad))
    bad.write_text("epochs: 3\nepochs: 4\n")
    with pytest.raises(StemdlError, match="given twice"):
        load(str(bad))


def test_set_items_are_yaml_values():
    assert parse_set(["epochs=3", "workload.view=single", "target=0.5"]) == \
        {"epochs": 3, "workload.view": "single", "target": 0.5}
    with pytest.raises(StemdlError, match="KEY=VALUE"):
        parse_set(["epochs"])
