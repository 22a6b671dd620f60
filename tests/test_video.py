"""Video end to end on the tiny model: decoding under limits, the one frame policy, prompts (timestamps), the
batch (packed video patches, positions, micro-batches), check-batch, the idle tower pass, bad videos, the
motion task, filmstrips in the reports. The real vLLM server's side is in tests/test_vllm.py."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlrl.adapters.qwen3_vl import PromptError, Qwen3VLAdapter
from vlrl.adapters.video import VideoError, VideoLimits, load_video, processor_video_size
from vlrl.batch import plan_micro_batches
from vlrl.config import ConfigError, EnvConfig, ModelConfig, load_config
from vlrl.data.builtin import builtin_split
from vlrl.data.encode import encode_samples
from vlrl.data.files import load_file_split
from vlrl.errors import UserError
from vlrl.records import Rollout
from vlrl.sample import Sample
from vlrl.summary import read_jsonl
from vlrl.update import batch_logprobs

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
VIDEO_CPU = ROOT / "configs/tiny-cpu-video.toml"


# --- tiny videos, written with PyAV ------------------------------------------------------------------------
def bar_frames(n: int, w: int = 96, h: int = 64) -> list[np.ndarray]:
    """n frames of a white vertical bar 8 px wide whose left edge is at 4 * k (frame k): the frame index is
    readable from the pixels."""
    out = []
    for k in range(n):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:, 4 * k : 4 * k + 8] = 255
        out.append(arr)
    return out


def encode(frames: list[np.ndarray] | None, fps: float = 10, codec: str = "libx264", fmt: str = "mp4",
           audio: bool = False) -> bytes:
    """A video file's bytes (frames None: no video stream; audio: an audio stream too)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        if frames is not None:
            s = c.add_stream(codec, rate=fps)
            s.height, s.width = frames[0].shape[:2] if frames else (64, 64)
            s.pix_fmt = "yuv420p"
            for f in frames:
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        if audio:
            a = c.add_stream("aac", rate=8000)
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate = 8000
            for p in [*a.encode(fr), *a.encode()]:
                c.mux(p)
    return buf.getvalue()


def bar_position(frame: Image.Image) -> float:
    """Mean column of the bright pixels."""
    cols = np.asarray(frame.convert("L")).astype(float).mean(0)
    return float((cols * np.arange(len(cols))).sum() / cols.sum())


@pytest.fixture(scope="module")
def vcfg(tiny_model_dir):
    return ModelConfig(path=str(tiny_model_dir), dtype="float32", min_pixels=64 * 64, max_pixels=128 * 128,
                       max_model_len=1024, max_videos_per_prompt=2, video_min_pixels=4096,
                       video_max_pixels=8192,
                       video_max_frames=8)


@pytest.fixture(scope="module")
def vad(vcfg):
    return Qwen3VLAdapter.from_config(vcfg)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("videos") / "bar.mp4"
    path.write_bytes(encode(bar_frames(20), fps=10))  # 2 s
    return path


# --- decoding and the frame policy -------------------------------------------------------------------------
@pytest.mark.parametrize("codec, fmt", [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("mpeg4", "matroska")])
def test_decoded_frames_are_the_processors_own_sample(vad, vcfg, tmp_path, codec, fmt):
    path = tmp_path / f"bar.{fmt}"
    path.write_bytes(encode(bar_frames(20), fps=10, codec=codec, fmt=fmt))
    v = vad.load_video(path.name, base_dir=tmp_path)  # relative paths resolve against the data's directory
    # 2 s at 10 fps, sampled at model.video_fps = 2: int(20 / 10 * 2) = 4 frames, linspace(0, 19, 4).round()
    assert v.frames_indices == [0, 6, 13, 19] and v.fps == 10 and v.total_num_frames == 20
    import copy

    from transformers.video_utils import VideoMetadata

    # Qwen3VLVideoProcessor's own sampling, with the config's limits
    own = copy.copy(vad.processor.video_processor)
    own.min_frames, own.max_frames = vcfg.video_min_frames, vcfg.video_max_frames
    assert (own.sample_frames(VideoMetadata(total_num_frames=20, fps=10.0), fps=2.0).tolist()
            == v.frames_indices)
    assert v.timestamps == pytest.approx([0.0, 0.6, 1.3, 1.9])
    assert v.duration == pytest.approx(2.0)
    assert [f.size for f in v.frames] == [(96, 64)] * 4  # 6144 pixels: on the 32-grid, within [4096, 8192]
    # the kept frames are the frames at those indices (lossy codecs: within a pixel)
    for f, i in zip(v.frames, v.frames_indices):
        assert abs(bar_position(f) - (4 * i + 3.5)) < 1.0


