"""A procedural inspection line: phone backs on a conveyor belt, some of them defective.

Pure: numbers in, pixels out, no file I/O and no clocks. The same
``(seed, index, size, conditions, defect)`` always gives bit-identical pixels, because
every random draw comes from ``np.random.SeedSequence([seed, index])`` and OpenCV's
drawing and filtering are deterministic.

Geometry is in *scene units*: ``s = min(width / 4, height / 3)`` pixels, with the origin at
the frame centre, so a 4:3 frame spans x in [-2, 2] and y in [-1.5, 1.5] and the same
scene renders at any size (wider frames show more belt at the sides). Defects are sized
so that they stay visible after downscaling to 160x120 (a scratch is at least about 0.6%
of a 4:3 frame's width thick).

The random draws come from independent child streams (scene, defect decision, defect
geometry, sensor noise), so forcing a defect kind or changing the lighting never moves
the product: ``render_item(..., defect="scratch")`` and ``render_item(..., defect="none")``
show the same item with and without the scratch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist

import cv2
import numpy as np
import numpy.typing as npt

DEFECT_KINDS: tuple[str, ...] = ("scratch", "dent", "crack", "missing")
VARIANTS: tuple[str, ...] = ("a", "b")
NO_DEFECT = "none"
"""Pass as ``defect=`` to force a defect-free item (``None`` draws it with defect_rate)."""

MIN_SIZE = (32, 24)

_SHIFT = 4  # fractional bits for cv2 drawing coordinates (sub-pixel geometry)
_ONE = 1 << _SHIFT
_NOISE_SIGMA = 2.5  # sensor noise standard deviation in gray levels at noise=1.0
# A uniform byte mapped through the inverse normal CDF: Gaussian-shaped sensor noise at
# a fraction of the cost of drawing float normals per pixel.
_NOISE_Z = np.array([NormalDist().inv_cdf((i + 0.5) / 256.0) for i in range(256)])


@dataclass(frozen=True, slots=True)
class LineConditions:
    """How the line looks: lighting, defect rate, product variant, sensor noise."""

    brightness: float = 1.0  # multiplier on the lit scene
    color_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)  # R, G, B gains
    defect_rate: float = 0.1
    variant: str = "a"
    noise: float = 1.0  # scale of sensor noise


@dataclass(frozen=True, slots=True)
class SyntheticItem:
    image: npt.NDArray[np.uint8]  # HxWx3 BGR
    label: str  # "ok" | "defect"
    defect: str | None  # kind, or None


@dataclass(frozen=True, slots=True)
class _Pose:
    """Maps product-local scene units to pixel coordinates (fixed point, _SHIFT bits)."""

    cx: float
    cy: float
    cos: float
    sin: float
    scale: float  # pixels per local unit

    def points(self, local: npt.NDArray[np.float64]) -> npt.NDArray[np.int32]:
        s = self.scale * _ONE
        m = np.array([[self.cos * s, self.sin * s], [-self.sin * s, self.cos * s]])
        px = local @ m
        px += (self.cx * _ONE, self.cy * _ONE)
        return np.asarray(np.rint(px), dtype=np.int32)

    def point(self, x: float, y: float) -> tuple[int, int]:
        px, py = self.pixel(x, y)
        return round(px * _ONE), round(py * _ONE)

    def pixel(self, x: float, y: float) -> tuple[float, float]:
        lx, ly = x * self.scale, y * self.scale
        return self.cx + lx * self.cos - ly * self.sin, self.cy + lx * self.sin + ly * self.cos

    def length(self, units: float) -> int:
        return round(units * self.scale * _ONE)

    def thickness(self, units: float) -> int:
        return max(1, round(units * self.scale))


@dataclass(frozen=True, slots=True)
class _Design:
    """One product variant's layout, in local units (body centred at the origin)."""

    body: tuple[float, float, float]  # length, width, corner radius
    body_bgr: tuple[float, float, float]
    module: tuple[float, float, float, float, float]  # centre x, y, width, height, radius
    module_bgr: tuple[float, float, float]
    lenses: tuple[tuple[float, float, float], ...]  # centre x, y, radius
    flash: tuple[float, float, float]
    logo: tuple[float, float, float]  # centre x, y, radius
    stripe: bool  # variant extra feature: an antenna band across the body


