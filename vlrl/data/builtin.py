"""Built-in synthetic visual tasks: the answer is only in the image, and is deterministic by seed.

`colors`: one filled shape of one of four colours on a grey canvas; "What color is the shape?".
The answers are single tokens of the tiny model's tokenizer, so a random policy can hit them by chance.
`shapes`: one circle, square or triangle (random colour, size and place); answer the shape's name.
`count`: one to four identical small shapes in distinct cells of a 3x3 grid; answer the number as a word.
`position`: one shape wholly inside the left or the right half; answer left or right.
`zoom` (with the `builtin:zoom` environment): a checkered square whose colour shows only once cropped
(vlrl/envs/zoom.py). `calculator` (with `builtin:calculator`): arithmetic, text only
(vlrl/envs/calculator.py). `motion` (a video task, motion.py): a dot moves towards one edge of the frame;
answer left, right, top or bottom.

Every sample is drawn from its own RNG seeded by (task, seed, split, index), so a split is reproducible
sample by sample and train and eval never share an RNG stream. The colour, size and kind of shape vary
in every task, so only the asked-for property predicts the answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..envs.calculator import calculator_split
from ..envs.zoom import COLORS as ZOOM_COLORS
from ..envs.zoom import QUESTION as ZOOM_QUESTION
from ..envs.zoom import zoom_image
from ..errors import UserError
from ..sample import Sample
from .motion import EDGES, FPS, QUESTION, motion_frames

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 30)}
SHAPES = ["circle", "square", "triangle"]
COUNT_WORDS = ["one", "two", "three", "four"]
SIDES = ["left", "right"]
BACKGROUND = (200, 200, 200)
SPLIT_SEEDS = {"train": 1, "eval": 2}


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


def _random_color(rng: random.Random) -> tuple[int, int, int]:
    return COLORS[rng.choice(sorted(COLORS))]


def _colors_image(rng: random.Random, answer: str, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    side = rng.randint(size // 2, size - 4)
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    _paint(ImageDraw.Draw(img), "circle" if rng.random() < 0.5 else "square", x0, y0, side, COLORS[answer])
    return img


def _shapes_image(rng: random.Random, answer: str, size: int) -> Image.Image:
    rgb = _random_color(rng)
    img = Image.new("RGB", (size, size), BACKGROUND)
    side = rng.randint(size // 2, size - 4)
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    _paint(ImageDraw.Draw(img), answer, x0, y0, side, rgb)
    return img


def _count_image(rng: random.Random, answer: str, size: int) -> Image.Image:
    """Shapes sit in distinct cells of a 3x3 grid with at least two pixels between them, so they never touch
    and the count is the number of separate blobs."""
    cell = size // 3
    side = max(4, cell * 3 // 5)
    kind = rng.choice(SHAPES)
    rgb = _random_color(rng)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for c in rng.sample(range(9), COUNT_WORDS.index(answer) + 1):
        row, col = divmod(c, 3)
        x0 = col * cell + rng.randint(1, cell - side - 1)
        y0 = row * cell + rng.randint(1, cell - side - 1)
        _paint(draw, kind, x0, y0, side, rgb)
    return img


def _position_image(rng: random.Random, answer: str, size: int) -> Image.Image:
    """The shape keeps two pixels from the centre line, so its half is never ambiguous."""
    half = size // 2
    kind = rng.choice(SHAPES)
    rgb = _random_color(rng)
    side = rng.randint(size // 5, half - 4)
    x0 = rng.randint(2, half - 2 - side)  # left half; mirrored for right
    if answer == "right":
        x0 = size - side - x0
    y0 = rng.randint(0, size - side)
    img = Image.new("RGB", (size, size), BACKGROUND)
    _paint(ImageDraw.Draw(img), kind, x0, y0, side, rgb)
    return img


@dataclass(frozen=True)
class Task:
    """A built-in task: its answers, its question, and how an image (or, for a video task, the frames of a
    video at `fps`) with a given answer is drawn."""

    name: str
    options: list[str]
    question: str
    draw: Callable[[random.Random, str, int], Image.Image | list[Image.Image]]
    fps: float | None = None

    def __call__(self, split: str, n: int, image_size: int, seed: int = 0) -> list[Sample]:
        out = []
        for i in range(n):
            rng = random.Random(f"{self.name}/{seed}/{SPLIT_SEEDS[split]}/{i}")
            answer = rng.choice(self.options)
            drawn = self.draw(rng, answer, image_size)
            media = {"videos": [{"frames": drawn, "fps": self.fps}]} if self.fps else {"images": [drawn]}
            out.append(Sample(id=f"{self.name}-{split}-{i}", question=self.question, answer=answer,
                              meta={"options": self.options}, **media))
        return out


def _task(name: str, options: list[str], question: str, draw, fps: float | None = None) -> Task:
    return Task(name, options, f"{question} Answer with one word: {_options(options)}.", draw, fps)


TASKS = {
    t.name: t
    for t in (
        _task("colors", sorted(COLORS), "What color is the shape?", _colors_image),
        _task("shapes", SHAPES, "What shape is in the image?", _shapes_image),
        _task("count", COUNT_WORDS, "How many shapes are in the image?", _count_image),
        _task("position", SIDES, "Is the shape in the left or the right half of the image?", _position_image),
        _task("zoom", list(ZOOM_COLORS), ZOOM_QUESTION, zoom_image),
        _task("motion", EDGES, QUESTION, motion_frames, fps=FPS),
    )
}


def builtin_split(name: str, split: str, n: int, image_size: int, seed: int = 0) -> list[Sample]:
    if name == "calculator":
        return calculator_split(split, n, seed)
    if name not in TASKS:
        names = ", ".join(sorted([*TASKS, "calculator"]))
        raise UserError(f"env.dataset: unknown built-in task {name!r}; choose one of {names}")
    if split not in SPLIT_SEEDS:
        raise UserError(f"unknown split {split!r}; built-in tasks have 'train' and 'eval'")
    return TASKS[name](split, n, image_size, seed)
