"""`vlrl eval`: score a policy (the base model or a checkpoint) on a split, without training it.

For every prompt the sampler draws `n` completions; the configured rewards score them. The summary holds the
mean reward (total and per reward function), accuracy (the fraction of completions whose FIRST reward function
scored >= 1, as training's `accuracy`), pass@k for k = 1, 2, 4, ... <= n (the unbiased estimator of Chen et
al. 2021, averaged over prompts), and the mean response length (sampled tokens: a multi-turn trajectory's
environment replies are not counted). With a multi-turn environment it also holds the environment's reward
(`reward/env/mean`), turns, tool calls and their errors, and how episodes ended (`finish/<reason>`). Sampling
is seeded per batch of prompts from one seed, so with the embedded sampler the same policy, config and seed
give the same completions, line for line; a vLLM server takes no seed (rollout/__init__.py: `Sampler.sample`),
so its completions vary.

`evaluate` is the reusable part (training can call it with its live model and sampler); `run_eval` loads the
policy for the command line and calls it. Results go to one directory: `summary.json`, `samples.jsonl` (every
completion, with image references), `images/` (images that had no file of their own) and `report.html`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from .atomic import write_atomic
from .errors import UserError

ProgressFn = Callable[[int, int], None]  # (prompts done, prompts in all)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k completions drawn without replacement from n (c of them correct) is
    correct: 1 - C(n-c, k) / C(n, k). Unbiased, unlike 1 - (1 - c/n)^k (Chen et al. 2021,
    arXiv:2107.03374)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k reported for n completions per prompt: the powers of two up to n."""
    return [2**i for i in range(n.bit_length()) if 2**i <= n]


def summarize(records: list[dict], reward_keys: list[str], n: int, multi_turn: bool = False) -> dict:
    """The summary numbers of scored completions (records as written to samples.jsonl, prompt-major); with
    `multi_turn`, the records' turns, tool calls, tool errors and finish reasons too."""
    total = [r["reward"] for r in records if r["reward"] is not None]
    lengths = [r["length"] for r in records] or [0]
    out = {
        "reward/mean": sum(total) / len(total) if total else 0.0,
        "accuracy": sum(r["correct"] for r in records) / max(len(records), 1),
    }
    for key in reward_keys:
        ok = [r["rewards"][key] for r in records if r["rewards"].get(key) is not None]
        out[f"reward/{key}/mean"] = sum(ok) / len(ok) if ok else 0.0
    correct: dict = {}
    for r in records:  # by prompt (its position in the split; sample ids need not be unique)
        correct.setdefault(r.get("prompt", r["sample_id"]), []).append(r["correct"])
    for k in pass_ks(n):
        values = [pass_at_k(len(c), sum(c), k) for c in correct.values() if len(c) >= k]
        out[f"pass@{k}"] = sum(values) / len(values) if values else 0.0
    out["response_length/mean"] = sum(lengths) / len(lengths)
    out["truncated_fraction"] = sum(r["finish_reason"] == "length" for r in records) / max(len(records), 1)
    out["reward_failures"] = len(records) - len(total)
    if multi_turn:
        turns = [r["turns"] for r in records] or [0]
        out.update({"turns/mean": sum(turns) / len(turns), "turns/max": max(turns),
                    "tool_calls": sum(r["tool_calls"] for r in records)})
        for key in ("tool_errors", "finish"):
            counts: dict[str, int] = {}
            for r in records:
                for reason, c in (r["tool_errors"].items() if key == "tool_errors"
                                  else [(r["finish_reason"], 1)]):
                    counts[reason] = counts.get(reason, 0) + c
            out.update({f"{key}/{reason}": c for reason, c in sorted(counts.items())})
    return out


