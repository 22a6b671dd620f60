"""What a training step logs: metrics.jsonl (pooled over ranks), samples.jsonl and bad_samples.jsonl."""

from __future__ import annotations

import json
import math

import torch


def step_stats(got, step: int | None = None) -> dict:
    """What the metrics need from one rank's `rollout.groups.Groups` (plain data, so ranks can pool it). They
    describe every rollout the step sampled and scored, the groups dynamic sampling dropped included (a step
    whose groups were all dropped still shows its rewards); `trained` and `dropped` say what was learned from.
    Lengths count sampled tokens only (not the environment's replies between turns). `step` (0-based, the step
    that trains them): the staleness of each trained rollout, in policy versions (0: sampled by the weights
    being trained)."""
    sampled = got.sampled
    return {
        "staleness": [step - r.version for r in got.trained] if step is not None else [],
        "stale_dropped": getattr(got, "stale_dropped", 0),
        "rewards": [r.reward for r in sampled],
        "lengths": [r.sampled_tokens for r in sampled],
        "truncated": sum(r.finish_reason == "length" for r in sampled),
        "per_fn": got.per_fn_of(sampled),
        "kept": len(got.rollouts),
        "trained": len(got.trained),
        "dropped": got.groups_dropped,
        "rounds": got.rounds,
        "failures": dict(got.failures),
        "bad": len(got.bad_samples),
        "turns": [r.turns for r in sampled],
        "tool_calls": sum(r.tool_calls for r in sampled),
        "tool_errors": _added([r.tool_errors for r in sampled]),
        "env_images": sum(len(r.env_images) for r in sampled),
        "finish": _added([{r.finish_reason: 1} for r in sampled]),
    }


def _added(counts: list[dict]) -> dict:
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def pool(stats: dict, sums: dict, world: int) -> tuple[dict, dict]:
    """Every rank's stats and loss sums pooled (lists joined, counts added); one rank: unchanged. Every rank
    calls it."""
    if world == 1:
        return stats, sums
    from accelerate.utils import gather_object

    everyone = gather_object([(stats, sums)])
    out = {"rewards": [], "lengths": [], "truncated": 0, "per_fn": {}, "kept": 0, "trained": 0, "dropped": 0,
           "rounds": 0,
           "failures": {}, "bad": 0, "turns": [], "tool_calls": 0, "tool_errors": {}, "env_images": 0,
           "finish": {}, "staleness": [], "stale_dropped": 0}
    pooled: dict = {}
    for st, sm in everyone:
        for k in ("rewards", "lengths", "turns", "staleness"):
            out[k] += st[k]
        for k in ("truncated", "kept", "trained", "dropped", "bad", "tool_calls", "env_images", "stale_dropped"):
            out[k] += st[k]
        out["rounds"] = max(out["rounds"], st["rounds"])
        for name, values in st["per_fn"].items():
            out["per_fn"].setdefault(name, []).extend(values)
        for k in ("failures", "tool_errors", "finish"):
            out[k] = _added([out[k], st[k]])
        for k, v in sm.items():
            same = k in ("grad_norm", "checkpoint_fraction", "selective_fraction")  # already global: identical on every rank
            biggest = k in ("max_abs_diff", "micro_batches", "peak_memory_gib", "log_ratio_max")
            if k == "log_ratio_min":
                pooled[k] = min(pooled.get(k, v), v)
                continue
            pooled[k] = v if same else (max(pooled.get(k, v), v) if biggest else pooled.get(k, 0.0) + v)
    return out, pooled


