"""Checkpoints: an HF-format model + processor (servable by vLLM as is) plus the trainer's state.

Layout: `runs/NAME/step-N/` holds `model.safetensors` (+ config, processor, chat template) and
`trainer_state.pt` (optimizer, scheduler, step, RNG, data position). A checkpoint is written into a hidden
temporary directory and renamed into place only when complete, then `runs/NAME/latest` is replaced
atomically; a kill at any moment leaves the previous checkpoint whole and loadable. Model weights are
safetensors only; the trainer state is loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .atomic import write_atomic
from .errors import UserError

STATE_FILE = "trainer_state.pt"
COMPLETE = "COMPLETE"


class CheckpointError(UserError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in `run_dir`, ascending."""
    steps = []
    for d in Path(run_dir).glob("step-*"):
        if d.is_dir() and (d / COMPLETE).is_file() and d.name[5:].isdigit():
            steps.append(int(d.name[5:]))
    return sorted(steps)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (the `latest` pointer if valid, else a scan)."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        d = run_dir / pointer.read_text().strip()
        if (d / COMPLETE).is_file():
            return d
    steps = checkpoint_steps(run_dir)
    return run_dir / f"step-{steps[-1]}" if steps else None


def save_checkpoint(
    run_dir: Path, step: int, save_model, trainer_state: dict, keep_last: int
) -> Path:
    """Write `step-N` atomically. `save_model(dir)` writes the HF model and processor into `dir`."""
    run_dir = Path(run_dir)
    final = run_dir / f"step-{step}"
    tmp = run_dir / f".step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_model(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / COMPLETE).write_text(f"{step}\n")
        for f in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if f.is_dir():
                _fsync_dir(f)
            else:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint is intact. "
            "Free disk space or change output_dir, then resume with --resume"
        ) from None
    if final.exists():  # re-saving a step (e.g. after a resume): swap, never leave the step missing
        old = run_dir / f".step-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(run_dir)
    write_atomic(run_dir / "latest", final.name + "\n", durable=True)
    for s in checkpoint_steps(run_dir)[:-keep_last]:
        shutil.rmtree(run_dir / f"step-{s}", ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {STATE_FILE}; it is incomplete or not a vlrl "
                              "checkpoint")
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read lazily (see fsdp.py)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a plain trainer state (tensors, numbers, strings); refusing to unpickle it ({e})"
        ) from None
