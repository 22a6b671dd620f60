"""Asynchronous rollouts: what `rollout.max_off_policy_steps = k` buys, a simulated server beside the learner.

A vLLM server cannot run on the GPU machine, and the CPU one here is no model of an H100's, so the overlap is
simulated with the producer's exact gating (rollout/producer.py: batch s starts once weights of version s - k
are published; k = 0 is synchronous) against:
- the server: continuous batching, every running sequence gains one token per decode step of `a + b * n`
  seconds for n running sequences (at most `--capacity`; more wait), so a step's stragglers leave it mostly
  idle unless another step's requests fill it;
- the batches: a ragged GRPO batch per step, `bench/ragged.py`'s lengths (64 = 8 prompts x 8, log-normal,
  median 400, sigma 0.8, clipped to 16..2048, a fresh seed per step: stragglers included);
- the learner: `--update-s` per step (default 4.177 s, the 8B ragged update as shipped on one H200:
  `bench/update_step.py --compile --auto --optimizer`, bench/README.md), then the weight sync: the learner
  waits `--sync-s` (0.31 s, the copy to pinned buffers: `bench/sync.py`) and the server pauses `--swap-s` for
  the reload (requests frozen, not drained: `VLLMClient.pause`). With k > 0 the update is streamed as
  vlrl does it (vlrl/streamed_update.py): it begins with the step's first groups, running each micro-batch
  they fill (`--micro-batch-tokens`, packed by the planner's own `pack_micro_batches`) in time proportional to
  its tokens, so only the last micro-batch and the optimizer step (`--optimizer-s`) wait for the last group.
The decode step's `a` and `b` are scaled so that a synchronous step's generation takes `--gen-ratio` times the
update (default 2). Rows: steps/s, rollout wait and learner idle fraction, staleness of the trained batches,
groups dropped as too stale and the mean length of the trained completions over the sampled batches' (dropping
stragglers favours short completions), for k = 0, 1, 2, 3, 4, the one-step-off-policy vlrl shipped before (one
batch generated at a time, the next started when the learner takes the last) and k = 2 with the update waiting
for the step's last group (as before the streamed update). Last line:
`async: k=2 vs synchronous X.XXx, vs one-step-off Y.YYx, learner idle Z%`.

`--server URL --config CONFIG`: the same comparison through `vlrl train` against a real server (the CPU one
with the tiny model here): the rollout wait per step for k = 0 and 2, from each run's metrics.
"""

from __future__ import annotations

import argparse
import heapq
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ragged import RaggedSpec, completion_lengths  # noqa: E402

from vlrl.planner import pack_micro_batches  # noqa: E402


@dataclass
class Server:
    a: float  # seconds per decode step, fixed part
    b: float  # seconds per decode step, per running sequence
    capacity: int  # most sequences decoded together


@dataclass
class Streaming:
    """The streamed update's model (streamed_update.py)."""

    tokens: list[list[int]]  # each group's rollouts' tokens (prompt + completion)
    step_tokens: float  # a step's mean tokens: the update takes `update_s` for them
    budget: int  # train.micro_batch_tokens
    optimizer_s: float  # of the update, what runs after the last micro-batch (gradient scaling, AdamW)


@dataclass
class Result:
    name: str
    seconds: float
    steps: int
    rollout_wait: float  # the learner's seconds waiting for rollouts
    staleness: list[int]  # of each trained group, in versions
    dropped: int = 0  # groups dropped as too stale
    fill: float = 0.0  # seconds the first step waited for its groups (every k pays it once a run)
    trained: list[int] = field(default_factory=list)  # the groups trained, in order

    @property
    def steady_idle(self) -> float:
        """Idle fraction after the first step's fill: what a long run tends to."""
        return (self.rollout_wait - self.fill) / (self.seconds - self.fill)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds

    @property
    def idle(self) -> float:
        return self.rollout_wait / self.seconds


