"""The config: declared once (rules beside the fields), validated once when loaded, shipped in the package."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import make_toy_slice_set
from toolkit import ORGANS
from toolkit.cli import app
from toolkit.config import (
    CONFIG_DIR,
    Config,
    PhantomConfig,
    TrainConfig,
    load_config,
    organ_config,
    organ_train_settings,
    parse_overrides,
    validate,
)
from toolkit.errors import ConfigError, ContractError

REPO = Path(__file__).resolve().parent.parent


def load(name: str, *sets: str) -> Config:
    return load_config(name, parse_overrides(list(sets)))


# ------------------------------------------------------------------ merging
def test_set_changes_one_organ_of_a_mapping_and_keeps_the_others():
    base = load("demo")
    cfg = load("demo", "phantom.prevalence.liver=0.5")
    assert cfg.phantom.prevalence == {**base.phantom.prevalence, "liver": 0.5}
    assert cfg.phantom.prevalence["spleen"] == 0.35  # demo.yaml's, not 0 and not the RSNA default

    # train.organs merges per organ and per key; an empty mapping drops every override.
    cfg = load("demo", "train.organs.liver.image_size=96", "train.organs.kidney.lr=1e-3")
    assert cfg.train.organs == {
        "kidney": {"trainable_blocks": -1, "lr": 1e-3},
        "bowel": {"image_size": 128},
        "liver": {"image_size": 96},
    }
    assert load("demo", "train.organs={}").train.organs == {}


def test_unknown_keys_inside_fixed_key_mappings_are_refused():
    with pytest.raises(ConfigError, match=r"phantom.prevalence has unknown key 'lung'"):
        load("demo", "phantom.prevalence.lung=0.1")
    with pytest.raises(ConfigError, match=r"phantom.high_grade_fraction has unknown key 'bowel'"):
        load("demo", "phantom.high_grade_fraction.bowel=0.1")
    with pytest.raises(ConfigError, match=r"train.organs has unknown organ 'lung'"):
        load("demo", "train.organs.lung.image_size=64")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'"):
        load("demo", "train.epoch=3")


# ------------------------------------------------------------------ YAML quirks
@pytest.mark.parametrize("model", ["gan", "diffusion"])
def test_exponent_without_dot_in_a_yaml_file_is_a_float_and_a_generator_trains_with_it(model, tmp_path):
    from gen.registry import create_generator
    from toolkit.transforms import resize_slices, window_hu

    path = tmp_path / "mine.yaml"
    # YAML 1.1 reads 1e-4 and 2e-4 (no dot) as text; `no` as false.
    path.write_text(
        f"gen:\n  model: {model}\n  mixed_precision: no\n  image_size: 16\n  train_steps: 3\n  batch_size: 8\n"
        "  diffusion:\n    lr: 1e-4\n    unet_channels: [8, 16]\n    layers_per_block: 1\n"
        "    num_train_timesteps: 50\n    sample_steps: 2\n"
        "  gan:\n    lr: 2e-4\n    ngf: 8\n    ndf: 8\n    z_dim: 8\n"
    )
    assert yaml.safe_load(path.read_text())["gen"]["diffusion"]["lr"] == "1e-4"  # the quirk this guards against
    cfg = load_config(path)
    assert cfg.gen.diffusion.lr == 1e-4 and isinstance(cfg.gen.diffusion.lr, float)
    assert cfg.gen.gan.lr == 2e-4 and isinstance(cfg.gen.gan.lr, float)
    assert cfg.gen.mixed_precision == "no"

    store = make_toy_slice_set(n_patients=8, slices_per_patient=4, size=32)
    x = resize_slices(window_hu(store.images)[:, 0], 16)
    gen = create_generator(model, cfg.gen, n_classes=2, seed=0).fit(x, store.labels("liver"))
    out = gen.sample(n_per_class=2, seed=0)
    assert out.shape == (4, 16, 16) and np.isfinite(out).all()


def test_set_values_are_typed_by_the_field():
    cfg = load("default", "train.lr=1e-4", "train.epochs=3.0", "eval.bootstrap=1e3", "train.mixed_precision=no")
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.eval.bootstrap == 1000 and isinstance(cfg.eval.bootstrap, int)
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.weights is None and load("default", "train.weights=null").train.weights is None


# ------------------------------------------------------------------ bad values, every section
@pytest.mark.parametrize(
    "item, key",
    [
        ("seed=-1", "seed"),
        ("phantom.patients=0", "phantom.patients"),
        ("phantom.prevalence.liver=1.5", "phantom.prevalence.liver"),
        ("phantom.image_level_organs=[liver, lung]", "phantom.image_level_organs"),
        ("data.test_fraction=1", "data.test_fraction"),
        ("data.folds=1", "data.folds"),
        ("data.windows=[[40, 0]]", "data.windows[0]"),
        ("data.crop_body=maybe", "data.crop_body"),
        ("gen.diffusion.lr=fast", "gen.diffusion.lr"),
        ("gen.diffusion.sampler=euler", "gen.diffusion.sampler"),
        ("gen.diffusion.unet_channels=[8]", "gen.diffusion.unet_channels"),
        ("gen.gan.ema_decay=1", "gen.gan.ema_decay"),
        ("train.epoch_size=33", "train.epoch_size"),
        ("train.select_on=auc", "train.select_on"),
        ("train.batch_size=2.5", "train.batch_size"),
        ("train.organs.kidney.lr=-1", "train.organs.kidney.lr"),
        ("train.organs.liver.synthetic_ratio=0.5", "train.organs.liver"),
        ("eval.ci=1.5", "eval.ci"),
        ("eval.alpha=often", "eval.alpha"),
        ("eval.bootstrap=0", "eval.bootstrap"),
        ("eval.baseline=[1]", "eval.baseline"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(item, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        load("default", item)
    message = str(info.value)
    assert "\n" not in message
    assert "must" in message or "unknown" in message or "cannot" in message


def test_bad_eval_value_in_a_file_stops_any_command_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("eval:\n  ci: 95\n")
    result = CliRunner().invoke(app, ["demo-data", "-w", str(tmp_path / "ws"), "-c", str(path)])
    assert result.exit_code == 2
    assert "error: eval.ci must be a number in (0, 1), got 95" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "ws" / "data").exists()


# ------------------------------------------------------------------ rules across sections
def test_classifier_or_generator_larger_than_the_stored_slices_is_refused(tmp_path):
    """Sizes are checked against the store on disk (it may be smaller than data.size says), in one line."""
    from gen.run import generate
    from toolkit.workspace import Workspace
    from train.run import train_run

    ws = Workspace(tmp_path)
    store = make_toy_slice_set(n_patients=8, slices_per_patient=4, size=32)
    store.meta["split_hash"] = "toy"
    store.save(ws.store_dir)
    cfg = load("demo", "train.organs={}", "train.image_size=64", "train.epochs=1")
    with pytest.raises(ContractError, match=r"train.image_size=64 is above the 32 px slices of the store .* upsampled"):
        train_run(ws, cfg, organs=["liver"])
    cfg = load("demo", "train.image_size=32", "train.organs.kidney.image_size=128")
    with pytest.raises(ContractError, match=r"train.organs.kidney.image_size=128 is above the 32 px slices"):
        train_run(ws, cfg, organs=["liver"])
    with pytest.raises(ContractError, match=r"gen.image_size=64 is above the 32 px slices .* prepare --force"):
        generate(ws, load("demo", "gen.image_size=64", "gen.input=slices"), "liver")
    assert not (ws.runs_dir).exists() and not ws.synthetic_root.exists()  # refused before anything is written


def test_train_folds_above_the_stored_folds_is_refused():
    with pytest.raises(ConfigError, match=r"train.folds=4 is above data.folds=3"):
        load("demo", "train.folds=4")
    # A Config built in code gets the same checks.
    cfg = dataclasses.replace(Config(), train=dataclasses.replace(Config().train, folds=9))
    with pytest.raises(ConfigError, match="train.folds=9 is above data.folds=5"):
        validate(cfg)


# ------------------------------------------------------------------ per-organ settings
def test_one_organ_rule_for_configs_and_saved_config_dicts():
    from eval.runs import Run
    from toolkit.artifacts.run import RunFolder, RunInfo

    cfg = load("demo")
    kidney, liver = organ_config(cfg, "kidney").train, organ_config(cfg, "liver").train
    bowel = organ_config(cfg, "bowel").train
    assert (kidney.image_size, kidney.trainable_blocks, kidney.organs) == (64, -1, {})
    assert (bowel.image_size, bowel.trainable_blocks) == (128, 3)
    assert liver == dataclasses.replace(cfg.train, organs={})
    saved = cfg.to_dict()["train"]  # what eval reads from an old run's config.yaml
    assert organ_train_settings(saved, "kidney") == {
        k: v for k, v in dataclasses.asdict(kidney).items() if k != "organs"
    }
    # An old run.json without per-organ settings: eval rebuilds them from config.yaml with the same rule.
    info = RunInfo("r", None, 0.0, 0, 3, ["kidney", "liver"], "mobilenetv2_100", 64, [[60, 200]], 384, 8)
    run = Run("r", RunFolder(Path(".")), info, config={"train": saved})
    assert run.organ_setting("bowel", "image_size") == 128 and run.image_size("liver") == 64
    assert run.organ_setting(None, "trainable_blocks") == 3 and run.organ_setting("kidney", "trainable_blocks") == -1
    from train.run import organ_config as from_train

    assert from_train is organ_config
    assert TrainConfig().for_organ(None) == TrainConfig()


def test_choices_match_the_registries_they_name():
    from gen.registry import list_generators
    from gen.sampling import SAMPLERS
    from train.inference import AGGREGATES

    rules = {f.name: f.metadata for f in dataclasses.fields(Config().gen)}
    assert set(rules["model"]["choices"]) == set(list_generators())
    diffusion_rules = {f.name: f.metadata for f in dataclasses.fields(Config().gen.diffusion)}
    assert set(diffusion_rules["sampler"]["choices"]) == set(SAMPLERS)
    train_rules = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    assert set(train_rules["aggregate"]["choices"]) == set(AGGREGATES)


# ------------------------------------------------------------------ shipped configs
def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("prevalence", "high_grade_fraction", "organs"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _get(cfg: Config, dotted: str) -> object:
    node: object = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("name", ["default", "demo", "study-demo"])
def test_shipped_configs_validate_and_set_what_their_files_say(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found in the package, not via the working directory
    cfg = load_config(name)
    written = _leaves(yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()))
    defaults = Config()
    for key, value in written.items():
        loaded = _get(cfg, key)
        if isinstance(value, dict):
            assert {k: loaded[k] for k in value} == value, key
        else:
            assert loaded == value, key
    changed = [key for key, value in written.items() if _get(defaults, key) != value]
    # If the file were ignored every one of these would still hold the dataclass default.
    assert len(changed) >= 5, changed
    assert validate(cfg) == cfg


def test_a_configs_folder_in_the_working_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("seed: 7\ndata: {size: 300}\n")
    (tmp_path / "configs" / "mine.yaml").write_text("train: {epochs: 2}\n")
    cfg = load_config("demo")
    assert cfg.seed == 7 and cfg.data.size == 300 and cfg.phantom == PhantomConfig()
    assert load_config("mine").train.epochs == 2
    with pytest.raises(ConfigError, match=r"no config named 'nope'; choose one of default, demo, mine, study-demo"):
        load_config("nope")


@pytest.mark.slow
def test_installed_wheel_ships_its_configs(tmp_path):
    """`pip install .` (not editable), then `toolkit demo-data --config demo` from an empty folder."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache", ".ruff_cache", "workspace"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    assert (target / "toolkit" / "configs" / "demo.yaml").is_file()
    shutil.rmtree(source)  # nothing may come from the source tree

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import toolkit; print(toolkit.__file__)"],
                           cwd=run_dir, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target))
    result = subprocess.run(
        [str(target / "bin" / "toolkit"), "demo-data", "--config", "demo", "--workdir", "ws",
         "--set", "phantom.patients=4", "--set", "phantom.slices=6", "--set", "phantom.size=64"],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    labels = pd.read_csv(run_dir / "ws" / "data" / "train.csv")
    assert len(labels) == 4 and set(ORGANS) <= {c.split("_")[0] for c in labels.columns}
    assert yaml.safe_load((run_dir / "ws" / "config.yaml").read_text())["data"]["size"] == 128  # demo's