_DESIGNS: dict[str, _Design] = {
    # Graphite phone, square camera module at the left end, three lenses.
    "a": _Design(
        body=(2.7, 1.36, 0.2),
        body_bgr=(92.0, 84.0, 78.0),
        module=(-0.88, -0.24, 0.66, 0.66, 0.14),
        module_bgr=(70.0, 66.0, 62.0),
        lenses=((-1.03, -0.39, 0.125), (-1.03, -0.09, 0.125), (-0.73, -0.24, 0.125)),
        flash=(-0.73, -0.46, 0.045),
        logo=(0.25, 0.0, 0.17),
        stripe=False,
    ),
    # Gold phone, slimmer and longer, pill-shaped module at the right end, two lenses,
    # and an antenna band: a product the reference model never saw.
    "b": _Design(
        body=(2.85, 1.24, 0.32),
        body_bgr=(150.0, 190.0, 212.0),
        module=(0.95, 0.0, 0.42, 0.92, 0.21),
        module_bgr=(120.0, 150.0, 170.0),
        lenses=((0.95, -0.22, 0.14), (0.95, 0.22, 0.14)),
        flash=(0.68, -0.4, 0.05),
        logo=(-0.35, 0.0, 0.15),
        stripe=True,
    ),
}


def render_item(
    seed: int,
    index: int,
    size: tuple[int, int],
    conditions: LineConditions = LineConditions(),
    *,
    defect: str | None = None,
) -> SyntheticItem:
    """Render item ``index`` of the line seeded ``seed`` as a ``size = (width, height)`` BGR image.

    ``defect=None`` draws whether the item is defective (probability
    ``conditions.defect_rate``) and which kind from the item's own random streams; a kind
    from ``DEFECT_KINDS`` forces that defect and ``NO_DEFECT`` ("none") forces a good
    item. The product, pose and nuisances are the same in all three cases.

    Raises:
        ValueError: size below 32x24, defect_rate outside [0, 1], unknown variant,
            brightness <= 0, negative noise, color cast gains <= 0, or unknown defect.
    """
    width, height = _check(size, conditions, defect)
    scene_ss, decide_ss, defect_ss, noise_ss = np.random.SeedSequence([seed, index]).spawn(4)
    scene_rng = np.random.default_rng(scene_ss)
    defect_rng = np.random.default_rng(defect_ss)

    kind: str | None
    if defect is None:
        defective = bool(np.random.default_rng(decide_ss).random() < conditions.defect_rate)
        kind = str(DEFECT_KINDS[int(defect_rng.integers(len(DEFECT_KINDS)))]) if defective else None
    else:
        kind = None if defect == NO_DEFECT else defect
        defect_rng.integers(len(DEFECT_KINDS))  # keep the geometry draws identical

    design = _DESIGNS[conditions.variant]
    s = min(width / 4.0, height / 3.0)
    pose = _draw_pose(scene_rng, width, height, s)
    body_bgr = _jitter_color(scene_rng, design.body_bgr, 9.0)
    image = _belt(scene_rng, width, height, s)
    missing = _draw_missing(defect_rng, design) if kind == "missing" else None
    _draw_product(image, scene_rng, pose, design, body_bgr, missing=missing)
    if kind == "scratch":
        _draw_scratch(image, defect_rng, pose, design, body_bgr)
    elif kind == "dent":
        _draw_dent(image, defect_rng, pose, design)
    elif kind == "crack":
        _draw_crack(image, defect_rng, pose, design, body_bgr)

    blur_sigma = float(scene_rng.uniform(0.0, 0.011)) * s
    if blur_sigma > 0.35:
        image = np.asarray(cv2.GaussianBlur(image, (0, 0), blur_sigma), dtype=np.uint8)
    image = _light(image, scene_rng, conditions, s)
    if conditions.noise > 0:
        _add_noise(image, np.random.default_rng(noise_ss), conditions.noise)
    return SyntheticItem(image=image, label="ok" if kind is None else "defect", defect=kind)


