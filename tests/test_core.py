"""The shared core: config resolution, the SliceSet type, windowing and the CLI shell."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import make_toy_slice_set
from toolkit.cli import app
from toolkit.config import load_config, parse_overrides, save_config
from toolkit.errors import ToolkitError
from toolkit.sliceset import SliceSet
from toolkit.transforms import unwindow_hu, window_hu

runner = CliRunner()


def test_config_layers_defaults_file_and_overrides(tmp_path):
    cfg = load_config("demo", parse_overrides(["train.epochs=7", "seed=3", "data.windows=[[40,400],[300,1500]]"]))
    assert cfg.train.epochs == 7 and cfg.seed == 3
    assert parse_overrides(["train.lr=1e-4"]) == {"train": {"lr": "1e-4"}}  # typed when loaded (test_config)
    assert cfg.data.size == 128  # from demo.yaml
    assert cfg.train.weight_decay == 1e-4  # dataclass default, absent from the yaml
    assert cfg.data.windows == [[40, 400], [300, 1500]]
    saved = yaml.safe_load(save_config(cfg, tmp_path / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 7 and saved["seed"] == 3


def test_config_rejects_unknown_keys_and_names(tmp_path):
    with pytest.raises(ToolkitError, match="unknown config key 'train.epoch'"):
        load_config("demo", parse_overrides(["train.epoch=3"]))
    with pytest.raises(ToolkitError, match="no config named 'nope'"):
        load_config("nope")
    with pytest.raises(ToolkitError, match="section.key=value"):
        parse_overrides(["epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ToolkitError, match="not valid YAML"):
        load_config(bad)


def test_workspace_config_is_remembered(tmp_path):
    result = runner.invoke(app, ["status", "--workdir", str(tmp_path)])
    assert result.exit_code == 0
    from toolkit.cli_common import setup

    setup(tmp_path, "demo", None)
    assert (tmp_path / "config.yaml").exists()
    _, cfg = setup(tmp_path, None, None)
    assert cfg.data.size == 128  # later commands default to the workspace's config


def test_slice_set_round_trip_memory_maps(tmp_path):
    s = make_toy_slice_set(n_patients=6, slices_per_patient=2, size=16)
    s.save(tmp_path / "set")
    loaded = SliceSet.load(tmp_path / "set")
    assert isinstance(loaded.images, np.memmap)
    assert loaded.images.dtype == np.int16 and loaded.images.shape == (12, 16, 16)
    np.testing.assert_array_equal(np.asarray(loaded.images), s.images)
    assert list(loaded.table["patient_id"]) == list(s.table["patient_id"])
    assert loaded.meta["split_hash"] == "toy-split"
    sub = loaded.subset(loaded.table["split"].eq("test").to_numpy())
    assert set(sub.table["split"]) == {"test"} and len(sub.images) == len(sub.table)
    with pytest.raises(ToolkitError, match="pass --force"):
        s.save(tmp_path / "set")


def test_slice_set_validates_shapes(tmp_path):
    s = make_toy_slice_set(n_patients=4, slices_per_patient=1, size=8)
    with pytest.raises(ToolkitError, match="4 images but 3 manifest rows"):
        SliceSet(s.images, s.table.iloc[:3])
    with pytest.raises(ToolkitError, match="no slice set at"):
        SliceSet.load(tmp_path / "missing")


def test_window_maps_hu_to_unit_range_and_back():
    hu = np.array([[-1000, -160, 40, 240, 3000]], dtype=np.int16)
    x = window_hu(hu, [(40, 400), (300, 1500)])
    assert x.shape == (2, 1, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], [0, 0, 0.5, 1, 1])
    np.testing.assert_array_equal(unwindow_hu(x[0], (40, 400)), [[-160, -160, 40, 240, 240]])


def test_every_command_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = ["demo-data", "prepare", "segment", "crop", "status", "gen", "train", "compare", "explain", "predict",
                "demo"]
    for command in commands:
        assert command in result.output, f"`toolkit {command}` is not registered"
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0, sub.output
        assert "--workdir" in sub.output or command == "predict"


def test_bad_set_override_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["demo-data", "--workdir", str(tmp_path), "--set", "phantom.nope=1"])
    assert result.exit_code == 2
    assert "error: unknown config key 'phantom.nope'" in result.output
    assert "Traceback" not in result.output

