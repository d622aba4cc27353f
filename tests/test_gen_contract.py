"""The contract every registered generator backend keeps, run against each of them.

fit (tiny) -> sample(n, seed): shape, range, determinism -> save_pretrained / from_pretrained gives
identical samples -> a run resumed from a checkpoint equals the uninterrupted run. Plus: the
training loop reproduces loss histories recorded before it was shared by the backends, and the
generator id hashes only the active backend's settings.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_toy_slice_set

from gen.base import TRAINING_STATE_NAME
from gen.registry import create_generator, list_generators, load_generator
from gen.run import generator_id
from toolkit.config import Config, DiffusionGenConfig, GANGenConfig, GenConfig
from toolkit.errors import ContractError
from toolkit.transforms import resize_slices, window_hu

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tiny networks so each fit takes about a second; a new backend adds its section here.
TINY_SECTIONS = {
    "diffusion": DiffusionGenConfig(
        lr=5e-4, unet_channels=[8, 16], layers_per_block=1, num_train_timesteps=50, ema_decay=0.995,
        label_dropout=0.1, guidance_scale=2.0, sampler="dpm", sample_steps=3, beta_schedule="linear",
        prediction_type="v_prediction",
    ),
    "gan": GANGenConfig(lr=5e-4, z_dim=8, ngf=8, ndf=8, ema=True, ema_decay=0.995),
}


def tiny_gen(model: str, **shared: object) -> GenConfig:
    values = dict(image_size=16, train_steps=4, batch_size=8, checkpoint_every=2, mixed_precision="no")
    values.update(shared)
    return GenConfig(model=model, **values, **TINY_SECTIONS)


@pytest.fixture(scope="module")
def train_images() -> tuple[np.ndarray, np.ndarray]:
    store = make_toy_slice_set(n_patients=16, slices_per_patient=6, size=32)
    rows = (store.table["split"] == "train").to_numpy()
    return resize_slices(window_hu(store.images[rows])[:, 0], 16), store.labels("liver")[rows]


@pytest.fixture(scope="module", params=list_generators())
def fitted(request, train_images, tmp_path_factory):
    """Each backend fitted once, uninterrupted, with checkpoints (4 steps, one every 2)."""
    x, y = train_images
    folder = tmp_path_factory.mktemp(f"full_{request.param}")
    gen = create_generator(request.param, tiny_gen(request.param), n_classes=2, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter: fit seeds what it uses
    gen.fit(x, y, checkpoint_dir=folder)
    return gen, folder


def test_fit_logs_every_step(fitted):
    gen, folder = fitted
    assert gen.step_ == 4
    assert [r["step"] for r in gen.history_] == [1, 2, 3, 4]
    assert list(gen.history_[0]) == ["step", *gen.log_columns, "img_per_s"] and gen.log_columns
    assert all(np.isfinite(r[c]) for r in gen.history_ for c in gen.log_columns)
    assert int(torch.load(folder / TRAINING_STATE_NAME, weights_only=True)["step"]) == 4


def test_sample_shape_range_and_determinism(fitted):
    gen, _ = fitted
    a = gen.sample(n_per_class=3, seed=7)
    assert a.shape == (6, 16, 16) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0
    np.testing.assert_array_equal(a, gen.sample(n_per_class=3, seed=7))
    assert not np.array_equal(a, gen.sample(n_per_class=3, seed=8))
    # The class label changes the output: same noise, other class.
    b = gen.sample(labels=np.array([1, 1, 1, 0, 0, 0]), seed=7)
    assert not np.array_equal(a[:3], b[:3])


def test_pretrained_round_trip_gives_identical_samples(fitted, tmp_path):
    gen, _ = fitted
    gen.save_pretrained(tmp_path / "g")
    for again in (load_generator(tmp_path / "g"), type(gen).from_pretrained(tmp_path / "g")):
        assert type(again) is type(gen) and again.step_ == gen.step_
        np.testing.assert_array_equal(again.sample(n_per_class=3, seed=7), gen.sample(n_per_class=3, seed=7))


def test_resume_after_interruption_equals_uninterrupted_run(fitted, train_images, tmp_path):
    full, _ = fitted
    x, y = train_images
    name = full.generator_name

    def crash(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_generator(name, tiny_gen(name), seed=3).fit(x, y, checkpoint_dir=tmp_path, callback=crash)
    assert int(torch.load(tmp_path / TRAINING_STATE_NAME, weights_only=True)["step"]) == 2

    resumed = create_generator(name, tiny_gen(name), seed=3).fit(x, y, checkpoint_dir=tmp_path, resume=True)
    assert resumed.step_ == full.step_ == 4
    a, b = full.model_.state_dict(), resumed.model_.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    columns = ["step", *full.log_columns]
    assert [[r[c] for c in columns] for r in resumed.history_] == [[r[c] for c in columns] for r in full.history_]
    np.testing.assert_array_equal(full.sample(n_per_class=2, seed=0), resumed.sample(n_per_class=2, seed=0))


def test_resume_refuses_a_checkpoint_of_another_architecture(fitted, train_images):
    gen, folder = fitted
    x, y = train_images
    name = gen.generator_name
    section = TINY_SECTIONS[name]
    width = "ngf" if name == "gan" else "layers_per_block"
    other = dataclasses.replace(tiny_gen(name), **{name: dataclasses.replace(section, **{width: 2})})
    with pytest.raises(ContractError, match=rf"has gen.{name}.{width}=.* pass --force to start over"):
        create_generator(name, other, seed=3).fit(x, y, checkpoint_dir=folder, resume=True)


# Loss histories, weight sums and sample pixels of a 6-step fit (seed 3, the settings of tiny_gen) recorded
# on the code before the two backends shared gen/training.py: the loop must draw the same batches and
# noise in the same order. Recorded with one torch thread on CPU; the tolerance only absorbs float
# differences between CPUs, a changed draw moves the losses by far more.
RECORDED = {
    "diffusion": {
        "loss": [1.1401522159576416, 1.0074092149734497, 1.0503885746002197, 0.9015774726867676,
                 0.9325798749923706, 0.9255656599998474],
        "param_sum": 303.3077980723083,
        "sample": [[0.7711056470870972, 1.0, 0.25140994787216187, 0.0],
                   [0.6022430062294006, 0.8566179275512695, 1.0, 0.19491782784461975]],
    },
    "gan": {
        "d_loss": [3.423846483230591, 3.171593189239502, 2.6555473804473877, 2.390807628631592,
                   2.722275733947754, 2.3713295459747314],
        "g_loss": [-1.85512113571167, -1.703719139099121, -1.1569722890853882, -1.0758562088012695,
                   -1.1266957521438599, -1.1079803705215454],
        "param_sum": 47.17678103430808,
        "sample": [[0.10936325788497925, 0.43880611658096313, 0.48742151260375977, 0.29207277297973633],
                   [0.2658708095550537, 0.29494214057922363, 0.26711857318878174, 0.3074779212474823]],
    },
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_training_reproduces_the_recorded_run(name, train_images, tmp_path):
    x, y = train_images
    gen = create_generator(name, tiny_gen(name, train_steps=6), seed=3).fit(x, y, checkpoint_dir=tmp_path)
    record = RECORDED[name]
    for column in gen.log_columns:
        assert [r[column] for r in gen.history_] == pytest.approx(record[column], rel=1e-6, abs=1e-7), column
    weights = gen.model_.state_dict().values()
    assert float(sum(p.double().sum() for p in weights if p.is_floating_point())) == pytest.approx(
        record["param_sum"], rel=1e-6
    )
    np.testing.assert_allclose(gen.sample(n_per_class=1, seed=5)[:, 4, 4:8], record["sample"], atol=1e-5)


# ------------------------------------------------------------------ generator id
def _id(model: str, **changes: object) -> str:
    gen = tiny_gen(model)
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        if section:
            gen = dataclasses.replace(gen, **{section: dataclasses.replace(getattr(gen, section), **{field: value})})
        else:
            gen = dataclasses.replace(gen, **{field: value})
    return generator_id("liver", Config(gen=gen), "split", "patients")


@pytest.mark.parametrize("model", list_generators())
def test_generator_id_hashes_only_the_active_backend(model):
    base = _id(model)
    assert base.startswith(f"liver-{model}-")
    for other in TINY_SECTIONS:
        if other == model:
            continue
        field = dataclasses.fields(TINY_SECTIONS[other])[0].name
        value = getattr(TINY_SECTIONS[other], field)
        assert _id(model, **{f"{other}__{field}": value * 2}) == base, f"{other}.{field} changed a {model} id"
    field = dataclasses.fields(TINY_SECTIONS[model])[0].name
    assert _id(model, **{f"{model}__{field}": getattr(TINY_SECTIONS[model], field) * 2}) != base
    assert _id(model, image_size=32) != base  # shared settings count
    assert _id(model, checkpoint_every=1) == base  # bookkeeping does not
