"""Server faults, with the real vLLM CPU server started by `vlrl serve`: a second `vlrl serve` on a taken
port, the engine killed behind the API during a run, the server restarted mid-run (then stopped by SIGHUP);
and `vlrl serve`'s health watch of a server process that lives on without its engine."""

from __future__ import annotations

import http.server
import io
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from vlrl.checkpoint import latest_checkpoint
from vlrl.summary import read_jsonl

from conftest import tiny_config
from vllm_server import Server, live_processes_in_group, port_is_open


def flat(text: str) -> str:
    """Console output as one line (rich wraps long lines at the terminal width)."""
    return " ".join(text.split())


def when_steps(run_dir: Path, n: int, action, timeout: float = 600) -> threading.Thread:
    """Run `action()` in a thread once the run's metrics hold `n` steps."""

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            path = run_dir / "metrics.jsonl"
            if path.is_file() and len(path.read_text().splitlines()) >= n:
                return action()
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.mark.vllm
def test_a_second_vlrl_serve_on_a_taken_port_is_refused(tiny_server, tiny_model_dir, tmp_path):
    """A second `vlrl serve` on the port of one that serves: refused before vLLM starts, naming the port and
    its holder; the first one untouched. (kill -9 of `vlrl serve`: tests/test_vllm.py, at the end of the
    server killed mid-rollout.)"""
    first = tiny_server
    group = first.vllm_pid()
    processes = live_processes_in_group(group)
    assert len(processes) >= 4  # the guard, the API server, its engine core, a worker
    second = Server(tiny_model_dir, tmp_path / "second.log", port=first.port).launch()
    assert second.proc.wait(60) == 2  # a user error, as a bad option is
    out = flat(second.out.read_text())
    holder = int(os.popen(f"pgrep -P {group}").read().split()[0])  # the vLLM API server holds the port
    assert f"port {first.port} is already in use; held by pid {holder} (" in out, out
    assert "vLLM ready" not in out and not second.log.exists()  # vLLM was never started
    assert live_processes_in_group(group) == processes  # the first server untouched, and still serving
    assert httpx.get(f"{first.url}/health", timeout=10).status_code == 200


@pytest.mark.vllm
def test_engine_killed_behind_the_api_stops_the_run_with_a_checkpoint(tiny_model_dir, tmp_path):
    """The engine core dies under a live API server: its requests answer 500, then the server goes. The
    trainer retries, then saves the last completed step and stops with exit code 1, the reason and
    `--resume`."""
    from vlrl.train import train

    srv = Server(tiny_model_dir, tmp_path / "serve.log").start()
    group = srv.vllm_pid()
    cfg = tiny_config(tiny_model_dir, tmp_path, f"rollout.server_url={srv.url}", "rollout.max_new_tokens=6",
                      "train.steps=200", "checkpoint.every=1000", "rollout.max_retries=3",
                      "rollout.retry_backoff_s=0.5", "name=dead")
    killed = {}
    watcher = when_steps(cfg.run_dir, 2, lambda: killed.update(at=time.time(), pid=os.kill(srv.engine_pid(),
                                                                                            signal.SIGKILL)))
    out = io.StringIO()
    try:
        res = train(cfg, console=Console(file=out, width=400))
    finally:
        if srv.proc.poll() is None and "at" not in killed:
            srv.stop()
    watcher.join(5)
    assert "at" in killed
    steps = read_jsonl(res.run_dir / "metrics.jsonl")
    assert res.stopped and res.exit_code == 1 and res.step == len(steps) >= 2
    assert "failed" in res.reason and "4 times" in res.reason and "is it running?" in res.reason, res.reason
    # saved on failure (checkpoint.every=1000)
    assert latest_checkpoint(res.run_dir).name == f"step-{res.step}"
    text = flat(out.getvalue())
    assert f"stopped at step {res.step}" in text and "vlrl train CONFIG --resume" in text, text
    # `vlrl serve` sees the server dead (exited, or alive but failing its health check), stops what is left of
    # it and exits non-zero, so a supervisor can start a new one
    assert srv.proc.wait(120) == 1
    said = flat(srv.out.read_text())
    assert "the vLLM server exited" in said or "the vLLM server failed its health check" in said, said[-2000:]
    assert live_processes_in_group(group) == [] and not port_is_open(srv.port)


