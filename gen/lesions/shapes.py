"""Lesion masks drawn inside an organ mask, from shape priors per injury kind and grade.

Every class here is a random array transform in MONAI's style: settings in ``__init__``,
``mask = RandLacerationMask(grade=2)(organ_mask, rng, spacing=0.8)`` with an explicit
``np.random.Generator``. Sizes are physical (mm): ``spacing`` (mm per pixel, one number or
``(row, column)``) converts them, so a grade means the same injury at any crop size.

The result always lies inside the organ mask (it is intersected with it last). A lesion that
the organ cannot hold whole (a 5 cm hematoma in a 2 cm slice of spleen) is clipped by the organ's
outline, as the real one would be on that slice. A non-empty organ always gets a non-empty
lesion (at least one pixel); an empty organ gets an empty mask.

Shapes (what a radiologist would draw; sizes default to ``gen.lesion``, see ``toolkit/config.py``):

- laceration: a thin, irregular cleft entering from the capsule, sometimes branching; depth by grade
- subcapsular hematoma: a lentiform crescent under the capsule covering a share of its outline by grade
- parenchymal hematoma: an ovoid with an irregular outline inside the organ; diameter by grade
- infarct: a wedge with its base on the capsule and its apex inside
- extravasation: a small irregular blush (a few overlapping ellipses)
- bowel_wall: a band of thickened wall along part of the loop's outline
- bowel_fluid: an angular (triangular, polygonal) collection
- bowel_gas: a few small round bubbles close together
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage

from toolkit.config import LesionGenConfig
from toolkit.errors import ConfigError, DataError

GRADES = (1, 2, 3)
"""AAST-like grades the size priors distinguish (RSNA low = 1-2, high = 3; see :func:`grades_for_class`)."""


def grades_for_class(class_name: str) -> tuple[int, ...]:
    """Grades a lesion of an RSNA class is drawn from: low -> 1, 2; high -> 3; injured -> 1, 2, 3."""
    table = {"low": (1, 2), "high": (3,), "injured": GRADES}
    if class_name not in table:
        raise ConfigError(f"class '{class_name}' has no lesion grades; lesions are drawn for {', '.join(table)}")
    return table[class_name]


# ------------------------------------------------------------------ geometry of one organ mask
def check_spacing(spacing: float | Sequence[float]) -> tuple[float, float]:
    sy, sx = (float(spacing), float(spacing)) if np.ndim(spacing) == 0 else (float(spacing[0]), float(spacing[1]))
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise DataError(f"pixel spacing must be positive mm per pixel, got {spacing!r}")
    return sy, sx


class OrganGeometry:
    """What the shape priors need to know about one organ mask (computed once per mask).

    Attributes
    ----------
    organ : ndarray of shape (H, W), bool
    spacing : (float, float)
        mm per pixel along rows and columns.
    capsule : ndarray of shape (n_capsule, 2), int
        Organ pixels next to a non-organ pixel (the organ's outline in the slice); the crop's
        border stands in when the organ fills the whole crop.
    depth : ndarray of shape (H, W), float
        Distance (mm) from the capsule, 0 outside the organ.
    nearest : ndarray of shape (2, H, W), int
        Row and column of the capsule pixel nearest to each pixel.
    centroid : ndarray of shape (2,), float
    """

    def __init__(self, organ: np.ndarray, spacing: float | Sequence[float]) -> None:
        self.organ = np.asarray(organ, dtype=bool)
        self.spacing = check_spacing(spacing)
        inner = ndimage.binary_erosion(self.organ, border_value=1)
        capsule = self.organ & ~inner
        if not capsule.any():
            capsule = np.zeros_like(self.organ)
            capsule[[0, -1], :] = capsule[:, [0, -1]] = True
        self.capsule = np.argwhere(capsule)
        dist, nearest = ndimage.distance_transform_edt(~capsule, sampling=self.spacing, return_indices=True)
        self.depth = np.where(self.organ, dist, 0.0)
        self.nearest = nearest
        self.centroid = np.argwhere(self.organ).mean(axis=0) if self.organ.any() else np.zeros(2)

    @property
    def shape(self) -> tuple[int, int]:
        return self.organ.shape  # type: ignore[return-value]

    def mm_to_px(self, mm: float) -> float:
        """A length in mm as pixels (mean of both axes' spacing)."""
        return float(mm) / (0.5 * (self.spacing[0] + self.spacing[1]))

    def inward(self, point: np.ndarray) -> np.ndarray:
        """Unit vector (row, col) pointing into the organ at ``point``: up the depth map, else to the centroid."""
        r, c = int(point[0]), int(point[1])
        h, w = self.shape
        gy = self.depth[min(r + 1, h - 1), c] - self.depth[max(r - 1, 0), c]
        gx = self.depth[r, min(c + 1, w - 1)] - self.depth[r, max(c - 1, 0)]
        v = np.array([gy, gx], dtype=np.float64)
        if np.linalg.norm(v) < 1e-9:
            v = self.centroid - np.asarray(point, dtype=np.float64)
        n = np.linalg.norm(v)
        return v / n if n > 1e-9 else np.array([1.0, 0.0])

    def random_point(self, rng: np.random.Generator, min_depth_mm: float = 0.0) -> np.ndarray:
        """An organ pixel at least ``min_depth_mm`` from the capsule (the deepest ones if none is that deep)."""
        candidates = np.argwhere(self.depth >= min_depth_mm) if min_depth_mm > 0 else np.argwhere(self.organ)
        if len(candidates) == 0:
            candidates = np.argwhere(self.depth >= 0.8 * self.depth.max())
        return candidates[rng.integers(len(candidates))].astype(np.float64)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        return np.mgrid[0 : self.shape[0], 0 : self.shape[1]].astype(np.float64)


def _disks(shape: tuple[int, int], points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Union of disks (pixels) centred on ``points`` (k, 2); a radius under 0.5 px still marks its centre pixel."""
    out = np.zeros(shape, dtype=bool)
    h, w = shape
    for (r, c), rad in zip(points, radii, strict=True):
        rad = max(float(rad), 0.5)
        r0, r1 = max(int(math.floor(r - rad)), 0), min(int(math.ceil(r + rad)) + 1, h)
        c0, c1 = max(int(math.floor(c - rad)), 0), min(int(math.ceil(c + rad)) + 1, w)
        if r0 >= r1 or c0 >= c1:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1]
        out[r0:r1, c0:c1] |= (yy - r) ** 2 + (xx - c) ** 2 <= rad**2
        ri, ci = int(round(r)), int(round(c))
        if 0 <= ri < h and 0 <= ci < w:
            out[ri, ci] = True
    return out


def _irregular_ellipse(
    geo: OrganGeometry, center: np.ndarray, diameter_mm: float, aspect: float, rng: np.random.Generator,
    wobble: float = 0.12,
) -> np.ndarray:
    """An ellipse (major axis ``diameter_mm``) whose radius wobbles with a few random harmonics."""
    yy, xx = geo.grid()
    dy, dx = (yy - center[0]) * geo.spacing[0], (xx - center[1]) * geo.spacing[1]
    theta = rng.uniform(0, math.pi)
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    a, b = diameter_mm / 2.0, max(diameter_mm * aspect / 2.0, 1e-6)
    phi = np.arctan2(v / b, u / a)
    radius = np.ones_like(phi)
    for k in (2, 3, 5):
        radius += rng.uniform(0, wobble) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    return (u / a) ** 2 + (v / b) ** 2 <= radius**2


def _capsule_band(
    geo: OrganGeometry, fraction: float, thickness_mm: float, profile: str, rng: np.random.Generator
) -> np.ndarray:
    """Organ pixels within ``thickness(s)`` of an arc of the capsule covering ``fraction`` of its pixels.

    The arc is a run of capsule pixels in angular order around the centroid; ``s`` in [0, 1] is the
    position along it. ``profile`` "crescent" tapers to 0 at both ends (sqrt(sin(pi s)): a lentiform
    subcapsular collection); "plateau" keeps full thickness except near the ends (a thickened wall).
    """
    cap = geo.capsule
    angles = np.arctan2(cap[:, 0] - geo.centroid[0], cap[:, 1] - geo.centroid[1])
    order = np.argsort(angles, kind="stable")
    n = len(cap)
    k = int(np.clip(round(fraction * n), 1, n))
    start = int(rng.integers(n))
    arc = order[(start + np.arange(k)) % n]
    position = np.full(geo.shape, -1.0)
    position[cap[arc, 0], cap[arc, 1]] = (np.arange(k) + 0.5) / k
    s = position[geo.nearest[0], geo.nearest[1]]
    on_arc = s >= 0
    if profile == "crescent":
        taper = np.sqrt(np.clip(np.sin(math.pi * np.clip(s, 0, 1)), 0, 1))
    else:
        taper = np.clip(np.minimum(s, 1 - s) * 6.0, 0, 1)
    # Capsule pixels themselves have depth 0: half a pixel keeps the thinnest band visible.
    reach = thickness_mm * taper + 0.5 * min(geo.spacing)
    return on_arc & (geo.depth <= reach) & geo.organ


def _convex_polygon(geo: OrganGeometry, center: np.ndarray, diameter_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A random convex polygon of 3-5 vertices (an angular collection) around ``center``."""
    n_vertices = int(rng.integers(3, 6))
    # Vertices spread around the centre (evenly, jittered) so the polygon contains it.
    step = 2 * math.pi / n_vertices
    angles = rng.uniform(0, 2 * math.pi) + step * np.arange(n_vertices) + rng.uniform(-0.25, 0.25, n_vertices) * step
    radii = diameter_mm / 2.0 * rng.uniform(0.6, 1.0, n_vertices)
    vy = center[0] + radii * np.sin(angles) / geo.spacing[0]
    vx = center[1] + radii * np.cos(angles) / geo.spacing[1]
    yy, xx = geo.grid()
    inside = np.ones(geo.shape, dtype=bool)
    # Inside a counter-clockwise convex polygon = left of (or on) every edge.
    for i in range(n_vertices):
        j = (i + 1) % n_vertices
        cross = (vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i])
        inside &= cross >= -0.5
    return inside


def _walk(
    geo: OrganGeometry, start: np.ndarray, heading: np.ndarray, length_px: float, rng: np.random.Generator,
    stop_depth_mm: float | None = None, jitter: float = 0.25,
) -> np.ndarray:
    """A jagged path: half-pixel steps whose heading wanders, until ``length_px``, leaving the organ, or depth."""
    points = [np.asarray(start, dtype=np.float64)]
    angle = math.atan2(heading[0], heading[1])
    target = angle
    h, w = geo.shape
    p = points[0]
    for i in range(int(math.ceil(2 * length_px))):
        # Wander, pulled back toward the first heading (a cleft does not curl).
        angle += rng.normal(0.0, jitter) + 0.15 * (target - angle)
        p = p + 0.5 * np.array([math.sin(angle), math.cos(angle)])
        r, c = int(round(p[0])), int(round(p[1]))
        if not (0 <= r < h and 0 <= c < w) or (i > 4 and not geo.organ[r, c]):
            break
        points.append(p)
        if stop_depth_mm is not None and geo.depth[r, c] >= stop_depth_mm:
            break
    return np.array(points)


# ------------------------------------------------------------------ the shape transforms
class RandLesionMask:
    """Base: ``__call__`` on one organ mask (H, W) or a stack (n, H, W); subclasses draw one mask."""

    kind: ClassVar[str] = ""

    def __call__(
        self, organ_mask: np.ndarray, rng: np.random.Generator, spacing: float | Sequence[float] | np.ndarray = 1.0
    ) -> np.ndarray:
        """Draw a lesion inside ``organ_mask``.

        Parameters
        ----------
        organ_mask : ndarray of shape (H, W) or (n, H, W), bool
        rng : np.random.Generator
            Every random draw comes from it (same state, same masks).
        spacing : float, (row, col) pair, or ndarray of shape (n,) or (n, 2), default=1.0
            mm per pixel; for a stack, one number for all or one (or one pair) per mask.

        Returns
        -------
        ndarray of the shape of ``organ_mask``, bool, inside ``organ_mask``.
        """
        organ = np.asarray(organ_mask).astype(bool)
        if organ.ndim == 2:
            return self._one(organ, spacing, rng)
        if organ.ndim != 3:
            raise DataError(f"organ mask must have shape (H, W) or (n, H, W), got {organ.shape}")
        spacing = np.asarray(spacing, dtype=np.float64)
        if spacing.ndim == 0:
            spacing = np.full(len(organ), float(spacing))
        if spacing.shape not in ((len(organ),), (len(organ), 2)):
            raise DataError(
                f"spacing of a stack of {len(organ)} organ masks must be one number, shape ({len(organ)},) or "
                f"({len(organ)}, 2), got shape {spacing.shape}"
            )
        return np.stack([self._one(o, spacing[i], rng) for i, o in enumerate(organ)])

    def _one(self, organ: np.ndarray, spacing: Any, rng: np.random.Generator) -> np.ndarray:
        if not organ.any():
            return np.zeros_like(organ)
        geo = OrganGeometry(organ, spacing)
        mask = self.draw(geo, rng) & organ
        if not mask.any():  # smaller than a pixel where it fell: the organ's deepest pixel stands in
            mask = np.zeros_like(organ)
            r, c = np.unravel_index(np.argmax(np.where(organ, geo.depth + 1.0, 0.0)), geo.shape)
            mask[r, c] = True
        return mask

    def draw(self, geo: OrganGeometry, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class RandLacerationMask(RandLesionMask):
    """A thin, jagged cleft from the capsule inward, reaching ``depth_mm`` of depth, sometimes branching.

    Parameters
    ----------
    depth_mm : (low, high)
        Depth from the capsule (AAST: < 1 cm grade I, 1-3 cm II, > 3 cm III); capped by the organ's depth.
    width_mm : (low, high)
        Cleft width at the capsule; it narrows to half inward.
    branch_probability : float, default=0.6
        Chance of each of up to ``max_branches`` side branches.
    """

    kind = "laceration"

    def __init__(
        self, depth_mm: Sequence[float] = (10.0, 30.0), width_mm: Sequence[float] = (1.5, 5.0),
        branch_probability: float = 0.6, max_branches: int = 2,
    ) -> None:
        self.depth_mm, self.width_mm = depth_mm, width_mm
        self.branch_probability, self.max_branches = branch_probability, max_branches

    def draw(self, geo: OrganGeometry, rng: np.random.Generator) -> np.ndarray:
        depth = min(rng.uniform(*self.depth_mm), 0.95 * geo.depth.max())
        width = geo.mm_to_px(rng.uniform(*self.width_mm))
        start = geo.capsule[rng.integers(len(geo.capsule))].astype(np.float64)
        # An oblique entry: up to 35 degrees off the inward normal.
        normal = geo.inward(start)
        tilt = rng.uniform(-0.6, 0.6)
        heading = np.array([
            normal[0] * math.cos(tilt) - normal[1] * math.sin(tilt),
            normal[0] * math.sin(tilt) + normal[1] * math.cos(tilt),
        ])
        trunk = _walk(geo, start, heading, 2.5 * geo.mm_to_px(depth) + 2, rng, stop_depth_mm=depth)
        radii = 0.5 * width * np.linspace(1.0, 0.5, len(trunk))
        paths, all_radii = [trunk], [radii]
        for _ in range(self.max_branches):
            if len(trunk) < 6 or rng.random() >= self.branch_probability:
                continue
            at = int(rng.integers(len(trunk) // 3, len(trunk)))
            direction = trunk[min(at + 1, len(trunk) - 1)] - trunk[at - 1]
            turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
            a = math.atan2(direction[0], direction[1]) + turn
            branch = _walk(geo, trunk[at], np.array([math.sin(a), math.cos(a)]),
                           rng.uniform(0.3, 0.6) * len(trunk) / 2, rng)
            paths.append(branch)
            all_radii.append(radii[at] * np.linspace(0.8, 0.4, len(branch)))
        return _disks(geo.shape, np.concatenate(paths), np.concatenate(all_radii))


class RandSubcapsularHematomaMask(RandLesionMask):
    """A lentiform crescent under the capsule over ``fraction`` of the organ's outline.

    Parameters
    ----------
    fraction : (low, high)
        Share of the capsule covered (AAST: < 10 % grade I, 10-50 % II, > 50 % III of the surface).
    thickness_mm : (low, high)
        Greatest thickness, at the middle of the crescent.
    """

    kind = "subcapsular_hematoma"

    def __init__(self, fraction: Sequence[float] = (0.1, 0.5), thickness_mm: Sequence[float] = (3.0, 15.0)) -> None:
        self.fraction, self.thickness_mm = fraction, thickness_mm

    def draw(self, geo: OrganGeometry, rng: np.random.Generator) -> np.ndarray:
        fraction = rng.uniform(*self.fraction)
        thickness = min(rng.uniform(*self.thickness_mm), 0.7 * geo.depth.max() + min(geo.spacing))
        return _capsule_band(geo, fraction, thickness, "crescent", rng)


class RandParenchymalHematomaMask(RandLesionMask):
    """An ovoid with an irregular outline inside the organ.

    Parameters
    ----------
    diameter_mm : (low, high)
        Major axis (AAST spleen: < 5 cm grade II, >= 5 cm III; liver: < 10 cm / > 10 cm).
    """

    kind = "parenchymal_hematoma"

    def __init__(self, diameter_mm: Sequence[float] = (20.0, 50.0)) -> None:
        self.diameter_mm = diameter_mm

    def draw(self, geo: OrganGeometry, rng: np.random.Generator) -> np.ndarray:
        diameter = rng.uniform(*self.diameter_mm)
        aspect = rng.uniform(0.55, 1.0)
        center = geo.random_point(rng, min_depth_mm=min(0.5 * diameter * aspect, 0.6 * geo.depth.max()))
        return _irregular_ellipse(geo, center, diameter, aspect, rng)


class RandInfarctMask(RandLesionMask):
    """A wedge: apex ``depth_mm`` inside the organ, opening toward the capsule with ``angle_deg``.

    Parameters
    ----------
    depth_mm : (low, high)
    angle_deg : (low, high)
        Full opening angle of the wedge.
    """

    kind = "infarct"

    def __init__(self, depth_mm: Sequence[float] = (10.0, 40.0), angle_deg: Sequence[float] = (30.0, 75.0)) -> None:
        self.depth_mm, self.angle_deg = depth_mm, angle_deg

    def draw(self, geo: OrganGeometry, rng: np.random.Generator) -> np.ndarray:
        base = geo.capsule[rng.integers(len(geo.capsule))].astype(np.float64)
        normal = geo.inward(base)
        depth_px = geo.mm_to_px(min(rng.uniform(*self.depth_mm), 0.9 * geo.depth.max() + min(geo.spacing)))
        apex = base + normal * depth_px
        half = math.radians(rng.uniform(*self.angle_deg)) / 2.0
        yy, xx = geo.grid()
        vy, vx = yy - apex[0], xx - apex[1]
        dist = np.hypot(vy, vx)
        # Cosine between (pixel - apex) and the outward direction (-normal).
        cos = -(vy * normal[0] + vx * normal[1]) / np.maximum(dist, 1e-9)
        return (cos >= math.cos(half)) & (dist <= depth_px / max(math.cos(half), 0.3) + 1.0)


class RandExtravasationMask(RandLesionMask):
    """A small irregular blush: two to four overlapping small ellipses.

    Parameters
    ----------
    diameter_mm : (low, high)
        Size of the whole blush.
    """

    kind = "extravasation"

    def __init__(self, diameter_mm: Sequence[float] = (3.0, 15.0)) -> None:
        self.diameter_mm = diameter_mm

    def draw(self, geo: OrganGeometry, rng: np.random.Generator) -> np.ndarray:
        diameter = rng.uniform(*self.diameter_mm)
        center = geo.random_point(rng, min_depth_mm=min(0.3 * diameter, 0.5 * geo.depth.max()))
        out = np.zeros(geo.shape, dtype=bool)
        for _ in range(int(rng.integers(2, 5))):
            offset = rng.normal(0.0, diameter / 6.0, 2) / np.asarray(geo.spacing)
            out |= _irregular_ellipse(geo, center + offset, diameter * rng.uniform(0.4, 0.8),
                                      rng.uniform(0.35, 1.0), rng, wobble=0.2)
        return out


class RandBowelWallMask(RandLesionMask):
    """Thickened bowel wall: a band ``thickness_mm`` deep along ``fraction`` of the loop's outline.

    Parameters
    ----------
    thickness_mm : (low, high)
        Wall thickness (a wall above 3 mm is thickened).
    fraction : (low, high)
        Share of the outline affected.
    """

    kind = "bowel_wall"

    def __init__(self, thickness_mm: Sequence[float] = (3.0, 10.0), fraction: Sequence[float] = (0.15, 0.5)) -> None:
        self.thickness_mm, self.fraction = thickness_mm, fraction

    def draw(self, geo: OrganGeometry, rng: np.random.Generator) -> np.ndarray:
        thickness = min(rng.uniform(*self.thickness_mm), 0.7 * geo.depth.max() + min(geo.spacing))
        return _capsule_band(geo, rng.uniform(*self.fraction), thickness, "plateau", rng)


class RandBowelFluidMask(RandLesionMask):
    """Fluid between loops: an angular (triangular or polygonal) collection.

    Parameters
    ----------
    diameter_mm : (low, high)
    """

    kind = "bowel_fluid"

    def __init__(self, diameter_mm: Sequence[float] = (5.0, 30.0)) -> None:
        self.diameter_mm = diameter_mm

    def draw(self, geo: OrganGeometry, rng: np.random.Generator) -> np.ndarray:
        diameter = rng.uniform(*self.diameter_mm)
        center = geo.random_point(rng)
        return _convex_polygon(geo, center, diameter, rng)


class RandBowelGasMask(RandLesionMask):
    """Extraluminal gas: ``bubbles`` small round bubbles within ~1 cm of each other.

    Parameters
    ----------
    diameter_mm : (low, high)
        Diameter of each bubble.
    bubbles : (low, high)
        Number of bubbles (inclusive).
    """

    kind = "bowel_gas"

    def __init__(self, diameter_mm: Sequence[float] = (1.0, 5.0), bubbles: Sequence[int] = (1, 6)) -> None:
        self.diameter_mm, self.bubbles = diameter_mm, bubbles

    def draw(self, geo: OrganGeometry, rng: np.random.Generator) -> np.ndarray:
        k = int(rng.integers(int(self.bubbles[0]), int(self.bubbles[1]) + 1))
        center = geo.random_point(rng)
        offsets = rng.uniform(-10.0, 10.0, (k, 2)) / np.asarray(geo.spacing)  # mm -> px per axis
        offsets[0] = 0.0  # the first bubble at the drawn point, the others around it
        points = center + offsets
        radii = np.array([geo.mm_to_px(rng.uniform(*self.diameter_mm)) / 2.0 for _ in range(k)])
        return _disks(geo.shape, points, radii)


# ------------------------------------------------------------------ registry + factory
LESION_SHAPES: dict[str, type[RandLesionMask]] = {
    cls.kind: cls
    for cls in (
        RandLacerationMask, RandSubcapsularHematomaMask, RandParenchymalHematomaMask, RandInfarctMask,
        RandExtravasationMask, RandBowelWallMask, RandBowelFluidMask, RandBowelGasMask,
    )
}
"""Lesion kind -> its shape transform (the kinds of ``gen.lesion``, :data:`toolkit.config.LESION_KINDS`)."""


def create_lesion_mask(kind: str, grade: int, cfg: LesionGenConfig | None = None) -> RandLesionMask:
    """The shape transform of ``kind`` at ``grade`` with the sizes of ``cfg`` (default: ``gen.lesion`` defaults).

    Kinds without a graded size (infarct, extravasation, bowel findings) ignore ``grade``.
    """
    cfg = cfg or LesionGenConfig()
    if kind not in LESION_SHAPES:
        raise ConfigError(f"unknown lesion kind '{kind}'; valid kinds: {', '.join(LESION_SHAPES)}")
    if grade not in GRADES:
        raise ConfigError(f"lesion grade must be one of {', '.join(map(str, GRADES))}, got {grade}")
    g = grade - 1
    settings: dict[str, dict[str, Any]] = {
        "laceration": {"depth_mm": cfg.laceration_depth_mm[g], "width_mm": cfg.laceration_width_mm},
        "subcapsular_hematoma": {"fraction": cfg.subcapsular_fraction[g],
                                 "thickness_mm": cfg.subcapsular_thickness_mm},
        "parenchymal_hematoma": {"diameter_mm": cfg.parenchymal_diameter_mm[g]},
        "infarct": {"depth_mm": cfg.infarct_depth_mm, "angle_deg": cfg.infarct_angle_deg},
        "extravasation": {"diameter_mm": cfg.extravasation_diameter_mm},
        "bowel_wall": {"thickness_mm": cfg.bowel_wall_thickness_mm, "fraction": cfg.bowel_wall_fraction},
        "bowel_fluid": {"diameter_mm": cfg.bowel_fluid_diameter_mm},
        "bowel_gas": {"diameter_mm": cfg.bowel_gas_diameter_mm, "bubbles": cfg.bowel_gas_bubbles},
    }
    return LESION_SHAPES[kind](**settings[kind])
