"""`vlrl train` end to end on the tiny model: metrics, checkpoints, resume, Ctrl-C, LoRA, dynamic sampling."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlrl.checkpoint import latest_checkpoint, load_trainer_state
from vlrl.config import load_config
from vlrl.summary import read_jsonl
from vlrl.train import train

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"time/rollout", "time/rollout_wait", "time/update", "time/update_overlapped", "time/sync",
          "time/sync_blocking", "time/step", "tokens_per_s"}
REQUIRED = {"step", "reward/mean", "reward/std", "loss", "response_length/mean", "clip_fraction",
            "mismatch_kl", "entropy", "grad_norm", "tokens_per_s", "time/rollout", "time/update", "accuracy"}


def small(tiny_model_dir, tmp_path, *extra):
    return tiny_overrides(tiny_model_dir, tmp_path, "train.micro_batch_size=3", "checkpoint.every=2", *extra)


def cfg_of(overrides):
    return load_config(ROOT / "configs/tiny-cpu.toml", overrides)


def without_timing(ms):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in ms]


def test_metrics_samples_and_a_servable_checkpoint(tiny_model_dir, tmp_path):
    res = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=3", "name=a")))
    assert res.step == 3 and not res.stopped
    ms = read_jsonl(res.run_dir / "metrics.jsonl")
    assert [m["step"] for m in ms] == [1, 2, 3]
    assert REQUIRED <= set(ms[0])
    assert ms[0]["samples"] == 8 and ms[0]["mismatch_kl"] < 1e-6
    samples = [json.loads(line) for line in (res.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all((res.run_dir / p).is_file() for s in samples for p in s["images"])
    assert (res.run_dir / "config.toml").is_file()
    ckpt = latest_checkpoint(res.run_dir)
    assert ckpt.name == "step-3"
    assert [p.name for p in sorted(res.run_dir.glob("step-*"))] == ["step-2", "step-3"]  # keep_last = 2
    state = load_trainer_state(ckpt)
    assert state["step"] == 3 and state["data"] == [{"index": 6}]  # one rank, 3 steps x 2 prompts
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoProcessor.from_pretrained(ckpt)
    trained = AutoModelForImageTextToText.from_pretrained(ckpt, use_safetensors=True)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, use_safetensors=True)
    tp, bp = dict(trained.named_parameters()), dict(base.named_parameters())
    lm = [n for n in tp if "language_model" in n]
    assert any(not torch.equal(tp[n], bp[n]) for n in lm)  # the policy moved
    assert all(torch.equal(tp[n], bp[n]) for n in tp if ".visual." in n)  # the vision tower stayed frozen


def test_resume_repeats_the_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=4", "name=straight")))
    first = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=2", "name=resumed")))
    assert first.step == 2
    with pytest.raises(Exception, match="already holds a run"):
        train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=4", "name=resumed")))
    second = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=4", "name=resumed")), resume=True)
    assert second.step == 4
    a = without_timing(read_jsonl(straight.run_dir / "metrics.jsonl"))
    b = without_timing(read_jsonl(second.run_dir / "metrics.jsonl"))
    assert a == b


def test_a_run_killed_between_checkpoints_resumes_without_logging_a_step_twice(tiny_model_dir, tmp_path):
    """A kill after step 3, whose last checkpoint is step 2, mid-line in metrics.jsonl: the resumed run drops
    what its logs hold past step 2 and logs steps 3 and 4 once, as the uninterrupted run did."""
    straight = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=4", "name=straight")))
    run = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=3", "name=killed",
                             "checkpoint.every=2"))).run_dir
    shutil.rmtree(run / "step-3")  # as if killed before step 3's checkpoint
    (run / "latest").write_text("step-2\n")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "rew')  # and in the middle of a line
    assert [s["step"] for s in read_jsonl(run / "samples.jsonl")][-1] == 3
    again = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=4", "name=killed",
                               "checkpoint.every=2")),
                  resume=True)
    assert again.step == 4
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # every line whole, each step once
    assert (without_timing(read_jsonl(run / "metrics.jsonl"))
            == without_timing(read_jsonl(straight.run_dir / "metrics.jsonl")))
    steps = [s["step"] for s in read_jsonl(run / "samples.jsonl")]
    assert steps == sorted(steps) and set(steps) == {1, 2, 3, 4}


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_and_resume_continues(tiny_model_dir, tmp_path, sig, code):
    """Ctrl-C, and SIGTERM (what schedulers send on preemption), finish or drop the step, save and exit with
    128 + the signal's number; with checkpoint.every far away, nothing is lost."""
    args = [sys.executable, "-m", "vlrl", "train", "configs/tiny-cpu.toml",
            *[f"--set={o}"
              for o in small(tiny_model_dir, tmp_path, "train.steps=500", "name=int",
                             "checkpoint.every=1000")]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    metrics = tmp_path / "int" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert "checkpoint saved, resume with --resume" in out
    done = len(read_jsonl(metrics))
    ckpt = latest_checkpoint(tmp_path / "int")
    assert ckpt is not None and ckpt.name == f"step-{done}" and done >= 2
    res = train(cfg_of(small(tiny_model_dir, tmp_path, f"train.steps={done + 1}", "name=int")), resume=True)
    assert res.step == done + 1 and [m["step"] for m in read_jsonl(metrics)] == list(range(1, done + 2))


def test_a_signal_handled_while_the_ranks_agree_stops_every_rank_at_the_next_check():
    """Under torchrun, a rank waiting in the stop check's reduction runs its SIGTERM handler as the reduction
    returns, after every rank sent 0: that check must still say "go on" (as it does on the other ranks, which
    have not had the signal yet), and the next one stops all of them. (Answering with the local flag stopped
    rank 0 alone; rank 1 waited for it in the next step and died with "Connection closed by peer".)"""
    from vlrl.train import Run, StopFlag

    class Ranks:  # the other rank sends 0; the signal lands while this one is in the reduction
        signal_now = True

        def over_ranks(self, values, op):
            agreed = [max(v, 0.0) for v in values]
            if self.signal_now:
                signal.raise_signal(signal.SIGTERM)
                self.signal_now = False
            return agreed

    ranks = Ranks()
    with StopFlag() as stop:
        assert Run.stop_requested(ranks, stop) is False
        assert stop.requested  # had locally, agreed on next time
        assert Run.stop_requested(ranks, stop) is True and stop.code == 143


def test_a_rank_stopping_on_another_ranks_signal_is_not_interrupted_by_its_own():
    """torchrun passes SIGTERM to rank 0, then to rank 1 (35 ms later on a loaded machine): rank 1 may have
    agreed to stop on rank 0's signal when its own arrives. That is the first signal this process had, not a
    second one (which interrupts at once)."""
    from vlrl.train import Run, StopFlag

    class OtherRankSignalled:
        def over_ranks(self, values, op):
            return [max(v, 143.0) for v in values]

    with StopFlag() as stop:
        assert Run.stop_requested(OtherRankSignalled(), stop) is True and stop.code == 143
        try:
            signal.raise_signal(signal.SIGTERM)  # its own, late: the stop goes on
        except KeyboardInterrupt:
            pytest.fail("the rank's own first SIGTERM interrupted it")
        assert stop.received == 1
        with pytest.raises(KeyboardInterrupt):  # a second one to this process
            signal.raise_signal(signal.SIGTERM)


def test_a_signal_during_the_final_save_is_vlrls_not_the_default(tiny_model_dir, tmp_path, monkeypatch):
    """The final save runs under vlrl's signal handlers: a rank that agreed to stop on another's SIGTERM gets
    its own while it saves (before, SIGTERM's default action killed it mid-save, and the other rank died in
    the save's barrier: CI's red). Here the stop comes from a failed weight sync (no signal), and a SIGTERM
    arrives during the final save; the test's own handler, the one in place before the run, must not see it."""
    from vlrl import policy_sync
    from vlrl.rollout.vllm_client import ServerError
    from vlrl.train import Run

    real_choose, real_save = policy_sync.choose_sync, Run.save

    class FailsAtStep2:
        def __init__(self, sync):
            self.sync = sync

        def __call__(self, policy, version):
            if version == 2:
                raise ServerError("the server went away (test)")
            return self.sync(policy, version=version)

        def __getattr__(self, name):
            return getattr(self.sync, name)

    def save(self, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(policy_sync, "choose_sync", lambda *a, **k: FailsAtStep2(real_choose(*a, **k)))
    monkeypatch.setattr(Run, "save", save)
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        res = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=50", "checkpoint.every=1000")))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [] and res.exit_code == 143 and res.step == 2
    assert latest_checkpoint(res.run_dir).name == "step-2"


def test_lora_trains_only_adapters_and_checkpoints_merged_weights(tiny_model_dir, tmp_path):
    res = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=2", "name=lora", "model.lora_rank=4",
                             "train.learning_rate=0.01")))
    ckpt = latest_checkpoint(res.run_dir)
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(ckpt, use_safetensors=True)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, use_safetensors=True)
    mp, bp = dict(merged.named_parameters()), dict(base.named_parameters())
    assert set(mp) == set(bp)  # plain HF names: vLLM can serve it
    changed = {n for n in mp if not torch.equal(mp[n], bp[n])}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(n.endswith(".weight") and any(t in n for t in projections) for n in changed)
    again = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=3", "name=lora", "model.lora_rank=4",
                               "train.learning_rate=0.01")), resume=True)
    assert again.step == 3


