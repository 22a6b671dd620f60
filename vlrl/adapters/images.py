"""Image loading for the Qwen3-VL adapter: every source a dataset may hold, one pixel policy.

Sources: a file path (relative paths resolve against the dataset's directory), `file://`, `http(s)://` URLs
(fetched with httpx under a timeout and a byte limit), `data:` URIs, bare base64, raw bytes and PIL images.
Every image is converted to RGB (alpha flattened onto white; palette, grayscale, 16-bit and CMYK handled),
turned upright by its EXIF orientation, and resized into [min_pixels, max_pixels] with the processor's own
`smart_resize`, so the trainer and the vLLM server (which receives the already-resized image) see the same
grid of patches and the same number of image tokens.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s]+$")


class MediaError(UserError):
    """An image or video the user supplied cannot be used; the message names the source and what to do."""


class ImageError(MediaError):
    """An image the user supplied cannot be used; the message names the source and what to do."""


@dataclass(frozen=True)
class ImageLimits:
    """Limits that keep image fetching and decoding bounded."""

    max_bytes: int = 32 * 1024 * 1024
    """Largest encoded image accepted (file, download or base64 payload)."""
    max_decoded_pixels: int = 64 * 1024 * 1024
    """Largest image area accepted before resizing (decompression-bomb guard)."""
    timeout_s: float = 10.0
    """Connect/read timeout for http(s) images."""


def describe_source(source: Any) -> str:
    """A short, printable name for an image source (base64 payloads are abbreviated)."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height} {source.mode}>"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    s = str(source)
    if s.startswith("data:") or (len(s) > 120 and _BASE64_RE.match(s[:200])):
        return f"{s[:40]}... ({len(s)} chars)"
    return s


def _decode_base64(payload: str, source: Any, kind: str = "image",
                   error: type[MediaError] = ImageError) -> bytes:
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise error(f"{kind} {describe_source(source)}: invalid base64 ({e})") from None


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _fetch_url(url: str, limits, kind: str = "image", error: type[MediaError] = ImageError) -> bytes:
    """Download `url` under the limits' timeout and byte cap; `kind` ("image"/"video") names it in errors."""
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.timeout_s, follow_redirects=True) as r:
            if r.status_code != 200:
                raise error(f"{kind} {url}: HTTP {r.status_code}; check the URL")
            ctype = r.headers.get("content-type", "")
            if ctype and not (ctype.startswith(f"{kind}/") or ctype.startswith("application/octet-stream")):
                raise error(f"{kind} {url}: the server sent {ctype.split(';')[0]}, not {_a(kind)}; check the "
                            "URL")
            declared = int(r.headers.get("content-length") or 0)
            if declared > limits.max_bytes:
                raise error(f"{kind} {url}: {declared} bytes is over the limit of {limits.max_bytes} bytes; "
                            f"raise model.{kind}_max_bytes or shrink the file")
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > limits.max_bytes:
                    raise error(f"{kind} {url}: larger than the limit of {limits.max_bytes} bytes; "
                                f"raise model.{kind}_max_bytes or shrink the file")
            return bytes(buf)
    except httpx.TimeoutException:
        raise error(f"{kind} {url}: timed out after {limits.timeout_s:g} s; check the URL or the "
                    "network") from None
    except httpx.HTTPError as e:
        raise error(f"{kind} {url}: could not be fetched ({type(e).__name__}: {e})") from None


