"""Group-relative advantages (GRPO family). Pure functions on [N] tensors.

Each prompt is sampled several times (a group). A sample's advantage is its reward minus a baseline made
from the other rewards of its group, so no value network is needed:
- `grpo`: baseline = group mean (arXiv:2402.03300), optionally divided by the group's std.
- `rloo`: leave-one-out baseline = mean of the *other* samples (arXiv:2402.14740); unbiased.
Dr.GRPO (arXiv:2503.20783) is `grpo` without std scaling (plus the constant loss normaliser in losses.py).
A reward of NaN marks a failed sample (its reward function raised, timed out...): it is left out of its
group's baseline and gets advantage 0.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,  # [N] float, NaN = failed sample
    group_index: torch.Tensor,  # [N] int64, the prompt group of each sample
    estimator: str = "grpo",
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Returns advantages [N] float32; 0 for failed samples and for groups with fewer than 2 valid rewards."""
    rewards = rewards.double()
    adv = torch.zeros_like(rewards)
    for g in torch.unique(group_index):
        idx = (group_index == g).nonzero(as_tuple=True)[0]
        r = rewards[idx]
        ok = ~torch.isnan(r)
        n = int(ok.sum())
        if n < 2:
            continue
        valid = r[ok]
        mean = valid.mean()
        if estimator == "grpo":
            a = valid - mean
        elif estimator == "rloo":
            a = valid - (valid.sum() - valid) / (n - 1)  # = n/(n-1) * (r - mean)
        else:
            raise ValueError(f"unknown advantage estimator {estimator!r}")
        if std_normalize:
            a = a / (valid.std(unbiased=True) + eps)
        adv[idx[ok]] = a
    return adv.float()


def zero_variance_groups(rewards: torch.Tensor, group_index: torch.Tensor) -> set[int]:
    """Groups whose valid rewards are all equal: they carry no learning signal (DAPO's dynamic sampling)."""
    out = set()
    for g in torch.unique(group_index).tolist():
        r = rewards[group_index == g]
        r = r[~torch.isnan(r)]
        if r.numel() == 0 or bool((r == r[0]).all()):
            out.add(g)
    return out
