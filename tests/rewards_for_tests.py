"""Reward functions the tests name by `module:function` (tests/ is on sys.path under pytest)."""


def parity(completion, sample):
    """Varies within a group from the first step, so advantages are non-zero and the policy moves."""
    return float(len(completion) % 2)


def odd_fails(completion, sample):
    """Raises on odd-length completions (about half of them), scores the others 1."""
    if len(completion) % 2:
        raise ValueError("odd length")
    return 1.0
