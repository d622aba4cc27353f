"""Lesions drawn into real healthy organ crops (gen/lesions/): shapes, fills, inpainting, pairs, audit.

Each test builds tiny organ crops itself: an elliptic organ (~100 HU, noisy) in soft tissue, healthy
or with a dark lesion, at 16 px, so a generator fits in a fraction of a second.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gen.base import TRAINING_STATE_NAME
from gen.lesions.audit import (
    contrast_range,
    measure_lesions,
    organ_tail_contrast,
    quality_filter,
    realism_auc,
)
from gen.lesions.backend import inpaint_hu
from gen.lesions.fill import RandFillLesion, fill_lesions, organ_statistics
from gen.lesions.grid import save_lesion_grid
from gen.lesions.pairs import LesionSamples, choose_sources, eligible_sources, plan_lesions, training_plan
from gen.lesions.shapes import LESION_SHAPES, RandSubcapsularHematomaMask, create_lesion_mask
from gen.registry import create_generator, list_generators, load_generator
from toolkit.artifacts.synthetic import SyntheticSet
from toolkit.config import LESION_KINDS, DiffusionGenConfig, GANGenConfig, GenConfig, LesionGenConfig, load_config
from toolkit.errors import ConfigError, ContractError, DataError
from toolkit.transforms import window_hu

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16
WINDOW = (40.0, 400.0)
CLASSES = ["healthy", "injured"]


def organ_crops(n: int = 48, size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HU crops (int16), organ masks, labels (every other crop injured) and patient ids (4 crops each)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    crops, masks = [], []
    labels = np.arange(n) % 2
    for i in range(n):
        cy, cx = 0.5 + rng.normal(0, 0.04, 2)
        organ = ((yy - cy) / rng.uniform(0.3, 0.42)) ** 2 + ((xx - cx) / rng.uniform(0.3, 0.42)) ** 2 < 1
        hu = np.where(organ, 100.0, 40.0) + rng.normal(0, 10, (size, size))
        if labels[i]:
            lesion = organ & (((yy - cy) / 0.12) ** 2 + ((xx - cx - 0.1) / 0.08) ** 2 < 1)
            hu[lesion] -= 60.0
        crops.append(np.round(hu).astype(np.int16))
        masks.append(organ)
    return np.stack(crops), np.stack(masks), labels, 1000 + np.arange(n) // 4


def windowed(hu: np.ndarray) -> np.ndarray:
    return window_hu(hu, [WINDOW])[:, 0]


def tiny_gen(**shared: object) -> GenConfig:
    values = dict(image_size=SIZE, train_steps=4, batch_size=8, checkpoint_every=2, mixed_precision="no")
    values.update(shared)
    return GenConfig(
        **values,
        diffusion=DiffusionGenConfig(
            lr=5e-4, unet_channels=[8, 16], layers_per_block=1, num_train_timesteps=50, sample_steps=3
        ),
        gan=GANGenConfig(lr=5e-4, z_dim=8, ngf=8, ndf=8, ema=True, ema_decay=0.995),
        lesion=dataclasses.replace(LesionGenConfig(), repaint_steps=10, repaint_jump_length=3, repaint_resample=2),
    )


@pytest.fixture(scope="module")
def crops():
    return organ_crops()


@pytest.fixture(scope="module")
def plan(crops):
    hu, masks, labels, _ = crops
    return training_plan("liver", labels, masks, CLASSES, np.random.default_rng(1), spacing=3.0,
                         cfg=tiny_gen().lesion)


@pytest.fixture(scope="module", params=list_generators("lesion"))
def fitted(request, crops, plan, tmp_path_factory):
    """Each lesion-mode backend fitted once (4 steps, a checkpoint every 2)."""
    hu, _, labels, _ = crops
    folder = tmp_path_factory.mktemp(f"lesion_{request.param}")
    gen = create_generator(request.param, tiny_gen(), mode="lesion", seed=3)
    gen.fit(windowed(hu), labels, lesion_plan=plan, checkpoint_dir=folder)
    return gen, folder


# ------------------------------------------------------------------ shape priors
def odd_organs(size: int = 24) -> list[np.ndarray]:
    """Organ masks that stress the priors: an ellipse, a thin crescent, one touching the border, a
    3-pixel sliver, two blobs, and one filling the whole crop."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    ellipse = ((yy - 12) / 9) ** 2 + ((xx - 11) / 7) ** 2 < 1
    ring = (((yy - 12) / 10) ** 2 + ((xx - 12) / 10) ** 2 < 1) & ~((((yy - 12) / 7) ** 2 + ((xx - 15) / 8) ** 2) < 1)
    border = ((yy - 2) / 8) ** 2 + ((xx - 20) / 8) ** 2 < 1
    sliver = np.zeros((size, size), bool)
    sliver[10, 10:13] = True
    blobs = (((yy - 5) / 3) ** 2 + ((xx - 5) / 3) ** 2 < 1) | (((yy - 18) / 4) ** 2 + ((xx - 17) / 4) ** 2 < 1)
    return [ellipse, ring, border, sliver, blobs, np.ones((size, size), bool)]


