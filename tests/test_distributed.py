"""Data parallelism on the CPU (gloo): one step with 2 ranks gives the single-rank loss and gradients on the
same global batch, and `vlrl train` runs with 2 processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port()}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_give_the_single_rank_gradient(tiny_model_dir, tmp_path):
    results = {}
    for n in (1, 2):
        out = tmp_path / f"grads-{n}.pt"
        res = torchrun(n, "tests/dist_worker.py", str(tiny_model_dir), str(out))
        assert res.returncode == 0, res.stderr[-4000:]
        results[n] = torch.load(out, weights_only=True)
    one, two = results[1], results[2]
    assert two["world"] == 2 and one["world"] == 1
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert set(two["grads"]) == set(one["grads"])
    assert any("visual" in k for k in one["grads"])  # the vision tower trained, and reduced without a hang
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_vlrl_train_with_two_processes(tiny_model_dir, tmp_path):
    """Two CPU processes over gloo, started by torchrun (accelerate launch's CPU multi-process mode needs MPI;
    on GPUs `accelerate launch --config_file configs/accelerate/...` starts the same processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port()}",
           "-m", "vlrl", "train", "configs/tiny-cpu.toml",
           *[f"--set={o}" for o in (f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "name=ddp",
                                    "train.steps=2", "rollout.prompts_per_step=3", "rollout.group_size=4",
                                    "rollout.max_new_tokens=4", "logging.progress=false",
                                    'env.rewards=[{fn="rewards_for_tests:parity"}]')]]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["samples"] == 12 for m in metrics)  # 3 prompts x 4 over both ranks (2 + 1 prompts)
    from vlrl.checkpoint import latest_checkpoint, load_trainer_state

    state = load_trainer_state(latest_checkpoint(tmp_path / "ddp"))
    assert state["data"] == [{"index": 4}, {"index": 2}]  # rank 0 took prompts 0, 2 of each step; rank 1 took 1
