"""Prompts in, scored groups out: the one rollout pipeline of `vlrl train`, `vlrl eval` and
`vlrl check-batch`.

encode (samples -> prompts; a sample the data makes unusable is skipped and named, or stops the run, as
`env.on_bad_sample` says) -> sample (`n` completions per prompt, the configured sampler; with a multi-turn
environment, `n` trajectories it drives turn by turn: rollout/episodes.py) -> score (the reward set) -> group
advantages -> for training, dynamic sampling (groups whose rewards all agree are dropped and refilled from the
prompt stream, within `algorithm.max_refill_rounds`). Out come plain records, `Rollout`s carrying their
rewards and advantages, and counts: the learner never sees a sample source, a sampler or a reward function,
and train, eval and check-batch share every line of it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from ..algo.advantages import group_advantages, zero_variance_groups
from ..data.encode import encode_samples
from ..envs.environment import load_environment
from ..records import Rollout
from ..rewards.base import MAX_ERRORS
from ..rewards.reward_set import RewardSet
from ..sample import Sample
from .episodes import run_episodes

EVAL_STREAM = 500_009  # eval's sampler seeds: a stream apart from training's (step * 101 + round)


def sampler_seed(seed: int, stream: int, rank: int = 0, world: int = 1) -> int:
    """The sampler's seed for one call: `stream` numbers the call within a run (training: step * 101 + refill
    round; eval: EVAL_STREAM + batch), and every rank gets seeds of its own."""
    return (seed * 1_000_003 + stream) * world + rank


@dataclass
class Groups:
    """Scored groups of rollouts, and what it took to make them."""

    keys: list[str]
    """The reward functions' keys (`fn`, a repeated fn as `fn#2`...): what `Rollout.rewards` is keyed by."""
    rollouts: list[Rollout] = field(default_factory=list)
    """The rollouts of the kept groups, prompt-major; `group` numbers the kept groups 0, 1, ..."""
    trained: list[Rollout] = field(default_factory=list)
    """The rollouts that enter the loss (a reward, and not cut by max_new_tokens under overlong masking)."""
    bad_samples: list[tuple[Sample, str]] = field(default_factory=list)
    """Samples skipped by env.on_bad_sample, with the reason: each time one was drawn (the count stays
    honest)."""
    new_bad_samples: list[tuple[Sample, str]] = field(default_factory=list)
    """Those skipped for the first time in the run (the ones worth telling a person about)."""
    failures: dict[str, int] = field(default_factory=dict)
    """Reward-function failures by reason (raised, timeout, nan...), over every scored rollout."""
    errors: list[str] = field(default_factory=list)
    """The first few reward-failure messages."""
    dropped: list[Rollout] = field(default_factory=list)
    """The scored rollouts of the groups dynamic sampling dropped (their rewards all agreed)."""
    groups_dropped: int = 0
    stale_dropped: int = 0
    """Groups asynchronous rollouts dropped: sampled by weights more than max_off_policy_steps old."""
    rounds: int = 0
    seconds: float = 0.0
    """Time spent encoding, sampling and scoring."""

    @property
    def per_fn(self) -> dict[str, list[float | None]]:
        """Each reward function's values over the kept rollouts (and the environment's own rewards, `env`)."""
        return self.per_fn_of(self.rollouts)

    @property
    def sampled(self) -> list[Rollout]:
        """Every scored rollout: the kept ones, then those of the groups dynamic sampling dropped."""
        return self.rollouts + self.dropped

    def per_fn_of(self, rollouts: list[Rollout]) -> dict[str, list[float | None]]:
        keys = self.keys + (["env"] if any("env" in r.rewards for r in rollouts) else [])
        return {k: [r.rewards.get(k) for r in rollouts] for k in keys}


def merge_groups(parts: list[Groups]) -> Groups:
    """One step's groups from several sampled apart (asynchronous rollouts take them one group at a time):
    the kept groups renumbered 0, 1, ... in order, counts added, the slowest part's time."""
    out = Groups(parts[0].keys if parts else [])
    for part in parts:
        offset = len({r.group for r in out.rollouts})
        numbers = {g: offset + i for i, g in enumerate(sorted({r.group for r in part.rollouts}))}
        for r in part.rollouts:
            r.group = numbers[r.group]
        out.rollouts += part.rollouts
        out.trained += part.trained
        out.bad_samples += part.bad_samples
        out.new_bad_samples += part.new_bad_samples
        for reason, count in part.failures.items():
            out.failures[reason] = out.failures.get(reason, 0) + count
        out.errors += part.errors[: max(0, MAX_ERRORS - len(out.errors))]
        out.dropped += part.dropped
        out.groups_dropped += part.groups_dropped
        out.stale_dropped += part.stale_dropped
        out.rounds = max(out.rounds, part.rounds)
        out.seconds = max(out.seconds, part.seconds)
    return out


