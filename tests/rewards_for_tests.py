"""Reward functions the tests name by `module:function` (tests/ is on sys.path under pytest)."""


def parity(completion, sample):
    """Varies within a group from the first step, so advantages are non-zero and the policy moves."""
    return float(len(completion) % 2)
