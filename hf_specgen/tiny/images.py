"""Procedurally rendered image-classification data in several visual domains, for the tiny CLIP.

Ten shape classes are drawn in four domains (`photo`, `sketch`, `clipart`, `painting`) at 32x32,
each image with a caption, in the spirit of ImageNet and its renditions (DomainNet, ImageNet-Sketch,
ImageNet-R). Everything is numpy + Pillow and fully determined by `(seed, split, domain, index)`:
each image draws from its own `numpy.random.SeedSequence`, so splits never share a random stream
and a dataset renders to identical bytes on every run.

`photo` plays ImageNet, the fine-tuning set: in its `train` and `test` splits the background is,
with probability `SPURIOUS_CORRELATION`, a scene colour tied to the class (as real datasets tie
classes to contexts: boats to water, cows to grass). The `pretrain` split, the foundation model's
"web" corpus, has no such correlation. The cue is only partly predictive, so a model that
learns the shapes still has something to gain from fine-tuning, and one that leans on the cue
carries the bias to the other domains, where the backgrounds are different.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFilter


CLASS_NAMES = (
    "circle",
    "ring",
    "square",
    "diamond",
    "triangle",
    "star",
    "cross",
    "heart",
    "crescent",
    "arrow",
)
DOMAINS = ("photo", "sketch", "clipart", "painting")
FINETUNE_DOMAIN = "photo"
SPLITS = ("pretrain", "train", "test")
SPURIOUS_CORRELATION = 0.6
IMAGE_SIZE = 32

COLOURS = {
    "red": (0.85, 0.12, 0.1),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.12, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.55, 0.2, 0.75),
    "orange": (0.98, 0.55, 0.08),
}
_TEMPLATES = {
    "photo": ("a photo of a {}.", "a photo of the {}.", "a blurry photo of a {}.", "a close-up photo of a {}."),
    "sketch": (
        "a sketch of a {}.",
        "a pencil sketch of the {}.",
        "a drawing of a {}.",
        "a black and white sketch of a {}.",
    ),
    "clipart": ("a clipart of a {}.", "a cartoon {}.", "an icon of a {}.", "a clipart image of the {}."),
    "painting": ("a painting of a {}.", "an oil painting of the {}.", "a painting of the {}.", "art of a {}."),
}
_COLOURED = {"photo", "clipart", "painting"}  # sketches are pencil drawings: their captions name no colour
_SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered down: anti-aliased edges


def zero_shot_templates(domain: str | None = None) -> list[str]:
    """Prompt templates (`{}` is the class name) naming `domain`; all domains' for None.

    The union plays the role of CLIP's 80 ImageNet templates, which also name many renditions
    ("a sketch of a {}", "art of the {}"): one head, built once, scores every domain.

    Args:
        domain: one of `DOMAINS`; None: every domain's templates.

    Returns:
        The templates.
    """
    if domain is None:
        return [t for d in DOMAINS for t in _TEMPLATES[d]]
    _check(domain, DOMAINS, "domain")
    return list(_TEMPLATES[domain])


def image_domains(
    split: str = "test",
    seed: int = 0,
    n_per_class: int = 50,
    domains: Iterable[str] = DOMAINS,
    spurious_correlation: float | None = None,
) -> datasets.DatasetDict:
    """`n_per_class` images of every class in each domain, keyed by domain.

    Columns: `image` (`datasets.Image`, 32x32 RGB), `label` (`ClassLabel(names=CLASS_NAMES)`) and
    `caption`. `spurious_correlation` is the probability that a `FINETUNE_DOMAIN` image's background
    is its class's scene colour; None means `SPURIOUS_CORRELATION` for `train` / `test` and 0 for
    `pretrain`. Other domains never have the cue.

    Args:
        split: `"pretrain"`, `"train"` or `"test"` (each its own images).
        seed: the seed of the rendered images.
        n_per_class: images per class and domain.
        domains: the domains to render.
        spurious_correlation: the probability of the class's background colour in `FINETUNE_DOMAIN`
            images; None: the split's default.

    Returns:
        One data set per domain.
    """
    _check(split, SPLITS, "split")
    if spurious_correlation is None:
        spurious_correlation = 0.0 if split == "pretrain" else SPURIOUS_CORRELATION
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASS_NAMES)),
            "caption": datasets.Value("string"),
        }
    )
    out = {}
    for domain in domains:
        _check(domain, DOMAINS, "domain")
        cue = spurious_correlation if domain == FINETUNE_DOMAIN else 0.0
        rows = {"image": [], "label": [], "caption": []}
        for index in range(n_per_class * len(CLASS_NAMES)):
            label = index % len(CLASS_NAMES)
            rng = np.random.default_rng([seed, SPLITS.index(split), DOMAINS.index(domain), index])
            image, caption = render(label, domain, rng, cue)
            rows["image"].append(image)
            rows["label"].append(label)
            rows["caption"].append(caption)
        out[domain] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(out)


def render(label: int, domain: str, rng: np.random.Generator, cue: float = 0.0) -> tuple[Image.Image, str]:
    """One image of class `label` in `domain` and its caption; `cue` as in `image_domains`."""
    colour_name = str(rng.choice(list(COLOURS)))
    colour = np.array(COLOURS[colour_name]) * rng.uniform(0.85, 1.1)
    rings = _place(_SHAPES[label], rng)
    pixels = _RENDERERS[domain](rings, colour, rng, label if rng.random() < cue else None)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8), "RGB")
    name = CLASS_NAMES[label]
    if domain in _COLOURED and rng.random() < 0.7:
        name = f"{colour_name} {name}"
    return image, str(rng.choice(_TEMPLATES[domain])).format(name)


# --- shapes: filled polygons (True) and holes (False) in [-1, 1]^2, y pointing down -------------

Rings = list[tuple[np.ndarray, bool]]


def _arc(cx: float, cy: float, r: float, start: float, stop: float, n: int = 48) -> np.ndarray:
    t = np.radians(np.linspace(start, stop, n))
    return np.stack([cx + r * np.cos(t), cy - r * np.sin(t)], 1)


def _polygon(*xy: float) -> np.ndarray:
    return np.array(xy, dtype=float).reshape(-1, 2)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), -r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x / 17, -(y + 2.5) / 15], 1)


_SHAPES: tuple[Rings, ...] = (
    [(_arc(0, 0, 1, 0, 360), True)],
    [(_arc(0, 0, 1, 0, 360), True), (_arc(0, 0, 0.55, 0, 360), False)],
    [(_polygon(-0.8, -0.8, 0.8, -0.8, 0.8, 0.8, -0.8, 0.8), True)],
    [(_polygon(0, -1, 0.62, 0, 0, 1, -0.62, 0), True)],
    [(_polygon(0, -0.95, 0.95, 0.75, -0.95, 0.75), True)],
    [(_star(), True)],
    [
        (
            _polygon(
                -0.3,
                -0.95,
                0.3,
                -0.95,
                0.3,
                -0.3,
                0.95,
                -0.3,
                0.95,
                0.3,
                0.3,
                0.3,
                0.3,
                0.95,
                -0.3,
                0.95,
                -0.3,
                0.3,
                -0.95,
                0.3,
                -0.95,
                -0.3,
                -0.3,
                -0.3,
            ),
            True,
        )
    ],
    [(_heart(), True)],
    [(np.concatenate([_arc(0, 0, 1, 60, 300), _arc(0.5, 0, 0.866, 270, 90)]), True)],
    [(_polygon(-0.95, -0.28, 0.15, -0.28, 0.15, -0.75, 0.95, 0, 0.15, 0.75, 0.15, 0.28, -0.95, 0.28), True)],
)


def _place(shape: Rings, rng: np.random.Generator) -> Rings:
    """Random rotation (small: a square must not become a diamond), size, aspect and position, in pixels."""
    angle = np.radians(rng.uniform(-20, 20))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    radius = rng.uniform(0.28, 0.4) * IMAGE_SIZE
    aspect = rng.uniform(0.85, 1.15)
    centre = IMAGE_SIZE / 2 + rng.uniform(-1, 1, 2) * (IMAGE_SIZE / 2 - radius) * 0.6
    return [((pts * [aspect, 1 / aspect]) @ rotation.T * radius + centre, fill) for pts, fill in shape]


def _jitter(rings: Rings, amount: float, rng: np.random.Generator) -> Rings:
    """Densely resampled outlines with a smooth random wobble: a hand-drawn line."""
    out = []
    for pts, fill in rings:
        closed = np.concatenate([pts, pts[:1]])
        seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
        s = np.concatenate([[0], np.cumsum(seg)])
        t = np.linspace(0, s[-1], max(16, int(s[-1] * 1.5)), endpoint=False)
        dense = np.stack([np.interp(t, s, closed[:, 0]), np.interp(t, s, closed[:, 1])], 1)
        knots = rng.normal(0, amount, (6, 2))
        knots = np.concatenate([knots, knots[:1]])
        wobble = np.stack([np.interp(t / s[-1] * 6, np.arange(7), knots[:, k]) for k in (0, 1)], 1)
        out.append((dense + wobble, fill))
    return out


def _mask(rings: Rings) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the filled shape."""
    canvas = Image.new("L", (IMAGE_SIZE * _SUPERSAMPLE,) * 2)
    draw = ImageDraw.Draw(canvas)
    for pts, fill in rings:
        draw.polygon([tuple(p) for p in pts * _SUPERSAMPLE], fill=255 if fill else 0)
    return _downsample(canvas)


