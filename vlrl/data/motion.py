"""`builtin:motion`: a dot crosses the frame towards one edge; which edge is known only from the frame order.

Each video is FRAMES frames at FPS frames per second (2 s) of one dot, on a grey canvas, moving in a straight
line along one axis across (nearly) the whole frame. The path is a random segment [a, b] of that axis: towards
`right`/`bottom` the dot goes from a to b, towards `left`/`top` from b to a. So a left and a right video (or a
top and a bottom one) draw their frames from the same distribution: any single frame, or the frames as an
unordered set, says only the axis, and telling the two directions of an axis apart takes the order of the
frames (which the model sees through the timestamps and positions between frame pairs, and inside a pair
through the temporal patch). A random policy is right 25% of the time it names an edge.

The answers are single tokens of the tiny model's tokenizer (`left`, `right`, `top`, `bottom` are in its
ANSWER_WORDS), so the tiny model is rewarded by chance from the first step (`configs/tiny-cpu-video.toml`; the
README says what 150 CPU steps learn: no more than chance).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

EDGES = ["left", "right", "top", "bottom"]
QUESTION = "Towards which edge of the frame does the dot move?"
FRAMES = 8
FPS = 4.0
BACKGROUND = (200, 200, 200)
DOT_COLOR = (20, 20, 20)


def motion_frames(rng: random.Random, answer: str, size: int) -> list[Image.Image]:
    """FRAMES frames of a dot moving towards the `answer` edge (see the module docstring)."""
    radius = max(4, size // 6)
    lo, hi = radius + 1, size - radius - 2  # the dot stays wholly inside the frame
    length = hi - lo - rng.randint(0, size // 8)  # crosses (nearly) the whole frame: half to half
    a = rng.randint(lo, hi - length)
    path = [a + length * k / (FRAMES - 1) for k in range(FRAMES)]
    if answer in ("left", "top"):
        path.reverse()
    across = rng.randint(lo, hi)  # the fixed coordinate on the other axis
    frames = []
    for p in path:
        x, y = (p, across) if answer in ("left", "right") else (across, p)
        img = Image.new("RGB", (size, size), BACKGROUND)
        ImageDraw.Draw(img).ellipse((x - radius, y - radius, x + radius, y + radius), fill=DOT_COLOR)
        frames.append(img)
    return frames