def _check(
    size: tuple[int, int], conditions: LineConditions, defect: str | None
) -> tuple[int, int]:
    width, height = int(size[0]), int(size[1])
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        raise ValueError(f"size must be at least {MIN_SIZE[0]}x{MIN_SIZE[1]}, got {width}x{height}")
    if not 0.0 <= conditions.defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be in [0, 1], got {conditions.defect_rate}")
    if conditions.variant not in VARIANTS:
        raise ValueError(f"unknown variant {conditions.variant!r}; known: {', '.join(VARIANTS)}")
    if not conditions.brightness > 0:
        raise ValueError(f"brightness must be > 0, got {conditions.brightness}")
    if not conditions.noise >= 0:
        raise ValueError(f"noise must be >= 0, got {conditions.noise}")
    if len(conditions.color_cast) != 3 or not all(g > 0 for g in conditions.color_cast):
        raise ValueError(f"color_cast must be three gains > 0, got {conditions.color_cast}")
    if defect is not None and defect != NO_DEFECT and defect not in DEFECT_KINDS:
        raise ValueError(
            f"unknown defect {defect!r}; known: {', '.join(DEFECT_KINDS)} or {NO_DEFECT!r}"
        )
    return width, height


def _draw_pose(rng: np.random.Generator, width: int, height: int, s: float) -> _Pose:
    angle = math.radians(float(rng.uniform(-15.0, 15.0)))
    cx = width / 2.0 + float(rng.uniform(-0.3, 0.3)) * s
    cy = height / 2.0 + float(rng.uniform(-0.22, 0.22)) * s
    scale = s * float(rng.uniform(0.95, 1.05))
    return _Pose(cx, cy, math.cos(angle), math.sin(angle), scale)


def _jitter_color(
    rng: np.random.Generator, bgr: tuple[float, float, float], spread: float
) -> tuple[float, float, float]:
    common = float(rng.uniform(-spread, spread))
    b, g, r = (c + common + float(rng.uniform(-spread / 3, spread / 3)) for c in bgr)
    return (b, g, r)


def _belt(rng: np.random.Generator, width: int, height: int, s: float) -> npt.NDArray[np.uint8]:
    """A textured dark belt: blotchy low-frequency grain plus cross seams, in scene units."""
    gray = float(rng.uniform(48.0, 68.0))
    tint = rng.uniform(-4.0, 4.0, size=3)
    cells = (max(2, round(width / (0.2 * s))), max(2, round(height / (0.2 * s))))
    grain = rng.uniform(-7.0, 7.0, size=(cells[1], cells[0])).astype(np.float32)
    field = cv2.resize(grain, (width, height), interpolation=cv2.INTER_CUBIC)
    # The field is far above zero, so convertScaleAbs is a rounding, saturating cast.
    planes = [cv2.convertScaleAbs(field, alpha=1.0, beta=gray + float(t)) for t in tint]
    image = np.asarray(cv2.merge(planes), dtype=np.uint8)
    pitch = float(rng.uniform(0.45, 0.6)) * s
    phase = float(rng.uniform(0.0, pitch))
    seam = tuple(max(0.0, gray - 14.0) for _ in range(3))
    x = phase
    thick = max(1, round(0.012 * s))
    while x < width:
        xi = round(x * _ONE)
        cv2.line(image, (xi, 0), (xi, height * _ONE), seam, thick, cv2.LINE_AA, _SHIFT)
        x += pitch
    return image


@functools.lru_cache(maxsize=64)
def _rounded_rect(
    box: tuple[float, float, float, float, float], steps: int = 6
) -> npt.NDArray[np.float64]:
    """Outline of a rounded rectangle (centre x, y, width, height, corner radius);
    read-only because it is cached."""
    cx, cy, w, h, r = box
    r = min(r, w / 2, h / 2)
    pts: list[tuple[float, float]] = []
    corners = (
        (w / 2 - r, h / 2 - r, 0.0),
        (-w / 2 + r, h / 2 - r, 90.0),
        (-w / 2 + r, -h / 2 + r, 180.0),
        (w / 2 - r, -h / 2 + r, 270.0),
    )
    for ox, oy, start in corners:
        for k in range(steps + 1):
            a = math.radians(start + 90.0 * k / steps)
            pts.append((cx + ox + r * math.cos(a), cy + oy + r * math.sin(a)))
    outline = np.array(pts, dtype=np.float64)
    outline.flags.writeable = False
    return outline


