"""A small world of coloured shapes, drawn deterministically from a seed (PIL only).

It yields the images of the built-in dataset `nbtune:shapes` and the pre-training images of the embedded ViT
(`build_vision.py`). An image is 32x32 RGB: one shape (`SHAPES`) in one colour (`COLOURS`, jittered) in one
quadrant (`POSITIONS`, jittered) at a random size, on a light background with a soft tint and pixel noise.

The downstream split holds out, for each shape, one colour per position (`heldout_combos`): those
shape x colour x position combinations never occur in train, only in eval, while every colour and every
position still occurs with every shape in train. Pre-training draws all combinations, from other seeds.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

SIZE = 32
SHAPES = ("circle", "cross", "diamond", "square", "triangle")  # sorted: the order of an image-folder listing
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 50),
    "blue": (40, 70, 210),
    "yellow": (225, 190, 20),
    "purple": (150, 50, 180),
}
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
_CENTRES = {"top-left": (8, 8), "top-right": (24, 8), "bottom-left": (8, 24), "bottom-right": (24, 24)}
JITTER = 2  # pixels of the centre's random offset, each axis
RADIUS = (4, 6)  # half the shape's extent in pixels, inclusive range
SEED = 0  # the downstream dataset's seed; pre-training uses other seeds (build_vision.PRETRAIN_SEEDS)


@dataclass(frozen=True)
class Sample:
    """One drawn image and what it shows."""

    image: Image.Image
    shape: str
    colour: str
    position: str
    radius: int


def heldout_combos(shape: str) -> frozenset[tuple[str, str]]:
    """The (colour, position) pairs that train never shows with `shape`: for shape s, position p the colour c
    with (c + p + s) % len(COLOURS) == 0 (a Latin-square pattern: one colour per position, a different one
    for each shape and position)."""
    s = SHAPES.index(shape)
    colours = list(COLOURS)
    return frozenset(
        (colours[c], position)
        for p, position in enumerate(POSITIONS)
        for c in range(len(colours))
        if (c + p + s) % len(colours) == 0
    )


def _background(rng: random.Random) -> Image.Image:
    """A light grey background with a soft random tint and low-amplitude grey pixel noise."""
    from PIL import Image

    base = rng.randint(205, 235)
    tint = [base + rng.randint(-8, 8) for _ in range(3)]
    noise = bytes(max(0, min(255, base + rng.choice((-6, -3, 0, 0, 3, 6)))) for _ in range(SIZE * SIZE))
    grey = Image.frombytes("L", (SIZE, SIZE), noise).convert("RGB")
    flat = Image.new("RGB", (SIZE, SIZE), tuple(tint))
    return Image.blend(grey, flat, 0.5)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The polygon of a shape centred on (cx, cy) with half-extent r; None for the circle."""
    if shape == "square":
        r *= 0.85  # the same visual area as the other shapes
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        t = max(1.5, r / 2.5)
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


def draw(shape: str, colour: str, position: str, rng: random.Random) -> Sample:
    """One 32x32 RGB image of `shape` in `colour` in the quadrant `position`; size, exact place, shade and
    background come from `rng`."""
    from PIL import ImageDraw

    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; allowed: {', '.join(COLOURS)}")
    if position not in _CENTRES:
        raise ValueError(f"unknown position {position!r}; allowed: {', '.join(POSITIONS)}")
    image = _background(rng)
    r = rng.randint(*RADIUS)
    x, y = _CENTRES[position]
    cx, cy = x + rng.randint(-JITTER, JITTER) - 0.5, y + rng.randint(-JITTER, JITTER) - 0.5
    fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    pen = ImageDraw.Draw(image)
    outline = _outline(shape, cx, cy, r)
    if outline is None:
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        pen.polygon(outline, fill=fill)
    return Sample(image, shape, colour, position, r)


