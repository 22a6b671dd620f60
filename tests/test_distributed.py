"""Data parallelism on the CPU (gloo), DDP and FSDP2: one step with 2 ranks gives the single-rank loss and
gradients on the same global batch, FSDP2's gathered state round-trips, and `vlrl train` runs (and, sharded,
resumes) with 2 processes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    """`n` CPU processes on a free port (tests/ importable: its reward functions and workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def train_args(entry: str, tiny_model_dir, out_dir, *overrides: str) -> list[str]:
    """`train configs/tiny-cpu.toml` with a small step (3 prompts x 4 rollouts of 4 tokens, a reward that
    varies within every group) and `overrides`; `entry` is `-m vlrl` or a worker script."""
    sets = tiny_overrides(tiny_model_dir, out_dir, "rollout.prompts_per_step=3", *overrides)
    return [*entry.split(), "train", "configs/tiny-cpu.toml", *[f"--set={o}" for o in sets]]


def one_and_two_ranks(tiny_model_dir, tmp_path, *mode: str) -> tuple[dict, dict]:
    """tests/dist_worker.py's results (loss, gradients, ...) with 1 rank and with 2, on the same global
    batch."""
    results = {}
    for n in (1, 2):
        out = tmp_path / f"{'-'.join(mode) or 'grads'}-{n}.pt"
        res = torchrun(n, "tests/dist_worker.py", str(tiny_model_dir), str(out), *mode)
        assert res.returncode == 0, res.stderr[-4000:]
        results[n] = torch.load(out, weights_only=True)
    return results[1], results[2]


def assert_same_gradient(one: dict, two: dict) -> None:
    """Loss and every gradient of 2 ranks equal 1 rank's, the vision tower's included."""
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert set(two["grads"]) == set(one["grads"]) and any("visual" in k for k in one["grads"])
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_two_ranks_give_the_single_rank_gradient(tiny_model_dir, tmp_path):
    one, two = one_and_two_ranks(tiny_model_dir, tmp_path)
    assert two["world"] == 2 and one["world"] == 1
    assert_same_gradient(one, two)  # the vision tower trained, and reduced without a hang


@pytest.mark.parametrize("mode", ["even", "uneven"])
def test_a_streamed_step_on_two_ranks_gives_the_single_rank_gradient(tiny_model_dir, tmp_path, mode):
    """Asynchronous rollouts' streamed update (streamed_update.py) under DDP: each rank feeds its own groups,
    reduces nothing before its last pass and scales by the counts of both ranks: the gradient of one process
    updating the whole step. `uneven`: one rank got every group, the other none (a zero-weight last pass)."""
    results = {}
    for n in (1, 2):
        out = tmp_path / f"streamed-{n}.pt"
        res = torchrun(n, "tests/streamed_worker.py", str(tiny_model_dir), str(tmp_path / f"runs-{n}"), str(out),
                       mode)
        assert res.returncode == 0, res.stderr[-4000:]
        results[n] = torch.load(out, weights_only=True)
    one, two = results[1], results[2]
    assert two["world"] == 2 and one["world"] == 1
    if mode == "even":
        assert two["early"] > 0  # each rank ran passes before the step's end
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert set(two["grads"]) == set(one["grads"]) and one["grads"]
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_multi_turn_batches_with_tool_images_on_one_rank_only_give_the_single_rank_gradient(
        tiny_model_dir, tmp_path):
    """Two-turn trajectories (a sampled turn, an environment reply, a sampled turn): rank 0's replies hold
    tool images, rank 1's hold none (nor do its prompts): the ranks' vision passes differ, nothing hangs, and
    loss and gradients equal one rank's over all of them."""
    assert_same_gradient(*one_and_two_ranks(tiny_model_dir, tmp_path, "multiturn"))
    sets = ("env.environment=envs_for_tests:ImageOnRankZero", "env.max_turns=3", "rollout.max_new_tokens=32",
            "name=mt", "train.steps=2")
    res = torchrun(2, *train_args("-m vlrl", tiny_model_dir, tmp_path, *sets))
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    metrics = [json.loads(line) for line in (tmp_path / "mt" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("turns/mean" in m for m in metrics)


def test_two_ranks_with_token_balanced_packing_give_the_single_rank_gradient(tiny_model_dir, tmp_path):
    """`vlrl train`'s default path on 2 ranks: rank 0 holds 6 rollouts, rank 1 two; the planner moves rollouts
    until their tokens balance, both pack their micro-batches, and the loss and gradients are one rank's."""
    one, two = one_and_two_ranks(tiny_model_dir, tmp_path, "packed")
    first, second = two["tokens"]
    assert first + second == one["tokens"][0] and abs(first - second) < 0.25 * (first + second)
    assert_same_gradient(one, two)


def test_fsdp2_two_ranks_give_the_single_rank_gradient_and_gather_whole_state(tiny_model_dir, tmp_path):
    """FSDP2 (Accelerate's own sharding: every decoder layer and vision block a unit) on 2 CPU ranks: the loss
    and every gradient equal the single-rank ones (rank 1 never sees an image: the vision blocks' all-gathers
    are matched by its idle vision pass); the gathered weights and optimizer state load into a fresh sharded
    policy and gather back unchanged; an unsharded replica refreshed from the shards equals them."""
    outs = {}
    for n, mode in ((1, "ddp"), (2, "fsdp")):
        outs[mode] = tmp_path / f"{mode}.pt"
        res = torchrun(n, "tests/dist_worker.py", str(tiny_model_dir), str(outs[mode]), mode)
        assert res.returncode == 0, res.stderr[-4000:]
    one = torch.load(outs["ddp"], weights_only=True)
    two = torch.load(outs["fsdp"], weights_only=True)
    assert two["world"] == 2
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert set(two["grads"]) == set(one["grads"]) and any("visual" in k for k in one["grads"])
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)
    weights, stepped = two["weights"], two["step_weights"]
    assert set(weights) == {k[len("model."):]
                            for k in stepped} and all(not k.startswith("model.model") for k in weights)
    for k, v in stepped.items():  # the gathered state is the trained weights, under the HF model's names
        assert torch.equal(weights[k[len("model."):]], v), k
    for k, v in weights.items():
        assert torch.equal(two["weights2"][k], v), k
    assert two["replica_diff"] == 0.0
    opt, opt2 = two["opt"], two["opt2"]
    assert set(opt["state"]) == set(opt2["state"]) and len(opt["state"]) == len(stepped)
    for k, st in opt["state"].items():
        assert float(st["exp_avg_sq"].abs().sum()) > 0
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt2["state"][k][field], st[field]), (k, field)


def test_vlrl_train_with_two_processes(tiny_model_dir, tmp_path):
    """Two CPU processes over gloo, started by torchrun (accelerate launch's CPU multi-process mode needs MPI;
    on GPUs `accelerate launch --config_file configs/accelerate/...` starts the same processes)."""
    res = torchrun(2, *train_args("-m vlrl", tiny_model_dir, tmp_path, "name=ddp", "train.steps=2"))
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["samples"] == 12 for m in metrics)  # 3 prompts x 4 over both ranks (2 + 1 prompts)
    from vlrl.checkpoint import latest_checkpoint, load_trainer_state

    state = load_trainer_state(latest_checkpoint(tmp_path / "ddp"))
    # rank 0 took prompts 0, 2 of each step; rank 1 took 1
    assert state["data"] == [{"index": 4}, {"index": 2}]


