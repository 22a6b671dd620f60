"""Reward functions the tests name by `module:function` (tests/ is on sys.path under pytest)."""


def parity(completion, sample):
    """Varies within a group from the first step, so advantages are non-zero and the policy moves."""
    return float(len(completion) % 2)


def slow_parity(completion, sample):
    """`parity`, 0.3 s a call: a step that lasts, so a signal sent during it lands inside it."""
    import time

    time.sleep(0.3)
    return parity(completion, sample)


def noise(completion, sample):
    """Uniform noise: varies within every group whatever the completions are, so the first update moves the
    policy for sure (parity leaves a group without signal when its completions' lengths share a parity)."""
    import random

    return random.random()


def odd_fails(completion, sample):
    """Raises on odd-length completions (about half of them), scores the others 1."""
    if len(completion) % 2:
        raise ValueError("odd length")
    return 1.0
