"""`builtin:zoom`: an answer legible only after cropping, with a `crop(x0, y0, x1, y1)` tool.

Each 256 x 256 image holds one square inside one of its four quadrants, painted as a one-pixel checkerboard
of a colour (red, green or blue) and its complement (cyan, magenta, yellow). Seen whole, the image is resized
to the pixel policy (a 2x reduction for the tiny CPU model: 128 x 128 at most), and every checkerboard
averages to the same grey: where the square is shows, its colour does not. `crop` returns the region at full
resolution (a quadrant fits the pixel policy unshrunk), where the checkerboard and its colour are plain.
The question asks for the colour; the `choice` reward scores the last assistant turn. The environment also
gives 0.25 (the reward `env`) for the episode's first crop that holds the whole square: without it a random
policy rarely crops, never sees a colour it could learn from, and settles on guessing (1 in 3); with it,
cropping spreads (README: the zoom demo, where the tiny model learns to crop the square but not, in 150
steps, to read its colour).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .environment import Environment, Reply
from .tools import Tool, parse_tool_calls

SIZE = 256  # the image side (not env.image_size: the tiny tokenizer knows this task's quadrant calls)
COLORS = {"red": ((255, 0, 0), (0, 255, 255)), "green": ((0, 255, 0), (255, 0, 255)),
          "blue": ((0, 0, 255), (255, 255, 0))}
QUESTION = "What colour is the checkered square? Crop the image to see it."


def zoom_image(rng: random.Random, answer: str, size: int = SIZE) -> Image.Image:
    """White, with one checkered square (even side and corner, so every 2x2 cell is whole) in one quadrant.
    The square's box is left in the image's `info["box"]` (x0, y0, x1, y1), for the environment's reward."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    half = SIZE // 2
    side = 2 * rng.randint(16, 48)
    qx, qy = rng.choice((0, half)), rng.choice((0, half))
    x0 = qx + 2 * rng.randint(2, (half - side) // 2 - 2)
    y0 = qy + 2 * rng.randint(2, (half - side) // 2 - 2)
    color, complement = COLORS[answer]
    draw = ImageDraw.Draw(img)
    draw.rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=complement)
    for y in range(y0, y0 + side):
        for x in range(x0 + (y - y0) % 2, x0 + side, 2):
            draw.point((x, y), fill=color)
    img.info["box"] = (x0, y0, x0 + side, y0 + side)
    return img


def crop(sample, state, x0: int, y0: int, x1: int, y1: int) -> list:
    """The region [x0, x1) x [y0, y1) of the sample's image, at full resolution."""
    img = sample.images[0]
    if not (0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height):
        raise ValueError(f"the box ({x0}, {y0}, {x1}, {y1}) is not inside the {img.width}x{img.height} image "
                         "with x0 < x1 and y0 < y1")
    return [img.crop((x0, y0, x1, y1)), f"the region ({x0}, {y0}) to ({x1}, {y1})"]


CROP = Tool(
    name="crop",
    description="Crop the image to the box (x0, y0)-(x1, y1), in pixels, and see it at full resolution.",
    parameters={"type": "object", "properties": {k: {"type": "integer"} for k in ("x0", "y0", "x1", "y1")},
                "required": ["x0", "y0", "x1", "y1"], "additionalProperties": False},
    fn=crop,
)


CROP_REWARD = 0.25


class ZoomEnv(Environment):
    """The model may crop the image as often as the turn budget allows, one crop a turn (the turn ends at the
    call); a turn without a call is its answer."""

    tools = [CROP]
    stop_at_tool_call = True

    def step(self, sample, state, completion: str) -> Reply:
        reply = super().step(sample, state, completion)
        box = sample.images[0].info.get("box")
        calls = [c for c in parse_tool_calls(completion, {"crop": CROP})
                 if c.error is None and c.name == "crop"]
        if box and not state.get("found") and any(_holds(c.arguments, box) for c in calls):
            state["found"] = True
            reply.reward = CROP_REWARD
        return reply


def _holds(args: dict, box: tuple) -> bool:
    """The crop (x0, y0, x1, y1) holds the whole box."""
    try:
        return args["x0"] <= box[0] and args["y0"] <= box[1] and args["x1"] >= box[2] and args["y1"] >= box[3]
    except (KeyError, TypeError):
        return False
