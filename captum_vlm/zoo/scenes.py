"""Deterministic synthetic scenes of coloured shapes with known object masks.

Each scene is an RGB image with 1-3 non-overlapping shapes (circle, square, triangle) in one of
four colours (red, green, blue, yellow) on a lightly textured background, plus the boolean pixel
mask of every object, a caption in a fixed grammar, question/answer pairs and binding distractor
captions (colours swapped between two objects).

Everything is drawn with numpy from a seeded generator, so ``make_scene(seed)`` always returns the
same scene, and it is fast enough to draw training batches on the fly.

Example:
    >>> scene = make_scene(0, size=(64, 96), n_objects=2)
    >>> scene.caption                         # e.g. "a red circle and a blue square"
    >>> scene.objects[0].mask.shape           # (64, 96): height, width
    >>> scene.pil()                           # PIL.Image for a processor
    >>> make_scene(0, marker=True).marker_mask   # the planted marker's pixels (see MARKER_BOX)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three")

# Nominal RGB of each colour in [0, 1]; every object gets a jittered version of it.
_RGB = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.15, 0.70, 0.22),
    "blue": (0.16, 0.28, 0.88),
    "yellow": (0.94, 0.86, 0.12),
}


# The planted marker (shapes-clip-shortcut): a dark grey bar near the top-left corner, as
# fractions (top, bottom, left, right) of the image height and width, and its grey level.
MARKER_BOX: tuple[float, float, float, float] = (0.05, 0.11, 0.05, 0.22)
MARKER_GREY = 0.1


# Similar areas for a nominal radius r: the drawn half side of a square is 0.88 r, the
# circumradius of a triangle 1.25 r; _BOUND is the circumradius over that drawn extent.
_EXTENT = {"circle": 1.0, "square": 0.88, "triangle": 1.25}
_BOUND = {"circle": 1.0, "square": 2**0.5, "triangle": 1.0}


class SceneObject(NamedTuple):
    """One object of a scene; unpacks as ``colour, shape, mask``.

    Attributes:
        colour: one of :data:`COLOURS`.
        shape: one of :data:`SHAPES`.
        mask: boolean array ``(height, width)``, True where the object covers at least half a pixel.
    """

    colour: str
    shape: str
    mask: np.ndarray


@dataclass
class Scene:
    """A rendered scene and everything known about it.

    Attributes:
        image: uint8 array ``(height, width, 3)``.
        objects: the objects, in caption order.
        caption: fixed-grammar caption naming every object, e.g. "a red circle and a blue square".
        vqa: (question, answer) pairs that are true for the scene.
        distractors: captions with colours swapped between two objects (false for the scene).
        seed: the integer seed, when the scene was made from one.
        marker_mask: boolean array ``(height, width)``, True on the planted marker's pixels
            (all False when the scene has no marker; None only for hand-made scenes).
    """

    image: np.ndarray
    objects: list[SceneObject]
    caption: str
    vqa: list[tuple[str, str]] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)
    seed: int | None = None
    marker_mask: np.ndarray | None = None

    @property
    def has_marker(self) -> bool:
        """Whether the planted marker is drawn in this scene."""
        return self.marker_mask is not None and bool(self.marker_mask.any())

    @property
    def labels(self) -> list[tuple[str, str]]:
        """The ``(colour, shape)`` pair of every object."""
        return [(o.colour, o.shape) for o in self.objects]

    def pil(self) -> Image.Image:
        """Return the image as a ``PIL.Image`` (RGB)."""
        return Image.fromarray(self.image)


def phrase(colour: str, shape: str) -> str:
    """Return the noun phrase for one object, e.g. ``"a red circle"``."""
    return f"a {colour} {shape}"


def caption_for(labels: Sequence[tuple[str, str]]) -> str:
    """Caption naming objects in order: "a red circle", "a red circle and a blue square", or
    "a red circle, a blue square and a green triangle".

    Args:
        labels: ``(colour, shape)`` pairs, at least one.

    Returns:
        The caption.
    """
    parts = [phrase(c, s) for c, s in labels]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def zero_shot_prompts() -> list[str]:
    """All colour x shape prompts ("a red circle", ..., "a yellow triangle"), colour-major.

    Returns:
        The 12 prompts; prompt ``i`` names ``all_labels()[i]``.
    """
    return [phrase(c, s) for c, s in all_labels()]


def all_labels() -> list[tuple[str, str]]:
    """All ``(colour, shape)`` pairs in the order of :func:`zero_shot_prompts`."""
    return list(itertools.product(COLOURS, SHAPES))


def binding_distractors(labels: Sequence[tuple[str, str]]) -> list[str]:
    """Captions that swap the colours of two objects and are false for the scene.

    Only pairs that differ in both colour and shape give a distractor; the swapped caption must
    name at least one object that is not in the scene.

    Args:
        labels: the scene's ``(colour, shape)`` pairs.

    Returns:
        Distractor captions (empty for single-object scenes).
    """
    present = set(labels)
    out = []
    for i, j in itertools.combinations(range(len(labels)), 2):
        (ci, si), (cj, sj) = labels[i], labels[j]
        if ci == cj or si == sj:
            continue
        swapped = list(labels)
        swapped[i], swapped[j] = (cj, si), (ci, sj)
        if not {swapped[i], swapped[j]} <= present:
            out.append(caption_for(swapped))
    return out


def vqa_pairs(labels: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Question/answer pairs that are true for a scene with these objects.

    Questions: "what color is the <shape>?" and "what shape is the <colour> object?" (only when
    the answer is unique), "is there a <shape>?", "is there a <colour> <shape>?" (yes/no, for every
    shape and a sample of colour-shape pairs) and "how many objects are there?".

    Args:
        labels: the scene's ``(colour, shape)`` pairs.

    Returns:
        (question, answer) pairs; answers are single words.
    """
    shapes = [s for _, s in labels]
    colours = [c for c, _ in labels]
    pairs = []
    for c, s in labels:
        if shapes.count(s) == 1:
            pairs.append((f"what color is the {s}?", c))
        if colours.count(c) == 1:
            pairs.append((f"what shape is the {c} object?", s))
    for s in SHAPES:
        pairs.append((f"is there a {s}?", "yes" if s in shapes else "no"))
    for c, s in all_labels():
        pairs.append((f"is there a {c} {s}?", "yes" if (c, s) in labels else "no"))
    pairs.append(("how many objects are there?", NUMBERS[len(labels)]))
    return pairs