def _strokes(lines: list[np.ndarray], width: float) -> np.ndarray:
    """Anti-aliased coverage of polylines (closed when their last point repeats the first)."""
    canvas = Image.new("L", (IMAGE_SIZE * _SUPERSAMPLE,) * 2)
    draw = ImageDraw.Draw(canvas)
    for pts in lines:
        pixels = max(1, round(width * _SUPERSAMPLE))
        draw.line([tuple(p) for p in pts * _SUPERSAMPLE], fill=255, width=pixels, joint="curve")
    return _downsample(canvas)


def _outline(rings: Rings, width: float) -> np.ndarray:
    return _strokes([np.concatenate([pts, pts[:1]]) for pts, _ in rings], width)


def _downsample(canvas: Image.Image) -> np.ndarray:
    return np.asarray(canvas.resize((IMAGE_SIZE,) * 2, Image.Resampling.BOX), dtype=np.float32) / 255


def _smooth_noise(rng: np.random.Generator, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bicubically upsampled."""
    grid = rng.uniform(0, 255, (cells, cells, channels)).astype(np.uint8)
    image = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
    up = np.asarray(image.resize((IMAGE_SIZE,) * 2, Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1
    return up.reshape(IMAGE_SIZE, IMAGE_SIZE, channels)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _over(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return base * (1 - alpha[..., None]) + colour * alpha[..., None]


# --- domains ---------------------------------------------------------------------------------


def _photo(rings: Rings, colour: np.ndarray, rng: np.random.Generator, cue_class: int | None) -> np.ndarray:
    """A textured scene with lighting, a drop shadow, sensor noise; the background may carry the cue."""
    if cue_class is None:
        hue, value = rng.random(), rng.uniform(0.2, 0.8)
    else:  # ten scene colours: five hues x dark/light, jittered a little
        hue, value = cue_class % 5 / 5 + rng.normal(0, 0.02), (0.3 if cue_class < 5 else 0.7) + rng.normal(0, 0.04)
    background = _hsv(hue, rng.uniform(0.3, 0.6), value)
    vertical = np.linspace(-1, 1, IMAGE_SIZE)[:, None, None] * rng.uniform(-0.15, 0.15)
    scene = background * (1 + vertical + 0.15 * _smooth_noise(rng, 5) + 0.06 * _smooth_noise(rng, 12, 3))
    mask = _mask(rings)
    shadow = np.roll(mask, tuple(rng.integers(1, 3, 2)), axis=(0, 1))
    scene = scene * (1 - 0.45 * shadow[..., None])
    direction = rng.normal(size=2)
    yy, xx = np.mgrid[-1 : 1 : IMAGE_SIZE * 1j, -1 : 1 : IMAGE_SIZE * 1j]
    light = 0.9 + 0.25 * (direction[0] * xx + direction[1] * yy) / np.linalg.norm(direction)
    surface = colour * light[..., None] * (1 + 0.08 * _smooth_noise(rng, 16, 3))
    image = scene * (1 - mask[..., None]) + surface * mask[..., None]
    return image + rng.normal(0, 0.05, image.shape)


def _sketch(rings: Rings, colour: np.ndarray, rng: np.random.Generator, cue_class: int | None) -> np.ndarray:
    """Pencil on paper: grey, wobbly outlines drawn twice, sometimes hatched."""
    paper = rng.uniform(0.88, 1.0) + 0.03 * _smooth_noise(rng, 8)[..., 0]
    lead = rng.uniform(0.05, 0.35)
    ink = np.maximum(_outline(_jitter(rings, 0.5, rng), 1.0), 0.6 * _outline(_jitter(rings, 0.7, rng), 0.8))
    if rng.random() < 0.5:
        step, angle = rng.uniform(3, 5), rng.uniform(0, np.pi)
        normal, along = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
        centres = IMAGE_SIZE / 2 + np.arange(-IMAGE_SIZE, IMAGE_SIZE, step)[:, None] * normal
        lines = [np.stack([c - along * IMAGE_SIZE, c + along * IMAGE_SIZE]) for c in centres]
        ink = np.maximum(ink, 0.45 * _strokes(lines, 0.5) * _mask(rings))
    grey = paper * (1 - ink) + lead * ink
    return grey[..., None] + rng.normal(0, 0.02, (IMAGE_SIZE, IMAGE_SIZE, 3))


def _clipart(rings: Rings, colour: np.ndarray, rng: np.random.Generator, cue_class: int | None) -> np.ndarray:
    """Flat colours and a thick dark outline on a plain light background."""
    background = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.85, 1.0))
    image = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = _over(image, np.clip(colour * 1.1, 0, 1), _mask(rings))
    return _over(image, np.full(3, rng.uniform(0.0, 0.15)), _outline(rings, rng.uniform(1.5, 2.2)))


def _brush(
    image: np.ndarray,
    tone: np.ndarray,
    rng: np.random.Generator,
    n: int,
    reach: float,
    width: tuple[float, float],
    within: np.ndarray | None = None,
) -> np.ndarray:
    """`n` straight strokes of paint in jittered shades of `tone`, optionally only inside `within`."""
    for _ in range(n):
        start = rng.uniform(0, IMAGE_SIZE, 2)
        stroke = np.stack([start, start + rng.normal(0, reach, 2)])
        alpha = _strokes([stroke], rng.uniform(*width)) * rng.uniform(0.5, 0.9)
        image = _over(image, np.clip(tone + rng.normal(0, 0.08, 3), 0, 1), alpha if within is None else alpha * within)
    return image


def _painting(rings: Rings, colour: np.ndarray, rng: np.random.Generator, cue_class: int | None) -> np.ndarray:
    """Brush strokes everywhere, a wobbly object in varied tones of its colour, a warm varnish."""
    base = _hsv(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.35, 0.9))
    image = _brush(base + 0.12 * _smooth_noise(rng, 6, 3), base, rng, 6, 8, (2, 4))
    body = _mask(_jitter(rings, 0.6, rng))
    image = _brush(_over(image, colour, body), colour, rng, 10, 4, (1.5, 3), within=body)
    warm = np.array([1.05, 1.0, 0.85]) * rng.uniform(0.9, 1.05)
    varnished = Image.fromarray((np.clip(image * warm, 0, 1) * 255).astype(np.uint8))
    blurred = varnished.filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(blurred, dtype=np.float32) / 255


_RENDERERS = {"photo": _photo, "sketch": _sketch, "clipart": _clipart, "painting": _painting}


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