def test_sigterm_to_torchrun_saves_every_rank_and_resumes(tiny_model_dir, tmp_path):
    """SIGTERM (a scheduler's preemption) to the launcher: torchrun passes it to both ranks, which agree to
    stop at the same step, save one checkpoint with both ranks' data positions, and exit 143; the run
    resumes."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *train_args("-m vlrl", tiny_model_dir, tmp_path, "name=term", "train.steps=500",
                       "checkpoint.every=1000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    # what the processes said, of their tracebacks only vlrl's frames (rank 1's fill the tail if rank 0 dies first)
    said = "\n".join(line for line in out.splitlines()
                     if not re.match(r"(\[rank\d\]: )?\s", line) or "/vlrl/" in line)[-4000:]
    # said once, by the main rank
    assert out.count("checkpoint saved, resume with --resume") == 1, said
    from vlrl.checkpoint import latest_checkpoint, load_trainer_state

    done = len(metrics.read_text().splitlines())
    ckpt = latest_checkpoint(tmp_path / "term")
    assert ckpt is not None and ckpt.name == f"step-{done}", out[-3000:]
    assert load_trainer_state(ckpt)["data"] == [{"index": 2 * done}, {"index": done}]
    res = torchrun(2,
                   *train_args("-m vlrl", tiny_model_dir, tmp_path, "name=term", f"train.steps={done + 1}"),
                   "--resume")
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, done + 2))


def fsdp_train(tiny_model_dir, out_dir, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    args = train_args("tests/fsdp_train_worker.py", tiny_model_dir, out_dir, "checkpoint.every=1", *overrides)
    res = torchrun(2, *args, *(["--resume"] if resume else []))
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return res


def test_vlrl_train_under_fsdp2_trains_samples_fresh_weights_and_resumes_exactly(tiny_model_dir, tmp_path):
    """`vlrl train` with the policy sharded by FSDP2 over 2 CPU processes: the in-process sampler's replica
    gets every step's weights (the sampler's logprobs match the trainer's), checkpoints hold the whole model,
    and a run resumed from step 2 (weights and re-sharded AdamW state) gives the uninterrupted run's step
    3."""
    from safetensors.torch import load_file

    from vlrl.checkpoint import load_trainer_state

    fsdp_train(tiny_model_dir, tmp_path, "name=whole", "train.steps=3")
    fsdp_train(tiny_model_dir, tmp_path, "name=split", "train.steps=2")
    fsdp_train(tiny_model_dir, tmp_path, "name=split", "train.steps=3", resume=True)
    runs = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("whole", "split")}
    whole, split = runs["whole"], runs["split"]
    assert [m["step"] for m in whole] == [1, 2, 3] == [m["step"] for m in split]
    assert all(m["samples"] == 12 for m in whole)
    assert any(m["grad_norm"] > 0 for m in whole)  # the weights moved...
    assert all(m["mismatch_kl"] < 1e-6 for m in whole)  # ...and the replica the sampler uses moved with them
    for key in ("loss", "grad_norm", "reward/mean", "mismatch_kl", "entropy"):
        assert split[2][key] == pytest.approx(whole[2][key], rel=1e-4, abs=1e-6), key
    w, s = load_file(tmp_path / "whole" / "step-3"
                     / "model.safetensors"), load_file(tmp_path / "split" / "step-3" / "model.safetensors")
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert set(w) == set(base) and any(not torch.equal(w[k], base[k]) for k in base)
    for k in w:
        torch.testing.assert_close(s[k], w[k], atol=1e-6, rtol=1e-5, msg=k)
    state = load_trainer_state(tmp_path / "whole" / "step-3")
    assert state["data"] == [{"index": 6}, {"index": 3}]
    assert all(k.startswith("model.") for k in state["optimizer"]["state"]) and state["optimizer"]["state"]


def test_fsdp_bench_runs_on_cpu_processes():
    """`bench/fsdp_update.py --tiny` (its GPU runs are in bench/README.md): both runs give a row, none an
    error; with `--ragged`, packed micro-batches of token-balanced ranks run under FSDP2 and under DDP, no
    padding."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def bench(*args):
        res = subprocess.run([sys.executable, "bench/fsdp_update.py", "--tiny", "--warmup", "1", "--repeat",
                              "1", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        return [line for line in res.stdout.splitlines() if line.startswith("| fsdp2, ")
                or line.startswith("| ddp, ")]

    rows = bench("--gpus", "1", "2")
    assert len(rows) == 2 and all(" - |" not in r for r in rows), rows
    assert rows[0].endswith("| 1.00 (vs 1 GPU) |")
    rows = bench("--ragged", "--gpus", "2", "--strategy", "fsdp2", "ddp", "--plan", "packed")
    assert [r.split(" | ")[0] for r in rows] == ["| fsdp2, bf16-mixed, packed",
                                                 "| ddp, bf16-mixed, packed"], rows
    assert all(" - |" not in r and r.split(" | ")[7] == "0.0%" for r in rows), rows  # no padding computed


def test_fsdp_with_lora_is_refused_with_a_message(tiny_model_dir, tmp_path):
    res = torchrun(1,
                   *train_args("tests/fsdp_train_worker.py", tiny_model_dir, tmp_path, "model.lora_rank=4"))
    assert res.returncode != 0
    assert "LoRA with FSDP is not supported" in res.stdout + res.stderr and "ddp-" in res.stdout + res.stderr
    assert not (tmp_path / "tiny-cpu" / "metrics.jsonl").exists()
