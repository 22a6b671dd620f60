"""Built-in synthetic visual tasks: the answer is only in the image, and is deterministic by seed.

`colors`: one filled shape of one of four colours on a grey canvas; "What color is the shape?".
The answers are single tokens of the tiny model's tokenizer, so a random policy can hit them by chance.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from ..errors import UserError
from .dataset import Sample

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 30)}
SPLIT_SEEDS = {"train": 1, "eval": 2}


def _draw_shape(rng: random.Random, size: int, rgb: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(img)
    side = rng.randint(size // 2, size - 4)
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=rgb)
    else:
        draw.rectangle(box, fill=rgb)
    return img


def colors_task(split: str, n: int, image_size: int, seed: int = 0) -> list[Sample]:
    names = sorted(COLORS)
    options = ", ".join(names[:-1]) + " or " + names[-1]
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
            )
        )
    return out


TASKS = {"colors": colors_task}


def builtin_split(name: str, split: str, n: int, image_size: int, seed: int = 0) -> list[Sample]:
    if name not in TASKS:
        raise UserError(f"env.dataset: unknown built-in task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    if split not in SPLIT_SEEDS:
        raise UserError(f"unknown split {split!r}; built-in tasks have 'train' and 'eval'")
    return TASKS[name](split, n, image_size, seed)
