"""The process between `vlrl serve` and the vLLM server: the vLLM server goes when `vlrl serve` goes, however
it goes (kill -KILL included), so no orphan keeps the port or the GPU memory.

`vlrl serve` starts `python .../serve_guard.py PARENT_PID -- VLLM_ARGV...` as the leader of a new session and
process group; the guard starts vLLM as its child in that group (vLLM's engine-core and worker processes join
it too). The guard
- watches its parent: when `vlrl serve` is gone (its parent pid changes), it sends SIGTERM to the whole group
  (vLLM's own shutdown stops its engine), waits up to `GRACE_S`, then SIGKILLs the group, itself included;
- on Linux also asks the kernel to send the vLLM API server SIGTERM should the guard itself die
  (prctl PR_SET_PDEATHSIG), so even a guard killed alone leaves no server behind;
- ignores Ctrl-C, SIGTERM and SIGHUP sent to the group (`vlrl serve` stops the group that way: vLLM handles
  them, and the guard waits for it), and exits with vLLM's exit code (128 + N when a signal N ended it).
Parent watching is polling (every `POLL_S`), so it works on every POSIX system; only the PDEATHSIG
belt-and-braces is Linux-only. Nothing heavy is imported: the guard starts in a few tens of milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2
GRACE_S = 15.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the vLLM child, before exec (Linux): SIGTERM when the guard dies. Elsewhere: nothing (the guard's
    parent watch still covers `vlrl serve` dying)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _end_group(child: subprocess.Popen) -> None:
    """SIGTERM to the group, up to GRACE_S for vLLM to stop its engine, then SIGKILL to whatever is left (and
    to the guard itself, which is in the group)."""
    try:
        os.killpg(0, signal.SIGTERM)
        child.wait(GRACE_S)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[argv.index("--") + 1:]
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # a handler, not SIG_IGN: an ignored signal would stay ignored in vLLM across exec
        signal.signal(s, lambda *_: None)
    if os.getppid() != parent:  # `vlrl serve` died before we got here
        return 1
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    while child.poll() is None:
        if os.getppid() != parent:
            _end_group(child)
        time.sleep(POLL_S)
    code = child.returncode
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