def _draw_missing(rng: np.random.Generator, design: _Design) -> int:
    """Which part is missing: -1 for the whole camera module, else a lens index."""
    if rng.random() < 0.35:
        return -1
    return int(rng.integers(len(design.lenses)))


def _draw_product(
    image: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    pose: _Pose,
    design: _Design,
    body_bgr: tuple[float, float, float],
    *,
    missing: int | None,
) -> None:
    length, wide, radius = design.body
    aa = cv2.LINE_AA
    # Soft shadow on the belt, then the body with a lighter rim.
    shadow = pose.points(_rounded_rect((0.05, 0.06, length, wide, radius)))
    cv2.fillPoly(image, [shadow], (22, 22, 22), aa, _SHIFT)
    body = pose.points(_rounded_rect((0.0, 0.0, length, wide, radius)))
    rim = tuple(min(255.0, c + 35.0) for c in body_bgr)
    cv2.fillPoly(image, [body], rim, aa, _SHIFT)
    inner = pose.points(_rounded_rect((0.0, 0.0, length - 0.05, wide - 0.05, radius - 0.025)))
    cv2.fillPoly(image, [inner], body_bgr, aa, _SHIFT)
    # Body texture: a broad sheen band whose place and strength vary per item.
    sheen_x = float(rng.uniform(-1.0, 1.0))
    sheen_w = float(rng.uniform(0.25, 0.5))
    gain = float(rng.uniform(6.0, 16.0))
    band = np.array(
        [
            [sheen_x - sheen_w, -wide / 2 + 0.05],
            [sheen_x + 0.3, -wide / 2 + 0.05],
            [sheen_x + 0.3 - 0.4, wide / 2 - 0.05],
            [sheen_x - sheen_w - 0.4, wide / 2 - 0.05],
        ]
    )
    band[:, 0] = band[:, 0].clip(-length / 2 + 0.2, length / 2 - 0.2)
    sheen = tuple(min(255.0, c + gain) for c in body_bgr)
    cv2.fillPoly(image, [pose.points(band)], sheen, aa, _SHIFT)
    if design.stripe:
        for sx in (-1.05, 0.45):
            strip = pose.points(_rounded_rect((sx, 0.0, 0.04, wide - 0.02, 0.0), 1))
            cv2.fillPoly(image, [strip], tuple(c * 0.72 for c in body_bgr), aa, _SHIFT)

    lx, ly, lr = design.logo
    ring = tuple(min(255.0, c + 28.0) for c in body_bgr)
    cv2.circle(image, pose.point(lx, ly), pose.length(lr), ring, pose.thickness(0.035), aa, _SHIFT)
    cv2.circle(image, pose.point(lx, ly), pose.length(lr * 0.35), ring, -1, aa, _SHIFT)

    if missing == -1:
        # The module was never fitted: only a faint adhesive outline is left.
        mx, my, mw, mh, mr = design.module
        outline = pose.points(_rounded_rect(design.module))
        glue = tuple(c - 6.0 for c in body_bgr)
        cv2.polylines(image, [outline], True, glue, 1, aa, _SHIFT)
        return
    mx, my, mw, mh, mr = design.module
    edge = tuple(c + 45.0 for c in design.module_bgr)
    cv2.fillPoly(image, [pose.points(_rounded_rect(design.module))], edge, aa, _SHIFT)
    face = pose.points(_rounded_rect((mx, my, mw - 0.04, mh - 0.04, mr - 0.02)))
    cv2.fillPoly(image, [face], design.module_bgr, aa, _SHIFT)
    for i, (x, y, r) in enumerate(design.lenses):
        if i == missing:
            # An empty mount: a thin ring where the lens should sit.
            mount = tuple(c - 18.0 for c in design.module_bgr)
            cv2.circle(image, pose.point(x, y), pose.length(r * 0.9), mount, 1, aa, _SHIFT)
            continue
        _draw_lens(image, pose, x, y, r)
    fx, fy, fr = design.flash
    cv2.circle(image, pose.point(fx, fy), pose.length(fr), (170, 215, 235), -1, aa, _SHIFT)


