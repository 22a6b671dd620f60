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
from vlrl.rollout.producer import RolloutProducer, drop_stale
from vlrl.rollout.vllm_client import ServerRestarted
from vlrl.sample import Sample


def rollout(group: int, version: int) -> Rollout:
    prompt = EncodedPrompt(input_ids=[1, 2], messages=None, images=[], pixel_values=None,
                           image_grid_thw=torch.zeros(0, 3, dtype=torch.long))
    return Rollout(prompt=prompt, completion_ids=[3], logprobs=[-0.1], finish_reason="stop", group=group,
                   version=version, version_end=version)


class Scripted:
    """A rollout layer whose steps take `seconds` and record the published version they began under."""

    def __init__(self, seconds: float = 0.05, fail_at: int | None = None):
        self.seconds, self.fail_at = seconds, fail_at
        self.version = 0  # what the 'server' holds
        self.started: list[tuple[int, int]] = []  # (step, version at start)
        self.running, self.most_running = 0, 0
        self.lock = threading.Lock()

    def step(self, stream, step: int, prompts: int) -> Groups:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.started.append((step, self.version))
            v = self.version
        stream.take(prompts)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        if self.fail_at == step:
            self.fail_at = None
            raise ServerRestarted("scripted restart")
        out = Groups(["r"])
        out.rollouts = [rollout(g, v) for g in range(prompts)]
        out.trained = list(out.rollouts)
        return out


def stream(n: int = 100) -> PromptStream:
    return PromptStream([Sample(id=str(i), question="q", images=[]) for i in range(n)], seed=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_batches_start_at_most_k_versions_ahead_and_come_in_order(k):
    layer = Scripted()
    producer = RolloutProducer(layer, stream(), prompts=2, k=k, first_step=0, steps=8)
    try:
        for step in range(8):
            got = producer.take(step)
            assert {r.version for r in got.trained} <= set(range(step - k, step + 1))
            time.sleep(0.02)  # the update
            layer.version = step + 1  # the sync ...
            producer.publish(step + 1)  # ... then the producer learns of it
    finally:
        producer.close()
    # batch s began under a version >= s - k, and never more than k + 1 ran together
    assert all(v >= s - k for s, v in layer.started), layer.started
    assert [s for s, _ in layer.started] == list(range(8))
    assert 1 < layer.most_running <= k + 1


def test_stale_groups_are_dropped_and_counted():
    groups = Groups(["r"])
    groups.rollouts = [rollout(0, 3), rollout(0, 3), rollout(1, 1), rollout(2, 2)]
    groups.trained = list(groups.rollouts)
    out = drop_stale(groups, step=4, k=2)  # versions below 2 are too old
    assert out.stale_dropped == 1 and {r.group for r in out.trained} == {0, 2}


def test_checkpoint_position_is_the_oldest_untrained_batch_and_a_restart_rewinds_to_it():
    layer = Scripted(seconds=0.05, fail_at=2)
    s = stream()
    producer = RolloutProducer(layer, s, prompts=3, k=2, first_step=0, steps=6)
    try:
        producer.take(0)
        # batches 1 and 2 began from positions 3 and 6 (each takes 3 prompts, in order)
        assert producer.resume_state() == {"index": 3} and producer.pending() == 2
        producer.take(1)
        with pytest.raises(ServerRestarted):
            producer.take(2)
        before = producer.resume_state()
        assert before == {"index": 6}  # the failed batch's own position
        assert producer.close() >= 1
        s.restore(before)
        producer.start(2)
        again = producer.take(2)
        assert len(again.trained) == 3
        assert layer.started[-1][0] >= 2 and [st for st, _ in layer.started].count(2) == 2
    finally:
        producer.close()


def test_the_old_one_step_off_switch_names_its_replacement(tmp_path):
    with pytest.raises(Exception, match="max_off_policy_steps"):
        load_config("configs/tiny-cpu.toml", ["rollout.one_step_off_policy=true"])
    with pytest.raises(Exception, match="needs rollout.server_url"):
        load_config("configs/tiny-cpu.toml", ["rollout.max_off_policy_steps=2"])
