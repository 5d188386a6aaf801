"""Typed config: recipes, dotted overrides, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from s2bnn.config import Config, config_from_dict, load_config, save_config
from s2bnn.errors import ConfigError


def _write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_and_overrides_merge(tmp_path):
    path = _write(tmp_path, "output_dir: runs/x\nepochs: 3\noptim:\n  lr: 0.001\n")
    cfg = load_config(path, ["epochs=5", "data.limit=100", "method.teacher.path=t.pt"])
    assert isinstance(cfg, Config)
    assert cfg.epochs == 5 and cfg.optim.lr == 0.001
    assert cfg.data.limit == 100 and cfg.method.teacher.path == "t.pt"
    assert cfg.batch_size == 256  # schema default survives


def test_unknown_key_names_key_and_known_keys(tmp_path):
    path = _write(tmp_path, "output_dir: runs/x\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*known keys under optim: .*lr"):
        load_config(path)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        load_config(None, ["output_dir=x", "epoch=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["output_dir=x", "batch_size=lots"])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match="method.name.*allowed values: mocov2, s2bnn, seed, dino"):
        load_config(None, ["output_dir=x", "method.name=simclr"])


def test_non_positive_rejected():
    with pytest.raises(ConfigError, match="epochs"):
        load_config(None, ["output_dir=x", "epochs=0"])


def test_missing_output_dir_is_explained():
    with pytest.raises(ConfigError, match="output_dir"):
        load_config(None, [])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(_write(tmp_path, "epochs: [1,\n"))


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["output_dir=x", "epochs"])


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(None, ["output_dir=runs/y", "seed=7", "data.augment.crop_scale=[0.3,1.0]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_from_dict({"output_dir": "runs/y", "seed": 7}).seed == 7


def test_bad_crop_scale():
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(None, ["output_dir=x", "data.augment.crop_scale=[0.9,0.1]"])


def test_cli_reports_config_error_in_one_line(tmp_path, capsys):
    from s2bnn.cli import main

    path = _write(tmp_path, "output_dir: runs/x\nbogus: 1\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2bnn: error: unknown config key 'bogus'")
    assert "\n" not in err and "Traceback" not in err