def _draw_lens(image: npt.NDArray[np.uint8], pose: _Pose, x: float, y: float, r: float) -> None:
    aa = cv2.LINE_AA
    cv2.circle(image, pose.point(x, y), pose.length(r), (185, 185, 190), -1, aa, _SHIFT)
    cv2.circle(image, pose.point(x, y), pose.length(r * 0.78), (18, 16, 14), -1, aa, _SHIFT)
    cv2.circle(image, pose.point(x, y), pose.length(r * 0.42), (60, 38, 30), -1, aa, _SHIFT)
    glint = pose.point(x - r * 0.3, y - r * 0.3)
    cv2.circle(image, glint, pose.length(r * 0.14), (235, 235, 235), -1, aa, _SHIFT)


def _free_spot(rng: np.random.Generator, design: _Design, margin: float) -> tuple[float, float]:
    """A point on the body, away from its edges and the camera module."""
    length, wide, _ = design.body
    mx, my, mw, mh, _ = design.module
    for _ in range(32):
        x = float(rng.uniform(-length / 2 + margin, length / 2 - margin))
        y = float(rng.uniform(-wide / 2 + margin, wide / 2 - margin))
        if abs(x - mx) > mw / 2 + margin * 0.5 or abs(y - my) > mh / 2 + margin * 0.5:
            return x, y
    return -mx * 0.5, 0.0


def _draw_scratch(
    image: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    pose: _Pose,
    design: _Design,
    body_bgr: tuple[float, float, float],
) -> None:
    x0, y0 = _free_spot(rng, design, 0.25)
    angle = float(rng.uniform(0.0, math.pi))
    span = float(rng.uniform(0.4, 0.8))
    bow = float(rng.uniform(-0.06, 0.06))
    t = np.linspace(-0.5, 0.5, 7)
    along = t * span
    across = bow * (1.0 - 4.0 * t * t)
    ca, sa = math.cos(angle), math.sin(angle)
    local = np.stack([x0 + along * ca - across * sa, y0 + along * sa + across * ca], axis=1)
    length, wide, _ = design.body
    local[:, 0] = local[:, 0].clip(-length / 2 + 0.08, length / 2 - 0.08)
    local[:, 1] = local[:, 1].clip(-wide / 2 + 0.08, wide / 2 - 0.08)
    delta = float(rng.uniform(60.0, 100.0)) if rng.random() < 0.6 else -float(rng.uniform(45, 65))
    color = tuple(float(np.clip(c + delta, 0, 255)) for c in body_bgr)
    thick = pose.thickness(float(rng.uniform(0.026, 0.036)))
    cv2.polylines(image, [pose.points(local)], False, color, thick, cv2.LINE_AA, _SHIFT)


