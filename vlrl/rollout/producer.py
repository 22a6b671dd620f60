"""Asynchronous rollouts: a producer keeps the vLLM server generating the next steps' groups while the learner
trains, up to `rollout.max_off_policy_steps` (k) policy versions ahead.

Versions: the learner's step count of the weights (0 at the start, n after n optimizer steps). Batch s, the
groups step s (0-based) trains, may start once weights of version s - k are published (`publish`), so at most
k + 1 batches are generated at once, each in a thread of its own: the server's continuous batching takes
requests from several steps together, and a step's stragglers no longer leave it idle (a synchronous step
waits for its longest completion with the server mostly empty). Weight syncs land while requests run (the
server freezes them for the swap only: `VLLMClient.pause`), so a rollout records the versions it began and
ended under (`Rollout.version`, `version_end`; every token keeps the logprob of the weights that sampled it).
The learner takes batch s when it is complete (`take`); groups with a rollout begun before version s - k are
dropped and counted, never trained (by the gating above that happens only when the server outran a restart).

What is not kept: batches generated ahead are not checkpointed (rollouts are cheap to regenerate). The
checkpoint's data position is that of the oldest batch not yet trained (`resume_state`), so a resumed run
samples those prompts again (a prompt another in-flight batch had taken may come twice; none is skipped).
A server that restarted (its weights are the base ones again) costs the same: every batch not yet trained is
dropped, the trainer's weights are pushed again and production restarts at the learner's step (`restart`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


class LockedStream:
    """A prompt stream several batch threads take from: one take at a time, in order."""

    def __init__(self, stream, lock: threading.Lock):
        self.stream, self.lock = stream, lock

    def take(self, n: int):
        with self.lock:
            return self.stream.take(n)

    def state(self) -> dict:
        with self.lock:
            return self.stream.state()

    def restore(self, state: dict) -> None:
        with self.lock:
            self.stream.restore(state)


@dataclass
class Batch:
    step: int
    before: dict
    """The stream's position when the batch began: a resume or a restart samples again from the oldest one."""
    groups: object = None  # rollout.groups.Groups once done
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class RolloutProducer:
    def __init__(self, rollouts, stream, prompts: int, k: int, first_step: int, steps: int):
        self.rollouts, self.prompts, self.k, self.steps = rollouts, prompts, k, steps
        self.lock = threading.Lock()
        self.stream = LockedStream(stream, threading.Lock())
        self.cond = threading.Condition(self.lock)
        self.version = first_step
        self.batches: dict[int, Batch] = {}
        self.next_step = first_step
        self.closed = False
        self.threads: list[threading.Thread] = []
        self.dispatcher: threading.Thread | None = None
        self.start(first_step)

    # --- the producer's side ------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        with self.lock:
            self.next_step, self.version, self.closed = step, step, False
        self.dispatcher = threading.Thread(target=self._dispatch, name="vlrl-rollout-producer", daemon=True)
        self.dispatcher.start()

    def _dispatch(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or self.next_step >= self.steps
                                   or self.next_step - self.k <= self.version)
                if self.closed or self.next_step >= self.steps:
                    return
                s = self.next_step
                self.next_step += 1
                batch = self.batches[s] = Batch(s, self.stream.state())
            t = threading.Thread(target=self._produce, args=(batch,), name=f"vlrl-rollouts-step-{s + 1}",
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def _produce(self, batch: Batch) -> None:
        try:
            batch.groups = self.rollouts.step(self.stream, batch.step, self.prompts)
        except BaseException as e:  # handed to the learner, which decides (restart, stop)
            batch.error = e
        finally:
            batch.done.set()
            with self.cond:
                self.cond.notify_all()

    # --- the learner's side -------------------------------------------------------------------------------
    def publish(self, version: int) -> None:
        """Weights of `version` are on their way to the server (its sampling waits for them): batches up to
        version + k may start."""
        with self.cond:
            self.version = max(self.version, version)
            self.cond.notify_all()

    def take(self, step: int, stop=None):
        """Step `step`'s groups once complete, the stale ones dropped (`Groups.stale_dropped` counts them).
        Raises what the batch's sampling raised (ServerRestarted, ServerError...)."""
        with self.lock:
            batch = self.batches.get(step)
        if batch is None:
            raise RuntimeError(f"step {step + 1}'s rollouts were never started (producer at step "
                               f"{self.next_step + 1})")
        while not batch.done.wait(0.2):
            if stop is not None and stop.requested:
                return None
        if batch.error is not None:  # kept: a restart rewinds the stream to it
            raise batch.error
        with self.lock:
            del self.batches[step]
        return drop_stale(batch.groups, step, self.k)

    def resume_state(self) -> dict:
        """The data position a checkpoint records: that of the oldest batch not yet trained."""
        with self.lock:
            pending = [b.before for b in self.batches.values()]
        return min(pending, key=lambda s: s["index"]) if pending else self.stream.state()

    def pending(self) -> int:
        """Batches started and not yet trained."""
        with self.lock:
            return len(self.batches)

    def close(self) -> int:
        """Stop producing; the batches started finish (their requests are not aborted) and are dropped."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.dispatcher is not None:
            self.dispatcher.join()
        for t in self.threads:
            t.join()
        self.threads = []
        with self.lock:
            dropped = len(self.batches)
            self.batches.clear()
        return dropped


def drop_stale(groups, step: int, k: int):
    """`groups` without the groups any of whose rollouts began under a version older than step - k."""
    oldest = step - k
    stale = {r.group for r in groups.rollouts if r.version < oldest}
    groups.stale_dropped = len(stale)
    if stale:
        groups.rollouts = [r for r in groups.rollouts if r.group not in stale]
        groups.trained = [r for r in groups.trained if r.group not in stale]
    return groups

