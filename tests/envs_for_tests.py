"""Environments the tests name by `module:Class` (tests/ is on sys.path under pytest and torchrun)."""

import os

from PIL import Image

from vlrl.envs.environment import Environment, Reply


def _image(turn: int) -> Image.Image:
    return Image.new("RGB", (64 + 32 * (turn % 2), 64), (40 * turn % 256, 120, 200))


class ImageEveryTurn(Environment):
    """Answers every assistant turn with a tool message holding an image and text, until env.max_turns: every
    trajectory gets tool images, whatever a random model writes."""

    def step(self, sample, state, completion):
        state["turn"] = state.get("turn", 0) + 1
        content = [{"type": "image"}, {"type": "text", "text": f"view {state['turn']}"}]
        return Reply(messages=[{"role": "tool", "content": content}],
                     images=[_image(state["turn"])], reward=0.25)


class ImageEveryCall(ImageEveryTurn):
    """ImageEveryTurn whose turns end at a tool call's end (`</tool_call>`, or one of the tiny vocabulary's
    whole-call tokens): a random tiny model ends a turn that way within a few dozen tokens, so its episodes go
    on turn after turn, with a real sampler."""

    stop_at_tool_call = True


class TextEveryTurn(Environment):
    """Answers every turn with text only."""

    def step(self, sample, state, completion):
        return Reply(messages=[{"role": "user", "content": [{"type": "text", "text": "go on"}]}])


class ImageOnRankZero(Environment):
    """Tool images on rank 0's trajectories, text on the others' (the ranks' vision passes differ)."""

    stop_at_tool_call = True

    def step(self, sample, state, completion):
        if os.environ.get("RANK", "0") == "0":
            return ImageEveryTurn.step(self, sample, state, completion)
        return TextEveryTurn.step(self, sample, state, completion)


class RaisesInReset(Environment):
    def reset(self, sample):
        if sample.id.endswith("-1"):
            raise RuntimeError("no episode for this one")
        return {}


class RaisesInStep(Environment):
    def step(self, sample, state, completion):
        if sample.id.endswith("-1"):
            raise KeyError("lost state")
        return Reply(done=True)


class ReturnsNone(Environment):
    """Forgets to return its Reply on sample 1."""

    def step(self, sample, state, completion):
        if sample.id.endswith("-1"):
            return None
        return Reply(done=True)


class RewardNotANumber(Environment):
    """Rewards sample 1 with a string and sample 2 with NaN; the others with 0.5."""

    def step(self, sample, state, completion):
        reward = {"1": "high", "2": float("nan")}.get(sample.id.rsplit("-", 1)[1], 0.5)
        return Reply(done=True, reward=reward)


class StripImage(Environment):
    """Answers each turn with a tool image the pixel policy refuses (1x4000) next to a usable one."""

    def step(self, sample, state, completion):
        return Reply(messages=[{"role": "tool",
                                "content": [{"type": "image"}, {"type": "text", "text": "strip"},
                                                            {"type": "image"}]}],
                     images=[Image.new("RGB", (1, 4000)), _image(1)])


class SkipsOneAndRewards(ImageEveryTurn):
    """ImageEveryTurn (a tool image and 0.25 every turn) whose sample 1 cannot start (reset raises)."""

    def reset(self, sample):
        if sample.id.endswith("-1"):
            raise RuntimeError("no episode for this one")
        return {}


class RaisesInStepAtCall(RaisesInStep):
    """RaisesInStep whose turns end at a tool call (as ImageEveryCall's), so a random tiny model's turns reach
    `step` (a turn cut by max_new_tokens never does)."""

    stop_at_tool_call = True