def _draw_dent(
    image: npt.NDArray[np.uint8], rng: np.random.Generator, pose: _Pose, design: _Design
) -> None:
    """A soft dent: a shaded dimple, darker on the side away from the light."""
    x, y = _free_spot(rng, design, 0.25)
    radius = float(rng.uniform(0.09, 0.14)) * pose.scale
    depth = float(rng.uniform(38.0, 60.0))
    if rng.random() < 0.3:
        depth = -depth  # a bump rather than a dimple: bright centre
    light = float(rng.uniform(0.0, 2.0 * math.pi))
    px, py = pose.pixel(x, y)
    h, w = image.shape[:2]
    reach = 2.5 * radius
    x0, x1 = max(0, int(px - reach)), min(w, int(px + reach) + 1)
    y0, y1 = max(0, int(py - reach)), min(h, int(py + reach) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = (xx - px) / radius, (yy - py) / radius
    g = np.exp(-(dx * dx + dy * dy))
    # Darkening in the middle plus directional shading (the gradient of the dimple).
    shade = -depth * g * (0.6 + 0.9 * (dx * math.cos(light) + dy * math.sin(light)))
    roi = image[y0:y1, x0:x1].astype(np.float32) + shade[:, :, None]
    image[y0:y1, x0:x1] = roi.clip(0, 255).astype(np.uint8)


def _draw_crack(
    image: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    pose: _Pose,
    design: _Design,
    body_bgr: tuple[float, float, float],
) -> None:
    """A jagged dark crack with one or two branches, from an impact point."""
    length, wide, _ = design.body
    x, y = _free_spot(rng, design, 0.3)
    heading = float(rng.uniform(0.0, 2.0 * math.pi))
    main = _jagged(rng, x, y, heading, int(rng.integers(6, 10)))
    paths = [main]
    for _ in range(int(rng.integers(1, 3))):
        k = int(rng.integers(2, len(main) - 1))
        turn = float(rng.choice([-1.0, 1.0])) * float(rng.uniform(0.5, 1.1))
        paths.append(_jagged(rng, main[k, 0], main[k, 1], heading + turn, int(rng.integers(3, 5))))
    dark = tuple(c * 0.25 for c in body_bgr)
    light = tuple(min(255.0, c + 40.0) for c in body_bgr)
    thick = pose.thickness(float(rng.uniform(0.022, 0.032)))
    for path in paths:
        path[:, 0] = path[:, 0].clip(-length / 2 + 0.06, length / 2 - 0.06)
        path[:, 1] = path[:, 1].clip(-wide / 2 + 0.06, wide / 2 - 0.06)
        edge = path + np.array([0.02, 0.02])
        cv2.polylines(image, [pose.points(edge)], False, light, thick, cv2.LINE_AA, _SHIFT)
        cv2.polylines(image, [pose.points(path)], False, dark, thick, cv2.LINE_AA, _SHIFT)


def _jagged(
    rng: np.random.Generator, x: float, y: float, heading: float, segments: int
) -> npt.NDArray[np.float64]:
    pts = [(x, y)]
    for _ in range(segments):
        a = heading + float(rng.uniform(-0.75, 0.75))
        step = float(rng.uniform(0.06, 0.11))
        x, y = x + step * math.cos(a), y + step * math.sin(a)
        pts.append((x, y))
    return np.array(pts, dtype=np.float64)


def _light(
    image: npt.NDArray[np.uint8], rng: np.random.Generator, conditions: LineConditions, s: float
) -> npt.NDArray[np.uint8]:
    """Uneven illumination, then brightness and color cast (saturating at 255)."""
    height, width = image.shape[:2]
    cells = (max(2, round(width / (1.6 * s)) + 1), max(2, round(height / (1.6 * s)) + 1))
    coarse = rng.uniform(0.9, 1.08, size=(cells[1], cells[0], 1))
    r, g, b = conditions.color_cast
    gains = np.array([b, g, r]) * conditions.brightness
    field = cv2.resize(
        (coarse * gains).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    lit = image.astype(np.float32)
    lit *= field
    # The scene is >= 0, so the absolute value is a no-op: this is a rounding,
    # saturating float -> uint8 conversion.
    return np.asarray(cv2.convertScaleAbs(lit), dtype=np.uint8)


def _add_noise(image: npt.NDArray[np.uint8], rng: np.random.Generator, scale: float) -> None:
    """Add zero-mean Gaussian-shaped sensor noise in place, saturating at 0 and 255."""
    z = np.round(_NOISE_Z * (_NOISE_SIGMA * scale)).clip(-255, 255)
    up = z.clip(0, 255).astype(np.uint8)
    down = (-z).clip(0, 255).astype(np.uint8)
    draws = rng.integers(0, 256, size=image.shape, dtype=np.uint8)
    cv2.add(image, cv2.LUT(draws, up), dst=image)
    cv2.subtract(image, cv2.LUT(draws, down), dst=image)