@pytest.mark.parametrize("kind", sorted(LESION_SHAPES))
def test_every_prior_draws_only_inside_the_organ_and_never_nothing(kind):
    for grade in (1, 2, 3):
        transform = create_lesion_mask(kind, grade)
        for seed in range(8):
            rng = np.random.default_rng(seed)
            for organ in odd_organs():
                for spacing in (0.7, 3.0, (1.0, 2.5)):
                    mask = transform(organ, rng, spacing=spacing)
                    assert mask.dtype == bool and mask.shape == organ.shape
                    assert mask.any(), (kind, grade, seed, spacing)
                    assert not (mask & ~organ).any(), (kind, grade, seed, spacing)
    assert not create_lesion_mask(kind, 1)(np.zeros((8, 8), bool), np.random.default_rng(0)).any()


def test_priors_are_seeded_and_stacks_take_one_spacing_per_mask():
    organs = np.stack(odd_organs()[:3])
    transform = create_lesion_mask("laceration", 2)
    a = transform(organs, np.random.default_rng(5), spacing=np.array([1.0, 2.0, 3.0]))
    b = transform(organs, np.random.default_rng(5), spacing=np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(a, b)
    assert a.shape == organs.shape and not (a & ~organs).any()
    assert not np.array_equal(a, transform(organs, np.random.default_rng(6), spacing=np.array([1.0, 2.0, 3.0])))
    with pytest.raises(DataError, match=r"spacing of a stack of 3 organ masks"):
        transform(organs, np.random.default_rng(0), spacing=np.array([1.0, 2.0]))


def test_sizes_follow_the_grade_and_are_physical():
    yy, xx = np.mgrid[0:96, 0:96]
    organ = ((yy - 48) / 44) ** 2 + ((xx - 48) / 40) ** 2 < 1  # ~ 26 x 24 cm at 3 mm/px

    def mean_area(transform, spacing, n=30):
        rng = np.random.default_rng(0)
        return np.mean([transform(organ, rng, spacing=spacing).sum() for _ in range(n)])

    cfg = LesionGenConfig()
    # A grade III subcapsular hematoma covers > 50 % of the capsule, grade I < 10 %: far larger.
    fractions = cfg.subcapsular_fraction
    small, large = (mean_area(RandSubcapsularHematomaMask(fractions[g], (8.0, 8.0)), 3.0) for g in (0, 2))
    assert large > 4 * small
    # Lacerations: grade III (> 3 cm deep) reaches deeper than grade I (< 1 cm).
    depth = {}
    for grade in (1, 3):
        rng = np.random.default_rng(1)
        transform = create_lesion_mask("laceration", grade)
        from gen.lesions.shapes import OrganGeometry

        geo = OrganGeometry(organ, 3.0)
        depth[grade] = np.mean([geo.depth[transform(organ, rng, spacing=3.0)].max() for _ in range(20)])
    assert depth[1] < 12.0 < 30.0 < depth[3]
    # The same lesion in mm covers ~4x the pixels at half the pixel spacing.
    blob = create_lesion_mask("parenchymal_hematoma", 1)
    ratio = mean_area(blob, 1.5) / mean_area(blob, 3.0)
    assert 3.0 < ratio < 5.0


def test_kinds_of_the_config_are_the_registered_shapes():
    assert set(LESION_KINDS) == set(LESION_SHAPES)
    cfg = LesionGenConfig()
    assert all(k in cfg.delta_hu or k in cfg.absolute_hu for k in LESION_KINDS)
    with pytest.raises(ConfigError, match=r"gen.lesion.laceration_depth_mm must be three \[low, high\] pairs"):
        load_config("demo", {"gen": {"lesion": {"laceration_depth_mm": [[1, 2]]}}})
    with pytest.raises(ConfigError, match=r"gen.lesion.injuries.liver must be a non-empty list of lesion kinds"):
        load_config("demo", {"gen": {"lesion": {"injuries": {"liver": ["cut"]}}}})
    assert load_config("demo", {"gen": {"lesion": {"delta_hu": {"infarct": [-90, "-40"]}}}}).gen.lesion.delta_hu[
        "infarct"
    ] == [-90.0, -40.0]


# ------------------------------------------------------------------ procedural fill
def test_fill_changes_only_the_lesion_with_the_configured_contrast_and_the_organs_texture(crops):
    hu, masks, labels, _ = crops
    healthy = np.flatnonzero(labels == 0)
    rng = np.random.default_rng(0)
    lesions = create_lesion_mask("parenchymal_hematoma", 2)(masks[healthy], rng, spacing=3.0)
    fill = RandFillLesion(contrast_hu=(-60.0, -40.0), reference="organ", edge_mm=0.0, texture="matched")
    out = np.stack([fill(hu[i], masks[i], m, rng, spacing=3.0) for i, m in zip(healthy, lesions, strict=True)])
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out[~lesions], hu[healthy][~lesions])  # tolerance 0 outside the lesion
    measured = measure_lesions(out, masks[healthy], lesions)
    big = measured["area_px"].to_numpy() >= 12
    delta = measured["delta_hu"].to_numpy()[big]
    # The drawn contrast, up to the texture's noise over the lesion's pixels.
    assert np.all((delta > -75) & (delta < -25)) and -58 < np.median(delta) < -42
    # The lesion's texture is the organ's: same noise level (10 HU here).
    inside = np.concatenate([o[m] - o[m].mean() for o, m in zip(out[big], lesions[big], strict=True)])
    assert 7.0 < inside.std() < 13.0
    stats = organ_statistics(hu[healthy[0]], masks[healthy[0]])
    assert abs(stats.mean - 100) < 5 and 7 < stats.std < 13 and stats.correlation_px < 0.5


