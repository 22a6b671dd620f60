"""Image references for logged rollouts: the source path/URL when there is one, else a PNG in the run; and a
filmstrip PNG of each video's sampled frames (what the model saw of it)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ..adapters.images import resolve_source


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
        refs.append(_png(img, image_dir / f"{sample.id}-{k}.png", run_dir))
    return refs


def media_refs(rollout, image_dir: Path, run_dir: Path) -> dict[str, list[str]]:
    """`{"images": image_refs(...)}`, and for a rollout with videos `"videos"`: a filmstrip PNG of each video's
    sampled frames, written once to `image_dir`, referenced relative to `run_dir`."""
    refs = {"images": image_refs(rollout, image_dir, run_dir)}
    videos = getattr(rollout.prompt, "videos", None) or []
    if videos:
        refs["videos"] = [_png(v.filmstrip(), image_dir / f"{rollout.sample.id}-video-{k}.png", run_dir)
                          for k, v in enumerate(videos)]
    return refs


def _png(img: Image.Image, path: Path, run_dir: Path) -> str:
    """Write `img` to `path` once (atomically); its path relative to `run_dir`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        img.save(tmp, "PNG")
        os.replace(tmp, path)
    return str(path.relative_to(run_dir))