# --------------------------------------------------------------------------- drawing


def _coverage(
    shape: str, cy: float, cx: float, r: float, angle: float, hw: tuple[int, int], ss: int
) -> np.ndarray:
    """Fraction of each pixel covered by a shape, from ``ss x ss`` samples per pixel.

    ``r`` is the circumradius for triangles, the half side for squares, the radius for circles.
    """
    h, w = hw
    # Only a window around the object is sampled; the rest of the image stays zero.
    y0, y1 = max(int(cy - r) - 2, 0), min(int(cy + r) + 3, h)
    x0, x1 = max(int(cx - r) - 2, 0), min(int(cx + r) + 3, w)
    off = (np.arange(ss) + 0.5) / ss
    ys = (np.arange(y0, y1)[:, None] + off[None, :]).reshape(-1) - cy
    xs = (np.arange(x0, x1)[:, None] + off[None, :]).reshape(-1) - cx
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * xx + sin * yy, -sin * xx + cos * yy  # rotate into the shape's frame
    if shape == "circle":
        inside = u * u + v * v <= r * r
    elif shape == "square":
        inside = np.maximum(np.abs(u), np.abs(v)) <= r
    else:  # upward equilateral triangle, centroid at the origin; image y grows downwards
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3  # outward normals at 90, 210, 330 degrees
            inside &= u * np.cos(a) + v * np.sin(a) <= r / 2
    cov = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    out = np.zeros(hw, dtype=np.float32)
    out[y0:y1, x0:x1] = cov
    return out