def test_a_source_texture_shifts_the_crops_own_pixels_by_one_contrast(crops):
    """texture="source": inside the lesion each pixel is its healthy value plus the lesion's one drawn contrast."""
    hu, masks, labels, _ = crops
    healthy = np.flatnonzero(labels == 0)[:6]
    rng = np.random.default_rng(1)
    lesions = create_lesion_mask("parenchymal_hematoma", 2)(masks[healthy], rng, spacing=3.0)
    fill = RandFillLesion(contrast_hu=(-60.0, -40.0), reference="organ", edge_mm=0.0, texture="source")
    for i, lesion in zip(healthy, lesions, strict=True):
        out = fill(hu[i], masks[i], lesion, rng, spacing=3.0)
        np.testing.assert_array_equal(out[~lesion], hu[i][~lesion])
        shift = out[lesion].astype(np.int32) - hu[i][lesion]
        assert shift.max() - shift.min() <= 1 and -61 <= shift.mean() <= -39  # one contrast, rounded to HU
    with pytest.raises(Exception, match=r"unknown gen.lesion.texture 'plastic'"):
        RandFillLesion((-60.0, -40.0), texture="plastic")(hu[healthy[0]], masks[healthy[0]], lesions[0], rng)


def test_fill_can_take_the_contrast_measured_on_real_injuries(crops):
    """The toy's real lesions are 60 HU darker than their organ; a fill told so matches them, not the config."""
    hu, masks, labels, _ = crops
    injured = np.flatnonzero(labels == 1)
    # organ_crops drew them at ~40 HU in a ~100 HU organ (noise 10 HU): the organ's pixels below 70 HU.
    real_lesions = masks[injured] & (hu[injured] < 70)
    measured = contrast_range(measure_lesions(hu[injured], masks[injured], real_lesions)["delta_hu"])
    assert -75 < measured[0] < measured[1] < -45
    rows = np.flatnonzero(labels == 0)
    lesions = create_lesion_mask("parenchymal_hematoma", 2)(masks[rows], np.random.default_rng(0), spacing=3.0)
    cfg = dataclasses.replace(LesionGenConfig(), delta_hu={**LesionGenConfig().delta_hu,
                                                           "parenchymal_hematoma": [-20.0, -10.0]}, edge_mm=0.0)
    out = fill_lesions(hu[rows], masks[rows], lesions, ["parenchymal_hematoma"] * len(rows), np.random.default_rng(1),
                       spacing=3.0, cfg=cfg, measured_delta_hu={"parenchymal_hematoma": measured})
    delta = measure_lesions(out, masks[rows], lesions)["delta_hu"].to_numpy()
    assert np.nanmedian(delta) < -45  # the measured contrast, not the configured -20..-10


