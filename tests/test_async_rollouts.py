"""Asynchronous rollouts (rollout/producer.py): the producer's gating, order, staleness bound, data position
and restart, with a scripted rollout layer (the real server's side is in test_vllm.py)."""

import threading
import time

import pytest
import torch

from vlrl.config import load_config
from vlrl.data.stream import PromptStream
from vlrl.records import EncodedPrompt, Rollout
from vlrl.rollout.groups import Groups
from vlrl.rollout.producer import RolloutProducer
from vlrl.rollout.vllm_client import ServerRestarted
from vlrl.sample import Sample


def rollout(group: int, version: int) -> Rollout:
    prompt = EncodedPrompt(input_ids=[1, 2], messages=None, images=[], pixel_values=None,
                           image_grid_thw=torch.zeros(0, 3, dtype=torch.long))
    return Rollout(prompt=prompt, completion_ids=[3], logprobs=[-0.1], finish_reason="stop", group=group,
                   version=version, version_end=version)


class Scripted:
    """A rollout layer whose groups take `seconds(index)` and record the version they began under."""

    def __init__(self, seconds=lambda i: 0.05, fail_at: int | None = None):
        self.seconds, self.fail_at = seconds, fail_at
        self.version = 0  # what the 'server' holds
        self.started: dict[int, int] = {}  # group index -> version at its start
        self.running, self.most_running = 0, 0
        self.lock = threading.Lock()

    def step(self, stream, index: int, prompts: int) -> Groups:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.started[index] = v = self.version
        taken = stream.take(prompts)
        time.sleep(self.seconds(index))
        with self.lock:
            self.running -= 1
        if self.fail_at == index:
            self.fail_at = None
            raise ServerRestarted("scripted restart")
        out = Groups(["r"])
        out.rollouts = [rollout(0, v) for _ in range(2)]
        for r in out.rollouts:
            r.sample = taken[0]
        out.trained = list(out.rollouts)
        return out


def stream(n: int = 200) -> PromptStream:
    return PromptStream([Sample(id=str(i), question="q", images=[]) for i in range(n)], seed=0)


def learn(producer, layer, steps: int, first: int = 0, update_s: float = 0.02) -> list:
    """The learner's loop: take, 'update', sync, publish. Returns each step's groups."""
    out = []
    for step in range(first, steps):
        out.append(producer.take(step))
        time.sleep(update_s)
        layer.version = step + 1  # the sync ...
        producer.publish(step + 1)  # ... then the producer learns of it
    return out


@pytest.mark.parametrize("k", [0, 1, 2])
def test_groups_start_at_most_k_versions_ahead(k):
    layer, prompts = Scripted(), 3
    producer = RolloutProducer(layer, stream(), prompts=prompts, k=k, first_step=0, steps=6)
    try:
        got = learn(producer, layer, 6)
    finally:
        producer.close()
    for step, groups in enumerate(got):
        assert len({r.group for r in groups.trained}) == prompts and groups.stale_dropped == 0
        versions = [r.version for r in groups.trained]
        assert all(step - k <= v <= step for v in versions), (step, versions)
    # slot j (group index j, none dropped) began under a version >= j // prompts - k; at most
    # (k + 1) * prompts ran together, and with k > 0 more than one step's worth did
    assert all(v >= i // prompts - k for i, v in layer.started.items()), layer.started
    assert sorted(layer.started) == list(range(6 * prompts))
    assert layer.most_running <= (k + 1) * prompts
    assert k == 0 or layer.most_running > prompts


def test_a_straggler_is_trained_later_or_dropped_never_holds_its_step_back():
    # group 0 takes 1.5 s, the others 0.05: steps go on without it; when it ends (k = 1) it is too old
    layer = Scripted(seconds=lambda i: 1.5 if i == 0 else 0.05)
    producer = RolloutProducer(layer, stream(), prompts=2, k=1, first_step=0, steps=12)
    t0 = time.perf_counter()
    try:
        got = learn(producer, layer, 12, update_s=0.1)
    finally:
        producer.close()
    assert time.perf_counter() - t0 < 1.5 + 12 * 0.1  # the first step did not wait for it
    assert sum(g.stale_dropped for g in got) == 1  # dropped, counted
    assert all(len(g.trained) == 4 for g in got)  # every step still trains two groups


def test_checkpoint_position_is_the_oldest_untrained_group_and_a_restart_rewinds_to_it():
    layer = Scripted(seconds=lambda i: 0.05 + 0.02 * i, fail_at=4)
    s = stream()
    producer = RolloutProducer(layer, s, prompts=3, k=2, first_step=0, steps=6)
    try:
        first = producer.take(0)
        assert [r.sample.id for r in first.trained[::2]] == [x.id for x in PromptStream(s.samples, 0).take(3)]
        assert producer.resume_state() == {"index": 3}  # groups 3.. began from position 3, one prompt each
        with pytest.raises(ServerRestarted):
            producer.take(1)
        before = producer.resume_state()
        assert before == {"index": 3}  # the failed group's step, from its first prompt
        assert producer.close() >= 3
        s.restore(before)
        layer.fail_at = None
        producer.start(1)
        again = producer.take(1)
        assert len(again.trained) == 6 and producer.resume_state()["index"] >= 6
    finally:
        producer.close()


def test_the_old_one_step_off_switch_names_its_replacement(tmp_path):
    with pytest.raises(Exception, match="max_off_policy_steps"):
        load_config("configs/tiny-cpu.toml", ["rollout.one_step_off_policy=true"])
    with pytest.raises(Exception, match="needs rollout.server_url"):
        load_config("configs/tiny-cpu.toml", ["rollout.max_off_policy_steps=2"])


def test_the_async_bench_runs_and_the_streamed_update_cuts_the_learners_wait():
    """`bench/async_rollouts.py` (its numbers: README): every row, the staleness bound held (the script
    asserts it), and at k = 2 the streamed update waits less than the update that waited for the step's last
    group."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "bench/async_rollouts.py", "--steps", "30"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in res.stdout.splitlines()
            if line.startswith("| k=") or line.startswith("| synchronous")}
    wait = {name: float(cells[4]) for name, cells in rows.items()}
    assert wait["k=2"] < wait["k=2, update after the step's last group (before)"] < wait["synchronous (k=0)"]
    assert res.stdout.strip().splitlines()[-1].startswith("async: k=2 vs synchronous")
