"""Image references for logged rollouts: the source path/URL when there is one, else a PNG in the run; and a
filmstrip PNG of each video's sampled frames (what the model saw of it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image

from .adapters.images import resolve_source


def image_refs(rollout, image_dir: Path, run_dir: Path) -> list[str]:
    """Printable references to the rollout's images. In-memory images (built-in tasks) are written once to
    `image_dir` and referenced relative to `run_dir`, so a report in the run directory can show them."""
    sample = rollout.sample
    refs = []
    for k, src in enumerate(getattr(sample, "images", []) or []):
        if isinstance(src, (str, Path)) and not str(src).startswith("data:") and len(str(src)) < 1024:
            refs.append(str(resolve_source(src, sample.base_dir)))
            continue
        img = rollout.prompt.images[k] if k < len(rollout.prompt.images) else None
        if not isinstance(img, Image.Image):
            refs.append(f"<image {k}>")
            continue
        refs.append(_saved(img, image_dir / f"{sample.id}-{k}.png", run_dir))
    return refs


def rollout_record(rollout, image_dir: Path, run_dir: Path, images: list[str] | None = None) -> dict:
    """What samples.jsonl (training and eval) says of a rollout: its sample, its images (`images`: already
    written refs, else written now), a filmstrip of each video, the completion (a multi-turn trajectory whole,
    tool results included), the images its environment returned, and how it ended."""
    s = rollout.sample
    record = {
        "sample_id": s.id,
        "question": s.question,
        "answer": None if s.answer is None else str(s.answer),
        "images": images if images is not None else image_refs(rollout, image_dir, run_dir),
        "completion": rollout.transcript or rollout.text,
        "finish_reason": rollout.finish_reason,
    }
    videos = getattr(rollout.prompt, "videos", None) or []
    if videos:  # a filmstrip of each video's sampled frames, written once
        record["videos"] = [_saved(v.filmstrip(), image_dir / f"{s.id}-video-{k}.png", run_dir)
                            for k, v in enumerate(videos)]
    if rollout.turns > 1 or rollout.env_images:
        record.update(turns=rollout.turns, tool_calls=rollout.tool_calls,
                      env_images=env_image_refs(rollout, image_dir, run_dir))
    return record


def env_image_refs(rollout, image_dir: Path, run_dir: Path) -> list[str]:
    """The images an environment returned in the rollout (tool results), written under `image_dir` by content
    (each trajectory has its own) and referenced relative to `run_dir`."""
    return [_saved(img, image_dir / f"env-{hashlib.sha1(img.tobytes()).hexdigest()[:16]}.png", run_dir)
            for img in rollout.env_images]


def _saved(img: Image.Image, path: Path, run_dir: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        img.save(tmp, "PNG")
        os.replace(tmp, path)
    return str(path.relative_to(run_dir))