def test_frame_lists_caps_and_the_token_budget(tiny_model_dir):
    base = dict(path=str(tiny_model_dir), video_min_pixels=1024, video_max_pixels=64 * 64 * 4,
                video_max_frames=8)
    frames = [Image.fromarray(f) for f in bar_frames(20, w=128, h=128)]
    # a list of frames is a video at model.video_fps (2): 20 frames = 10 s -> 20 wanted, capped at 8, evenly
    # spread
    v = Qwen3VLAdapter.from_config(ModelConfig(**base)).load_video(frames)
    assert v.frames_indices == np.linspace(0, 19, 8).round().astype(int).tolist() and v.fps == 2.0
    assert v.frames[0].size == (128, 128)
    # {"frames", "fps"}: 20 frames at 10 fps = 2 s -> 4 frames
    adapter = Qwen3VLAdapter.from_config(ModelConfig(**base))
    assert adapter.load_video({"frames": frames, "fps": 10}).frames_indices == [0, 6, 13, 19]
    # video_max_tokens bounds the whole video: 8 frames = 4 pairs, 24 tokens -> 6 per pair -> frames of <=
    # 6144 px
    tight = Qwen3VLAdapter.from_config(ModelConfig(**base, video_max_tokens=24))
    v = tight.load_video(frames)
    w, h = v.frames[0].size
    assert w % 32 == 0 and h % 32 == 0 and math.ceil(8 / 2) * w * h // 1024 <= 24 and (w, h) == (64, 64)
    # and never more frames than two per token
    assert len(Qwen3VLAdapter.from_config(ModelConfig(**base,
                                                      video_max_tokens=2)).load_video(frames).frames) == 4
    # frames of other sizes take the first sampled frame's size
    mixed = [frames[0], frames[1].resize((64, 64))]
    assert {f.size
            for f in Qwen3VLAdapter.from_config(ModelConfig(**base)).load_video(mixed).frames} == {(128, 128)}


# --- bad videos ------------------------------------------------------------------------------------------
def _no_frames() -> bytes:
    """A Matroska file with a video stream that holds no frame (and an audio stream that has some)."""
    return encode([], fps=10, codec="mpeg4", fmt="matroska", audio=True)


