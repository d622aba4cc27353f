"""Anatomy and injuries of the CT trauma phantom, rendered in Hounsfield units.

Used by :mod:`toolkit.data.phantom`, which owns the RSNA file layout. Everything here is
array in, array out: no files.

Coordinates are millimetres in the axial plane relative to the centre of the patient's
body, DICOM LPS convention: ``x`` grows towards the patient's left (image right), ``y``
towards the back (image down). ``t`` is the craniocaudal position: 0 at the liver dome,
1 at the lower poles of the kidneys; a patient's ``length_mm`` converts it to millimetres.

A patient is an :class:`AnatomyModel` (drawn once from a ``np.random.Generator``) plus a
list of :class:`Lesion`; every series of the patient renders the same model, so both
series of a patient show the same organs and the same injuries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

ORGAN_CODES: dict[str, int] = {
    "liver": 1,
    "spleen": 2,
    "kidney": 3,  # both kidneys
    "bowel": 4,  # small bowel and colon
    "aorta": 5,  # aorta and the large vessels (IVC, portal/mesenteric vessels)
    "extravasation": 6,  # only in injury maps: the active contrast blush
    "bone": 7,  # vertebra and ribs
    "stomach": 8,
}
"""Label codes of ``phantom_truth/<series_id>.npz``: ``organs`` uses the organ codes (0 = anything
else); ``injury`` holds the code of the injured organ at injured pixels (``extravasation`` for a
blush, ``bowel`` for bowel injury and its free fluid/gas), 0 elsewhere. Each file carries them as
its ``code_names`` and ``codes`` arrays."""

LIVER, SPLEEN, KIDNEY, BOWEL, AORTA, BLUSH, BONE, STOMACH = (
    ORGAN_CODES[k]
    for k in ("liver", "spleen", "kidney", "bowel", "aorta", "extravasation", "bone", "stomach")
)

# Typical attenuation (HU) of contrast-enhanced abdominal CT per phase; drawn around these.
PHASES: dict[str, dict[str, tuple[float, float]]] = {
    "arterial": {
        "aorta": (250.0, 400.0),
        "ivc": (70.0, 100.0),
        "portal": (110.0, 150.0),
        "liver": (62.0, 80.0),
        "spleen": (100.0, 130.0),
        "cortex": (170.0, 230.0),
        "medulla": (70.0, 100.0),
        "bowel_wall": (55.0, 75.0),
    },
    "portal_venous": {
        "aorta": (140.0, 210.0),
        "ivc": (120.0, 160.0),
        "portal": (150.0, 190.0),
        "liver": (95.0, 120.0),
        "spleen": (105.0, 125.0),
        "cortex": (160.0, 190.0),
        "medulla": (135.0, 165.0),
        "bowel_wall": (65.0, 90.0),
    },
}


# --------------------------------------------------------------------------- geometry helpers


class Shape:
    """A smooth random outline: ``r(theta, t) = 1 + sum_k a_k cos(k theta + phi_k + w_k t)``.

    Multiplies the radius of an ellipse so organs are irregular and change along ``t``.
    """

    def __init__(self, rng: np.random.Generator, roughness: float, orders: tuple[int, ...] = (2, 3, 4, 5)):
        self.k = np.asarray(orders, dtype=np.float32)
        self.amp = (rng.normal(0.0, roughness, len(orders)) / np.sqrt(self.k)).astype(np.float32)
        self.phase = rng.uniform(0.0, 2 * np.pi, len(orders)).astype(np.float32)
        self.drift = rng.normal(0.0, 2.5, len(orders)).astype(np.float32)

    @property
    def reach(self) -> float:
        """Largest radius factor the outline can take."""
        return float(1.0 + np.abs(self.amp).sum())

    def radius(self, theta: np.ndarray, t: np.ndarray) -> np.ndarray:
        r = np.ones_like(theta)
        for k, a, p, w in zip(self.k, self.amp, self.phase, self.drift, strict=True):
            r += a * np.cos(k * theta + (p + w * t))
        return r


def profile(t: np.ndarray, top: float, peak: float, bottom: float) -> np.ndarray:
    """Cross-section scale of an organ along ``t``: 0 outside [top, bottom], 1 at ``peak``.

    Two half-ellipsoids, so an organ grows from its top, is widest at ``peak`` and tapers.
    """
    t = np.asarray(t, dtype=np.float32)
    u = np.where(t < peak, (peak - t) / max(peak - top, 1e-3), (t - peak) / max(bottom - peak, 1e-3))
    return np.sqrt(np.clip(1.0 - u * u, 0.0, None)).astype(np.float32)


@dataclass
class Region:
    """A crop of the canvas: slice indices, a row/column window and geometry on it.

    ``q`` is the normalised radius of the shape the region was built for (< 1 inside),
    ``xx``/``yy`` the body coordinates (mm) of the window's columns/rows.
    """

    idx: np.ndarray
    rows: slice
    cols: slice
    q: np.ndarray  # (m, h, w)
    xx: np.ndarray  # (1, 1, w)
    yy: np.ndarray  # (1, h, 1)

    @property
    def key(self) -> tuple:
        return (self.idx, self.rows, self.cols)


class Canvas:
    """HU image stack + organ labels + injury labels of one series, in body coordinates.

    Parameters
    ----------
    t : ndarray of shape (n,)
        Craniocaudal position of each slice.
    xs, ys : ndarray of shape (W,), (H,)
        Body coordinates (mm) of the pixel columns and rows, increasing.
    """

    def __init__(self, t: np.ndarray, xs: np.ndarray, ys: np.ndarray):
        self.t = np.asarray(t, dtype=np.float32)
        self.xs = np.asarray(xs, dtype=np.float32)
        self.ys = np.asarray(ys, dtype=np.float32)
        shape = (len(self.t), len(self.ys), len(self.xs))
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.organs = np.zeros(shape, dtype=np.uint8)
        self.injury = np.zeros(shape, dtype=np.uint8)
        self.cavity = np.zeros(shape, dtype=bool)  # inside the abdominal wall muscles
        self.wall = np.zeros(shape, dtype=bool)  # inside the subcutaneous fat

    def copy(self) -> Canvas:
        out = Canvas.__new__(Canvas)
        out.t, out.xs, out.ys = self.t, self.xs, self.ys
        out.hu, out.organs, out.injury = self.hu.copy(), self.organs.copy(), self.injury.copy()
        out.cavity, out.wall = self.cavity, self.wall
        return out

    @property
    def pixel_mm(self) -> float:
        return float(self.xs[1] - self.xs[0])

    def region(
        self,
        cx,
        cy,
        ax,
        ay,
        shape: Shape | None = None,
        angle: float = 0.0,
        reach: float | None = None,
    ) -> Region | None:
        """Window around an (irregular, rotated) ellipse per slice; None if it is nowhere.

        ``cx, cy, ax, ay`` are scalars or arrays of shape (n,) in mm; slices where an axis
        is below half a millimetre do not hold the shape.
        """
        n = len(self.t)
        cx, cy, ax, ay = (np.broadcast_to(np.asarray(v, dtype=np.float32), (n,)) for v in (cx, cy, ax, ay))
        idx = np.flatnonzero((ax > 0.5) & (ay > 0.5))
        if idx.size == 0:
            return None
        r = (
            reach if reach is not None else np.maximum(ax[idx], ay[idx]) * (shape.reach if shape else 1.0)
        ) + 2 * (self.pixel_mm)
        r = np.broadcast_to(np.asarray(r, dtype=np.float32), idx.shape)
        c0 = int(np.searchsorted(self.xs, float(np.min(cx[idx] - r))))
        c1 = int(np.searchsorted(self.xs, float(np.max(cx[idx] + r)), side="right"))
        r0 = int(np.searchsorted(self.ys, float(np.min(cy[idx] - r))))
        r1 = int(np.searchsorted(self.ys, float(np.max(cy[idx] + r)), side="right"))
        if c1 <= c0 or r1 <= r0:
            return None
        xx = self.xs[c0:c1][None, None, :]
        yy = self.ys[r0:r1][None, :, None]
        dx = xx - cx[idx][:, None, None]
        dy = yy - cy[idx][:, None, None]
        if angle:
            c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
            dx, dy = dx * c + dy * s, -dx * s + dy * c
        u = dx / ax[idx][:, None, None]
        v = dy / ay[idx][:, None, None]
        q = np.sqrt(u * u + v * v)
        if shape is not None:
            q = q / shape.radius(np.arctan2(v, u), self.t[idx][:, None, None])
        return Region(idx, slice(r0, r1), slice(c0, c1), q.astype(np.float32), xx, yy)

    def get(self, region: Region, name: str) -> np.ndarray:
        return getattr(self, name)[region.key]

    def paint(
        self,
        region: Region | None,
        mask: np.ndarray,
        value,
        organ: int | None = None,
        injury: int | None = None,
    ) -> None:
        """Set HU (scalar or array) and optionally labels where ``mask`` (region-shaped) holds."""
        if region is None:
            return
        key = region.key
        hu = self.hu[key]
        np.copyto(hu, np.asarray(value, dtype=np.float32), where=mask)
        self.hu[key] = hu
        if organ is not None:
            lab = self.organs[key]
            lab[mask] = organ
            self.organs[key] = lab
        if injury is not None:
            lab = self.injury[key]
            lab[mask] = injury
            self.injury[key] = lab


def polyline_distance(xx: np.ndarray, yy: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance (mm) from each grid point to a polyline of ``points`` (k, 2); broadcasts."""
    best = None
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        dx, dy = x1 - x0, y1 - y0
        px, py = xx - x0, yy - y0
        h = np.clip((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
        d = np.hypot(px - h * dx, py - h * dy)
        best = d if best is None else np.minimum(best, d)
    return best


# --------------------------------------------------------------------------- patient model


@dataclass
class Tube:
    """A bowel loop (or vessel) crossing slices: circle of ``radius`` moving linearly in t."""

    x0: float
    y0: float
    dx: float  # mm moved over the loop's t range
    dy: float
    t0: float
    t1: float
    radius: float
    wall: float
    content: str  # fluid | gas | mixed | stool
    fluid_hu: float

    def centre(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.clip((t - self.t0) / max(self.t1 - self.t0, 1e-3), 0.0, 1.0)
        return self.x0 + s * self.dx, self.y0 + s * self.dy

    def present(self, t: np.ndarray) -> np.ndarray:
        return (t >= self.t0) & (t <= self.t1)


@dataclass
class Lesion:
    """One injury of a patient, in body coordinates.

    ``organ`` is one of ``liver, spleen, kidney, bowel, extravasation``; ``grade`` 1 (low /
    injury) or 2 (high). The lesion spans ``|t - tc| < half_t``.
    """

    organ: str
    grade: int
    tc: float
    half_t: float
    x: float
    y: float
    radius: tuple[float, float]
    angle: float
    shape: Shape
    delta: float  # HU drop of the hematoma (or blush HU factor for extravasation)
    branches: list[np.ndarray] = field(default_factory=list)  # laceration polylines, mm from centre
    width: float = 4.0  # laceration width, mm
    side: int = 0  # kidney: -1 right, +1 left
    loop: int = -1  # bowel: index of the injured loop
    rim: float = 0.0  # high grade: thickness (mm) of the surrounding hematoma / hemoperitoneum
    extras: list[tuple[float, float, float]] = field(default_factory=list)  # (dx, dy, r): fluid/gas


class AnatomyModel:
    """One phantom patient: body habitus, organ geometry, bowel loops.

    Parameters
    ----------
    rng : numpy.random.Generator
        The patient's generator; everything about the patient is drawn from it here.
    """

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.length_mm = u(180.0, 230.0)  # liver dome -> kidney lower poles
        # Body habitus: semi-axes (mm) including subcutaneous fat.
        self.A = u(135.0, 168.0)
        self.B = self.A * u(0.68, 0.80)
        self.body_shape = Shape(rng, 0.025, (2, 3, 4))
        self.fat = u(8.0, 30.0)
        self.muscle = u(8.0, 13.0)
        self.q_fat = 1.0 - self.fat / self.B
        self.q_cav = 1.0 - (self.fat + self.muscle) / self.B
        cA, cB = self.A * self.q_cav, self.B * self.q_cav
        self.cA, self.cB = cA, cB
        self.hu_fat = u(-110.0, -90.0)
        self.hu_visceral_fat = u(-100.0, -80.0)
        self.hu_muscle = u(42.0, 58.0)
        # Spine.
        self.rv = u(16.0, 21.0)
        self.yv = 0.30 * self.B + u(-4.0, 4.0)
        self.hu_cortical = u(600.0, 850.0)
        self.hu_cancellous = u(170.0, 280.0)
        self.spine_phase = u(0.0, 1.0)
        # Vessels.
        self.r_aorta = u(9.0, 12.5)
        self.aorta = (self.rv * 0.35 + u(0.0, 6.0), self.yv - self.rv - 6.0 - self.r_aorta)
        self.ivc = (-(self.rv * 0.6 + 10.0) + u(-4, 4), self.yv - self.rv - 8.0)
        # Liver: right lobe + left lobe.
        self.liver_bottom = u(0.60, 0.75)
        self.liver_right = Shape(rng, 0.06)
        self.liver_left = Shape(rng, 0.08)
        self.liver_left_size = u(0.8, 1.2)
        self.liver_vessels = [
            (u(-0.75, -0.15) * cA, u(-0.5, 0.4) * cB, u(0.02, 0.5), u(3.0, 5.5), rng.normal(0, 15, 2))
            for _ in range(int(rng.integers(5, 10)))
        ]
        # Spleen.
        self.spleen_top, self.spleen_bottom = u(0.03, 0.12), u(0.40, 0.55)
        self.spleen_size = u(0.8, 1.25)
        self.spleen_angle = np.deg2rad(u(110.0, 140.0))
        self.spleen_shape = Shape(rng, 0.07)
        # Kidneys: side -1 = patient's right (image left), +1 = left.
        self.kidneys = {}
        for side in (-1, 1):
            top = u(0.40, 0.46) if side > 0 else u(0.46, 0.52)
            self.kidneys[side] = dict(
                x=side * u(58.0, 72.0),
                y=self.yv + u(-8.0, 4.0),
                ax=u(26.0, 32.0),
                ay=u(19.0, 24.0),
                angle=np.deg2rad(side * u(25.0, 45.0)),
                top=top,
                bottom=top + u(0.48, 0.55),
                shape=Shape(rng, 0.035),
            )
        # Stomach and gallbladder.
        self.stomach_gas = u(0.0, 0.7)
        self.stomach_fluid = u(5.0, 25.0)
        self.stomach_shape = Shape(rng, 0.08)
        self.gallbladder = bool(rng.random() < 0.6)
        self.gallbladder_hu = u(0.0, 15.0)
        # Bowel: small bowel loops in the anterior lower abdomen, then the colon.
        self.loops: list[Tube] = []
        for _ in range(int(rng.integers(12, 18))):
            t0 = u(0.36, 0.92)
            content = rng.choice(["fluid", "gas", "mixed"], p=[0.6, 0.12, 0.28])
            self.loops.append(
                Tube(
                    x0=u(-0.55, 0.55) * cA,
                    y0=u(-0.82, 0.0) * cB,
                    dx=rng.normal(0, 15),
                    dy=rng.normal(0, 12),
                    t0=t0,
                    t1=t0 + u(0.12, 0.35),
                    radius=u(8.0, 13.0),
                    wall=u(2.5, 3.5),
                    content=str(content),
                    fluid_hu=u(5.0, 25.0),
                )
            )
        self.colon = [
            Tube(
                -0.72 * cA,
                -0.05 * cB + u(-8, 8),
                rng.normal(0, 6),
                rng.normal(0, 6),
                u(0.5, 0.6),
                1.2,
                u(15.0, 22.0),
                2.5,
                "stool",
                0.0,
            ),
            Tube(
                0.74 * cA,
                0.08 * cB + u(-8, 8),
                rng.normal(0, 6),
                rng.normal(0, 6),
                u(0.3, 0.4),
                1.2,
                u(12.0, 16.0),
                2.5,
                "stool",
                0.0,
            ),
        ]
        self.transverse = (u(0.42, 0.5), u(0.14, 0.2), -0.62 * cB + u(-6, 6), u(14.0, 19.0))
        # Ribs: angle around the body and the phase of their appearance along z.
        self.ribs = [(a, u(0, 1), u(3.5, 5.5)) for a in np.deg2rad(np.arange(-180, 180, 24) + u(-8, 8))]
        self.table_gap = u(4.0, 20.0)
        # Texture: amplitude of organ heterogeneity and mesenteric strands.
        self.texture = u(3.0, 7.0)

    # ----------------------------------------------------------------- organ outlines

    def liver_parts(self, t: np.ndarray) -> list[tuple]:
        """(cx, cy, ax, ay, shape) per liver lobe, arrays over t."""
        cA, cB = self.cA, self.cB
        f = profile(t, -0.02, 0.2, self.liver_bottom)
        s = np.clip(t, 0, 1)
        # The right lobe is drawn larger than the cavity at the dome and clipped by the wall,
        # so it hugs the ribs as a real liver does; it shrinks posterolaterally going down.
        right = (
            -(0.36 + 0.2 * s) * cA,
            (0.02 + 0.2 * s) * cB,
            0.58 * cA * f,
            0.88 * cB * f,
            self.liver_right,
        )
        g = profile(t, 0.0, 0.15, 0.42) * self.liver_left_size
        left = (0.05 * cA + 0 * s, -0.5 * cB + 0 * s, 0.5 * cA * g, 0.32 * cB * g, self.liver_left)
        return [right, left]

    def spleen_part(self, t: np.ndarray) -> tuple:
        f = profile(t, self.spleen_top, 0.25, self.spleen_bottom) * self.spleen_size
        return (0.62 * self.cA, 0.32 * self.cB, 50.0 * f, 26.0 * f, self.spleen_shape)

    def kidney_part(self, t: np.ndarray, side: int) -> tuple:
        k = self.kidneys[side]
        f = profile(t, k["top"], 0.5 * (k["top"] + k["bottom"]), k["bottom"])
        return (k["x"], k["y"], k["ax"] * f, k["ay"] * f, k["shape"])

    # ----------------------------------------------------------------- rendering

    def render(self, canvas: Canvas, hu: dict[str, float], rng: np.random.Generator) -> Canvas:
        """Paint the anatomy into ``canvas`` with phase attenuations ``hu``; returns it."""
        t = canvas.t
        full = canvas.region(0.0, 0.0, self.A, self.B, self.body_shape)
        body = full.q < 1.0
        canvas.cavity = np.broadcast_to(np.zeros((1,) + canvas.hu.shape[1:], bool), canvas.hu.shape).copy()
        canvas.cavity[full.key] = full.q < self.q_cav
        canvas.wall = np.zeros_like(canvas.cavity)
        canvas.wall[full.key] = full.q < self.q_fat
        self._table(canvas)
        canvas.paint(full, body, self.hu_fat)
        canvas.paint(full, body & (full.q < self.q_fat), self.hu_muscle)
        canvas.paint(full, full.q < self.q_cav, self.hu_visceral_fat)
        self._ribs(canvas)
        self._bowel(canvas, hu, rng)
        self._stomach(canvas, hu)
        # Kidneys: enhancing cortex around the medulla, sinus fat at the hilum.
        for side in (-1, 1):
            k = self.kidneys[side]
            cx, cy, ax, ay, shape = self.kidney_part(t, side)
            reg = canvas.region(cx, cy, ax, ay, shape, k["angle"])
            if reg is None:
                continue
            inside = (reg.q < 1.0) & canvas.get(reg, "cavity")
            canvas.paint(reg, inside, hu["cortex"], organ=KIDNEY)
            canvas.paint(reg, inside & (reg.q < 0.68), hu["medulla"])
            f = ax / max(k["ax"], 1e-3)
            sinus = canvas.region(
                cx - side * 0.40 * ax, cy - 0.35 * ay, 0.32 * k["ax"] * (f > 0.6), 0.28 * k["ay"] * (f > 0.6)
            )
            if sinus is not None:
                canvas.paint(sinus, sinus.q < 1.0, self.hu_visceral_fat + 30.0, organ=0)
        # Liver, then its vessels (brighter in the portal phase), then the gallbladder.
        for cx, cy, ax, ay, shape in self.liver_parts(t):
            reg = canvas.region(cx, cy, ax, ay, shape)
            if reg is not None:
                canvas.paint(reg, (reg.q < 1.0) & canvas.get(reg, "cavity"), hu["liver"], organ=LIVER)
        for vx, vy, vt, vr, (ddx, ddy) in self.liver_vessels:
            pres = np.abs(t - vt) < 0.12
            reg = canvas.region(vx + ddx * (t - vt), vy + ddy * (t - vt), vr * pres, vr * pres)
            if reg is not None:
                canvas.paint(reg, (reg.q < 1.0) & (canvas.get(reg, "organs") == LIVER), hu["portal"] - 25.0)
        cx, cy, ax, ay, shape = self.spleen_part(t)
        reg = canvas.region(cx, cy, ax, ay, shape, self.spleen_angle)
        if reg is not None:
            canvas.paint(reg, (reg.q < 1.0) & canvas.get(reg, "cavity"), hu["spleen"], organ=SPLEEN)
        if self.gallbladder:
            f = profile(t, 0.30, 0.42, 0.56)
            reg = canvas.region(-0.15 * self.cA, -0.40 * self.cB, 16.0 * f, 12.0 * f)
            if reg is not None:
                canvas.paint(reg, reg.q < 1.0, self.gallbladder_hu, organ=0)
        # Last the structures organs must not cover: lung bases behind the liver and spleen,
        # the spine with its muscles, the great vessels.
        self._lungs(canvas)
        self._spine(canvas)
        self._vessels(canvas, hu)
        self._texture(canvas, rng)
        return canvas

    def _table(self, canvas: Canvas) -> None:
        x = canvas.xs[None, :]
        y = canvas.ys[:, None]
        top = self.B * 1.06 + self.table_gap + 0.0008 * x * x
        band = ((y > top) & (y < top + 4.0)) | ((y > top + 22.0) & (y < top + 25.0))
        foam = (y >= top + 4.0) & (y <= top + 22.0)
        canvas.hu[:, band] = 90.0
        canvas.hu[:, foam] = -250.0

    def _ribs(self, canvas: Canvas) -> None:
        t = canvas.t
        q_ring = 0.5 * (self.q_fat + self.q_cav)
        for angle, phase, r in self.ribs:
            a = angle + 0.25 * t
            ca, sa = np.cos(a), np.sin(a)
            # Only lateral/posterior ribs reach the lower slices.
            anterior = sa < -0.35
            visible = ((t * self.length_mm / 28.0 + phase) % 1.0) < 0.45
            visible &= np.where(anterior, t < 0.3, t < 0.85 - 0.3 * (sa < 0))
            visible &= np.abs(ca) > 0.15  # no ribs at the midline (sternum, spine)
            rad = q_ring * self.body_shape.radius(np.arctan2(sa, ca), t)
            reg = canvas.region(self.A * rad * ca, self.B * rad * sa, r * visible, r * visible)
            if reg is not None:
                canvas.paint(reg, reg.q < 1.0, self.hu_cortical * 0.6, organ=BONE)
                canvas.paint(reg, reg.q < 0.55, self.hu_cancellous)

    def _lungs(self, canvas: Canvas) -> None:
        t = canvas.t
        f = np.sqrt(np.clip(1.0 - t / 0.16, 0.0, None))
        for side in (-1, 1):
            reg = canvas.region(side * 0.55 * self.cA, 0.6 * self.cB, 0.36 * self.cA * f, 0.38 * self.cB * f)
            if reg is not None:
                canvas.paint(reg, (reg.q < 1.0) & canvas.get(reg, "cavity"), -850.0, organ=0)

    def _spine(self, canvas: Canvas) -> None:
        t = canvas.t
        rv, yv = self.rv, self.yv
        level = (t * self.length_mm / 32.0 + self.spine_phase) % 1.0
        disc = level < 0.18
        # Paraspinal muscles, psoas.
        for side in (-1, 1):
            reg = canvas.region(side * (rv + 14.0), yv + rv + 22.0, 26.0, 23.0)
            canvas.paint(reg, (reg.q < 1.0) & canvas.get(reg, "wall"), self.hu_muscle, organ=0)
            g = np.clip((t - 0.45) / 0.55, 0.0, 1.0) * (t > 0.45)
            reg = canvas.region(side * (rv + 11.0 + 6 * g), yv - 3.0, 6.0 + 12.0 * g, 7.0 + 8.0 * g)
            if reg is not None:
                canvas.paint(reg, reg.q < 1.0, self.hu_muscle, organ=0)
        # Vertebral body: cortical rim, cancellous core; discs are soft tissue.
        reg = canvas.region(0.0, yv, rv, rv * 0.92)
        core = np.where(disc[reg.idx][:, None, None], 90.0, self.hu_cancellous)
        canvas.paint(reg, reg.q < 1.0, self.hu_cortical, organ=BONE)
        canvas.paint(reg, reg.q < 0.84, core)
        # Posterior arch: pedicles and laminae around the canal, then the spinous process.
        back = yv + 0.9 * rv
        arch = np.array(
            [[-9.0, back], [-8.0, back + 12.0], [0.0, back + 19.0], [8.0, back + 12.0], [9.0, back]]
        )
        reg = canvas.region(0.0, back + 10.0, 1.0, 1.0, reach=22.0)
        d = polyline_distance(reg.xx, reg.yy, arch)
        canvas.paint(reg, np.broadcast_to(d < 2.2, reg.q.shape), self.hu_cortical * 0.8, organ=BONE)
        canal = (reg.xx**2 + (reg.yy - back - 7.0) ** 2 < 6.5**2) & (reg.q >= 0)
        canvas.paint(reg, canal, 25.0, organ=0)
        arms = ~disc & (level < 0.6)
        reg = canvas.region(0.0, back + 28.0, 3.5 * arms, 10.0 * arms)
        if reg is not None:
            canvas.paint(reg, reg.q < 1.0, self.hu_cortical * 0.7, organ=BONE)
        for side in (-1, 1):
            reg = canvas.region(side * (rv + 10.0), yv + 0.55 * rv, 13.0 * arms, 5.0 * arms)
            if reg is not None:
                canvas.paint(reg, reg.q < 1.0, self.hu_cortical * 0.6, organ=BONE)

    def _vessels(self, canvas: Canvas, hu: dict[str, float]) -> None:
        t = canvas.t
        reg = canvas.region(self.aorta[0], self.aorta[1], self.r_aorta, self.r_aorta)
        canvas.paint(reg, reg.q < 1.0, hu["aorta"], organ=AORTA)
        reg = canvas.region(self.ivc[0], self.ivc[1], 13.0, 9.0)
        canvas.paint(reg, reg.q < 1.0, hu["ivc"], organ=AORTA)
        # Portal vein in the hilum; superior mesenteric artery and vein below it.
        pv = profile(t, 0.22, 0.32, 0.45)
        reg = canvas.region(-0.22 * self.cA, -0.05 * self.cB, 14.0 * pv, 8.0 * pv, angle=0.5)
        if reg is not None:
            canvas.paint(reg, reg.q < 1.0, hu["portal"], organ=AORTA)
        mes = ((t > 0.42) & (t < 0.9)).astype(np.float32)
        ay = self.aorta[1]
        reg = canvas.region(self.aorta[0] - 6.0, ay - 22.0 - 10.0 * t, 4.0 * mes, 4.0 * mes)
        if reg is not None:
            canvas.paint(reg, reg.q < 1.0, hu["aorta"] * 0.9, organ=AORTA)
        reg = canvas.region(self.aorta[0] - 20.0, ay - 20.0 - 10.0 * t, 5.5 * mes, 5.5 * mes)
        if reg is not None:
            canvas.paint(reg, reg.q < 1.0, hu["portal"], organ=AORTA)

    def _stomach(self, canvas: Canvas, hu: dict[str, float]) -> None:
        t = canvas.t
        f = profile(t, 0.05, 0.22, 0.46)
        cy = -0.25 * self.cB
        reg = canvas.region(0.30 * self.cA, cy, 0.30 * self.cA * f, 0.30 * self.cB * f, self.stomach_shape)
        if reg is None:
            return
        inside = (reg.q < 1.0) & canvas.get(reg, "cavity")
        canvas.paint(reg, inside, hu["bowel_wall"], organ=STOMACH)
        ay = 0.30 * self.cB * f[reg.idx][:, None, None]
        lumen = inside & (reg.q < 0.82)
        canvas.paint(reg, lumen, self.stomach_fluid)
        gas = lumen & (reg.yy < cy - ay * (1.0 - 2.0 * self.stomach_gas) * 0.8)
        canvas.paint(reg, gas, -950.0)

    def _bowel(self, canvas: Canvas, hu: dict[str, float], rng: np.random.Generator) -> None:
        t = canvas.t
        mottle = None
        for tube in self.colon + self.loops:
            pres = tube.present(t)
            cx, cy = tube.centre(t)
            reg = canvas.region(cx, cy, tube.radius * pres, tube.radius * pres)
            if reg is None:
                continue
            inside = (reg.q < 1.0) & canvas.get(reg, "cavity")
            canvas.paint(reg, inside, hu["bowel_wall"], organ=BOWEL)
            lumen = inside & (reg.q < 1.0 - tube.wall / tube.radius)
            if tube.content == "gas":
                canvas.paint(reg, lumen, -950.0)
            elif tube.content == "mixed":
                canvas.paint(reg, lumen, tube.fluid_hu)
                canvas.paint(reg, lumen & (reg.yy < cy[reg.idx][:, None, None] - 0.2 * tube.radius), -950.0)
            elif tube.content == "stool":
                if mottle is None:
                    mottle = ndimage.gaussian_filter(
                        rng.standard_normal(canvas.hu.shape).astype(np.float32), (0.0, 1.0, 1.0)
                    )
                    mottle /= mottle.std() + 1e-6
                m = mottle[reg.key]
                canvas.paint(reg, lumen, np.where(m > 0.7, -900.0, -40.0 + 40.0 * m))
            else:
                canvas.paint(reg, lumen, tube.fluid_hu)
        # Transverse colon: a wide ellipse across the anterior abdomen.
        tc, half, y, r = self.transverse
        f = np.sqrt(np.clip(1.0 - ((t - tc) / half) ** 2, 0.0, None))
        reg = canvas.region(0.0, y, 0.55 * self.cA * f, r * f)
        if reg is not None:
            inside = (reg.q < 1.0) & canvas.get(reg, "cavity")
            canvas.paint(reg, inside, hu["bowel_wall"], organ=BOWEL)
            canvas.paint(reg, inside & (reg.q < 0.8), -900.0)

    def _texture(self, canvas: Canvas, rng: np.random.Generator) -> None:
        """Parenchymal heterogeneity and mesenteric strands: smooth noise, organ-dependent amplitude."""
        field_ = ndimage.gaussian_filter(
            rng.standard_normal(canvas.hu.shape).astype(np.float32), (0.0, 1.5, 1.5)
        )
        field_ /= field_.std() + 1e-6
        solid = np.isin(canvas.organs, (LIVER, SPLEEN, KIDNEY))
        fat = canvas.cavity & (canvas.organs == 0) & (canvas.hu < -50.0) & (canvas.hu > -150.0)
        canvas.hu += field_ * np.where(solid, self.texture, np.where(fat, 12.0, 0.0)).astype(np.float32)

    # ----------------------------------------------------------------- injuries

    def organ_centre(self, organ: str, t: float, side: int = 0) -> tuple[float, float, float, float, float]:
        """(cx, cy, ax, ay, angle) of an organ's cross-section at ``t`` (main lobe for the liver)."""
        tt = np.asarray([t], dtype=np.float32)
        if organ == "liver":
            cx, cy, ax, ay, _ = self.liver_parts(tt)[0]
            angle = 0.0
        elif organ == "spleen":
            cx, cy, ax, ay, _ = self.spleen_part(tt)
            angle = self.spleen_angle
        else:
            cx, cy, ax, ay, _ = self.kidney_part(tt, side)
            angle = self.kidneys[side]["angle"]
        return float(np.ravel(cx)[0]), float(np.ravel(cy)[0]), float(ax[0]), float(ay[0]), float(angle)

    def organ_range(self, organ: str, side: int = 0) -> tuple[float, float]:
        """t range where the organ's cross-section is at least 60 % of its largest."""
        ts = np.linspace(-0.05, 1.1, 231, dtype=np.float32)
        if organ == "liver":
            size = self.liver_parts(ts)[0][2]
        elif organ == "spleen":
            size = self.spleen_part(ts)[2]
        else:
            size = self.kidney_part(ts, side)[2]
        ok = ts[size >= 0.6 * size.max()]
        return float(ok.min()), float(ok.max())

    def draw_lesion(self, organ: str, grade: int, rng: np.random.Generator, min_half_t: float) -> Lesion:
        """A random injury of ``organ`` (grade 1 low / 2 high); ``min_half_t`` keeps it on >= 1 slice."""
        u = rng.uniform
        high = grade == 2
        shape = Shape(rng, 0.12, (2, 3, 4))
        if organ in ("liver", "spleen", "kidney"):
            side = int(rng.choice([-1, 1])) if organ == "kidney" else 0
            lo, hi = self.organ_range(organ, side)
            tc = u(lo + 0.25 * (hi - lo), hi - 0.25 * (hi - lo))
            cx, cy, ax, ay, angle = self.organ_centre(organ, tc, side)
            # A point inside the organ, away from its rim.
            r, a = np.sqrt(u(0, 1)) * 0.5, u(0, 2 * np.pi)
            ox, oy = r * ax * np.cos(a), r * ay * np.sin(a)
            c, s = np.cos(angle), np.sin(angle)
            x, y = cx + ox * c - oy * s, cy + ox * s + oy * c
            # Lacerations and hematomas run several centimetres craniocaudally, so an injured organ
            # shows its injury on a good share of its slices (half the organ's length or more).
            half_t = (u(0.55, 0.75) if high else u(0.4, 0.55)) * (hi - lo) + 0.06
            radius = (u(26.0, 36.0), u(22.0, 30.0)) if high else (u(18.0, 26.0), u(15.0, 22.0))
            branches = []
            for _ in range(int(rng.integers(3, 6)) if high else int(rng.integers(1, 3))):
                length = u(30.0, 65.0) if high else u(16.0, 30.0)
                direction = u(0, 2 * np.pi)
                pts = [np.zeros(2)]
                for _ in range(3):
                    direction += rng.normal(0, 0.5)
                    pts.append(pts[-1] + length / 3 * np.array([np.cos(direction), np.sin(direction)]))
                branches.append(np.asarray(pts, dtype=np.float32))
            return Lesion(
                organ=organ,
                grade=grade,
                tc=tc,
                half_t=max(half_t, min_half_t),
                x=x,
                y=y,
                radius=radius,
                angle=u(0, np.pi),
                shape=shape,
                # Portal-venous parenchyma enhances to ~100-130 HU, unenhancing clot ~50-70 HU.
                delta=u(45.0, 65.0) if organ != "kidney" else u(70.0, 100.0),
                branches=branches,
                width=u(5.0, 7.0) if high else u(4.0, 6.0),
                side=side,
                rim=u(6.0, 12.0) if high else 0.0,
            )
        if organ == "extravasation":
            site = rng.choice(["liver", "spleen", "kidney", "mesentery"])
            if site == "mesentery":
                loop = self.loops[int(rng.integers(len(self.loops)))]
                tc = u(loop.t0, loop.t1)
                cx, cy = loop.centre(np.float32(tc))
                a = u(0, 2 * np.pi)
                x, y = (
                    float(cx) + (loop.radius + 8.0) * np.cos(a),
                    float(cy) + (loop.radius + 8.0) * np.sin(a),
                )
            else:
                side = int(rng.choice([-1, 1])) if site == "kidney" else 0
                lo, hi = self.organ_range(str(site), side)
                tc = u(lo, hi)
                cx, cy, ax, ay, angle = self.organ_centre(str(site), tc, side)
                a = u(0, 2 * np.pi)
                ox, oy = 0.85 * ax * np.cos(a), 0.85 * ay * np.sin(a)
                c, s = np.cos(angle), np.sin(angle)
                x, y = cx + ox * c - oy * s, cy + ox * s + oy * c
            return Lesion(
                organ=organ,
                grade=1,
                tc=tc,
                half_t=max(u(25.0, 45.0) / self.length_mm, min_half_t),
                x=float(x),
                y=float(y),
                radius=(u(11.0, 16.0), u(10.0, 14.0)),
                angle=u(0, np.pi),
                shape=shape,
                delta=u(0.9, 1.15),
                rim=u(6.0, 12.0),
            )
        if organ == "bowel":
            j = int(rng.integers(len(self.loops)))
            loop = self.loops[j]
            tc = u(loop.t0 + 0.2 * (loop.t1 - loop.t0), loop.t1 - 0.2 * (loop.t1 - loop.t0))
            extras = []
            for _ in range(int(rng.integers(1, 4))):  # free fluid between loops
                a = u(0, 2 * np.pi)
                d = loop.radius + u(8.0, 18.0)
                extras.append((d * np.cos(a), d * np.sin(a), u(11.0, 17.0)))
            for _ in range(int(rng.integers(0, 4))):  # extraluminal gas bubbles
                a = u(0, 2 * np.pi)
                d = loop.radius + u(3.0, 8.0)
                extras.append((d * np.cos(a), d * np.sin(a), -u(2.5, 4.0)))
            return Lesion(
                organ=organ,
                grade=1,
                tc=tc,
                half_t=max(u(30.0, 50.0) / self.length_mm, min_half_t),
                x=0.0,
                y=0.0,
                radius=(loop.radius, loop.radius),
                angle=0.0,
                shape=shape,
                delta=u(10.0, 22.0),  # free fluid HU
                width=u(4.0, 7.0),  # extra wall thickness
                loop=j,
                extras=extras,
            )
        raise ValueError(f"unknown injured organ {organ!r}")

    def render_lesion(self, canvas: Canvas, lesion: Lesion, hu: dict[str, float]) -> None:
        """Paint one injury into ``canvas`` (HU and injury map)."""
        t = canvas.t
        f = np.sqrt(np.clip(1.0 - ((t - lesion.tc) / lesion.half_t) ** 2, 0.0, None)).astype(np.float32)
        if not f.any():
            return
        code = ORGAN_CODES[lesion.organ]
        if lesion.organ in ("liver", "spleen", "kidney"):
            own = code
            # Hematoma: an irregular hypodense blob inside the parenchyma.
            r1, r2 = lesion.radius
            reg = canvas.region(
                lesion.x, lesion.y, r1 * np.sqrt(f), r2 * np.sqrt(f), lesion.shape, lesion.angle
            )
            if reg is not None:
                m = (reg.q < 1.0) & (canvas.get(reg, "organs") == own)
                canvas.paint(reg, m, canvas.get(reg, "hu") - lesion.delta, injury=code)
            # Lacerations: jagged hypodense clefts from the hematoma.
            reach = max(float(np.abs(b).max()) for b in lesion.branches) + lesion.width
            on = (f > 0.25).astype(np.float32)
            reg = canvas.region(lesion.x, lesion.y, reach * on, reach * on, reach=reach)
            if reg is not None:
                dx = reg.xx - lesion.x
                dy = reg.yy - lesion.y
                drift = (t[reg.idx] - lesion.tc)[:, None, None] * 40.0  # clefts move a little along z
                m = np.zeros(reg.q.shape, dtype=bool)
                for b in lesion.branches:
                    m |= polyline_distance(dx - drift, dy, b) < lesion.width / 2
                m &= canvas.get(reg, "organs") == own
                canvas.paint(reg, m, canvas.get(reg, "hu") - lesion.delta - 15.0, injury=code)
            if lesion.rim > 0:
                self._rim(canvas, own, code, lesion, f, hu_value=45.0 + 0.1 * lesion.delta)
        elif lesion.organ == "extravasation":
            reg = canvas.region(
                lesion.x, lesion.y, lesion.rim + lesion.radius[0] * f, lesion.rim + lesion.radius[1] * f
            )
            if reg is not None:
                m = (reg.q < 1.0) & canvas.get(reg, "cavity") & (canvas.get(reg, "organs") == 0)
                canvas.paint(reg, m, 50.0)  # surrounding hematoma
            r1, r2 = lesion.radius
            reg = canvas.region(
                lesion.x, lesion.y, r1 * np.sqrt(f), r2 * np.sqrt(f), lesion.shape, lesion.angle
            )
            if reg is not None:
                m = (reg.q < 1.0) & canvas.get(reg, "cavity")
                # Isodense to the aorta or brighter, as contrast pools outside the vessel.
                canvas.paint(reg, m, max(hu["aorta"] * lesion.delta, 220.0), injury=code)
        elif lesion.organ == "bowel":
            loop = self.loops[lesion.loop]
            cx, cy = loop.centre(t)
            on = (f > 0) & loop.present(t)
            outer = loop.radius + lesion.width
            reg = canvas.region(cx, cy, outer * on, outer * on)
            if reg is not None:
                # Thickened, hyperenhancing wall.
                ring = (reg.q < 1.0) & (reg.q > (loop.radius - loop.wall) / outer) & canvas.get(reg, "cavity")
                ring &= np.isin(canvas.get(reg, "organs"), (0, BOWEL))
                canvas.paint(reg, ring, hu["bowel_wall"] + 15.0, organ=BOWEL, injury=code)
            for ex, ey, r in lesion.extras:
                rr = abs(r) * np.sqrt(f) * on
                reg = canvas.region(cx + ex, cy + ey, rr, rr)
                if reg is None:
                    continue
                m = (reg.q < 1.0) & canvas.get(reg, "cavity") & (canvas.get(reg, "organs") == 0)
                canvas.paint(reg, m, lesion.delta if r > 0 else -900.0, injury=code)

    def _rim(
        self, canvas: Canvas, own: int, code: int, lesion: Lesion, f: np.ndarray, hu_value: float
    ) -> None:
        """High grade: hematoma / hemoperitoneum hugging the organ near the lesion."""
        idx = np.flatnonzero(f > 0.2)
        if idx.size == 0:
            return
        it = max(1, int(round(lesion.rim / canvas.pixel_mm)))
        organ = canvas.organs[idx] == own
        grown = ndimage.binary_dilation(
            organ, structure=ndimage.generate_binary_structure(3, 1)[1:2], iterations=it
        )
        near = (canvas.xs[None, None, :] - lesion.x) ** 2 + (canvas.ys[None, :, None] - lesion.y) ** 2 < (
            lesion.radius[0] + 45.0
        ) ** 2
        # Blood collects in the fat around the organ, not in the canal or the gut lumen.
        m = grown & ~organ & near & canvas.cavity[idx] & (canvas.organs[idx] == 0) & (canvas.hu[idx] < -30.0)
        hu = canvas.hu[idx]
        hu[m] = hu_value
        canvas.hu[idx] = hu
        inj = canvas.injury[idx]
        inj[m] = code
        canvas.injury[idx] = inj


def finish(canvas: Canvas, noise_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Scanner blur and correlated noise; returns int16 HU of shape (n, H, W)."""
    hu = ndimage.gaussian_filter(canvas.hu, (0.0, 0.6, 0.6))
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), (0.0, 0.7, 0.7))
    noise *= noise_hu / (noise.std() + 1e-6)
    hu += noise
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