def test_dynamic_sampling_drops_groups_without_signal_and_refills(tiny_model_dir, tmp_path, monkeypatch):
    """The first round's two prompts get a constant reward (no signal: both groups dropped), every later
    prompt uniform noise (signal in every group): the refill round keeps two groups and the step trains on
    them."""
    from vlrl.data.sources import load_samples
    from vlrl.data.stream import PromptStream

    config = cfg_of(small(tiny_model_dir, tmp_path, "train.steps=1", "name=dyn",
                          "algorithm.dynamic_sampling=true",
                          "algorithm.max_refill_rounds=2", 'env.rewards=[{fn="flat_first:score"}]'))
    first = [s.id for s in PromptStream(load_samples(config.env, "train", config.train.seed),
                                        config.train.seed).take(2)]  # the prompts of the first round
    (tmp_path / "flat_first.py").write_text(
        f"import random\n\ndef score(completion, sample):\n    return 1.0 if sample.id in {first!r} else "
        "random.random()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = train(config)
    m = read_jsonl(res.run_dir / "metrics.jsonl")[0]
    assert m["groups_dropped"] == 2 and m["sampling_rounds"] == 2  # the refill was needed, and it was enough
    assert m["samples_trained"] == 2 * 4 and m["grad_norm"] > 0.0  # the refill's two groups of 4 trained
    # 2 rounds x 2 prompts
    assert load_trainer_state(latest_checkpoint(res.run_dir))["data"] == [{"index": 4}]


def test_steps_whose_groups_all_agree_are_said_and_stop_the_run_after_k_in_a_row(
    tiny_model_dir, tmp_path, monkeypatch):
    """A reward that is always 1 under dynamic sampling: each step drops every group. Each such step is said,
    its metrics show what was sampled (reward 1, accuracy 1; they showed 0.0 of an empty kept set), and the
    run stops after train.max_steps_without_update of them in a row, naming the reason."""
    import io

    from rich.console import Console

    from vlrl.errors import UserError

    (tmp_path / "flat_reward.py").write_text("def const(completion, sample):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = io.StringIO()
    config = cfg_of(small(tiny_model_dir, tmp_path, "train.steps=10", "name=flat",
                          "algorithm.dynamic_sampling=true",
                          "algorithm.max_refill_rounds=1", "train.max_steps_without_update=2",
                          'env.rewards=[{fn="flat_reward:const"}]'))
    with pytest.raises(UserError,
                       match=r"stopped at step 2: 2 steps in a row trained nothing \(the last: every "
                                        r"group's rewards agreed \(4 groups dropped over 2 sampling rounds, "
                                        r"mean reward 1.000\)\)\. Check that env.rewards"):
        train(config, console=Console(file=out, width=300))
    said = [line for line in out.getvalue().splitlines() if "no update" in line]
    assert said == [f"step {k}: no update, every group's rewards agreed (4 groups dropped over 2 sampling "
                    "rounds, mean reward 1.000)" for k in (1, 2)]
    ms = read_jsonl(tmp_path / "flat" / "metrics.jsonl")
    assert [(m["step"], m["reward/mean"], m["accuracy"], m["samples"], m["samples_trained"]) for m in ms] == [
        (1, 1.0, 1.0, 16, 0), (2, 1.0, 1.0, 16, 0)]


def test_a_run_interrupted_twice_before_its_first_checkpoint_says_so_and_resume_starts_it_over(
        tiny_model_dir, tmp_path):
    """A second Ctrl-C exits at once (130) with one line saying what was saved (nothing, here); the run it
    left is not stuck: --resume starts it over at step 0, dropping its logged steps (it said "already holds a
    run; pass --resume", then "no complete checkpoint; start without --resume")."""
    args = [sys.executable, "-m", "vlrl", "train", "configs/tiny-cpu.toml",
            *[f"--set={o}"
              for o in small(tiny_model_dir, tmp_path, "train.steps=500", "name=twice",
                             "checkpoint.every=1000",
                             # a step of ~1 s: both signals land in step 2 (on a fast machine the stop's own
                             # checkpoint could be written within the 50 ms between them)
                             'env.rewards=[{fn="rewards_for_tests:slow_parity"}]')]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    metrics = tmp_path / "twice" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    # 130 (vlrl exits so); now and then the process is found killed by SIGINT (-2) after that exit began,
    # which a shell reports as 130 too (seen 1 time in 8 under pytest, never pinned down)
    assert proc.returncode in (130, -signal.SIGINT), out
    said = " ".join(out.split())  # (rich wraps lines at 80 columns in a pipe)
    assert re.search(r"interrupted again: stopped at once, in step \d+, without saving it; no checkpoint was "
                     "saved: --resume starts the run over at step 0", said), out
    assert latest_checkpoint(tmp_path / "twice") is None and metrics.read_text().count("\n") >= 1
    with pytest.raises(Exception,
                       match="stopped before its first checkpoint; pass --resume to start it over"):
        train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=2", "name=twice")))
    res = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=2", "name=twice")), resume=True)
    assert res.step == 2 and [m["step"] for m in read_jsonl(metrics)] == [1, 2]
    with pytest.raises(Exception,
                       match="no run to resume in .*nothing; start without --resume|no run to resume"):
        train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=2", "name=never")), resume=True)


def test_failing_reward_and_overlong_masking_do_not_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text(
        "def flaky(completion, sample):\n"
        "    if sample.id.endswith(('0', '2', '4', '6', '8')):\n        raise RuntimeError('boom')\n"
        "    return float(len(completion) % 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from vlrl.data.sources import load_samples
    from vlrl.data.stream import PromptStream

    # Failures alone (no overlong masking, so truncation decides nothing): a step trains exactly the rollouts
    # of its prompts whose reward did not raise, 4 per prompt with an odd id, and counts 4 failures per even
    # one.
    config = cfg_of(small(tiny_model_dir, tmp_path, "train.steps=2", "name=failing",
                          'env.rewards=[{fn="bad_reward:flaky"}]'))
    stream = PromptStream(load_samples(config.env, "train", config.train.seed), config.train.seed)
    odd = [sum(not s.id.endswith(("0", "2", "4", "6", "8")) for s in stream.take(2)) for _ in range(2)]
    assert train(config).step == 2
    ms = read_jsonl(tmp_path / "failing" / "metrics.jsonl")
    assert [(m["samples_trained"],
             m["reward_failures/raised"]) for m in ms] == [(4 * k, 4 * (2 - k)) for k in odd]
    assert sum(odd) not in (0, 4)  # (the seed draws both kinds of prompt, so the test can fail either way)

    res = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=2", "name=bad",
                             "algorithm.mask_truncated=true",
                             'env.rewards=[{fn="bad_reward:flaky"}]')))
    ms = read_jsonl(res.run_dir / "metrics.jsonl")
    assert res.step == 2
    assert sum(m["reward_failures"] for m in ms) > 0 and sum(m["reward_failures/raised"] for m in ms) > 0
    for m in ms:  # failed and truncated samples are not trained
        assert m["samples_trained"] <= m["samples"] * (1 - m["truncated_fraction"]) + 1e-9


@pytest.mark.slow
def test_demo_learns_well_above_chance(tiny_model_dir, tmp_path):
    """The shipped demo config: chance is 25% (a guess among four colours); the untrained model is ~2%."""
    cfg = cfg_of([f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "logging.progress=false"])
    res = train(cfg)
    ms = read_jsonl(res.run_dir / "metrics.jsonl")
    first = sum(m["reward/mean"] for m in ms[:5]) / 5
    last = sum(m["reward/mean"] for m in ms[-10:]) / 10
    assert first < 0.15 and last > 0.6, (first, last)


def test_metrics_reach_tensorboard_and_wandb_offline(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=2", "name=tb",
                             'logging.trackers=["tensorboard", "wandb"]')))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(res.run_dir.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    rewards = acc.Scalars("reward/mean")
    logged = [json.loads(line)["reward/mean"]
              for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in rewards] == [1, 2]
    assert [e.value for e in rewards] == pytest.approx(logged)
    assert list(res.run_dir.rglob("offline-run-*"))  # the W&B run, kept on disk with no network


def test_a_reward_function_listed_twice_gets_a_key_of_its_own(tiny_model_dir, tmp_path):
    """The same function twice (at weights 1 and 0.5) is two rewards, `fn` and `fn#2`, as `vlrl eval` names
    them, and the total weighs both (it died with KeyError: 'fn#2')."""
    fn = "rewards_for_tests:parity"
    twice = f'env.rewards=[{{fn="{fn}"}}, {{fn="{fn}", weight=0.5}}]'
    res = train(cfg_of(small(tiny_model_dir, tmp_path, "train.steps=2", "name=twice", twice)))
    ms = read_jsonl(res.run_dir / "metrics.jsonl")
    assert len(ms) == 2
    for m in ms:
        first, second = m[f"reward/{fn}/mean"], m[f"reward/{fn}#2/mean"]
        assert first == second and 0 < first < 1  # parity varies within the step
        assert m["reward/mean"] == pytest.approx(1.5 * first)
        assert m["accuracy"] == pytest.approx(first)  # the first reward decides what is correct