BAD = {
    "text named .mp4": (lambda: b"this is a text file, not a video\n" * 4, "not a readable video file"),
    "truncated (half)": (lambda: encode(bar_frames(20))[: len(encode(bar_frames(20))) // 2],
                         r"not a readable video file|corrupt or truncated|decodable frame"),
    "truncated (90%)": (lambda: encode(bar_frames(20))[: len(encode(bar_frames(20))) * 9 // 10],
                        r"not a readable video file|corrupt or truncated|decodable frame"),
    "zero frames": (_no_frames, r"0 decodable frame\(s\)"),
    "audio only": (lambda: encode(None, audio=True), r"holds no video stream \(only 1 audio stream"),
    "one frame": (lambda: encode(bar_frames(1)), "1 decodable frame"),
    "empty file": (lambda: b"", r"empty \(0 bytes\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_video_files_are_one_clear_error(vad, tmp_path, case):
    make, message = BAD[case]
    path = tmp_path / "clip.mp4"
    path.write_bytes(make())
    with pytest.raises(VideoError, match=message) as err:
        vad.load_video(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("limits, message", [
    (VideoLimits(max_decoded_pixels=1000),
     r"96x64 frames are over the limit of 1000 pixels.*video_max_decoded_pixels"),
    (VideoLimits(max_duration_s=1.5), r"lasts 2 s .*video_max_duration_s"),
    (VideoLimits(decode_timeout_s=1e-9), r"decoding took longer than 1e-09 s.*video_decode_timeout_s"),
    (VideoLimits(max_bytes=100), r"bytes is over the limit of 100 bytes; raise model.video_max_bytes"),
])
def test_limits_on_size_resolution_duration_and_time(vad, mp4, limits, message):
    with pytest.raises(VideoError, match=message):
        load_video(str(mp4), None, limits, vad.frame_policy)


def test_missing_file_and_bad_frame_lists(vad, tmp_path):
    with pytest.raises(VideoError, match="file not found"):
        vad.load_video("nope.mp4", base_dir=tmp_path)
    with pytest.raises(VideoError, match="needs at least 2"):
        vad.load_video([Image.new("RGB", (64, 64))])
    with pytest.raises(VideoError, match="frame.*file not found"):
        vad.load_video(["a.png", "b.png"], base_dir=tmp_path)
    with pytest.raises(VideoError, match="fps 'fast' is not a positive number"):
        vad.load_video({"frames": [Image.new("RGB", (64, 64))] * 2, "fps": "fast"})


def test_bad_videos_are_skipped_and_named_or_stop_the_run(vad, mp4, tmp_path):
    (tmp_path / "text.mp4").write_text("hello\n")
    samples = [Sample(id="good", question="q", videos=[str(mp4)]),
               Sample(id="bad", question="q", videos=["text.mp4"],
                                                                           base_dir=tmp_path)]
    prompts, kept, bad = encode_samples(vad, samples, EnvConfig())
    assert [s.id for s in kept] == ["good"] and len(prompts) == 1
    ((sample, reason),) = bad
    assert sample.id == "bad" and f"video {tmp_path / 'text.mp4'}: not a readable video file" in reason
    with pytest.raises(UserError, match=r"not a readable video file.*on_bad_sample = \"skip\""):
        encode_samples(vad, samples, EnvConfig(on_bad_sample="error"))


# --- prompts ---------------------------------------------------------------------------------------------
def test_prompt_with_an_image_and_two_videos(vad, mp4):
    frames = [Image.fromarray(f) for f in bar_frames(6, w=64, h=64)]
    msgs = vad.build_messages("Which way?", 1, num_videos=2)
    assert [p["type"] for p in msgs[-1]["content"]] == ["image", "video", "video", "text"]
    p = vad.encode_prompt(msgs, [Image.new("RGB", (64, 64))], video_sources=[str(mp4), frames])
    # the mp4: 4 frames of 96x64 -> 2 pairs of 4x6 patches; the list: 6 frames of 64x64 -> 3 pairs of 4x4
    assert p.video_grid_thw.tolist() == [[2, 4, 6], [3, 4, 4]]
    assert p.pixel_values_videos.shape == (2 * 24 + 3 * 16, 1536) and p.num_video_patches == 96
    assert p.image_grid_thw.tolist() == [[1, 4, 4]]
    assert p.input_ids.count(vad.video_token_id) == 2 * 6 + 3 * 4
    text = vad.tokenizer.decode(p.input_ids)
    # each frame pair behind its timestamp, the mean of the pair's index / fps: the mp4's pairs (0, 6) and
    # (13, 19) at 10 fps, then the list's (0, 1), (2, 3), (4, 5) at 2 fps
    assert re.findall(r"<([0-9.]+) seconds>", text) == ["0.3", "1.6", "0.2", "1.2", "2.2"]
    assert text.index("<|image_pad|>") < text.index("<0.3 seconds>")
    with pytest.raises(PromptError, match=r"3 videos is over model.max_videos_per_prompt \(2\).*video=N"):
        vad.encode_prompt(vad.build_messages("q", 0, num_videos=3), [], video_sources=[frames] * 3)


# --- the batch -------------------------------------------------------------------------------------------
def test_batch_packs_videos_by_patch_count_and_positions_equal_transformers(vad, mp4, tiny_model):
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    frames = [Image.fromarray(f) for f in bar_frames(6, w=64, h=64)]
    ps = [
        vad.encode_prompt(vad.build_messages("both", 1, num_videos=1), [img], video_sources=[str(mp4)]),
        vad.encode_prompt(vad.build_messages("text only", 0), []),
        vad.encode_prompt(vad.build_messages("two videos", 0, num_videos=2), [],
                          video_sources=[frames, str(mp4)]),
        vad.encode_prompt(vad.build_messages("image", 1), [img]),
    ]
    torch.manual_seed(0)
    rs = []
    for i, p in enumerate(ps):
        comp = torch.randint(0, 300, (2 + 3 * i,)).tolist()
        rs.append(Rollout(prompt=p, completion_ids=comp, logprobs=[0.0] * len(comp), finish_reason="length"))
    b = vad.build_batch(rs)
    assert b.videos_per_sample == [1, 0, 2, 0] and b.video_patches_per_sample == [48, 0, 48 + 48, 0]
    assert b.images_per_sample == [1, 0, 0, 1] and b.patches_per_sample == [16, 0, 0, 16]
    assert b.vision_patches_per_sample == [64, 0, 96, 16]
    assert b.model_inputs["video_grid_thw"].tolist() == [[2, 4, 6], [3, 4, 4], [2, 4, 6]]
    assert b.model_inputs["pixel_values_videos"].shape == (144, 1536)
    mm = b.model_inputs["mm_token_type_ids"]
    assert torch.equal(mm == 2, b.input_ids == vad.video_token_id) and int((mm == 2).sum()) == 12 + 12 + 12
    # slicing by patch counts: sample 2's rows are its prompt's own
    sub = b.select([2, 1])
    torch.testing.assert_close(sub.model_inputs["pixel_values_videos"], ps[2].pixel_values_videos)
    assert sub.model_inputs["video_grid_thw"].tolist() == [[3, 4, 4], [2, 4, 6]]
    assert "pixel_values" not in sub.model_inputs
    assert "pixel_values_videos" not in b.select([1, 3]).model_inputs
    # positions: built on the host == transformers' get_rope_index (each frame pair its own t = 1 block)
    assert torch.equal(vad.reference_positions(tiny_model, b), b.model_inputs["position_ids"])
    for g in ([2], [0, 3]):
        sub = b.select(g)
        assert torch.equal(vad.reference_positions(tiny_model, sub), sub.model_inputs["position_ids"])
    # micro-batches give the whole batch's logprobs
    policy = vad.policy(tiny_model, 1.0)
    with torch.no_grad():
        whole, _ = batch_logprobs(policy, b)
        for groups in ([[0, 1], [2, 3]], [[3], [1], [0, 2]]):
            for g in groups:
                mb = b.select(g)
                part, _ = batch_logprobs(policy, mb)
                torch.testing.assert_close(part, whole[g, : mb.seq_len], atol=1e-5, rtol=1e-5)
    # the patch budget counts video patches: 100 patches per micro-batch splits [64, 0 | 96 | 16]
    assert plan_micro_batches(b.attention_mask.sum(-1).tolist(), 8, None,
                              b.vision_patches_per_sample, 100) == \
        [[0, 1], [2], [3]]


def test_idle_tower_passes_keep_every_rank_at_two_calls(vad, mp4, tiny_model, tmp_path):
    """Under data parallelism the model calls the vision tower once for images and once for videos; a
    micro-batch lacking either runs it on a blank image instead, so every rank makes the same calls (FSDP
    all-gathers)."""
    import torch.distributed as dist

    img = Image.new("RGB", (64, 64))
    kinds = {
        "image + video": vad.encode_prompt(vad.build_messages("q", 1, num_videos=1), [img],
                                           video_sources=[str(mp4)]),
        "image": vad.encode_prompt(vad.build_messages("q", 1), [img]),
        "video": vad.encode_prompt(vad.build_messages("q", 0, num_videos=1), [], video_sources=[str(mp4)]),
        "text": vad.encode_prompt(vad.build_messages("q", 0), []),
    }
    calls = []
    hook = tiny_model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        policy = vad.policy(tiny_model, 1.0)
        for name, p in kinds.items():
            calls.clear()
            b = vad.build_batch([Rollout(prompt=p, completion_ids=[5, 6], logprobs=[0.0, 0.0],
                                         finish_reason="stop")])
            with torch.no_grad():
                batch_logprobs(policy, b)
            assert len(calls) == 2, name
    finally:
        dist.destroy_process_group()
        hook.remove()


# --- the motion task -------------------------------------------------------------------------------------
def dot_centre(img: Image.Image) -> tuple[float, float]:
    arr = (np.asarray(img).astype(int) != 200).any(-1)
    ys, xs = arr.nonzero()
    return float(xs.mean()), float(ys.mean())


def test_motion_answer_is_in_the_frame_order_only(vad):
    train, ev = builtin_split("motion", "train", 200,
                              64, seed=3), builtin_split("motion", "eval", 50, 64, seed=3)
    assert [s.answer for s in builtin_split("motion", "train", 200, 64, seed=3)] == [s.answer for s in train]
    assert {s.id for s in train}.isdisjoint({s.id for s in ev})
    assert {s.answer for s in train} == {"left", "right", "top", "bottom"}
    assert train[0].question.endswith("Answer with one word: left, right, top or "
                                      "bottom.") and not train[0].images
    for s in train:
        (video,) = s.videos
        first, last = dot_centre(video["frames"][0]), dot_centre(video["frames"][-1])
        dx, dy = last[0] - first[0], last[1] - first[1]
        moved = {"right": dx, "left": -dx, "bottom": dy, "top": -dy}[s.answer]
        assert moved >= 10 and abs(dx if s.answer in ("top", "bottom") else dy) < 0.5
    # left and right paths are the same segments run the other way: their start and end points share a
    # distribution
    def mean_x(answer: str, frame: int) -> float:
        return float(np.mean([dot_centre(s.videos[0]["frames"][frame])[0] for s in train
                              if s.answer == answer]))

    assert abs(mean_x("left", 0)
               - mean_x("right", -1)) < 6 and abs(mean_x("left", -1) - mean_x("right", 0)) < 6
    for word in ("left", "right", "top", "bottom"):  # one token of the tiny tokenizer, bare and after a space
        assert len(vad.tokenizer.encode(word, add_special_tokens=False)) == 1
        assert len(vad.tokenizer.encode(" " + word, add_special_tokens=False)) == 1
    p = vad.encode_prompt(vad.build_messages(train[0].question, 0, num_videos=1), [],
                          video_sources=train[0].videos)
    assert p.video_grid_thw.tolist() == [[2, 4, 4]]  # 8 frames at 4 fps = 2 s -> 4 frames at 2 fps, 2 pairs


# --- check-batch, training, bad samples and filmstrips end to end ------------------------------------------
def test_check_batch_on_the_video_demo_config(tiny_model_dir, tmp_path):
    from vlrl.check_batch import run_check_batch

    cfg = load_config(VIDEO_CPU,
                      [f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "rollout.group_size=4",
                                  "rollout.max_new_tokens=6"])
    report, _ = run_check_batch(cfg, num_prompts=2)
    d = report.to_dict()
    checks = {c["name"]: c["ok"] for c in d["checks"]}
    assert d["ok"] and checks["video tokens vs grid"] and checks["M-RoPE positions"], d["checks"]
    # 2 prompts x 4 samples; each video 2 frames (the first and the last of 8 at 4 fps, sampled at 1 fps), one
    # pair
    assert d["stats"]["videos"] == 8 and d["stats"]["video_frames"] == 8 * 2
    assert d["stats"]["mismatch_kl"] < 1e-6
    assert d["shapes"]["video_grid_thw"] == [8, 3] and d["shapes"]["pixel_values_videos"] == [8 * 16, 1536]
    # (0 + 7) / 2 / 4
    assert "<|video_pad|>x4" in d["sample"]["text"] and "<0.9 seconds>" in d["sample"]["text"]


def test_training_on_a_jsonl_of_videos_skips_bad_ones_and_shows_filmstrips(tiny_model_dir, tmp_path, mp4):
    from vlrl.train import train

    data = tmp_path / "data"
    data.mkdir()
    (data / "clip.mp4").write_bytes(mp4.read_bytes())
    (data / "broken.mp4").write_text("not a video")
    for k in range(3):
        Image.fromarray(bar_frames(3, w=64, h=64)[k]).save(data / f"f{k}.png")
    rows = [
        {"id": "file", "question": "Which way?", "answer": "right", "videos": "clip.mp4"},
        {"id": "frames", "question": "Which way?", "answer": "right",
         "videos": [["f0.png", "f1.png", "f2.png"]]},
        {"id": "broken", "question": "Which way?", "answer": "left", "videos": ["broken.mp4"]},
        {"id": "both", "question": "Which way?", "answer": "left", "images": "f0.png",
         "videos": [{"frames": ["f0.png", "f1.png"], "fps": 1}]},
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "eval.jsonl").write_text(json.dumps(rows[0]) + "\n")
    over = tiny_overrides(tiny_model_dir, tmp_path, f"env.dataset={data / 'train.jsonl'}",
                          f"env.eval_dataset={data / 'eval.jsonl'}", "model.max_videos_per_prompt=1",
                          "model.video_min_pixels=4096", "model.video_max_pixels=8192", "train.steps=2",
                          "rollout.prompts_per_step=4", "rollout.group_size=2", "logging.samples_per_step=8",
                          "algorithm.max_refill_rounds=0",
                          step=())
    samples = load_file_split(load_config(ROOT / "configs/tiny-cpu.toml", over).env, "train", 0)
    assert [s.videos for s in samples][1:3] == [[["f0.png", "f1.png", "f2.png"]], ["broken.mp4"]]
    res = train(load_config(ROOT / "configs/tiny-cpu.toml", over))
    assert res.step == 2
    bad = read_jsonl(res.run_dir / "bad_samples.jsonl")
    assert {b["sample_id"] for b in bad} == {"broken"}
    assert all("broken.mp4: not a readable video file" in b["reason"] for b in bad)
    logged = read_jsonl(res.run_dir / "samples.jsonl")
    with_video = [s for s in logged if s.get("videos")]
    assert with_video and {s["sample_id"] for s in logged} <= {"file", "frames", "both"}
    for s in with_video:  # a filmstrip of the sampled frames: frames side by side, 96 px high
        strip = Image.open(res.run_dir / s["videos"][0])
        n = {"file": 4, "frames": 3, "both": 2}[s["sample_id"]]
        fw = 144 if s["sample_id"] == "file" else 96
        assert strip.size == (n * (fw + 2) - 2, 96)
    html = (res.run_dir / "report.html").read_text()
    assert html.count('<div class="film">') >= len(with_video) and "video 1: sampled frames" in html


def test_eval_of_the_motion_task_shows_filmstrips(tiny_model_dir, tmp_path):
    from rich.console import Console

    from vlrl.evaluate import run_eval

    cfg = load_config(VIDEO_CPU,
                      [f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "rollout.max_new_tokens=4",
                                  "logging.progress=false"])
    summary = run_eval(cfg, None, "eval", n=2, limit=3, console=Console(quiet=True))
    out = Path(summary["out_dir"])
    records = read_jsonl(out / "samples.jsonl")
    assert len(records) == 6 and all(len(r["videos"]) == 1 and r["images"] == [] for r in records)
    assert Image.open(out / records[0]["videos"][0]).size == (2 * (96 + 2) - 2, 96)
    assert (out / "report.html").read_text().count('<div class="film">') == 3  # one per prompt


# --- config and serve --------------------------------------------------------------------------------------
def test_config_rules_and_the_serve_command(tmp_path):
    from vlrl.serve import build_command

    with pytest.raises(ConfigError, match="max_videos_per_prompt .* at most 1 with a vLLM server"):
        load_config(VIDEO_CPU, ["model.max_videos_per_prompt=2", "rollout.server_url='http://127.0.0.1:1'"])
    with pytest.raises(ConfigError, match="video_min_frames .* larger than"):
        load_config(VIDEO_CPU, ["model.video_min_frames=9"])
    with pytest.raises(ConfigError, match="video_min_pixels .* larger than"):
        load_config(VIDEO_CPU, ["model.video_min_pixels=8192"])
    cmd = build_command("M", limit_mm_per_prompt="image=4,video=1", min_pixels=100, max_pixels=200,
                        video_max_pixels=4096, video_max_frames=8)
    mm = json.loads(cmd[cmd.index("--mm-processor-kwargs") + 1])
    assert mm["images_kwargs"] == {"size": {"shortest_edge": 100, "longest_edge": 200}}
    assert mm["videos_kwargs"]["size"] == processor_video_size(4096, 8) == {"shortest_edge": 2048,
                                                                            "longest_edge": 40960}
    assert json.loads(cmd[cmd.index("--media-io-kwargs") + 1]) == {"video": {"num_frames": -1}}
    assert "--trust-request-mm-kwargs" in cmd
    plain = build_command("M", limit_mm_per_prompt="image=4", min_pixels=100, max_pixels=200)
    assert "--trust-request-mm-kwargs" not in plain and "--media-io-kwargs" not in plain