def combos(split: str) -> Iterator[tuple[str, str, str]]:
    """(shape, colour, position) of a downstream split ("train": all but the held-out combinations; "eval":
    the held-out ones; "all": every combination), in a fixed order."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"unknown split {split!r}; allowed: train, eval, all")
    for shape in SHAPES:
        held = heldout_combos(shape)
        for colour in COLOURS:
            for position in POSITIONS:
                if split == "all" or ((colour, position) in held) == (split == "eval"):
                    yield shape, colour, position


def make_split(split: str, per_combo: int, seed: int = SEED) -> list[Sample]:
    """`per_combo` images of every combination of a split, drawn from a generator seeded by `seed` and the
    split's name (so train and eval never share images), ordered by shape, colour, position."""
    rng = random.Random(f"shapes-{seed}-{split}")
    return [draw(shape, colour, position, rng) for shape, colour, position in combos(split) for _ in range(per_combo)]


def rows(samples: list[Sample]) -> list[dict]:
    """The attributes of samples as dicts (no image): shape = the label, colour, position, radius."""
    return [{"label": s.shape, "colour": s.colour, "position": s.position, "radius": s.radius} for s in samples]


# ----- the concept shape of `nbtune:sks-star` (build_diffusion.py): a shape that no SHAPES image shows -----------

CONCEPT = "star"  # not in SHAPES: the text-to-image base never sees it, a DreamBooth-style fine-tune teaches it
CONCEPT_SEED = 7  # the seed of the shipped concept images (nbtune/embedded/data/sks-star)


def star_outline(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A five-pointed star centred on (cx, cy), one point up; its points reach 1.15 r (about the visual area of
    the other shapes), its inner corners 0.45 of that."""
    import math

    outer = r * 1.15
    inner = outer * 0.45
    return [
        (cx + (outer if k % 2 == 0 else inner) * math.sin(math.pi * k / 5),
         cy - (outer if k % 2 == 0 else inner) * math.cos(math.pi * k / 5))
        for k in range(10)
    ]  # fmt: skip


def draw_concept(colour: str, position: str, rng: random.Random) -> Sample:
    """One 32x32 RGB image of the concept (a star) in `colour` in the quadrant `position`, drawn in the style of
    `draw` (the same background, size, jitter and shade, taken from `rng` in the same order)."""
    from PIL import ImageDraw

    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; allowed: {', '.join(COLOURS)}")
    if position not in _CENTRES:
        raise ValueError(f"unknown position {position!r}; allowed: {', '.join(POSITIONS)}")
    image = _background(rng)
    r = rng.randint(*RADIUS)
    x, y = _CENTRES[position]
    cx, cy = x + rng.randint(-JITTER, JITTER) - 0.5, y + rng.randint(-JITTER, JITTER) - 0.5
    fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    ImageDraw.Draw(image).polygon(star_outline(cx, cy, r), fill=fill)
    return Sample(image, CONCEPT, colour, position, r)


def concept_heldout() -> frozenset[tuple[str, str]]:
    """The (colour, position) pairs of the concept that its train split never shows: for position p the colours
    c with (c + p) % len(COLOURS) in (0, 1), two per position (8 of 20)."""
    colours = list(COLOURS)
    return frozenset(
        (colours[c], position)
        for p, position in enumerate(POSITIONS)
        for c in range(len(colours))
        if (c + p) % len(colours) in (0, 1)
    )


def concept_combos(split: str) -> Iterator[tuple[str, str]]:
    """(colour, position) of a concept split ("train": 12 pairs, "eval": the 8 held-out ones, "all": 20)."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"unknown split {split!r}; allowed: train, eval, all")
    held = concept_heldout()
    for colour in COLOURS:
        for position in POSITIONS:
            if split == "all" or ((colour, position) in held) == (split == "eval"):
                yield colour, position


def make_concept(split: str, per_combo: int, seed: int = CONCEPT_SEED) -> list[Sample]:
    """`per_combo` concept images of every (colour, position) of a split, from a generator seeded by `seed` and
    the split's name, ordered by colour, position."""
    rng = random.Random(f"concept-{seed}-{split}")
    return [draw_concept(colour, position, rng) for colour, position in concept_combos(split) for _ in range(per_combo)]