def test_feathered_rim_stays_inside_and_fill_lesions_is_seeded(crops):
    hu, masks, labels, _ = crops
    rows = np.flatnonzero(labels == 0)[:6]
    cfg = dataclasses.replace(LesionGenConfig(), edge_mm=6.0)
    lesions = create_lesion_mask("extravasation", 1)(masks[rows], np.random.default_rng(0), spacing=1.0)
    kinds = ["extravasation"] * len(rows)
    a = fill_lesions(hu[rows], masks[rows], lesions, kinds, np.random.default_rng(3), spacing=1.0, cfg=cfg)
    b = fill_lesions(hu[rows], masks[rows], lesions, kinds, np.random.default_rng(3), spacing=1.0, cfg=cfg)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[~lesions], hu[rows][~lesions])
    assert (a[lesions] > hu[rows][lesions]).mean() > 0.9  # a hyperdense blush
    c = fill_lesions(hu[rows], masks[rows], lesions, kinds, np.random.default_rng(4), spacing=1.0, cfg=cfg)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------ inpainting backends
def test_lesion_backends_are_registered_beside_the_image_ones():
    assert list_generators() == ["diffusion", "gan"]
    assert list_generators("lesion") == ["diffusion", "gan"]
    with pytest.raises(Exception, match=r"unknown generator mode 'video'"):
        list_generators("video")


def test_inpainting_keeps_the_source_outside_the_mask_and_is_seeded(fitted, crops, plan):
    gen, _ = fitted
    hu, _, _, _ = crops
    x = windowed(hu)
    rows, masks = plan.source_rows[:5], plan.lesion_masks[:5]
    labels = np.ones(5, np.int64)
    a = gen.inpaint(x[rows], masks, labels, seed=7)
    assert a.shape == (5, SIZE, SIZE) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a[~masks], x[rows][~masks])  # tolerance 0
    assert np.abs(a[masks] - x[rows][masks]).mean() > 1e-3  # the lesion region was redrawn
    np.testing.assert_array_equal(a, gen.inpaint(x[rows], masks, labels, seed=7))
    assert not np.array_equal(a, gen.inpaint(x[rows], masks, labels, seed=8))
    # In HU: exact outside the masks, values outside the window included.
    out_hu = inpaint_hu(gen, hu[rows], masks, labels, WINDOW, seed=7)
    assert out_hu.dtype == np.int16
    np.testing.assert_array_equal(out_hu[~masks], hu[rows][~masks])


def test_inpainting_refuses_crops_of_another_size(fitted):
    gen, _ = fitted
    crops = np.zeros((2, 2 * SIZE, 2 * SIZE), np.float32)
    with pytest.raises(ContractError) as err:
        gen.inpaint(crops, crops > 0, np.ones(2, np.int64))
    assert f"draws at {SIZE} px (gen.image_size)" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(Exception, match=r"call inpaint\("):
        gen.sample(n_per_class=1)


def test_lesion_checkpoint_round_trip(fitted, crops, plan, tmp_path):
    gen, _ = fitted
    x = windowed(crops[0])
    rows, masks = plan.source_rows[:3], plan.lesion_masks[:3]
    gen.save_pretrained(tmp_path / "g")
    again = load_generator(tmp_path / "g")
    assert type(again) is type(gen) and again.mode == "lesion"
    np.testing.assert_array_equal(again.inpaint(x[rows], masks, np.ones(3, np.int64), seed=1),
                                  gen.inpaint(x[rows], masks, np.ones(3, np.int64), seed=1))


def test_an_image_mode_diffusion_model_inpaints_as_it_is(crops, plan, tmp_path):
    """RePaint needs no retraining: the class-conditional image-mode checkpoint loads as an inpainter."""
    hu, _, labels, _ = crops
    image = create_generator("diffusion", tiny_gen(), seed=3).fit(windowed(hu), labels)
    image.save_pretrained(tmp_path / "image")
    from gen.lesions.inpaint import DiffusionInpainter

    inpainter = DiffusionInpainter.from_pretrained(tmp_path / "image")
    source, masks = windowed(hu)[plan.source_rows[:2]], plan.lesion_masks[:2]
    out = inpainter.inpaint(source, masks, np.ones(2, np.int64))
    np.testing.assert_array_equal(out[~masks], source[~masks])


