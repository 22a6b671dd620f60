"""A step's update fed group by group (streamed_update.py) is the update of the whole step, to float32
rounding, whatever order the groups arrive in; a pass that runs out of memory redoes the step's passes; and
the producer hands the learner each group as it is taken, before the step's last group is in."""

import time

import pytest
import torch
from streamed_worker import sampled_groups
from test_async_rollouts import Scripted, stream

from vlrl import train as train_module
from vlrl.rollout.producer import RolloutProducer
from vlrl.streamed_update import StreamedUpdate
from vlrl.train import Run

from conftest import tiny_config


@pytest.fixture(scope="module")
def groups(adapter, tiny_model):
    return sampled_groups(adapter, tiny_model)


def a_run(tiny_model_dir, tmp_path, name, groups, *extra):
    budget = 2 * max(r.length for g in groups for r in g) + 1  # two or three rollouts a micro-batch
    cfg = tiny_config(tiny_model_dir, tmp_path, f"name={name}", f"train.micro_batch_tokens={budget}",
                      f"model.max_model_len={budget}", *extra)
    run = Run(cfg)
    seen = {}
    step = run.optimizer_step

    def spy(params, sums, micro_batches):  # the gradients the optimizer is given, and what is logged
        seen["grads"] = {n: p.grad.clone() for n, p in run.policy.named_parameters() if p.grad is not None}
        seen["sums"] = step(params, sums, micro_batches)
        return seen["sums"]

    run.optimizer_step = spy
    return run, seen


def close(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for n in a:
        scale = float(a[n].abs().max()) + 1e-12
        assert float((a[n] - b[n]).abs().max()) <= 1e-5 * scale, n


LOGGED = ["loss", "tokens", "clipped_tokens", "masked_tokens", "ratio_sum", "mismatch_kl_sum", "entropy_sum",
          "max_abs_diff", "log_ratio_min", "log_ratio_max", "log_ratio_sum", "attended_tokens"]


def test_a_streamed_step_plans_within_the_budget_auto_chose(tiny_model_dir, tmp_path, groups):
    """`auto` may halve train.micro_batch_tokens at the first update (activation_memory.decide_budget):
    streamed steps plan within `Run.train_budgets`, as whole ones do."""
    whole, w = a_run(tiny_model_dir, tmp_path, "whole", groups)
    whole.update([r for g in groups for r in g], [])
    budget = whole.cfg.train.micro_batch_tokens
    fed, f = a_run(tiny_model_dir, tmp_path, "fed", groups, f"train.micro_batch_tokens={4 * budget}")
    # as the first update leaves it when `auto` halves the budget
    fed.train_budgets = fed.cfg.train.model_copy(update={"micro_batch_tokens": budget})
    streamed = StreamedUpdate(fed)
    for g in groups:
        streamed.add(g)
    streamed.finish()
    assert f["sums"]["micro_batches"] == w["sums"]["micro_batches"] > 1
    close(w["grads"], f["grads"])


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "constant"])
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2]])
def test_a_streamed_step_is_the_whole_step(tiny_model_dir, tmp_path, groups, aggregation, order):
    agg = f'algorithm.aggregation="{aggregation}"'
    whole, w = a_run(tiny_model_dir, tmp_path, "whole", groups, agg)
    whole.update([r for g in groups for r in g], [])
    fed, f = a_run(tiny_model_dir, tmp_path, "fed", groups, agg)
    assert fed.why_not_streamed() is None
    streamed = StreamedUpdate(fed)
    passes_before_last = 0
    for i in order:
        passes_before_last = streamed.micro_batches
        streamed.add(groups[i])
    assert passes_before_last > 0  # the update began before the last group came
    streamed.finish()
    close(w["grads"], f["grads"])
    for key in LOGGED:
        assert f["sums"][key] == pytest.approx(w["sums"][key], rel=1e-5, abs=1e-6), key
    assert f["sums"]["grad_norm"] == pytest.approx(w["sums"]["grad_norm"], rel=1e-5)
    # (the weights after AdamW's first step are not compared: it moves each weight by ~lr * sign(gradient), so
    # a gradient within rounding of zero moves it either way)


