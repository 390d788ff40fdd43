"""Training configs: valid files load, and every kind of mistake is named before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mupd.cli import main
from mupd.train.config import TrainConfigError, config_from_dict, load_config

GOOD = """
output: runs/her2
model: {name: tiny}
data:
  store: stores/her2st-C
  task: translate
  targets: [HER2, ER]
  conditions: [rna]
  exclude_patients: [A, B]
optim: {max_steps: 100, batch_size: 4, learning_rate: 2.0e-4, warmup_steps: 10}
checkpoint: {every: 50, keep: 2}
"""


def test_yaml_and_json_load(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.data.targets == ["HER2", "ER"] and config.optim.learning_rate == 2e-4
    assert config.checkpoint.keep == 2 and config.optim.ema_decay == 0.9999  # default kept
    as_json = tmp_path / "cfg.json"
    as_json.write_text(json.dumps(config.to_dict()))
    assert load_config(as_json) == config


@pytest.mark.parametrize("raw, message", [
    ({"output": "o", "data": {"store": "s", "stroe": 1}}, r"config\.data: unknown key\(s\) 'stroe'"),
    ({"output": "o", "optimizer": {}, "data": {"store": "s"}}, r"unknown key\(s\) 'optimizer'"),
    ({"output": "o", "data": {"store": "s"}, "optim": {"max_steps": "many"}},
     r"config\.optim\.max_steps must be int, got 'many'"),
    ({"output": "o", "data": {"store": "s"}, "optim": {"batch_size": 0}}, "optim.batch_size must be >= 1"),
    ({"output": "o", "data": {"store": "s", "task": "segment"}}, "data.task 'segment' is not one of"),
    ({"output": "o", "data": {"store": "s", "conditions": ["smell"]}}, r"data.conditions \['smell'\] unknown"),
    ({"output": "o", "data": {"store": "s", "patients": ["A"], "exclude_patients": ["A"]}},
     "both included and excluded"),
    ({"output": "o"}, "data.store is required"),
    ({"data": {"store": "s"}}, "output is required"),
    ({"output": "o", "data": {"store": "s"}, "optim": {"ema_decay": 1.5}}, "ema_decay must be in"),
])
def test_mistakes_are_named(raw, message):
    with pytest.raises(TrainConfigError, match=message):
        config_from_dict(raw)


def test_cli_reports_bad_config_cleanly(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("keep: 2", "keep: 2, kep: 3"))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "'kep'" in err and "Traceback" not in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path.write_text("output: [unclosed")
    assert main(["train", "--config", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "resources" / "configs")
                                          .glob("*.yaml")), ids=lambda p: p.name)
def test_committed_recipes_load_and_name_local_files(recipe):
    """Every recipe in resources/configs passes the config checks, and a VAE codec it names
    is a folder of the checkout (no hub id)."""
    from mupd.models.codec import build_codec

    config = load_config(recipe)
    codec = config.model.overrides.get("codec")
    if codec and codec.get("path"):
        folder = Path(__file__).parents[1] / codec["path"]
        assert folder.is_dir(), f"{recipe.name}: codec folder {folder} is missing"
        built = build_codec({**codec, "path": str(folder)})
        assert (built.latent_channels, built.downsample) in {(4, 4), (32, 8)}  # vae-tiny, TAEF2
