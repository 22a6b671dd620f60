"""`vlrl serve` in a subprocess, as a user starts it, and helpers for the tests that need a real vLLM server
on the CPU (prompts, trainer-side logprobs against the server's)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from vlrl.batch import batch_logprobs
from vlrl.check_batch import mismatch_stats
from vlrl.config import RolloutConfig

ROOT = Path(__file__).resolve().parents[1]

# `vlrl serve` gets SIGINT at its default, as under a terminal: pytest started as a background job of a shell
# without job control inherits it ignored, and Ctrl-C (which `Server.stop` sends) would then never reach the
# server. An ignored signal stays ignored across exec, a handled one is reset to its default, so this process
# handles it (Python's own handler; this module is first imported in the main thread). Not per child with a
# `preexec_fn`: that runs Python in the forked child, which deadlocks when another thread held a lock at the
# fork (a server restarted from a watcher thread while the run trained hung there, before its exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def live_processes_in_group(pgid: int) -> list[str]:
    """`pid command` of the group's processes that are not zombies (a zombie holds no port or memory).
    The state letter is left out: running or sleeping is whatever the scheduler shows at that instant."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "-g", str(pgid)],
                         capture_output=True, text=True).stdout
    live = []
    for line in filter(str.strip, out.splitlines()):
        pid, stat, command = line.split(None, 2)
        if not stat.startswith("Z"):
            live.append(f"{pid} {command}")
    return live


class Server:
    """`vlrl serve` in a subprocess, as a user starts it."""

    def __init__(self, model_dir: Path, log: Path, port: int | None = None, api_key: str | None = None):
        self.port = port or free_port()
        self.env = {**os.environ, **({"VLRL_TEST_KEY": api_key} if api_key else {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "vlrl", "serve", "--model", str(model_dir), "--port",
                     str(self.port),
                     "--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.2",
                     "--min-pixels", "4096", "--max-pixels", "16384", "--limit-mm-per-prompt",
                     "image=4,video=1",
                     "--video-max-pixels", "8192", "--video-max-frames", "8",
                     "--allowed-local-media-path", "/tmp", "--log-file", str(log), "--api-key-env",
                     "VLRL_TEST_KEY"]
        self.out = log.with_suffix(".out")
        self.log = log

    def log_text(self) -> str:
        """The vLLM server's own log (`vlrl serve --log-file`)."""
        return self.log.read_text() if self.log.is_file() else ""

    def launch(self) -> Server:
        """Start `vlrl serve` without waiting for it."""
        self.fh = open(self.out, "a")
        self.seen = self.out.stat().st_size  # a restarted server appends to the same file
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=self.fh, stderr=subprocess.STDOUT, text=True,
                                     env=self.env)
        return self

    def start(self, timeout: float = 240) -> Server:
        self.launch()
        seen = self.seen
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.out.read_text()[-3000:]
            if "vLLM ready" in self.out.read_text()[seen:]:
                return self
            time.sleep(0.5)
        raise AssertionError("vlrl serve did not become ready:\n" + self.out.read_text()[-3000:])

    def vllm_pid(self) -> int:
        """The pid of `vlrl serve`'s child (the guard, parent of the vLLM server): the leader of a session of
        its own, so also the id of the group every process of the server is in."""
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)],
                                  capture_output=True, text=True).stdout.split()
        assert len(children) == 1, children
        return int(children[0])

    def engine_pid(self) -> int:
        """The pid of vLLM's engine-core process (vLLM names it `VLLM::EngineCore`)."""
        out = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(self.vllm_pid())],
                             capture_output=True, text=True)
        pids = [int(line.split()[0]) for line in out.stdout.splitlines() if "VLLM::EngineCore" in line]
        assert len(pids) == 1, out.stdout
        return pids[0]

    def kill_hard(self) -> None:
        """SIGKILL the server's process group: the engine dies without any chance to clean up."""
        os.killpg(self.vllm_pid(), signal.SIGKILL)
        assert self.proc.wait(30) == 1  # `vlrl serve` reports the dead server and exits non-zero
        self.fh.close()

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Send `sig` to `vlrl serve` (not to the server: that is its job) and return its exit code."""
        self.proc.send_signal(sig)
        code = self.proc.wait(90)
        self.fh.close()
        return code

    def assert_stops(self, sig: int, code: int) -> None:
        """`sig` to `vlrl serve`: it exits with `code`, no process of the server's group is left, the port is
        free."""
        group = self.vllm_pid()
        assert self.stop(sig) == code, self.out.read_text()[-2000:]
        assert live_processes_in_group(group) == []
        assert not port_is_open(self.port)
        assert f"{signal.Signals(sig).name}: stopping the vLLM server" in self.out.read_text()

    def assert_kill_9_leaves_nothing(self) -> None:
        """kill -9 of `vlrl serve` (nothing of it runs any more): its guard takes the server's whole group
        down, within the guard's SIGTERM and its 15 s grace before SIGKILL."""
        group = self.vllm_pid()
        t0 = time.monotonic()
        self.proc.kill()
        while live_processes_in_group(group) and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        gone = time.monotonic() - t0
        print(f"vLLM's process group empty {gone:.2f} s after kill -9 of vlrl serve")
        assert live_processes_in_group(group) == [] and not port_is_open(self.port)
        assert gone < 20
        self.fh.close()


def prompts(adapter, shapes=((64, 64), (96, 128)), with_text_only=True):
    out = []
    for i, size in enumerate(shapes):
        imgs = [Image.new("RGB", size, (200, 30 * i, 40))] * (1 + i)
        out.append(adapter.encode_prompt(adapter.build_messages("What color is the shape?", len(imgs),
                                                                "You are a helpful assistant."), imgs))
    if with_text_only:
        out.append(adapter.encode_prompt(adapter.build_messages("Say a colour.", 0), []))
    return out


def rollout_cfg(server, **kw) -> RolloutConfig:
    return RolloutConfig(**{"server_url": server.url, "max_new_tokens": 12, **kw})


def trainer_logprobs(adapter, model, rollouts):
    batch = adapter.build_batch(rollouts)
    with torch.no_grad():
        lp, _ = batch_logprobs(adapter.policy(model, 1.0), batch)
    return mismatch_stats(lp, batch.behavior_logprobs, batch.loss_mask)
