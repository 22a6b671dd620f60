"""Built-in synthetic visual tasks: the answer is only in the image, and is deterministic by seed.

`colors`: one filled shape of one of four colours on a grey canvas; "What color is the shape?".
The answers are single tokens of the tiny model's tokenizer, so a random policy can hit them by chance.
`shapes`: one circle, square or triangle (random colour, size and place); answer the shape's name.
`count`: one to four identical small shapes in distinct cells of a 3x3 grid; answer the number as a word.
`position`: one shape wholly inside the left or the right half; answer left or right.

Every sample is drawn from its own RNG seeded by (task, seed, split, index), so a split is reproducible
sample by sample and train and eval never share an RNG stream. The colour, size and kind of shape vary
in every task, so only the asked-for property predicts the answer.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from ..errors import UserError
from .dataset import Sample

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 30)}
SPLIT_SEEDS = {"train": 1, "eval": 2}


def _draw_shape(rng: random.Random, size: int, rgb: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    side = rng.randint(size // 2, size - 4)
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    _paint(ImageDraw.Draw(img), "circle" if rng.random() < 0.5 else "square", x0, y0, side, rgb)
    return img


def colors_task(split: str, n: int, image_size: int, seed: int = 0) -> list[Sample]:
    names = sorted(COLORS)
    options = _options(names)
    out = []
    for i in range(n):
        rng = random.Random(f"colors/{seed}/{SPLIT_SEEDS[split]}/{i}")
        answer = rng.choice(names)
        out.append(
            Sample(
                id=f"colors-{split}-{i}",
                question=f"What color is the shape? Answer with one word: {options}.",
                answer=answer,
                images=[_draw_shape(rng, image_size, COLORS[answer])],
                meta={"options": names},
            )
        )
    return out


def _options(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]


def _paint(draw: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, side: int, rgb: tuple[int, int, int]):
    """A filled shape inside the box (x0, y0)-(x0+side-1, y0+side-1); the triangle points up."""
    x1, y1 = x0 + side - 1, y0 + side - 1
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=rgb)


SHAPES = ["circle", "square", "triangle"]
COUNT_WORDS = ["one", "two", "three", "four"]
SIDES = ["left", "right"]
BACKGROUND = (200, 200, 200)


def shapes_task(split: str, n: int, image_size: int, seed: int = 0) -> list[Sample]:
    out = []
    for i in range(n):
        rng = random.Random(f"shapes/{seed}/{SPLIT_SEEDS[split]}/{i}")
        answer = rng.choice(SHAPES)
        rgb = COLORS[rng.choice(sorted(COLORS))]
        img = Image.new("RGB", (image_size, image_size), BACKGROUND)
        side = rng.randint(image_size // 2, image_size - 4)
        x0, y0 = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
        _paint(ImageDraw.Draw(img), answer, x0, y0, side, rgb)
        out.append(
            Sample(
                id=f"shapes-{split}-{i}",
                question=f"What shape is in the image? Answer with one word: {_options(SHAPES)}.",
                answer=answer,
                images=[img],
                meta={"options": SHAPES},
            )
        )
    return out


def count_task(split: str, n: int, image_size: int, seed: int = 0) -> list[Sample]:
    """Shapes sit in distinct cells of a 3x3 grid with at least two pixels between them, so they never touch
    and the count is the number of separate blobs."""
    cell = image_size // 3
    side = max(4, cell * 3 // 5)
    out = []
    for i in range(n):
        rng = random.Random(f"count/{seed}/{SPLIT_SEEDS[split]}/{i}")
        answer = rng.choice(COUNT_WORDS)
        kind = rng.choice(SHAPES)
        rgb = COLORS[rng.choice(sorted(COLORS))]
        img = Image.new("RGB", (image_size, image_size), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for c in rng.sample(range(9), COUNT_WORDS.index(answer) + 1):
            row, col = divmod(c, 3)
            x0 = col * cell + rng.randint(1, cell - side - 1)
            y0 = row * cell + rng.randint(1, cell - side - 1)
            _paint(draw, kind, x0, y0, side, rgb)
        out.append(
            Sample(
                id=f"count-{split}-{i}",
                question=f"How many shapes are in the image? Answer with one word: {_options(COUNT_WORDS)}.",
                answer=answer,
                images=[img],
                meta={"options": COUNT_WORDS},
            )
        )
    return out


def position_task(split: str, n: int, image_size: int, seed: int = 0) -> list[Sample]:
    """The shape keeps two pixels from the centre line, so its half is never ambiguous."""
    half = image_size // 2
    out = []
    for i in range(n):
        rng = random.Random(f"position/{seed}/{SPLIT_SEEDS[split]}/{i}")
        answer = rng.choice(SIDES)
        kind = rng.choice(SHAPES)
        rgb = COLORS[rng.choice(sorted(COLORS))]
        side = rng.randint(image_size // 5, half - 4)
        x0 = rng.randint(2, half - 2 - side)  # left half; mirrored for right
        if answer == "right":
            x0 = image_size - side - x0
        y0 = rng.randint(0, image_size - side)
        img = Image.new("RGB", (image_size, image_size), BACKGROUND)
        _paint(ImageDraw.Draw(img), kind, x0, y0, side, rgb)
        out.append(
            Sample(
                id=f"position-{split}-{i}",
                question=f"Is the shape in the left or the right half of the image? "
                f"Answer with one word: {_options(SIDES)}.",
                answer=answer,
                images=[img],
                meta={"options": SIDES},
            )
        )
    return out


TASKS = {"colors": colors_task, "shapes": shapes_task, "count": count_task, "position": position_task}


def builtin_split(name: str, split: str, n: int, image_size: int, seed: int = 0) -> list[Sample]:
    if name not in TASKS:
        raise UserError(f"env.dataset: unknown built-in task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    if split not in SPLIT_SEEDS:
        raise UserError(f"unknown split {split!r}; built-in tasks have 'train' and 'eval'")
    return TASKS[name](split, n, image_size, seed)