def evaluate(
    cfg, rollouts, samples: list, n: int, seed: int, out_dir: Path,
    progress: ProgressFn | None = None, info: dict | None = None,
) -> dict:
    """Sample `n` completions for each of `samples`, score them, and write the results into `out_dir`.

    `rollouts` is the rollout layer (`rollout.groups.RolloutGroups`) holding the sampler of the policy being
    scored (training passes its own). The sampler restores the model's mode and the global RNG afterwards,
    so an eval does not change a training run. `info` adds fields to the summary (split, checkpoint,
    training step...). Returns the summary, also written to `out_dir/summary.json`.
    """
    from .report import write_eval_report
    from .rewards.base import MAX_ERRORS
    from .rollout.groups import EVAL_STREAM, sampler_seed
    from .sample_log import image_refs, rollout_record

    if not samples:
        raise UserError("eval: the split holds no samples; check env.dataset / env.eval_dataset and --limit")
    if n < 1:
        raise UserError(f"eval: --n must be at least 1 (got {n})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = rollouts.keys[0]
    multi_turn = rollouts.env is not None
    # the environment's own rewards, as training logs them
    keys = rollouts.keys + (["env"] if multi_turn else [])
    per_batch = max(1, cfg.rollout.prompts_per_step)
    records: list[dict] = []
    errors: list[str] = []  # the first reward-failure messages
    skipped: list[tuple[str, str]] = []  # (sample id, reason) of samples env.on_bad_sample skipped
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, len(samples))
    for b, start in enumerate(range(0, len(samples), per_batch)):
        batch = samples[start : start + per_batch]
        got = rollouts.score_groups(batch, n, sampler_seed(seed, EVAL_STREAM + b))
        skipped.extend((s.id, reason) for s, reason in got.bad_samples)
        errors.extend(got.errors[: max(0, MAX_ERRORS - len(errors))])
        refs: dict[int, list[str]] = {}
        seen: dict[int, int] = {}
        position = {id(s): start + i for i, s in enumerate(batch)}  # (groups number only the samples kept)
        for r in got.rollouts:
            if r.group not in refs:  # one image file per prompt, shared by its n completions
                refs[r.group] = image_refs(r, out_dir / "images", out_dir)
            seen[r.group] = seen.get(r.group, -1) + 1
            records.append({
                "prompt": position[id(r.sample)],
                "index": seen[r.group],
                **rollout_record(r, out_dir / "images", out_dir, refs[r.group]),
                "reward": None if math.isnan(r.reward) else r.reward,
                "rewards": dict(r.rewards),
                "correct": r.rewards[first] is not None and r.rewards[first] >= 1.0,
                "length": r.sampled_tokens,
                **({"turns": r.turns, "tool_calls": r.tool_calls, "tool_errors": dict(r.tool_errors)}
                   if multi_turn else {}),
            })
        if progress is not None:
            progress(start + len(batch), len(samples))
    summary = {
        **(info or {}),
        "dataset": cfg.env.dataset,
        "prompts": len(samples),
        "samples_per_prompt": n,
        "samples": len(records),
        "seed": seed,
        "rewards": rollouts.keys,
        **summarize(records, keys, n, multi_turn),
        "bad_samples": len(skipped),
        "reward_errors": errors,
        "time/eval": time.perf_counter() - t0,
    }
    write_atomic(out_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if skipped:
        write_atomic(out_dir / "bad_samples.jsonl",
                     "".join(json.dumps({"sample_id": i, "reason": r}) + "\n" for i, r in skipped))
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_eval_report(out_dir, summary, records)
    return summary


def default_out_dir(cfg, checkpoint: Path | None, split: str) -> Path:
    """Next to the checkpoint it scores, or under the run directory for the base model."""
    if checkpoint is not None:
        return Path(checkpoint) / f"eval-{split}"
    return cfg.run_dir / f"eval-base-{split}"


def check_checkpoint(checkpoint: Path) -> Path:
    """A checkpoint directory holding an HF model, or a UserError that says what to pass instead."""
    from .checkpoint import latest_checkpoint

    p = Path(checkpoint)
    if not p.is_dir():
        raise UserError(f"--checkpoint {p}: no such directory; pass a checkpoint directory such as "
                        "runs/NAME/step-N")
    if not (p / "config.json").is_file():
        latest = latest_checkpoint(p)
        hint = f" (its newest checkpoint is {latest})" if latest is not None else ""
        raise UserError(
            f"--checkpoint {p}: no config.json in it, so it is not a model checkpoint{hint}; pass a "
            "checkpoint directory such as runs/NAME/step-N"
        )
    return p


def run_eval(cfg, checkpoint: Path | None, split: str, n: int | None, limit: int | None, console) -> dict:
    """Load the policy (`model.path`, or the checkpoint's weights) and evaluate it on `split`.

    The summary it returns also names `out_dir`, where the results were written.
    """
    from .adapters import load_adapter
    from .data.sources import load_samples
    from .progress import eval_bar
    from .rollout import make_sampler
    from .rollout.groups import RolloutGroups
    from .runtime import quiet_libraries, resolve_device, resolve_dtype

    if split not in ("train", "eval"):
        raise UserError(f"--split {split!r}: expected 'train' or 'eval'")
    if checkpoint is not None:
        checkpoint = check_checkpoint(checkpoint)
    n = cfg.rollout.group_size if n is None else n
    if n < 1 or (limit is not None and limit < 1):
        raise UserError("--n and --limit must be at least 1")
    quiet_libraries()
    samples = load_samples(cfg.env, split, cfg.train.seed)  # the split training holds out (same seed)
    samples = samples[:limit] if limit is not None else samples
    device = resolve_device()
    adapter = load_adapter(cfg.model)
    weights = None if checkpoint is None else str(checkpoint)
    model = adapter.load_model(resolve_dtype(cfg, device), device, weights_from=weights).eval()
    sampler = make_sampler(cfg, model, adapter)
    sampler.sync_weights(model)  # a vLLM server must serve these weights, not its own
    out_dir = default_out_dir(cfg, checkpoint, split)
    info = {"model": cfg.model.path, "checkpoint": weights, "split": split}
    rollouts = RolloutGroups(cfg, adapter, sampler)
    try:
        with eval_bar(console, cfg.logging.progress) as bar:
            summary = evaluate(cfg, rollouts, samples, n, cfg.rollout.seed, out_dir, bar.update, info)
    finally:
        rollouts.close()
        if hasattr(sampler, "close"):  # (the weight sync's buffers, and a shared-memory sync dir)
            sampler.close()
    return {**summary, "out_dir": str(out_dir)}


def summary_table(summary: dict):
    """A rich Table of the summary's numbers, rewards first, then accuracy and pass@k."""
    from rich.markup import escape
    from rich.table import Table

    who = summary.get("checkpoint") or summary.get("model", "policy")
    title = escape(f"eval of {who} on split {summary.get('split', '?')}")
    table = Table(title=title, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith(("reward", "accuracy", "pass@", "response_length", "truncated", "turns",
                           "tool_", "finish")):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("prompts x samples", f"{summary.get('prompts')} x {summary.get('samples_per_prompt')}")
    return table