def simulate(
    name: str,
    groups: list[list[int]],
    prompts: int,
    steps: int,
    k: int,
    server: Server,
    update_s: float,
    sync_s: float,
    swap_s: float,
    sequential: bool = False,
    streamed: Streaming | None = None,
) -> Result:
    """Time-stepped over the server's decode steps, the learner's update and sync as events between them.
    Group slot j starts once version j // prompts - k is published; the learner's step s takes the `prompts`
    oldest finished groups begun under version s - k or later, drops older ones and gives their slots back
    (rollout/producer.py). `sequential`: the one-step-off vlrl shipped before: step s + 1's groups start when
    the learner takes step s's, and its sync waits for them. `streamed`: the update begins as the groups come
    (streamed_update.py): whenever the learner is free it takes every fresh finished group, and once their
    rollouts fill more than one micro-batch (`pack_micro_batches`, the planner's packing) it runs all but the
    last, each in time proportional to its tokens; after the step's last group, the rest and the optimizer
    step."""
    t = 0.0
    version = 0
    slots = 0  # slots given out (groups started, less the dropped)
    started: dict[int, int] = {}  # group -> version at its start
    left: dict[int, int] = {}  # group -> sequences not finished
    finished: list[int] = []  # groups finished, not taken
    queue: list[list[int]] = []  # [group, tokens left] waiting for a decode slot (FIFO)
    running: list[list[int]] = []
    learner_step, learner_busy, blocked = 0, False, False
    paused_until, wait_total, wait_since = 0.0, 0.0, 0.0
    staleness: list[int] = []
    dropped = 0
    fill = 0.0
    events: list[tuple[float, str]] = []
    trained: list[int] = []
    taken = 0  # groups of the learner's step taken so far (streamed)
    pending: list[int] = []  # tokens of their rollouts not yet run (streamed)

    def start_groups():
        nonlocal slots
        while slots < steps * prompts:
            s = slots // prompts
            if sequential:  # batch s + 1 starts when the learner takes batch s
                ok = s == 0 or s - 1 < learner_step or (s - 1 == learner_step and learner_busy)
            else:
                ok = s - k <= version
            if not ok:
                return
            g = len(started)
            started[g] = version
            left[g] = len(groups[g])
            queue.extend([g, n] for n in groups[g])
            slots += 1

    def sync_now():
        nonlocal paused_until
        heapq.heappush(events, (t + sync_s, "synced"))
        paused_until = max(paused_until, t + sync_s) + swap_s  # the server reloads after the learner's copy

    while learner_step < steps:
        start_groups()
        if not learner_busy:
            fresh = sorted(g for g in finished if started[g] >= learner_step - k)
            if sequential:
                fresh = [g for g in fresh if g // prompts == learner_step]
            for g in sorted(g for g in finished if started[g] < learner_step - k):
                finished.remove(g)
                dropped += 1
                slots -= 1
                start_groups()  # another group in its slot
            if streamed is not None and fresh:
                for g in fresh[: prompts - taken]:
                    finished.remove(g)
                    staleness.append(learner_step - started[g])
                    trained.append(g)
                    pending += streamed.tokens[g]
                    taken += 1
                run = pending if taken == prompts else []
                if not run and sum(pending) > streamed.budget:
                    bins = pack_micro_batches(pending, streamed.budget)
                    run = [pending[i] for b in bins[:-1] for i in b]
                    pending = [pending[i] for i in bins[-1]]
                if run:
                    if learner_step == 0:
                        fill += t - wait_since
                    wait_total += t - wait_since
                    learner_busy = True
                    work = (update_s - streamed.optimizer_s) * sum(run) / streamed.step_tokens
                    if taken == prompts:
                        pending, work = [], work + streamed.optimizer_s
                    heapq.heappush(events, (t + work, "updated" if taken == prompts else "ran"))
                start_groups()
            elif streamed is None and len(fresh) >= prompts:
                for g in fresh[:prompts]:
                    finished.remove(g)
                    staleness.append(learner_step - started[g])
                    trained.append(g)
                if learner_step == 0:
                    fill += t - wait_since
                wait_total += t - wait_since
                learner_busy = True
                heapq.heappush(events, (t + update_s, "updated"))
                start_groups()
        while queue and len(running) < server.capacity:
            running.append(queue.pop(0))
        step_s = server.a + server.b * len(running) if running else None
        begin = max(t, paused_until)
        if events and (step_s is None or events[0][0] <= begin + step_s):
            t_event, what = heapq.heappop(events)
            t = max(t, t_event)
            if (
                what == "updated"
                and sequential
                and (learner_step + 1) < steps
                and any(g // prompts == learner_step + 1 for g in list(left) if left[g] > 0)
            ):
                blocked = True  # the old one-step-off waited for the prefetched batch before its sync
                blocked_since = t
            elif what == "ran":  # (streamed) micro-batches run: the learner takes what has finished since
                learner_busy = False
                wait_since = t
            elif what == "updated":
                taken = 0
                sync_now()
            else:  # synced: the weights are published, the learner's next step begins
                learner_step += 1
                version = learner_step
                learner_busy = False
                wait_since = t
            continue
        if step_s is None:
            raise RuntimeError(f"{name}: nothing to do at t={t:.2f} (step {learner_step})")
        t = begin + step_s
        for seq in running:
            seq[1] -= 1
        for g, n in running:
            if n <= 0:
                left[g] -= 1
                if left[g] == 0:
                    finished.append(g)
        running = [seq for seq in running if seq[1] > 0]
        if blocked and not any(g // prompts == learner_step + 1 and left[g] > 0 for g in left):
            blocked = False
            wait_total += t - blocked_since
            sync_now()
    return Result(name, t, steps, wait_total, staleness, dropped, fill, trained)


def synchronous_generation(batch: list[int], server: Server) -> float:
    """Seconds one batch takes alone on the server (every sequence decoded together, the longest last)."""
    t, left = 0.0, sorted(batch)
    steps_done = 0
    while left:
        live = [n for n in left if n > steps_done][: server.capacity]
        if not live:
            break
        t += server.a + server.b * len(live)
        steps_done += 1
        left = [n for n in left if n > steps_done]
    return t


def run_server_comparison(url: str, config: str, steps: int) -> None:
    """`vlrl train` against a real server, k = 0 and 2 (the update streamed or not): the rollout wait per
    step."""
    print(f"\nreal server {url}, {config}, {steps} steps:\n")
    print("| k | update | seconds / step | rollout wait / step | update / step | of it overlapped | "
          "staleness max |")
    print("|---|---|---|---|---|---|---|")
    for k, streamed in ((0, False), (2, False), (2, True)):
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable,
                "-m",
                "vlrl",
                "train",
                config,
                "--set",
                f"rollout.server_url={url}",
                "--set",
                f"train.steps={steps}",
                "--set",
                f"rollout.max_off_policy_steps={k}",
                "--set",
                f"train.streamed_update={str(streamed).lower()}",
                "--set",
                f"output_dir={out}",
                "--set",
                f"name=async-k{k}",
                "--set",
                "logging.progress=false",
                "--set",
                f"checkpoint.every={steps}",
            ]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            ms = [
                json.loads(line) for line in next(Path(out).glob("*/metrics.jsonl")).read_text().splitlines()
            ]
        ms = ms[1:] or ms  # the first step has nothing to overlap with
        mean = lambda key: sum(m.get(key, 0.0) for m in ms) / len(ms)  # noqa: E731
        print(
            f"| {k} | {'streamed' if streamed else 'after the last group'} | {mean('time/step'):.2f} | "
            f"{mean('time/rollout_wait'):.2f} | {mean('time/update'):.2f} | "
            f"{mean('time/update_overlapped'):.2f} | "
            f"{max(m.get('staleness/max', 0) for m in ms)} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="a run's steps (the first step's fill: paid once)")
    p.add_argument("--update-s", type=float, default=4.177)
    p.add_argument("--sync-s", type=float, default=0.31)
    p.add_argument("--swap-s", type=float, default=0.5)
    p.add_argument("--gen-ratio", type=float, default=2.0, help="a synchronous step's generation / update")
    p.add_argument("--capacity", type=int, default=256, help="sequences the server decodes together")
    p.add_argument(
        "--b-over-a",
        type=float,
        default=0.005,
        help="decode-step cost per running sequence, "
        "relative to the fixed part (memory-bound decoding: 64 sequences cost 1.32x one)",
    )
    p.add_argument("--micro-batch-tokens", type=int, default=16384, help="train.micro_batch_tokens")
    p.add_argument(
        "--optimizer-s",
        type=float,
        default=0.076,
        help="of the update, what runs after its last micro-batch: gradient scaling, clipping and the fused "
        "AdamW step (0.076 s, the 8B on one H200: update_step.py --auto --optimizer, bench/README.md)",
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server", help="also compare k = 0 and 2 through `vlrl train` against this server")
    p.add_argument("--config", default="configs/tiny-cpu.toml")
    p.add_argument("--server-steps", type=int, default=6)
    args = p.parse_args()

    spec = RaggedSpec(prompts=args.prompts, group=args.group)
    n = spec.prompts * spec.group
    # every group's completion lengths: step s's batch is bench/ragged.py's with seed + s, cut into groups;
    # groups beyond the steps' (started in place of dropped ones) continue the seeds
    extra = args.steps
    groups = [
        b[i * spec.group : (i + 1) * spec.group]
        for s in range(args.steps + extra)
        for b in [completion_lengths(spec, n, args.seed + s)]
        for i in range(spec.prompts)
    ]
    batches = [
        [x for g in groups[s * spec.prompts : (s + 1) * spec.prompts] for x in g] for s in range(args.steps)
    ]
    unit = Server(1.0, args.b_over_a, args.capacity)
    gen = sum(synchronous_generation(b, unit) for b in batches) / len(batches)
    scale = args.gen_ratio * args.update_s / gen
    server = Server(unit.a * scale, unit.b * scale, unit.capacity)
    lengths = [x for b in batches for x in b]
    print(
        f"{args.steps} steps of {n} rollouts (lengths {min(lengths)}..{max(lengths)}, mean "
        f"{sum(lengths) / len(lengths):.0f}); update {args.update_s:.3f} s, "
        f"sync (learner) {args.sync_s:.2f} s, "
        f"swap (server paused) {args.swap_s:.2f} s; decode step {server.a * 1e3:.1f} ms + "
        f"{server.b * 1e3:.3f} ms per running sequence (a synchronous step's generation "
        f"{args.gen_ratio:.1f}x the update)\n"
    )

    # the update's tokens: each rollout's prompt (text, the image's placeholders) and completion
    prompt = spec.prompt_text + 2 + (spec.image_side // 16) ** 2 // 4
    tokens = [[prompt + n for n in g] for g in groups]
    streaming = Streaming(tokens, sum(map(sum, tokens[: args.steps * spec.prompts])) / args.steps,
                          args.micro_batch_tokens, args.optimizer_s)

    def sim(name, k, sequential=False, streamed=True):
        return simulate(
            name,
            groups,
            spec.prompts,
            args.steps,
            k,
            server,
            args.update_s,
            args.sync_s,
            args.swap_s,
            sequential,
            streaming if streamed and k > 0 and not sequential else None,
        )

    rows = [
        sim("synchronous (k=0)", 0),
        sim("one-step-off as shipped before (sequential)", 1, sequential=True),
        sim("k=2, update after the step's last group (before)", 2, streamed=False),
    ]
    rows += [sim(f"k={k}", k) for k in (1, 2, 3, 4)]
    sampled = sum(map(sum, groups[: args.steps * spec.prompts])) / (args.steps * spec.prompts * spec.group)
    print(
        "| rollouts | steps/s | vs synchronous | rollout wait / step (s) | learner idle | idle after the "
        "first step | staleness max | mean | groups dropped | trained length / sampled |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = rows[0].steps_per_s
    for r in rows:
        length = sum(sum(groups[g]) for g in r.trained) / (len(r.trained) * spec.group)
        print(
            f"| {r.name} | {r.steps_per_s:.4f} | {r.steps_per_s / base:.2f}x | "
            f"{r.rollout_wait / r.steps:.2f} | "
            f"{r.idle:.1%} | {r.steady_idle:.1%} | {max(r.staleness)} | "
            f"{sum(r.staleness) / len(r.staleness):.2f} | {r.dropped} | {length / sampled:.3f} |"
        )
    by = {r.name: r for r in rows}
    for r in rows[2:]:
        k = int(r.name.split("=")[1][0])
        assert max(r.staleness) <= k, (r.name, r.staleness)  # the bound the producer's gating holds
    if args.server:
        run_server_comparison(args.server, args.config, args.server_steps)
    k2, k1 = by["k=2"], by["k=1"]
    print(
        f"\nasync: k=2 vs synchronous {k2.steps_per_s / base:.2f}x, vs one-step-off "
        f"{k2.steps_per_s / k1.steps_per_s:.2f}x, learner idle {k2.idle:.0%} ({k2.steady_idle:.0%} after the "
        f"first step)"
    )


if __name__ == "__main__":
    main()