def test_gan_inpaint_resume_equals_uninterrupted_run(crops, plan, tmp_path):
    hu, _, labels, _ = crops
    x = windowed(hu)
    full = create_generator("gan", tiny_gen(), mode="lesion", seed=3).fit(x, labels, lesion_plan=plan)

    def crash(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_generator("gan", tiny_gen(), mode="lesion", seed=3).fit(
            x, labels, lesion_plan=plan, checkpoint_dir=tmp_path, callback=crash
        )
    assert int(torch.load(tmp_path / TRAINING_STATE_NAME, weights_only=True)["step"]) == 2
    trained: list[int] = []
    resumed = create_generator("gan", tiny_gen(), mode="lesion", seed=3).fit(
        x, labels, lesion_plan=plan, checkpoint_dir=tmp_path, resume=True,
        callback=lambda step, logs: trained.append(step),
    )
    # Equal weights alone would also come from a restart with the same seed: only steps 3 and 4 may be trained.
    assert trained == [3, 4], "the resumed run did not continue from the checkpoint of step 2"
    a, b = full.model_.state_dict(), resumed.model_.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["recon_l1"] for r in resumed.history_] == [r["recon_l1"] for r in full.history_]
    # An image-mode GAN checkpoint is not resumed as a lesion one.
    image_dir = tmp_path / "image"
    create_generator("gan", tiny_gen(train_steps=2), seed=3).fit(x, labels, checkpoint_dir=image_dir)
    with pytest.raises(ContractError, match=r"is a 'image' mode generator, not 'lesion'"):
        create_generator("gan", tiny_gen(), mode="lesion", seed=3).fit(
            x, labels, lesion_plan=plan, checkpoint_dir=image_dir, resume=True
        )


def test_gan_inpaint_needs_healthy_sources(crops, plan):
    hu, _, labels, _ = crops
    bad = dataclasses.replace(plan, source_rows=np.flatnonzero(labels == 1)[: len(plan)].repeat(4)[: len(plan)])
    with pytest.raises(ContractError, match=r"source rows must be healthy"):
        create_generator("gan", tiny_gen(), mode="lesion").fit(windowed(hu), labels, lesion_plan=bad)


# ------------------------------------------------------------------ counterfactual pairs
def test_pairs_link_every_synthetic_crop_to_the_healthy_crop_it_was_drawn_into(crops, tmp_path):
    hu, masks, labels, patients = crops
    rng = np.random.default_rng(0)
    sources = eligible_sources(labels, masks, min_organ_px=20)
    assert (labels[sources] == 0).all()
    rows = choose_sources(sources, 30, rng)
    counts = np.bincount(rows, minlength=len(labels))[sources]
    assert counts.max() - counts.min() <= 1  # every source used about equally often
    plan = plan_lesions("spleen", masks, rows, np.ones(30, np.int64), CLASSES, rng, spacing=2.0)
    assert not (plan.lesion_masks & ~masks[rows]).any()
    images = fill_lesions(hu[rows], masks[rows], plan.lesion_masks, plan.kinds, rng, spacing=2.0)
    samples = LesionSamples(images, plan, patients[rows], method="procedural")
    SyntheticSet.from_samples(
        samples.images_hu, plan.classes, np.zeros(30, bool), np.zeros(30),
        organ="spleen", generator_id="spleen-procedural-0", backend="procedural", window=WINDOW, windows=[WINDOW],
        class_names=CLASSES, split_hash="s", train_patients_hash="p", mode="lesion",
        lesion_masks=plan.lesion_masks, source_rows=plan.source_rows, source_patients=samples.source_patients,
        lesion_kinds=plan.kinds, lesion_grades=plan.grades,
    ).save(tmp_path / "set")
    read = SyntheticSet.load(tmp_path / "set")
    assert read.mode == "lesion" and len(read) == 30
    masks_read = np.asarray(read.lesion_masks)
    np.testing.assert_array_equal(masks_read, plan.lesion_masks)
    # The pair: outside its lesion each synthetic crop *is* its source crop, inside it is not.
    source = hu[read.source_rows]
    np.testing.assert_array_equal(np.asarray(read.slices.images)[~masks_read], source[~masks_read])
    assert (np.asarray(read.slices.images)[masks_read] != source[masks_read]).mean() > 0.5
    np.testing.assert_array_equal(read.source_patients, patients[rows])
    assert set(read.slices.table["lesion_kind"]) <= set(LesionGenConfig().injuries["spleen"])
    png = save_lesion_grid(tmp_path / "grid.png", windowed(source), masks_read, windowed(images), "spleen",
                           captions=[f"{k} {g}" for k, g in zip(plan.kinds, plan.grades, strict=True)])
    assert png.stat().st_size > 1000


