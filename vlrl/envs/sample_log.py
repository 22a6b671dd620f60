"""Image references for logged rollouts: the source path/URL when there is one, else a PNG in the run."""

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
        image_dir.mkdir(parents=True, exist_ok=True)
        path = image_dir / f"{sample.id}-{k}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            img.save(tmp, "PNG")
            os.replace(tmp, path)
        refs.append(str(path.relative_to(run_dir)))
    return refs
