"""Video for the Qwen3-VL adapter: decoding under limits, and the one frame policy trainer and server share.

Sources, as for images: a file path (relative paths resolve against the dataset's directory), `file://`, an
http(s) URL, a data URI, bare base64 or the bytes of a video file (mp4, webm, mkv, mov, avi...); or the frames
themselves: a list of images (any image source), taken as a video at `model.video_fps`, or
`{"frames": [...], "fps": F}`.

Decoder: PyAV (`av`), FFmpeg's own libraries. Its wheels bundle FFmpeg for Linux (x86-64, aarch64), macOS and
Windows, so `pip install` is the whole set-up, here and on GPU machines; it is maintained (releases every few
months) and transformers' own `load_video` uses it. The others do not fit: torchvision 0.29 no longer decodes
video (`torchvision.io.read_video` is gone), torchcodec is built against one torch release and needs FFmpeg
installed on the system, and decord's last release dates from 2021 (no wheels for current Pythons). vLLM's
OpenCV loader is never used: the server receives the decoded frames.

The frame policy (`FramePolicy`), applied once, by the trainer:
- which frames: the video processor's own `sample_frames` (Qwen3VLVideoProcessor): int(total / source fps *
  model.video_fps) frames, clamped to [video_min_frames, video_max_frames] and to the video's length, spread
  evenly over it (`linspace(0, total - 1, n).round()`);
- what size: one size for every frame of a video, by the image processor's `smart_resize` (multiples of 32),
  in [video_min_pixels, video_max_pixels] per frame, lowered until the video's tokens (ceil(frames / 2) x
  h x w / 32^2: two frames share each token grid) fit video_max_tokens.
The processor then keeps the frames as they are (its own resize is the identity on them:
`processor_video_size`), and the vLLM server is sent the same frames as lossless PNGs with their source
indices and frame rate, so both write the same timestamps (`<1.5 seconds>`: the mean of each frame pair's
index / fps) and the same tokens.

Limits: encoded bytes (`video_max_bytes`), frame area before resizing (`video_max_decoded_pixels`, checked on
the stream header and on every decoded frame), duration (`video_max_duration_s`, by the header and by the
frame count), and time (`video_decode_timeout_s`, checked between packets and frames; a single FFmpeg call is
not interrupted, so the bound holds for any file whose packets each decode in finite time).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .images import (
    ImageLimits,
    MediaError,
    decode_image,
    describe_source,
    read_bytes,
    resolve_source,
    target_size,
)

# Every Qwen3-VL: 16-pixel patches merged 2 x 2 (so sizes are multiples of 32), two frames per temporal patch.
FACTOR = 32
TEMPORAL_PATCH = 2


class VideoError(MediaError):
    """A video the user supplied cannot be used; the message names the source and what to do."""


@dataclass(frozen=True)
class VideoLimits:
    """Limits that keep video fetching and decoding bounded."""

    max_bytes: int = 256 * 1024 * 1024
    """Largest encoded video accepted (file, download or base64 payload)."""
    max_decoded_pixels: int = 4096 * 4096
    """Largest frame area accepted before resizing."""
    max_duration_s: float = 3600.0
    """Longest video accepted, in seconds."""
    timeout_s: float = 10.0
    """Connect/read timeout for http(s) videos."""
    decode_timeout_s: float = 60.0
    """Most seconds decoding one video may take."""


@dataclass
class Video:
    """A video after the frame policy: its sampled frames, resized, and where they sit in the source."""

    frames: list[Image.Image]
    """RGB frames, all of one size (multiples of 32): what the processor and the sampler receive."""
    fps: float
    """Frame rate of the source: a frame's time is its index / fps seconds."""
    frames_indices: list[int]
    """Index in the source of each sampled frame."""
    total_num_frames: int
    """Frames in the source."""
    duration: float
    """Length of the source in seconds."""
    source: str = ""
    """Printable name of the source."""

    @property
    def timestamps(self) -> list[float]:
        """Seconds into the source of each sampled frame."""
        return [i / self.fps for i in self.frames_indices]

    def array(self) -> np.ndarray:
        """[T, H, W, 3] uint8: the frames as the processor takes them."""
        return np.stack([np.asarray(f) for f in self.frames])

    def metadata(self) -> dict:
        """The sampling, as transformers' `VideoMetadata` and vLLM's `media_io_kwargs["video"]` take it: the
        processor writes each frame pair's timestamp from `frames_indices` / `fps`."""
        return {"fps": self.fps, "frames_indices": list(self.frames_indices),
                "total_num_frames": self.total_num_frames, "duration": self.duration}

    def filmstrip(self, height: int = 96) -> Image.Image:
        """The frames side by side (each `height` pixels high, 2 pixels apart), for reports."""
        w, h = self.frames[0].size
        fw = max(1, round(w * height / h))
        strip = Image.new("RGB", (len(self.frames) * (fw + 2) - 2, height), (255, 255, 255))
        for k, f in enumerate(self.frames):
            strip.paste(f.resize((fw, height), Image.Resampling.NEAREST if h < height
                                 else Image.Resampling.BICUBIC),
                        (k * (fw + 2), 0))
        return strip