def read_bytes(source: Any, base_dir: Path | None, limits, kind: str = "image",
               error: type[MediaError] = ImageError) -> bytes:
    """The encoded bytes of a path, `file://`, http(s) URL, data URI, bare base64 or bytes, within
    `limits.max_bytes` (and `limits.timeout_s` for URLs); `kind` ("image"/"video") names it in errors."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, Path) or isinstance(source, str):
        s = str(source).strip()
        if s.startswith(("http://", "https://")):
            return _fetch_url(s, limits, kind, error)
        if s.startswith("data:"):
            head, _, payload = s.partition(",")
            if ";base64" not in head:
                raise error(f"{kind} {describe_source(s)}: only base64 data URIs are supported")
            data = _decode_base64(payload, s, kind, error)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s) and not s.startswith("file://"):
            scheme = s.split("://", 1)[0]
            raise error(f"{kind} {s}: the {scheme}:// scheme is not allowed; use a path, http(s), or data "
                        "URI")
        else:
            path = Path(resolve_source(s.removeprefix("file://"), base_dir))
            if path.is_file():
                size = path.stat().st_size
                if size > limits.max_bytes:
                    raise error(f"{kind} {path}: {size} bytes is over the limit of {limits.max_bytes} bytes; "
                                f"raise model.{kind}_max_bytes or shrink the file")
                data = path.read_bytes()
            elif len(s) > 64 and _BASE64_RE.match(s):
                data = _decode_base64(s, s, kind, error)
            else:
                raise error(f"{kind} {path}: file not found; check the path (relative paths resolve "
                            f"against {base_dir or 'the working directory'})")
    else:
        raise error(f"{kind} {describe_source(source)}: unsupported source type {type(source).__name__}")
    if len(data) > limits.max_bytes:
        raise error(f"{kind} {describe_source(resolve_source(source, base_dir))}: {len(data)} bytes is over "
                    f"the limit of {limits.max_bytes} bytes; raise model.{kind}_max_bytes or shrink the file")
    if not data:
        raise error(f"{kind} {describe_source(resolve_source(source, base_dir))}: empty (0 bytes)")
    return data


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with alpha flattened onto white; palette, grayscale, 16-bit/float and CMYK converted."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # Scale high-bit-depth grayscale into 8 bits rather than clipping it.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = arr * (255.0 / hi) if hi > 255 else arr
        img = Image.fromarray(arr.clip(0, 255).astype("uint8"), mode="L")
    return img.convert("RGB") if img.mode != "RGB" else img


def resolve_source(source: Any, base_dir: Path | None) -> Any:
    """A relative file path resolved against `base_dir` (the dataset's directory): where it is read from,
    how messages and logs name it. Any other source (URL, data URI, absolute path, base64, bytes, an image)
    is returned unchanged."""
    if isinstance(source, (str, Path)) and base_dir is not None:
        s = str(source)
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", s) and not Path(s).is_absolute() and len(s) < 1024:
            return str(Path(base_dir) / s)
    return source


# What decoding an untrusted file can raise, beyond Pillow's documented OSError: found by fuzzing PNG, JPEG,
# GIF, TIFF, BMP, WebP, ICO, TGA and PPM files (tests/test_images.py). A `Warning` is an exception only when
# warnings are errors (`python -W error`, pytest's filterwarnings), e.g. "Tag data larger than file" from a
# broken EXIF.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError, struct.error,
                  ZeroDivisionError, Warning)


def _bomb(shown: Any, pixels: int | str, limits: ImageLimits) -> ImageError:
    return ImageError(f"image {describe_source(shown)}: {pixels} pixels is over the limit of "
                      f"{limits.max_decoded_pixels} (decompression-bomb guard); downscale it or raise "
                      "model.image_max_decoded_pixels")


def _pillow_allows(max_pixels: int) -> None:
    """Pillow refuses images over twice `Image.MAX_IMAGE_PIXELS` (~179 Mpx) on its own, before our guard: when
    model.image_max_decoded_pixels allows more, Pillow's limit follows it (only ever upwards)."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(source: Any, base_dir: Path | None = None,
                 limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Load any supported source into an upright RGB PIL image (not resized).

    Every failure of the image library (open, EXIF, decode, mode conversion; Pillow's own decompression-bomb
    error and warning) becomes an `ImageError` naming the source, so a bad image is a skipped sample.
    """
    shown = resolve_source(source, base_dir)
    data = None if isinstance(source, Image.Image) else read_bytes(source, base_dir, limits)
    _pillow_allows(limits.max_decoded_pixels)
    try:
        img = source if data is None else Image.open(io.BytesIO(data))
        if img.width * img.height > limits.max_decoded_pixels:
            raise _bomb(shown, f"{img.width}x{img.height}", limits)
        img = ImageOps.exif_transpose(img)
        img.load()
        return to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"image {describe_source(shown)}: not a recognised image format "
                         f"(is it an image file? {len(data or b'')} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb(shown, m.group(1) if m else "too many", limits) from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"image {describe_source(shown)}: corrupt or truncated ({type(e).__name__}: "
                         f"{e})") from None


def target_size(width: int, height: int, min_pixels: int, max_pixels: int, factor: int) -> tuple[int, int]:
    """(width, height) the processor would resize to: multiples of `factor`, area in [min, max] pixels."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def fit_image(img: Image.Image, min_pixels: int, max_pixels: int, factor: int,
              source: Any = None) -> Image.Image:
    """Resize to the pixel policy; an image already on the policy's grid is returned unchanged."""
    try:
        w, h = target_size(img.width, img.height, min_pixels, max_pixels, factor)
    except ValueError as e:  # smart_resize refuses aspect ratios above 200
        raise ImageError(f"image {describe_source(source if source is not None else img)}: "
                         f"{img.width}x{img.height} cannot be used ({e}); crop or pad it") from None
    if (w, h) == img.size:
        return img
    try:
        return img.resize((w, h), Image.Resampling.BICUBIC)
    except _DECODE_ERRORS as e:  # a PIL image given as is may still be lazily decoded
        raise ImageError(f"image {describe_source(source if source is not None else img)}: could not be "
                         f"resized to {w}x{h} ({type(e).__name__}: {e})") from None