@pytest.mark.vllm
def test_server_restarted_mid_run_gets_the_weights_again(tiny_model_dir, tmp_path):
    """The server is killed and a new one started on the same port during a run: the trainer's requests wait
    for it, it reports the base weights' version, the trainer pushes its own and samples again; every trained
    step's rollouts come from the trainer's weights (mismatch KL at float32 noise) and the run finishes. The
    new server then stops on SIGHUP (a closed terminal): exit code 129, its whole group gone."""
    from vlrl.rollout.vllm_client import VLLMClient
    from vlrl.train import train

    srv = Server(tiny_model_dir, tmp_path / "serve.log").start()
    cfg = tiny_config(tiny_model_dir, tmp_path, f"rollout.server_url={srv.url}", "rollout.max_new_tokens=6",
                      "train.steps=6", "rollout.max_retries=40", "rollout.retry_backoff_s=1.0",
                      "train.learning_rate=0.01",
                      'env.rewards=[{fn="rewards_for_tests:noise"}]', "name=restart")
    restarted = {}

    def restart():
        restarted["after_steps"] = len((cfg.run_dir / "metrics.jsonl").read_text().splitlines())
        srv.kill_hard()
        restarted["server"] = Server(tiny_model_dir, tmp_path / "serve2.log", port=srv.port).start()

    watcher = when_steps(cfg.run_dir, 2, restart)
    out = io.StringIO()
    res = train(cfg, console=Console(file=out, width=400))
    watcher.join(300)
    new = restarted["server"]
    try:
        ms = read_jsonl(res.run_dir / "metrics.jsonl")
        assert res.exit_code == 0 and res.reason is None and [m["step"] for m in ms] == [1, 2, 3, 4, 5, 6]
        assert restarted["after_steps"] < 6  # the restart happened mid-run
        assert ms[0]["grad_norm"] > 0  # the policy moved off the base weights the new server started with ...
        print("\n".join(line for line in out.getvalue().splitlines() if "restarted" in line))
        kls = [m["mismatch_kl"] for m in ms]
        print("mismatch KL per step:", kls)
        # ... yet every step trained on rollouts of the trainer's weights
        assert all(kl < 1e-6 for kl in kls), kls
        # pushed to the new server
        assert VLLMClient(new.url, cfg.rollout).weight_version().startswith("vlrl-")
    finally:  # a closed terminal or SSH session: the server goes with `vlrl serve`, exit code 129
        new.assert_stops(signal.SIGHUP, 129)


def test_a_live_server_process_that_fails_its_health_check_is_reported_dead():
    """vLLM's API server can outlive its engine (503 on /health, or hung in its shutdown): `vlrl serve`
    watches the health check, not only the process, and gives up after `failures` misses in a row."""
    from vlrl.serve import watch_health

    answer = {"status": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(answer["status"])
            self.end_headers()

        def log_message(self, *a):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{web.server_address[1]}"
    try:
        healthy = subprocess.Popen(["sleep", "1"])
        # it exited: not a health failure
        assert watch_health(url, healthy, interval_s=0.05, failures=3) is None
        answer["status"] = 503
        dead = subprocess.Popen(["sleep", "60"])
        t0 = time.monotonic()
        reason = watch_health(url, dead, interval_s=0.05, failures=3)
        assert reason == ("the vLLM server failed its health check 3 times in a row (HTTP 503; its engine "
                          "died?)")
        assert dead.poll() is None and time.monotonic() - t0 < 5  # reported while the process still lives
        dead.kill()
    finally:
        web.shutdown()