@dataclass(frozen=True)
class FramePolicy:
    """Which frames of a video are used, and at what size (see the module docstring)."""

    fps: float
    min_pixels: int
    max_pixels: int
    max_tokens: int
    max_frames: int
    sampler: Any = field(repr=False)
    """A copy of the model's video processor carrying the frame limits: its `sample_frames` picks frames."""

    @classmethod
    def from_config(cls, cfg, video_processor) -> FramePolicy:
        """The policy of a `ModelConfig`, picking frames with `video_processor`'s own sampling."""
        import copy

        # at most two frames per token: a video of `max_tokens` tokens holds at least one token per frame pair
        max_frames = min(cfg.video_max_frames, TEMPORAL_PATCH * cfg.video_max_tokens)
        sampler = copy.copy(video_processor)  # the model's processor (saved with checkpoints) stays as it is
        sampler.min_frames, sampler.max_frames = min(cfg.video_min_frames, max_frames), max_frames
        return cls(cfg.video_fps, cfg.video_min_pixels, cfg.video_max_pixels, cfg.video_max_tokens,
                   max_frames, sampler)

    def indices(self, total: int, source_fps: float) -> list[int]:
        """Source indices of the frames sampled from a video of `total` frames at `source_fps`."""
        from transformers.video_utils import VideoMetadata

        picked = self.sampler.sample_frames(VideoMetadata(total_num_frames=total, fps=source_fps),
                                            fps=self.fps)
        return [int(i) for i in picked]

    def frame_size(self, frames: int, width: int, height: int) -> tuple[int, int]:
        """(width, height) of every sampled frame of a `width` x `height` video of which `frames` are kept."""
        groups = -(-frames // TEMPORAL_PATCH)
        budget = min(self.max_pixels, self.max_tokens * FACTOR * FACTOR // groups)
        return target_size(width, height, min(self.min_pixels, budget), budget, FACTOR)

    @property
    def processor_size(self) -> dict[str, int]:
        return processor_video_size(self.max_pixels, self.max_frames)


def processor_video_size(max_pixels: int, max_frames: int) -> dict[str, int]:
    """The video processor's `size` (its budget over a whole video) under which its own resize leaves every
    frame the policy makes unchanged: the trainer passes it, and `vlrl serve` gives it to the server. The
    processor rounds the frame count to an even number (at most one more frame) before comparing."""
    return {"shortest_edge": TEMPORAL_PATCH * FACTOR * FACTOR, "longest_edge": max_pixels
            * (max_frames + TEMPORAL_PATCH)}


def processor_video_kwargs(max_pixels: int, max_frames: int) -> dict:
    """The video processor's settings under which it keeps the frame policy's frames as they are (the server's
    `videos_kwargs`): the size above, and no per-frame pixel cap where the processor has one."""
    kwargs: dict = {"size": processor_video_size(max_pixels, max_frames)}
    try:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        if hasattr(Qwen3VLVideoProcessor, "cap_pixels_per_frame"):  # transformers >= 5.19
            kwargs["cap_pixels_per_frame"] = False  # as the trainer: its cap could shrink the frames
    except ImportError:
        pass
    return kwargs


def load_video(source: Any, base_dir: Path | None, limits: VideoLimits, policy: FramePolicy,
               image_limits: ImageLimits = ImageLimits()) -> Video:
    """Any supported video source -> its frames under the frame policy (VideoError names the source)."""
    if isinstance(source, dict) and "frames" in source:
        return _from_frames(list(source["frames"]), source.get("fps"), base_dir, policy, image_limits)
    if isinstance(source, (list, tuple)):
        return _from_frames(list(source), None, base_dir, policy, image_limits)
    shown = describe_source(resolve_source(source, base_dir))
    data = read_bytes(source, base_dir, limits, "video", VideoError)
    return _decode(data, shown, limits, policy)


def _from_frames(frames: list, fps: float | None, base_dir, policy: FramePolicy,
                 limits: ImageLimits) -> Video:
    shown = f"<{len(frames)} frames: {describe_source(frames[0]) if frames else 'none'}, ...>"
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
        raise VideoError(f"video {shown}: fps {fps!r} is not a positive number")
    fps = float(fps or policy.fps)
    if len(frames) < TEMPORAL_PATCH:
        raise VideoError(f"video {shown}: {len(frames)} frame(s); a video needs at least {TEMPORAL_PATCH} "
                         "(give a single frame as an image)")
    indices = policy.indices(len(frames), fps)
    try:
        picked = [decode_image(frames[i], base_dir, limits) for i in indices]
    except MediaError as e:
        raise VideoError(f"video {shown}: {e}") from None
    size = _size(policy, len(picked), *picked[0].size, shown)
    return Video([_fit(f, size) for f in picked], fps, indices, len(frames), len(frames) / fps, shown)


def _size(policy: FramePolicy, frames: int, width: int, height: int, shown: str) -> tuple[int, int]:
    try:
        return policy.frame_size(frames, width, height)
    except ValueError as e:  # smart_resize refuses aspect ratios above 200
        raise VideoError(f"video {shown}: {width}x{height} frames cannot be used ({e}); crop or pad "
                         "them") from None


def _fit(frame: Image.Image, size: tuple[int, int]) -> Image.Image:
    frame = frame.convert("RGB") if frame.mode != "RGB" else frame
    return frame if frame.size == size else frame.resize(size, Image.Resampling.BICUBIC)


def _decode(data: bytes, shown: str, limits: VideoLimits, policy: FramePolicy) -> Video:
    """Two passes over the file: demux only, to count the frames (no decoding), then decode up to the last
    sampled frame, keeping (and resizing at once) only the sampled ones."""
    import av

    deadline = time.monotonic() + limits.decode_timeout_s

    def in_time() -> None:
        if time.monotonic() > deadline:
            raise VideoError(f"video {shown}: decoding took longer than {limits.decode_timeout_s:g} s; "
                             "shorten the video or raise model.video_decode_timeout_s")

    def area_ok(width: int, height: int) -> None:
        if width * height > limits.max_decoded_pixels:
            raise VideoError(f"video {shown}: {width}x{height} frames are over the limit of "
                             f"{limits.max_decoded_pixels} "
                             "pixels; downscale it or raise model.video_max_decoded_pixels")

    def too_long(seconds: float, how: str) -> None:
        if seconds > limits.max_duration_s:
            raise VideoError(f"video {shown}: lasts {seconds:.0f} s ({how}), over model.video_max_duration_s "
                             f"({limits.max_duration_s:g} s); cut it or raise the limit")

    try:
        container = av.open(io.BytesIO(data), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"video {shown}: not a readable video file ({_reason(e)}; {len(data)} "
                         "bytes)") from None
    try:
        with container:
            if not container.streams.video:
                audio = len(container.streams.audio)
                raise VideoError(f"video {shown}: holds no video stream"
                                 + (f" (only {audio} audio stream(s))" if audio else ""))
            stream = container.streams.video[0]
            area_ok(stream.codec_context.width, stream.codec_context.height)
            duration = _duration(container, stream)
            too_long(duration, "by its header")
            total = 0
            for packet in container.demux(stream):
                total += packet.size > 0  # the flush packet at the end is empty
                if total % 32 == 0:
                    in_time()
            fps = _frame_rate(stream, total, duration)  # while open: PyAV 18 refuses a closed stream's fields
        if total < TEMPORAL_PATCH:
            raise VideoError(f"video {shown}: {total} decodable frame(s) (truncated, or not a video?); a "
                             f"video needs at least {TEMPORAL_PATCH}")
        too_long(total / fps, f"{total} frames at {fps:g} fps")
        indices = policy.indices(total, fps)
        wanted = set(indices)
        kept: dict[int, Image.Image] = {}
        size = None
        with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                in_time()
                area_ok(frame.width, frame.height)
                if i in wanted:
                    size = size or _size(policy, len(indices), frame.width, frame.height, shown)
                    kept[i] = _fit(frame.to_image(), size)
                if i >= indices[-1]:
                    break
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:  # (FFmpeg's errors are OSErrors/ValueErrors)
        raise VideoError(f"video {shown}: corrupt or truncated ({_reason(e)})") from None
    if len(kept) < len(indices):
        raise VideoError(f"video {shown}: corrupt or truncated: {len(kept)} of the {len(indices)} sampled "
                         f"frames decode (the container lists {total})")
    return Video([kept[i] for i in indices], fps, indices, total, duration or total / fps, shown)


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _duration(container, stream) -> float:
    """Seconds, from the stream's header, else the container's; 0 when neither says."""
    import av

    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def _frame_rate(stream, frames: int, duration: float) -> float:
    """The stream's average frame rate; else frames / duration; else 24 (transformers' own fallback)."""
    rate = stream.average_rate or stream.guessed_rate
    if rate and float(rate) > 0:
        return float(rate)
    return frames / duration if duration > 0 else 24.0