class RolloutGroups:
    """Turns samples into scored groups with one sampler and the configured rewards."""

    def __init__(self, cfg, adapter, sampler, rank: int = 0, world: int = 1):
        self.cfg, self.adapter, self.sampler, self.rank, self.world = cfg, adapter, sampler, rank, world
        self.rewards = RewardSet(cfg.env.rewards, cfg.env.reward_timeout_s)
        self.env = load_environment(cfg.env)  # None: single-turn
        # Samples found bad once stay bad for the run: when the data order brings one back it is counted again
        # but not decoded (fetched, resized...) again. Keyed by the sample object, which lives the whole run.
        self.known_bad: dict[int, tuple[Sample, str]] = {}
        # Asynchronous rollouts run several steps' rounds at once (rollout/producer.py): encoding and scoring
        # take turns; the sampling, where the time goes, runs side by side.
        self.lock = threading.Lock()

    @property
    def keys(self) -> list[str]:
        return list(self.rewards.keys)

    def close(self) -> None:
        """End the reward set's worker processes."""
        self.rewards.close()

    def score_groups(self, samples: list[Sample], n: int, seed: int) -> Groups:
        """A group of `n` scored rollouts for every usable sample, none dropped (eval, check-batch)."""
        out = Groups(self.keys)
        t0 = time.perf_counter()
        for members in self._round(samples, n, seed, out, drop_uniform=False):
            self._keep(members, out)
        out.rounds, out.seconds = 1, time.perf_counter() - t0
        out.trained = [r for r in out.rollouts if not math.isnan(r.reward)]
        return out

    def step(self, stream, step: int, prompts: int) -> Groups:
        """A training step's groups: `prompts` of them carrying signal, drawn from `stream` and refilled
        (dynamic sampling, skipped bad samples) within `algorithm.max_refill_rounds`. `step` (0-based) seeds
        the sampler, so a resumed run samples what an uninterrupted one would."""
        cfg = self.cfg
        out = Groups(self.keys)
        t0 = time.perf_counter()
        for rnd in range(1 + cfg.algorithm.max_refill_rounds):
            need = prompts - len({r.group for r in out.rollouts})
            if need <= 0:
                break
            seed = sampler_seed(cfg.rollout.seed, step * 101 + rnd, self.rank, self.world)
            for members in self._round(stream.take(need), cfg.rollout.group_size, seed, out,
                                       drop_uniform=cfg.algorithm.dynamic_sampling):
                self._keep(members, out)
            out.rounds = rnd + 1
        out.seconds = time.perf_counter() - t0
        out.trained = [r for r in out.rollouts if not math.isnan(r.reward)
                       and not (cfg.algorithm.mask_truncated and r.finish_reason == "length")]
        return out

    @staticmethod
    def _keep(members: list[Rollout], out: Groups) -> None:
        group = len({r.group for r in out.rollouts})
        for r in members:
            r.group = group
        out.rollouts.extend(members)

    def _round(self, samples: list[Sample], n: int, seed: int, out: Groups,
               drop_uniform: bool) -> list[list[Rollout]]:
        """Encode, sample, score and compute advantages for one batch of samples; returns its groups (those
        with rewards that all agree left out under `drop_uniform`), counting bad samples and failures in
        `out`."""
        with self.lock:
            out.bad_samples.extend(self.known_bad[id(s)] for s in samples if id(s) in self.known_bad)
            tools = self.env.schemas() if self.env is not None else None
            prompts, kept, bad = encode_samples(self.adapter, [s for s in samples if id(s) not in self.known_bad],
                                                self.cfg.env, tools)
            self.known_bad.update((id(s), (s, reason)) for s, reason in bad)
        out.bad_samples.extend(bad)
        out.new_bad_samples.extend(bad)
        if not prompts:
            return []
        if self.env is None:
            rollouts = self.sampler.sample(prompts, n, seed=seed)
        else:  # the environment drives the sampler turn by turn; one that raises makes its sample bad
            rollouts, failed = run_episodes(self.env, self.adapter, self.sampler, prompts, kept, n,
                                            seed, self.cfg)
            out.bad_samples.extend(failed)
            out.new_bad_samples.extend(failed)
            if not rollouts:
                return []
        for r in rollouts:
            r.sample = kept[r.group]
        with self.lock:
            result = self.rewards.score([r.text for r in rollouts], [r.sample for r in rollouts])
        # rewards the environment gave along the way count as the reward `env`
        for i, r in enumerate(rollouts):
            # not a number: the rollout's reward fails, as a function's would
            if r.env_reward_error is not None:
                reason, detail = r.env_reward_error
                result.total[i] = None
                result.failures[reason] = result.failures.get(reason, 0) + 1
                result.errors.append(f"environment {self.cfg.env.environment or self.cfg.env.dataset} on "
                                     f"sample {r.sample.id}: {detail} ({reason})")
            elif r.env_reward is not None and result.total[i] is not None:
                result.total[i] += r.env_reward
        for reason, count in result.failures.items():
            out.failures[reason] = out.failures.get(reason, 0) + count
        out.errors.extend(result.errors[: max(0, MAX_ERRORS - len(out.errors))])
        rewards = torch.tensor([math.nan if t is None else t for t in result.total],
                               dtype=torch.float64)  # [N]
        groups = torch.tensor([r.group for r in rollouts])  # [N]
        algo = self.cfg.algorithm
        adv = group_advantages(rewards, groups, algo.advantage, algo.std_normalize)  # [N]
        for i, r in enumerate(rollouts):
            r.reward, r.advantage = float(rewards[i]), float(adv[i])
            r.rewards = {k: result.per_fn[k][i] for k in self.keys}
            if self.env is not None:  # an episode the environment gave nothing counts 0, as in the total
                r.rewards["env"] = None if r.env_reward_error is not None else r.env_reward or 0.0
        dead = zero_variance_groups(rewards, groups) if drop_uniform else set()
        out.groups_dropped += len(dead)
        out.dropped.extend(r for r in rollouts if r.group in dead)
        members = [[r for r in rollouts if r.group == g] for g in range(len(prompts)) if g not in dead]
        return [m for m in members if m]