def step_metrics(step: int, st: dict, sums: dict, times: dict, lr: float, accuracy_key: str, kl: bool,
                 multi_turn: bool = False) -> dict:
    """One JSON object per step: what `metrics.jsonl` holds (over all ranks). `accuracy_key`: the reward whose
    value 1 counts as correct (the first configured); `kl`: a KL penalty is on; `multi_turn`: an environment
    drives the rollouts (turns, tool calls and their errors, tool images, how episodes ended are logged)."""
    n = len(st["rewards"])
    valid = [r for r in st["rewards"] if not math.isnan(r)]
    rewards = torch.tensor(valid, dtype=torch.float64) if valid else torch.zeros(1, dtype=torch.float64)
    lengths = st["lengths"] or [0]
    tokens = max(sums.get("tokens", 0.0), 1.0)
    m = {
        "step": step,
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if len(valid) > 1 else 0.0,
        "accuracy": sum(1 for v in st["per_fn"].get(accuracy_key, []) if v is not None and v >= 1.0)
        / max(n, 1),
        "loss": sums.get("loss", 0.0),
        "response_length/mean": sum(lengths) / len(lengths),
        "response_length/max": max(lengths),
        "truncated_fraction": st["truncated"] / max(n, 1),
        "clip_fraction": sums.get("clipped_tokens", 0.0) / tokens,
        "ratio_masked_fraction": sums.get("masked_tokens", 0.0) / tokens,
        "mismatch_kl": sums.get("mismatch_kl_sum", 0.0) / tokens,
        "entropy": sums.get("entropy_sum", 0.0) / tokens,
        "grad_norm": sums.get("grad_norm", 0.0),
        "lr": lr,
        "tokens_per_s": sums.get("attended_tokens", 0.0) / max(times["update"], 1e-9),
        "trained_tokens": int(sums.get("tokens", 0)),
        "samples": n,
        "samples_trained": st["trained"],
        "groups_dropped": st["dropped"],
        "sampling_rounds": st["rounds"],
        "reward_failures": sum(st["failures"].values()),
        "bad_samples": st["bad"],
        "time/rollout": times["rollout"],
        "time/rollout_wait": times["rollout_wait"],
        "time/update": times["update"],
        # of it, the passes run while the step's groups were still coming in (asynchronous rollouts)
        "time/update_overlapped": times.get("update_overlapped", 0.0),
        "time/sync": times["sync"],  # a whole weight push (the last that finished; see policy_sync.py)
        "time/sync_blocking": times.get("sync_blocking", times["sync"]),  # of it, what the learner waited for
        "time/step": times["step"],
    }
    for name, values in st["per_fn"].items():
        ok = [v for v in values if v is not None]
        m[f"reward/{name}/mean"] = sum(ok) / len(ok) if ok else 0.0
    for reason, count in st["failures"].items():
        m[f"reward_failures/{reason}"] = count
    for k in ("checkpoint_fraction", "selective_fraction", "peak_memory_gib"):  # (auto checkpointing; a GPU)
        if k in sums:
            m[k] = sums[k]
    if "router_aux_loss" in sums:  # (mixture of experts, algorithm.router_aux_loss_coef > 0)
        m["router_aux_loss"] = sums["router_aux_loss"]
    if "routing_replayed_tokens" in sums:  # tokens routed to the sampler's experts / tokens computed
        m["routing_replayed"] = sums["routing_replayed_tokens"] / max(sums.get("attended_tokens", 0.0), 1.0)
    if multi_turn:
        turns = st["turns"] or [0]
        m.update({"turns/mean": sum(turns) / len(turns), "turns/max": max(turns),
                  "tool_calls": st["tool_calls"],
                  "tool_errors": sum(st["tool_errors"].values()), "env_images": st["env_images"]})
        m.update({f"tool_errors/{k}": v for k, v in st["tool_errors"].items()})
        m.update({f"finish/{k}": v for k, v in st["finish"].items()})
    if kl:
        m["kl"] = sums.get("kl_sum", 0.0) / tokens
    # the trainer/sampler log-ratio's spread over trained tokens (sampler mismatch plus staleness)
    if "log_ratio_sum" in sums:
        mean = sums["log_ratio_sum"] / tokens
        m["is/log_ratio_std"] = math.sqrt(max(sums["log_ratio_sq_sum"] / tokens - mean * mean, 0.0))
        m["is/ratio_min"], m["is/ratio_max"] = math.exp(sums["log_ratio_min"]), math.exp(sums["log_ratio_max"])
    if "truncated_tokens" in sums:  # tis / icepop
        m["is/truncated_fraction"] = sums["truncated_tokens"] / tokens
        m["is/weight_mean"] = sums["is_weight_sum"] / tokens
    stale = st.get("staleness") or []
    if stale or st.get("stale_dropped"):
        m["staleness/mean"] = sum(stale) / len(stale) if stale else 0.0
        m["staleness/max"] = max(stale) if stale else 0
        m.update({f"staleness/{v}": stale.count(v) for v in sorted(set(stale))})  # a histogram, in rollouts
        m["staleness/dropped_groups"] = st.get("stale_dropped", 0)
    return m