def test_an_oom_in_a_streamed_step_redoes_its_passes(tiny_model_dir, tmp_path, groups, monkeypatch):
    """The third pass runs out of memory, then the first pass of its redo; checkpointing 'steps up' each
    time (simulated: CPU), and the step redoes the passes it ran before: the gradients are the whole step's,
    counted once."""
    whole, w = a_run(tiny_model_dir, tmp_path, "whole", groups)
    whole.update([r for g in groups for r in g], [])
    fed, f = a_run(tiny_model_dir, tmp_path, "fed", groups)
    calls, recovered = [], []
    accumulate = train_module.accumulate_gradients

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) in (3, 4):
            raise torch.OutOfMemoryError("simulated")
        return accumulate(*args, **kwargs)

    import vlrl.streamed_update as streamed_module

    monkeypatch.setattr(streamed_module, "accumulate_gradients", flaky)
    monkeypatch.setattr(fed, "recovered_from_oom", lambda: recovered.append(1) or
                        fed.optimizer.zero_grad(set_to_none=True) or True)
    streamed = StreamedUpdate(fed)
    for g in groups:
        streamed.add(g)
    streamed.finish()
    assert recovered == [1, 1] and len(calls) > 4
    close(w["grads"], f["grads"])
    assert f["sums"]["tokens"] == pytest.approx(w["sums"]["tokens"])


def test_a_server_restart_mid_step_forgets_the_passes_run(tiny_model_dir, tmp_path, groups):
    """Group 2 of the step fails with a server restart after groups 0 and 1 went into the update: their passes
    are forgotten, production restarts at the step and the step's gradients are those of the groups it then
    takes, counted once."""
    from vlrl.rollout.groups import Groups
    from vlrl.rollout.vllm_client import ServerRestarted
    from vlrl.train import StopFlag, take_async

    class Layer:  # group i of the run: `groups[i % 4]`; the first group 2 fails as a restarted server would
        failed = False

        def step(self, stream, index, prompts):
            stream.take(prompts)
            time.sleep(0.3 * (index % 4))  # (groups 0 and 1 are taken before 2 fails)
            if index % 4 == 2 and not self.failed:
                Layer.failed = True
                raise ServerRestarted("scripted restart")
            out = Groups(["r"])
            out.rollouts = out.trained = list(groups[index % 4])
            return out

    whole, w = a_run(tiny_model_dir, tmp_path, "whole", groups)
    whole.update([r for g in groups for r in g], [])
    fed, f = a_run(tiny_model_dir, tmp_path, "fed", groups)
    producer = RolloutProducer(Layer(), stream(), prompts=4, k=0, first_step=0, steps=1)
    streamed, pushed, forgotten = StreamedUpdate(fed), [], []
    discard = streamed.discard
    streamed.discard = lambda: forgotten.append(streamed.micro_batches) or discard()
    optimizer_step = fed.optimizer_step
    fed.optimizer_step = lambda *a: pytest.fail("stepped before the take ended")
    try:
        got = take_async(producer, 0, fed, lambda policy, version: pushed.append(version), StopFlag(),
                         streamed)
    finally:
        producer.close()
    assert Layer.failed and pushed == [0] and any("restarted" in m for m in fed.messages)
    assert forgotten and forgotten[0] > 0  # passes had run when the restart came
    assert len(got.trained) == 12
    fed.optimizer_step = optimizer_step
    streamed.finish()
    close(w["grads"], f["grads"])


def test_what_cannot_stream_says_why(tiny_model_dir, tmp_path, groups):
    run, _ = a_run(tiny_model_dir, tmp_path, "r", groups, "algorithm.router_aux_loss_coef=0.01",
                   'algorithm.aggregation="constant"')
    assert "router" in run.why_not_streamed()
    off, _ = a_run(tiny_model_dir, tmp_path, "off", groups, "train.streamed_update=false")
    assert off.why_not_streamed() == "train.streamed_update = false"


def test_the_learner_gets_each_group_as_it_is_taken_before_the_last_is_in():
    """The producer calls `each` with a finished group while a slow group of the same step still samples."""
    layer = Scripted(seconds=lambda i: 0.8 if i == 2 else 0.02)
    producer = RolloutProducer(layer, stream(), prompts=3, k=0, first_step=0, steps=1)  # (three groups)
    fed: list[float] = []
    try:
        t0 = time.perf_counter()
        got = producer.take(0, each=lambda g: fed.append(time.perf_counter() - t0))
    finally:
        producer.close()
    assert len(fed) == 3 and len({r.group for r in got.trained}) == 3
    assert fed[0] < 0.5 < fed[-1]  # the first two were the learner's while group 2 slept