def test_a_lesion_set_needs_its_pairs_and_an_image_set_takes_none(tmp_path):
    common = dict(organ="liver", generator_id="g", backend="gan", window=WINDOW, windows=[WINDOW],
                  class_names=CLASSES, split_hash="s", train_patients_hash="p")
    images, n = np.zeros((2, 4, 4)), np.zeros(2)
    with pytest.raises(ContractError, match=r"needs lesion_masks, source_rows, source_patients"):
        SyntheticSet.from_samples(images, np.ones(2), n > 0, n, mode="lesion", **common)
    with pytest.raises(ContractError, match=r"mode 'image' takes no lesion_masks"):
        SyntheticSet.from_samples(images, np.ones(2), n > 0, n, lesion_masks=images > 0, **common)
    s = SyntheticSet.from_samples(images, np.ones(2), n > 0, n, mode="lesion", lesion_masks=images > 0,
                                  source_rows=[0, 1], source_patients=[7, 7], **common)
    s.save(tmp_path / "l")
    (tmp_path / "l" / "lesion_masks.npy").unlink()
    with pytest.raises(DataError, match=r"lesion_masks.npy is missing"):
        SyntheticSet.load(tmp_path / "l")
    image_set = SyntheticSet.from_samples(images, np.ones(2), n > 0, n, **common)
    with pytest.raises(ContractError, match=r"no source_row"):
        image_set.source_rows  # noqa: B018


# ------------------------------------------------------------------ audit
def test_realism_auc_is_chance_for_one_distribution_and_one_for_two():
    rng = np.random.default_rng(0)
    a, b = (np.clip(0.5 + 0.1 * rng.standard_normal((64, SIZE, SIZE)), 0, 1) for _ in range(2))
    c = b.copy()
    c[:, 5:10, 5:10] = np.clip(c[:, 5:10, 5:10] + 0.3, 0, 1)
    groups = np.arange(64) // 4
    same = realism_auc(a, b, groups, groups + 100, n_splits=4, epochs=10, width=8, seed=0)
    apart = realism_auc(a, c, groups, groups + 100, n_splits=4, epochs=10, width=8, seed=0)
    assert abs(same["auc"] - 0.5) < 0.15
    assert apart["auc"] > 0.95
    assert apart["synthetic_scores"].shape == (64,) and np.isfinite(apart["synthetic_scores"]).all()
    assert len(same["fold_auc"]) == 4


def test_quality_filter_drops_invisible_and_oversized_lesions_and_counts_them(crops):
    hu, masks, labels, _ = crops
    rows = np.flatnonzero(labels == 0)[:12]
    rng = np.random.default_rng(0)
    lesions = create_lesion_mask("parenchymal_hematoma", 1)(masks[rows], rng, spacing=3.0)
    out = fill_lesions(hu[rows], masks[rows], lesions, ["parenchymal_hematoma"] * 12, rng, spacing=3.0)
    out[:3] = hu[rows][:3]  # three "lesions" nobody can see (a fill that did nothing)
    lesions[3] = masks[rows][3]  # one covering the whole organ
    measures = measure_lesions(out, masks[rows], lesions)
    keep, report = quality_filter(measures, ["parenchymal_hematoma"] * 12, window=WINDOW)
    assert not keep[:4].any() and keep[4:].all()
    # The whole-organ lesion has no organ left to contrast with: it fails both rules.
    assert report["dropped"] == 4 and report["dropped_by"] == {"contrast": 4, "area": 1, "realism": 0}
    keep, report = quality_filter(measures, ["parenchymal_hematoma"] * 12, realism_scores=np.linspace(0, 1, 12),
                                  max_realism_score=0.95)
    assert report["dropped_by"]["realism"] == 1 and not keep[-1]
    # Without lesion masks, the dark tail of the organ tells injured crops from healthy ones.
    tail = organ_tail_contrast(hu, masks)
    assert np.median(tail[labels == 1]) < np.median(tail[labels == 0]) - 20