LOGS = ("metrics.jsonl", "samples.jsonl", "bad_samples.jsonl", "reward_errors.jsonl")


def forget_steps_after(run_dir, step: int) -> None:
    """Drop the lines of the run's step logs (`LOGS`) written after `step`: a resumed run restarts from the
    checkpoint of `step` and logs the steps after it again (a run stopped between checkpoints had logged
    some)."""
    from pathlib import Path

    from .atomic import write_atomic

    for name in LOGS:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _step(line) <= step]
        if len(kept) != len(lines):
            write_atomic(path, "".join(kept))


def _step(line: str) -> float:
    """The step a log line belongs to; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def log_bad_samples(path, step: int, bad: list, new: list, console) -> None:
    """Skipped samples go to `path` (bad_samples.jsonl), each time one was drawn; the first few of those
    skipped for the first time (`new`) are also printed, so they are not missed (and not repeated every
    epoch)."""
    first = {id(s) for s, _ in new}
    with open(path, "a") as fh:
        for sample, reason in bad:
            fh.write(json.dumps({"step": step, "sample_id": sample.id, "reason": reason,
                                 "repeat": id(sample) not in first}) + "\n")
    for sample, reason in new[:3]:
        console.print(f"skipped {reason}", highlight=False, markup=False)


SHOWN_ERRORS = 5  # reward-failure messages printed per run (all of them go to reward_errors.jsonl)


def log_reward_errors(path, step: int, errors: list[str], console, shown: int) -> int:
    """A step's reward-failure messages into `path` (reward_errors.jsonl); the run's first few also printed.
    Returns how many have been printed so far."""
    with open(path, "a") as fh:
        for message in errors:
            fh.write(json.dumps({"step": step, "message": message}) + "\n")
    for message in errors[: max(0, SHOWN_ERRORS - shown)]:
        console.print(f"reward failed: {message}", highlight=False, markup=False)
        shown += 1
        if shown == SHOWN_ERRORS:
            console.print(f"(further reward failures: {path})", highlight=False, markup=False)
    return shown


def log_samples(fh, step: int, rollouts: list, k: int, image_dir, run_dir) -> None:
    """`k` rollouts of the step (best and worst first), with image (and video filmstrip) references, into
    `fh`; in-memory images are written under `image_dir`, referenced relative to `run_dir`."""
    from .sample_log import rollout_record

    if k == 0 or not rollouts:
        return
    ranked = sorted(rollouts,
                    key=lambda r: (math.isnan(r.reward), -r.reward if not math.isnan(r.reward) else 0))
    chosen = ranked[: (k + 1) // 2] + ranked[::-1][: k // 2]
    seen = set()
    for r in chosen:
        if id(r) in seen:
            continue
        seen.add(id(r))
        fh.write(json.dumps({
            "step": step,
            "group": r.group,
            **rollout_record(r, image_dir, run_dir),
            "reward": None if math.isnan(r.reward) else r.reward,
            "advantage": r.advantage,
        }) + "\n")
