"""Asynchronous rollouts: a producer keeps the vLLM server generating groups continuously while the learner
trains, with rollouts at most `rollout.max_off_policy_steps` (k) policy versions behind the weights they
train.

Versions: the learner's step count of the weights (0 at the start, n after n optimizer steps). The unit of
work is one group (a prompt's `group_size` rollouts, refilled by dynamic sampling as in a synchronous step),
sampled in a thread of its own. Group slots are numbered in order, `prompts` per step; slot j's group starts
once weights of version j // prompts - k are published (`publish`), so about (k + 1) * prompts groups are
generated at once and the server's continuous batching always has work: no step waits for its longest
completion with the server mostly empty, as a synchronous step does. Weight syncs land while requests run (the
server freezes them for the swap only: `VLLMClient.pause`), so a rollout records the versions it began and
ended under (`Rollout.version`, `version_end`; every token keeps the logprob of the weights that sampled it).

The learner's step s takes the `prompts` oldest finished groups (`take`), whichever step's slot they had: a
straggler is trained a step later rather than holding its step back. A group begun under a version older than
s - k is dropped and counted (`Groups.stale_dropped`), never trained; its slot is given back, so production
never runs short.

What is not kept: groups generated ahead are not checkpointed (rollouts are cheap to regenerate). The
checkpoint's data position is that of the oldest group not yet trained (`resume_state`), so a resumed run
samples those prompts again (a later group's prompt may come twice; none is skipped). A server that restarted
(its weights are the base ones again) costs the same: every group not yet trained is dropped, the trainer's
weights are pushed again and production restarts (`close`, then `start`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .groups import Groups, merge_groups


class LockedStream:
    """A prompt stream several group threads take from: one take at a time, in order."""

    def __init__(self, stream):
        self.stream, self.lock = stream, threading.Lock()

    def take(self, n: int):
        with self.lock:
            return self.stream.take(n)

    def state(self) -> dict:
        with self.lock:
            return self.stream.state()

    def restore(self, state: dict) -> None:
        with self.lock:
            self.stream.restore(state)

    def state_and_take(self, n: int) -> tuple[dict, list]:
        """The position, then the `n` prompts from it, with no other take between."""
        with self.lock:
            return self.stream.state(), self.stream.take(n)


class TaskStream:
    """One group's view of the stream: its first prompt, taken when the group was given its slot (so the
    stream's order is the slots' order), then the shared stream for dynamic sampling's refills."""

    def __init__(self, first: list, shared: LockedStream):
        self.first, self.shared = list(first), shared

    def take(self, n: int):
        out, self.first = self.first[:n], self.first[n:]
        return out + (self.shared.take(n - len(out)) if n > len(out) else [])


@dataclass
class Task:
    index: int
    """The group's number in the run (its sampler seed stream)."""
    before: dict
    """The stream's position when it began: a resume or a restart samples again from the oldest one."""
    stream: TaskStream | None = None
    groups: Groups | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def version(self) -> int:
        """The oldest version any of its rollouts began under (kept no rollout: none, so fresh)."""
        return min((r.version for r in self.groups.rollouts), default=1 << 62)


class RolloutProducer:
    def __init__(self, rollouts, stream, prompts: int, k: int, first_step: int, steps: int):
        self.rollouts, self.prompts, self.k, self.steps = rollouts, prompts, k, steps
        self.stream = LockedStream(stream)
        self.cond = threading.Condition()
        self.tasks: dict[int, Task] = {}
        self.threads: list[threading.Thread] = []
        self.dispatcher: threading.Thread | None = None
        self.start(first_step)

    # --- the producer's side ------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        """Produce the groups of steps `step`, `step` + 1, ... (weights of version `step` published)."""
        with self.cond:
            self.version, self.closed = step, False
            self.slots = step * self.prompts  # slots given out: started groups, less the dropped ones
            self.next_index = step * self.prompts
        self.dispatcher = threading.Thread(target=self._dispatch, name="vlrl-rollout-producer", daemon=True)
        self.dispatcher.start()

    def _ready(self) -> bool:
        return self.slots < self.steps * self.prompts and self.slots // self.prompts - self.k <= self.version

    def _dispatch(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or self._ready())
                if self.closed:
                    return
                before, first = self.stream.state_and_take(1)
                task = Task(self.next_index, before, TaskStream(first, self.stream))
                self.tasks[task.index] = task
                self.next_index += 1
                self.slots += 1
            t = threading.Thread(target=self._produce, args=(task,), name=f"vlrl-group-{task.index}",
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def _produce(self, task: Task) -> None:
        try:
            task.groups = self.rollouts.step(task.stream, task.index, 1)
        except BaseException as e:  # handed to the learner, which decides (restart, stop)
            task.error = e
        finally:
            with self.cond:
                task.done.set()
                self.cond.notify_all()

    # --- the learner's side -------------------------------------------------------------------------------
    def publish(self, version: int) -> None:
        """Weights of `version` are on their way to the server (its sampling waits for them): groups of steps
        up to version + k may start."""
        with self.cond:
            self.version = max(self.version, version)
            self.cond.notify_all()

    def take(self, step: int, stop=None, each=None) -> Groups | None:
        """Step `step`'s groups: the `prompts` oldest finished ones begun under version step - k or later
        (older ones dropped and counted). `each(groups)`, if given, is called with each group as it is taken,
        in the learner's thread with no lock held (the step's update begins with it: streamed_update.py).
        None when `stop` is requested meanwhile. Raises what a group's sampling raised (ServerRestarted,
        ServerError...), the groups taken so far kept so that a restart rewinds to them."""
        taken: list[Task] = []
        stale = 0
        while len(taken) < self.prompts:
            new: list[Task] = []
            with self.cond:
                finished = sorted((t for t in self.tasks.values() if t.done.is_set()), key=lambda t: t.index)
                for t in finished:
                    if t.error is not None:
                        for done in taken:  # back where they were: a restart rewinds to the oldest
                            self.tasks[done.index] = done
                        raise t.error
                for t in finished:
                    if len(taken) + len(new) == self.prompts:
                        break
                    del self.tasks[t.index]
                    if t.version < step - self.k:
                        stale += len({r.group for r in t.groups.rollouts})
                        self.slots -= 1  # its slot is given back: another group starts in its place
                        self.cond.notify_all()
                    else:
                        new.append(t)
                if not new and len(taken) < self.prompts:
                    if stop is not None and stop.requested:
                        for t in taken:  # back where they were: the next take (or a checkpoint) sees them
                            self.tasks[t.index] = t
                        return None
                    self.cond.wait(0.2)
            for t in new:
                taken.append(t)
                if each is not None:
                    each(t.groups)
        out = merge_groups([t.groups for t in taken])
        out.stale_dropped = stale
        return out

    def resume_state(self) -> dict:
        """The data position a checkpoint records: that of the oldest group not yet trained."""
        with self.cond:
            pending = [t.before for t in self.tasks.values()]
        return min(pending, key=lambda s: s["index"]) if pending else self.stream.state()

    def pending(self) -> int:
        """Groups started and not yet trained."""
        with self.cond:
            return len(self.tasks)

    def close(self) -> int:
        """Stop producing; the groups started finish (their requests are not aborted) and are dropped. Returns
        how many."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.dispatcher is not None:
            self.dispatcher.join()
        for t in self.threads:
            t.join()
        self.threads = []
        with self.cond:
            dropped = len(self.tasks)
            self.tasks.clear()
        return dropped