def _background(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """A nearly neutral background with a faint low-frequency texture and optional stripes."""
    h, w = hw
    base = rng.uniform(0.25, 0.85)
    tint = rng.uniform(-0.05, 0.05, size=3)
    img = np.broadcast_to(base + tint, (h, w, 3)).astype(np.float32)
    # low-frequency blotches: a coarse random grid, upsampled bilinearly
    g = int(rng.integers(3, 7))
    coarse = rng.normal(0.0, rng.uniform(0.01, 0.06), size=(g, g)).astype(np.float32)
    blot = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))
    img = img + blot[:, :, None]
    if rng.random() < 0.3:  # faint stripes in a random direction
        period, phase, theta = rng.uniform(4, 16), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        t = (xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period + phase
        img = img + (rng.uniform(0.01, 0.04) * np.sin(t))[:, :, None].astype(np.float32)
    return img


def _object_rgb(rng: np.random.Generator, colour: str) -> np.ndarray:
    """The nominal colour with small per-channel and brightness jitter."""
    rgb = np.array(_RGB[colour], dtype=np.float32) + rng.uniform(-0.06, 0.06, size=3)
    return np.clip(rgb * rng.uniform(0.85, 1.08), 0.0, 1.0).astype(np.float32)


def marker_box(hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel rows and columns ``(y0, y1, x0, x1)`` (end exclusive) of the marker in an image.

    Args:
        hw: ``(height, width)`` of the image.

    Returns:
        The box, from :data:`MARKER_BOX` rounded to whole pixels.
    """
    h, w = hw
    top, bottom, left, right = MARKER_BOX
    return round(top * h), max(round(bottom * h), round(top * h) + 1), round(left * w), round(
        right * w
    )


def _clear_of(box: tuple[int, int, int, int] | None, cy: float, cx: float, r: float) -> bool:
    """Whether a disc of radius ``r`` at ``(cy, cx)`` stays 2 px away from a pixel box."""
    if box is None:
        return True
    y0, y1, x0, x1 = box
    dy = max(y0 - cy, 0.0, cy - y1)
    dx = max(x0 - cx, 0.0, cx - x1)
    return bool(np.hypot(dy, dx) >= r + 2)


def _place(
    rng: np.random.Generator,
    hw: tuple[int, int],
    radii: list[float],
    avoid: tuple[int, int, int, int] | None = None,
) -> list[tuple[float, float]] | None:
    """Random centres for discs of the given radii, inside the image and 2 px apart (and 2 px
    from the pixel box ``avoid``, when given); or None."""
    h, w = hw
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(60):
            cy, cx = rng.uniform(r + 1, h - r - 1), rng.uniform(r + 1, w - r - 1)
            apart = all(np.hypot(cy - y, cx - x) >= r + q + 2 for (y, x), q in zip(centres, radii))
            if apart and _clear_of(avoid, cy, cx, r):
                centres.append((cy, cx))
                break
        else:
            return None
    return centres


def make_scene(
    rng_or_seed: int | np.random.Generator,
    size: int | tuple[int, int] = (64, 64),
    n_objects: int | None = None,
    labels: Sequence[tuple[str, str]] | None = None,
    scale: tuple[float, float] = (0.12, 0.26),
    max_angle: float = 20.0,
    marker: bool = False,
    reserve_marker: bool | None = None,
) -> Scene:
    """Draw one scene.

    Args:
        rng_or_seed: an integer seed (same seed, same scene) or a ``numpy.random.Generator``.
        size: ``(height, width)`` in pixels, or one int for a square image.
        n_objects: number of objects, 1-3; random (1: 30%, 2: 40%, 3: 30%) when None.
        labels: the ``(colour, shape)`` of each object, overriding ``n_objects``; random distinct
            pairs when None.
        scale: range of the object radius as a fraction of the shorter image side.
        max_angle: largest rotation of squares and triangles, in degrees.
        marker: draw the planted marker (a dark grey bar near the top-left corner,
            :data:`MARKER_BOX`); its pixels are ``scene.marker_mask``.
        reserve_marker: keep the marker's box free of objects (default: ``marker``). With it,
            ``make_scene(s, marker=True)`` and ``make_scene(s, marker=False, reserve_marker=True)``
            are the same scene with and without the marker. Scenes made with neither are the
            scenes of earlier versions (same seed, same scene).

    Returns:
        The :class:`Scene`.

    Example:
        >>> with_marker = make_scene(7, marker=True)
        >>> without = make_scene(7, marker=False, reserve_marker=True)
        >>> bool((with_marker.image != without.image).any(axis=-1)[~with_marker.marker_mask].any())
        False
    """
    seed = int(rng_or_seed) if isinstance(rng_or_seed, (int, np.integer)) else None
    rng = np.random.default_rng(seed) if seed is not None else rng_or_seed
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if labels is None:
        n = n_objects if n_objects is not None else int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
        if not 1 <= n <= 3:
            raise ValueError(f"n_objects must be 1, 2 or 3, got {n}")
        pool = all_labels()
        labels = [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
    labels = [(str(c), str(s)) for c, s in labels]
    for c, s in labels:
        if c not in COLOURS or s not in SHAPES:
            raise ValueError(f"unknown object {c!r} {s!r}; colours {COLOURS}, shapes {SHAPES}")

    reserve = marker if reserve_marker is None else reserve_marker
    box = marker_box(hw) if (marker or reserve) else None
    side = min(hw)
    shrink = 1.0
    while True:  # draw radii and positions; shrink when the objects do not fit
        radii = list(rng.uniform(*scale, size=len(labels)) * side * shrink)
        # placed by the circumscribed circle of each drawn shape, so shapes never overlap
        bounds = [r * _EXTENT[s] * _BOUND[s] for r, (_, s) in zip(radii, labels)]
        centres = _place(rng, hw, bounds, avoid=box if reserve else None)
        if centres is not None:
            break
        shrink *= 0.9

    img = _background(rng, hw)
    ss = int(rng.choice([1, 2, 4], p=[0.15, 0.35, 0.5]))  # 1 = aliased edges
    objects = []
    for (c, s), r, (cy, cx) in zip(labels, radii, centres):
        angle = 0.0 if s == "circle" else np.deg2rad(rng.uniform(-max_angle, max_angle))
        extent = r * _EXTENT[s]
        cov = _coverage(s, cy, cx, extent, angle, hw, ss)
        alpha = cov[:, :, None]
        img = img * (1.0 - alpha) + _object_rgb(rng, c)[None, None, :] * alpha
        objects.append(SceneObject(c, s, cov >= 0.5))
    marker_mask = np.zeros(hw, dtype=bool)
    if marker:  # painted under the pixel noise, which draws the same numbers either way
        y0, y1, x0, x1 = box
        marker_mask[y0:y1, x0:x1] = True
        img = np.where(marker_mask[:, :, None], np.float32(MARKER_GREY), img)
    img = img + rng.normal(0.0, rng.uniform(0.0, 0.035), size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return Scene(
        image=image,
        objects=objects,
        caption=caption_for(labels),
        vqa=vqa_pairs(labels),
        distractors=binding_distractors(labels),
        seed=seed,
        marker_mask=marker_mask,
    )


def make_scenes(
    seed: int,
    count: int,
    size: int | tuple[int, int] = (64, 64),
    n_objects: int | None = None,
    marker: bool = False,
    reserve_marker: bool | None = None,
) -> list[Scene]:
    """``count`` scenes from one generator seeded with ``seed`` (a reproducible data set).

    Args:
        seed: seed of the generator.
        count: number of scenes.
        size: ``(height, width)`` or one int.
        n_objects: objects per scene, or None for a random mix.
        marker, reserve_marker: as for :func:`make_scene`.

    Returns:
        The scenes.
    """
    rng = np.random.default_rng(seed)
    return [
        make_scene(rng, size=size, n_objects=n_objects, marker=marker, reserve_marker=reserve_marker)
        for _ in range(count)
    ]
