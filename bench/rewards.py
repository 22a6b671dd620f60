"""What running reward calls in killable worker processes costs, against calls on threads in the same run.

A step of the 8B config scores 32 prompts x 8 samples = 256 completions per reward function. Measured here:
- per call, a cheap check (`exact_match`) on threads (how built-ins run) and the same function named as a user
  function (`module:function`, so it runs in the process pool), with samples holding no image, a 448x448 PIL
  image (built-in tasks hold PIL images), or 200 kB of encoded image bytes (parquet / hub datasets);
- per call, `math` (math-verify) on threads (GIL-bound) and in the pool (its real home);
- starting one worker, as after a killed call: forkserver (vlrl's choice) and spawn.

    python bench/rewards.py [--calls 256] [--repeats 5] [--processes N]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from vlrl.bounded import run_bounded  # noqa: E402
from vlrl.config import RewardSpec  # noqa: E402
from vlrl.rewards.math_reward import math_reward  # noqa: E402
from vlrl.rewards.pool import _Worker  # noqa: E402
from vlrl.rewards.reward_set import RewardSet  # noqa: E402
from vlrl.sample import Sample  # noqa: E402

USER_EXACT = "vlrl.rewards.builtin:exact_match"  # a built-in, named as a user function: runs in the pool


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def samples(n: int, images: str, group: int) -> list[Sample]:
    """`n` samples as a GRPO batch holds them: `group` completions of each prompt, so each object `group`
    times."""
    out = []
    for p in range(n // group):
        if images == "pil":
            pics = [Image.effect_noise((448, 448), 50).convert("RGB")]
        elif images == "bytes":
            pics = [os.urandom(200_000)]
        else:
            pics = []
        out += [Sample(id=str(p), question="What is the answer?", answer=str(p % 7), images=pics)] * group
    return out


class Fresh:
    """Completions never seen before on each call, so math-verify's parse caches cannot hide its cost."""

    def __init__(self):
        self.k = 0

    def __call__(self, n: int) -> list[str]:
        self.k += n
        return [f"<think>so</think> \\boxed{{\\frac{{{2 * (self.k + i)}}}{{2}}}}" for i in range(n)]


def worker_start(ctx_name: str, repeats: int) -> float:
    """Seconds from starting a worker to its first answer (a trivial call)."""
    import multiprocessing as mp

    from vlrl.rewards.pool import _context

    ctx = _context() if ctx_name == "forkserver" else mp.get_context(ctx_name)
    call = (USER_EXACT, "3", (1, 0), pickle.dumps(Sample(id="0", question="q", answer="3")))

    def once():
        w = _Worker(ctx, [USER_EXACT])
        w.conn.send(call)
        assert w.conn.recv()[0] == 1.0
        w.kill()

    return timed(once, repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--processes", type=int, default=None, help="pool size (default min(4, CPUs))")
    ap.add_argument("--group", type=int, default=8,
                    help="completions per prompt (each sample repeats this often)")
    args = ap.parse_args()
    n = args.calls
    completions = [f"<think>hm</think>{i % 5}" for i in range(n)]
    rows = []

    threads = RewardSet([RewardSpec(fn="exact_match")], 10.0)
    pool = RewardSet([RewardSpec(fn=USER_EXACT)], 10.0, processes=args.processes)
    base = timed(lambda: threads.score(completions, samples(n, "none", args.group)), args.repeats) / n
    rows.append(("exact_match on threads (built-in), no image", base, 1.0))
    for images, label in (("none", "no image"), ("pil", "a 448x448 PIL image"),
                          ("bytes", "200 kB image bytes")):
        batch = samples(n, images, args.group)
        t = timed(lambda b=batch: pool.score(completions, b), args.repeats) / n
        rows.append((f"exact_match in the process pool, {label}", t, t / base))
    pool.close()

    fresh, batch = Fresh(), samples(n, "none", args.group)
    calls = lambda: [(lambda c=c, s=s: math_reward(c, s)) for c, s in zip(fresh(n), batch)]  # noqa: E731
    math_threads = timed(lambda: run_bounded(calls(), 10.0), args.repeats) / n
    rows.append(("math on threads (math-verify, GIL-bound)", math_threads, math_threads / base))
    math_pool = RewardSet([RewardSpec(fn="math")], 10.0, processes=args.processes)
    t = timed(lambda: math_pool.score(fresh(n), batch), args.repeats) / n
    rows.append(("math in the process pool", t, t / base))
    math_pool.close()

    starts = [(f"start one worker ({name})", worker_start(name, args.repeats))
              for name in ("forkserver", "spawn")]

    size = args.processes or min(4, os.cpu_count() or 1)
    print(f"{n} calls per batch ({n // args.group} samples x {args.group}), median of {args.repeats}, pool "
          f"of {size} processes, {os.cpu_count()} CPUs")
    print("| path | us per call | vs exact_match on threads |")
    print("|---|---|---|")
    for label, t, ratio in rows:
        print(f"| {label} | {t * 1e6:,.0f} | {ratio:.1f}x |")
    print("| path | ms |")
    print("|---|---|")
    for label, t in starts:
        print(f"| {label} | {t * 1e3:,.0f} |")


if __name__ == "__main__":
    main()
