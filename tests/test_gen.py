"""Generators (diffusion, GAN), the audit and ``toolkit gen`` on tiny real training runs.

The contract every backend keeps (fit, sample, persistence, resume) is in test_gen_contract.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import make_toy_slice_set
from typer.testing import CliRunner

from gen.audit import audit
from gen.base import CONFIG_NAME, WEIGHTS_NAME
from gen.models.gan_nets import ConditionalGenerator, ProjectionDiscriminator
from gen.registry import create_generator, list_generators, load_generator
from gen.run import generate, generate_all
from toolkit.artifacts.synthetic import SyntheticSet
from toolkit.cli import app
from toolkit.config import CONFIG_DIR, load_config
from toolkit.errors import ContractError, ToolkitError
from toolkit.sliceset import SliceSet
from toolkit.transforms import resize_slices, window_hu
from toolkit.workspace import Workspace

TINY = {
    "input": "slices",  # toy stores have no organ crops (tests/test_crops.py generates from them)
    "image_size": 16,
    "train_steps": 4,
    "batch_size": 8,
    "checkpoint_every": 2,
    "n": 12,
    "audit_feature_epochs": 1,
    "gan": {"ngf": 8, "ndf": 8, "z_dim": 8},
    "diffusion": {"unet_channels": [8, 16], "layers_per_block": 1, "num_train_timesteps": 50, "sample_steps": 3},
}


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied, section by section."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def tiny_config(**gen):
    return load_config("demo", {"gen": merged(TINY, gen)})


@pytest.fixture(scope="module")
def toy_store() -> SliceSet:
    return make_toy_slice_set(n_patients=16, slices_per_patient=6, size=32)


@pytest.fixture(scope="module")
def train_images(toy_store):
    rows = (toy_store.table["split"] == "train").to_numpy()
    x = resize_slices(window_hu(toy_store.images[rows])[:, 0], 16)
    return x, toy_store.labels("liver")[rows]


@pytest.fixture
def workspace(tmp_path, toy_store) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    toy_store.save(ws.store_dir)
    return ws


# ------------------------------------------------------------------ registry and networks
def test_registry_lists_backends_and_rejects_unknown_names():
    assert list_generators() == ["diffusion", "gan"]
    with pytest.raises(ToolkitError, match="unknown generator 'vae'; valid generators: diffusion, gan"):
        create_generator("vae", tiny_config().gen)


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_gan_networks_handle_every_image_size(size):
    g, d = ConditionalGenerator(size, 8, 4, 3), ProjectionDiscriminator(size, 4, 3)
    x = g(torch.randn(2, 8), torch.tensor([0, 2]))
    assert x.shape == (2, 1, size, size)
    assert d(x, torch.tensor([0, 2])).shape == (2,)


def test_gan_rejects_unsupported_size():
    with pytest.raises(ToolkitError, match="gen.image_size 48 is not supported by the GAN"):
        ConditionalGenerator(48, 8, 4, 2)


# ------------------------------------------------------------------ backend specifics, config
def test_diffusion_noise_target_and_every_sampler(train_images):
    x, y = train_images
    gen = create_generator("diffusion", tiny_config(diffusion={"prediction_type": "epsilon"}).gen, seed=0).fit(x, y)
    for sampler in ("dpm", "ddim", "ddpm"):
        out = gen.sample(n_per_class=1, seed=0, sampler=sampler)
        assert out.shape == (2, 16, 16) and np.isfinite(out).all()
    with pytest.raises(ToolkitError, match="unknown sampler 'euler'"):
        gen.sample(n_per_class=1, sampler="euler")
    with pytest.raises(ToolkitError, match="unknown gen.diffusion.prediction_type 'x0'"):
        create_generator("diffusion", tiny_config(diffusion={"prediction_type": "x0"}).gen).fit(x, y)


def test_backend_settings_live_in_their_section():
    cfg = tiny_config(model="diffusion").gen
    assert cfg.gan.z_dim == 8 and cfg.diffusion.unet_channels == [8, 16]
    # create_generator overrides reach the shared settings and the backend's own section only.
    gen = create_generator("gan", cfg, z_dim=4, image_size=32)
    assert gen.cfg.gan.z_dim == 4 and gen.cfg.image_size == 32 and cfg.gan.z_dim == 8
    with pytest.raises(ToolkitError, match="unknown generator option\\(s\\) unet_channels"):
        create_generator("gan", cfg, unet_channels=[4])
    # A config of the flat layout names where a key went.
    with pytest.raises(ToolkitError, match="config key 'gen.z_dim' is now 'gen.gan.z_dim'"):
        load_config("demo", {"gen": {"z_dim": 8}})


def test_checkpoint_of_the_flat_config_layout_is_refused(train_images, tmp_path):
    x, y = train_images
    gen = create_generator("gan", tiny_config().gen, seed=0).fit(x, y)
    gen.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    flat = {k: v for k, v in config["gen"].items() if k != "gan"}
    config["gen"] = {**flat, "z_dim": 8, "ngf": 8, "ndf": 8, "gan_lr": 5e-4, "gan_ema": True}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ContractError, match="earlier toolkit version .* re-run `toolkit gen --organ <organ> --force`"):
        load_generator(tmp_path)


# ------------------------------------------------------------------ audit
def test_audit_flags_a_planted_training_slice_and_nothing_else(train_images):
    x, y = train_images
    gen = create_generator("gan", tiny_config().gen, seed=0).fit(x, y)
    synth = gen.sample(n_per_class=5, seed=0)
    labels = np.repeat([0, 1], 5)
    planted = x[17].copy()
    noisy = np.clip(x[40] + np.random.default_rng(0).normal(0, 0.01, x[40].shape), 0, 1).astype(np.float32)
    synth = np.concatenate([synth, planted[None], noisy[None]])
    labels = np.concatenate([labels, [y[17], y[40]]])

    report = audit(x, y, synth, labels, threshold=0.95, class_names=["healthy", "injured"], epochs=1)
    flags = report["per_slice"]["near_copy"]
    assert flags.tolist() == [False] * 10 + [True, True]
    assert report["per_slice"]["nn_index"][10] == 17
    assert report["per_slice"]["nn_similarity"][10] == pytest.approx(1.0, abs=1e-5)
    assert report["memorization"]["near_copies"] == 2
    assert report["frechet_distance"]["synthetic_vs_real"] > 0
    assert "Inception" in report["frechet_distance"]["feature_space"]
    assert set(report["per_class"]) == {"healthy", "injured"}


# ------------------------------------------------------------------ the run: outputs and honesty
def test_generate_writes_an_audited_synthetic_slice_set(workspace, toy_store):
    cfg = tiny_config()
    out = generate(workspace, cfg, "liver")
    synthetic = SyntheticSet.load(out)
    syn = synthetic.slices
    assert syn.images.dtype == np.int16 and syn.images.shape == (12, 16, 16)
    level, width = cfg.data.windows[0]
    assert syn.images.min() >= level - width / 2 and syn.images.max() <= level + width / 2
    t = syn.table
    assert t["liver"].tolist() == [0] * 6 + [1] * 6
    assert (t["liver_patient"] == t["liver"]).all()
    assert (t["split"] == "synthetic").all() and (t["source"] == "synthetic").all()
    assert (t["patient_id"] == -1).all() and (t["fold"] == -1).all()
    assert t["instance"].tolist() == list(range(12))
    assert t["near_copy"].dtype == bool and t["nn_similarity"].between(-1, 1).all()
    gid = synthetic.generator_id
    assert gid.startswith("liver-gan-") and len(gid) == len("liver-gan-") + 8 and (t["generator_id"] == gid).all()
    assert synthetic.split_hash == toy_store.meta["split_hash"] and synthetic.organ == "liver"
    assert synthetic.window == [level, width] and synthetic.windows == [[level, width]]
    assert synthetic.image_size == 16 and synthetic.mode == "image" and synthetic.backend == "gan"
    assert synthetic.class_names == ["healthy", "injured"] and len(synthetic.train_patients_hash) == 64

    report = json.loads((out / "audit.json").read_text())
    assert report["generator_id"] == gid and "near-copies" in report["summary"]
    loss = pd.read_csv(out / "loss.csv")
    assert loss["step"].tolist() == [1, 2, 3, 4] and {"d_loss", "g_loss", "img_per_s"} <= set(loss.columns)
    assert (out / "grid.png").stat().st_size > 1000
    assert yaml.safe_load((out / "config.yaml").read_text())["gen"]["image_size"] == 16
    assert (out / "checkpoint" / WEIGHTS_NAME).exists()
    assert load_generator(out / "checkpoint").sample(n_per_class=1, seed=0).shape == (2, 16, 16)

    with pytest.raises(ToolkitError, match="already holds a synthetic liver set; pass --force"):
        generate(workspace, cfg, "liver")
    generate(workspace, cfg, "liver", n=4, force=True)
    assert len(SliceSet.load(out)) == 4


def test_generator_trains_only_on_train_split_patients(workspace, toy_store):
    out = generate(workspace, tiny_config(), "kidney")
    trained = set(pd.read_csv(out / "train_patients.csv")["patient_id"])
    table = toy_store.table
    test_patients = set(table.loc[table["split"] == "test", "patient_id"])
    assert test_patients and not (trained & test_patients)
    assert trained == set(table.loc[table["split"] == "train", "patient_id"])


def test_grade_conditioning_makes_healthy_low_high_classes(tmp_path, toy_store):
    ws = Workspace(tmp_path / "ws")
    store = SliceSet(toy_store.images, toy_store.table.copy(), dict(toy_store.meta))
    high = store.table["patient_id"].isin([1000, 1004, 1008])  # kidney-injured train patients
    store.table.loc[high, "kidney"] = 2
    store.save(ws.store_dir)
    cfg = tiny_config(conditioning="grade", n=9)
    syn = SyntheticSet.load(generate(ws, cfg, "kidney"))
    assert syn.slices.table["kidney"].tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert syn.class_names == ["healthy", "low", "high"]
    # Binary organs ignore grade conditioning; too few slices of a class is named with the counts.
    store.table.loc[store.table["patient_id"] == 1000, "liver"] = 2
    store.table.loc[store.table["patient_id"] != 1000, "liver"] = store.table["liver"].clip(upper=1)
    store.save(ws.store_dir, force=True)
    with pytest.raises(ToolkitError, match=r"too few liver training slices \(healthy 30, low 36, high 6\)"):
        generate(ws, cfg, "liver")


def test_generate_all_reports_an_organ_without_positives_and_continues(tmp_path, toy_store):
    ws = Workspace(tmp_path / "ws")
    store = SliceSet(toy_store.images, toy_store.table.copy(), dict(toy_store.meta))
    train = store.table["split"] == "train"
    store.table.loc[train, "spleen"] = 0  # spleen injuries only among test patients
    store.save(ws.store_dir)
    results = generate_all(ws, tiny_config(), organs=["spleen", "liver"])
    assert results["spleen"]["status"] == "failed"
    assert "no injured spleen slices among the" in results["spleen"]["error"]
    assert results["liver"]["status"] == "done"
    assert not ws.synthetic_dir("spleen").exists()
    assert generate_all(ws, tiny_config(), organs=["liver"])["liver"]["status"] == "skipped"


# ------------------------------------------------------------------ CLI
@pytest.fixture
def tiny_yaml(tmp_path) -> Path:
    cfg = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    cfg["gen"] = merged(cfg["gen"], TINY)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(*args: str):
    return CliRunner().invoke(app, ["gen", *args])


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, tiny_yaml, toy_store):
    result = _run("--organ", "brain", "-w", str(tmp_path / "a"))
    assert result.exit_code == 2
    assert "unknown organ 'brain'; choose one of bowel, extravasation, kidney, liver, spleen or all" in result.output
    assert "Traceback" not in result.output

    result = _run("--organ", "liver", "-w", str(tmp_path / "a"), "-c", str(tiny_yaml))
    assert result.exit_code == 2
    assert "no slice store" in result.output and "run `toolkit prepare` first" in result.output

    ws = Workspace(tmp_path / "b")
    store = SliceSet(toy_store.images, toy_store.table.copy(), dict(toy_store.meta))
    store.table["liver"] = 0
    store.save(ws.store_dir)
    result = _run("--organ", "liver", "-w", str(ws.root), "-c", str(tiny_yaml))
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no injured liver slices among the 12 training patients" in lines[0]


def test_cli_writes_then_refuses_to_overwrite_without_force(workspace, tiny_yaml):
    args = ["--organ", "bowel", "-w", str(workspace.root), "-c", str(tiny_yaml), "--n", "6", "--steps", "2"]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert "audit: Frechet distance" in result.output
    assert len(SliceSet.load(workspace.synthetic_dir("bowel"))) == 6
    result = _run(*args)
    assert result.exit_code == 2 and "pass --force to regenerate it" in result.output
    assert _run(*args, "--force").exit_code == 0


def test_cli_help_explains_the_command():
    result = CliRunner().invoke(app, ["gen", "--help"])
    assert result.exit_code == 0
    for option in ("--organ", "--model", "--n", "--steps", "--image-size", "--resume", "--force"):
        assert option in result.output
