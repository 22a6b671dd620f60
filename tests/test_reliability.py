"""Reliability and security: every bad input is handled (and counted) or refused with a message that names
the sample, file, field or URL; faults during checkpoints lose nothing. (Server faults: tests/test_vllm.py,
tests/test_server_faults.py; reward faults: tests/test_rewards.py and tests/test_train.py; config values:
tests/test_config.py.)"""

from __future__ import annotations

import base64
import errno
import http.server
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_images import header_only_png

from vlrl.checkpoint import CheckpointError, latest_checkpoint, load_trainer_state, save_checkpoint
from vlrl.summary import read_jsonl
from vlrl.train import train

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def png(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/stall.png":
            time.sleep(5)
        if self.path == "/page.html":
            body, ctype = b"<html>a web page, not an image</html>", "text/html"
        else:
            body, ctype = png(Image.new("RGB", (64, 64), (0, 0, 255))), "image/png"
        try:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def web():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def bad_dataset(tmp_path: Path, web: str) -> tuple[Path, dict[str, str], list[str]]:
    """A JSONL file with one row per failure case (and what its error must say), plus rows that must work."""
    d = tmp_path / "data"
    d.mkdir()
    red = Image.new("RGB", (64, 64), (220, 30, 30))
    (d / "ok.png").write_bytes(png(red))
    jpeg = png(red, "JPEG")
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "big.png").write_bytes(png(Image.effect_noise((600, 600), 64).convert("RGB")))  # > 200 kB limit
    (d / "bomb.png").write_bytes(png(Image.new("L", (5000, 5000))))  # 25 Mpx > 16 Mpx limit, few bytes
    # 200 Mpx: Pillow's own check fires first
    (d / "pillow_bomb.png").write_bytes(header_only_png(20000, 10000))
    (d / "line.png").write_bytes(png(Image.new("RGB", (1, 4000), (9, 9, 9))))
    (d / "gray.png").write_bytes(png(Image.new("L", (64, 64), 90)))
    (d / "rgba.png").write_bytes(png(Image.new("RGBA", (64, 64), (255, 0, 0, 128))))
    (d / "cmyk.jpg").write_bytes(png(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"))
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    (d / "palette.png").write_bytes(png(pal))
    exif = Image.Exif()
    exif[0x0112] = 6
    (d / "rotated.jpg").write_bytes(png(Image.new("RGB", (96, 64), (0, 200, 0)), "JPEG", exif=exif.tobytes()))
    b64 = base64.b64encode(png(red)).decode()
    bad = {
        "missing": ("nope/missing.png", "missing.png: file not found"),
        "truncated": ("truncated.jpg", "truncated.jpg: corrupt or truncated"),
        "empty": ("empty.png", "empty.png: empty (0 bytes)"),
        "html": (f"{web}/page.html", "page.html: the server sent text/html, not an image"),
        "unreachable": ("http://127.0.0.1:9/x.png", "http://127.0.0.1:9/x.png: could not be fetched"),
        "stall": (f"{web}/stall.png", "stall.png: timed out after 1 s"),
        "big": ("big.png", "bytes is over the limit of 200000 bytes; raise model.image_max_bytes"),
        "bomb": ("bomb.png", "decompression-bomb guard"),
        "pillow_bomb": ("pillow_bomb.png",
                        "200000000 pixels is over the limit of 16000000 (decompression-bomb guard)"),
        "line": ("line.png", "1x4000 cannot be used"),
        "many": (["ok.png"] * 5, "5 images is over model.max_images_per_prompt (4)"),
        "long": (["ok.png"] * 4, "not below model.max_model_len"),
    }
    good = {
        "ok": "ok.png", "gray": "gray.png", "rgba": "rgba.png", "cmyk": "cmyk.jpg", "palette": "palette.png",
        "rotated": "rotated.jpg", "datauri": f"data:image/png;base64,{b64}", "base64": b64,
        "url": f"{web}/ok.png",
        "noimage": [],
    }
    rows = [{"id": k, "question": "What color is it?", "answer": "red", "images": v}
            for k, (v, _) in bad.items()]
    rows += [{"id": k, "question": "What color is it?", "answer": "red", "images": v}
             for k, v in good.items()]
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {k: msg for k, (_, msg) in bad.items()}, list(good)


def cfg_for(tiny_model_dir, tmp_path, data: Path, *extra):
    return tiny_config(
        tiny_model_dir, tmp_path, f"env.dataset={data}", "env.eval_size=1", "model.image_max_bytes=200000",
        "model.image_max_decoded_pixels=16000000", "model.image_fetch_timeout_s=1", "model.max_model_len=60",
        "rollout.group_size=2", *extra, step=(),
    )


def test_every_bad_sample_is_skipped_counted_and_named(tiny_model_dir, tmp_path, web):
    data, bad, good = bad_dataset(tmp_path, web)
    n = len(bad) + len(good)
    t0 = time.time()
    res = train(cfg_for(tiny_model_dir, tmp_path, data, "name=bad", "train.steps=1",
                        f"rollout.prompts_per_step={n}",
                        "env.eval_size=1", "algorithm.max_refill_rounds=0"))
    assert time.time() - t0 < 120  # the stalled URL cost its timeout, not the run
    m = read_jsonl(res.run_dir / "metrics.jsonl")[0]
    logged = [json.loads(line) for line in (res.run_dir / "bad_samples.jsonl").read_text().splitlines()]
    reasons = {r["sample_id"]: r["reason"] for r in logged}
    held_out = set(bad) | set(good) - set(reasons) - {s for s in good}  # one row is the eval split
    assert m["bad_samples"] == len(logged) >= len(bad) - 1
    for sample_id, reason in reasons.items():
        assert sample_id in bad, (sample_id, reason)  # no good row was refused
        assert f"sample {sample_id}" in reason and bad[sample_id] in reason, (sample_id, reason)
    assert m["samples"] >= 2 * (len(good) - 1)  # every good row (but the held-out one) was rolled out
    assert held_out <= set(bad)


def test_on_bad_sample_error_stops_with_the_reason(tiny_model_dir, tmp_path, web):
    data, bad, good = bad_dataset(tmp_path, web)
    res = subprocess.run(
        [sys.executable, "-m", "vlrl", "check-batch", "configs/tiny-cpu.toml", "--prompts", "30",
         *[f"--set={o}"
           for o in ("env.on_bad_sample=error", f"model.path={tiny_model_dir}", f"env.dataset={data}",
                                  "env.eval_size=1", "model.image_fetch_timeout_s=1",
                                  "rollout.max_new_tokens=4")]],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "sample " in res.stderr and 'env.on_bad_sample = "skip"' in res.stderr


def test_check_batch_shows_each_skipped_sample_and_why(tiny_model_dir, tmp_path):
    """The table view names every skipped sample with its reason and counts them (they were only in
    --json)."""
    Image.new("RGB", (64, 64), (220, 30, 30)).save(tmp_path / "ok.png")
    rows = [{"id": "good-1", "question": "Colour?", "answer": "red", "images": "ok.png"},
            {"id": "gone", "question": "Colour?", "answer": "red", "images": "missing.png"},
            {"id": "good-2", "question": "Colour?", "answer": "red", "images": "ok.png"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = subprocess.run(
        [sys.executable, "-m", "vlrl", "check-batch", "configs/tiny-cpu.toml", "--prompts", "3",
         *[f"--set={o}"
           for o in (f"model.path={tiny_model_dir}", f"env.dataset={data}", f"env.eval_dataset={data}",
                                  "rollout.max_new_tokens=4", "rollout.group_size=2")]],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "skipped samples: 1" in res.stdout and "1 sample(s) skipped" in res.stdout
    line = next(x for x in res.stdout.splitlines() if "gone" in x)
    assert "missing.png: file not found" in line


def test_a_bad_sample_is_decoded_once_and_counted_each_time_it_is_drawn(
    tiny_model_dir, tmp_path, monkeypatch, capsys):
    import vlrl.data.encode as dataset

    Image.new("RGB", (64, 64), (220, 30, 30)).save(tmp_path / "ok.png")
    rows = [{"id": "good", "question": "Colour?", "answer": "red", "images": "ok.png"},
            {"id": "gone", "question": "Colour?", "answer": "red", "images": "missing.png"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tried = []
    real = dataset.encode_sample
    monkeypatch.setattr(dataset, "encode_sample", lambda adapter, s, *a: tried.append(s.id)
                        or real(adapter, s, *a))
    # every step draws both rows (2 prompts, a dataset of 2), for 3 steps
    res = train(small(tiny_model_dir, tmp_path, "name=once", f"env.dataset={data}",
                      f"env.eval_dataset={data}",
                      "train.steps=3", "algorithm.max_refill_rounds=0"))
    assert tried.count("gone") == 1 and tried.count("good") == 3
    ms = read_jsonl(res.run_dir / "metrics.jsonl")
    assert [m["bad_samples"] for m in ms] == [1, 1, 1]
    logged = [json.loads(x) for x in (res.run_dir / "bad_samples.jsonl").read_text().splitlines()]
    assert [(x["step"], x["repeat"]) for x in logged] == [(1, False), (2, True), (3, True)]
    assert capsys.readouterr().out.count("skipped sample gone") == 1  # told once


def test_reward_failure_messages_reach_the_terminal_the_log_and_the_reports(tiny_model_dir, tmp_path, capsys):
    from vlrl.evaluate import run_eval

    fails = 'env.rewards=[{fn="rewards_for_tests:parity"}, {fn="rewards_for_tests:odd_fails"}]'
    res = train(small(tiny_model_dir, tmp_path, "name=rf", "train.steps=2", fails))
    said = capsys.readouterr().out
    logged = [json.loads(x) for x in (res.run_dir / "reward_errors.jsonl").read_text().splitlines()]
    per_step = {m["step"]: m["reward_failures"] for m in read_jsonl(res.run_dir / "metrics.jsonl")}
    assert sum(per_step.values()) > 0  # the first few of each step's failures are logged, by step
    assert {s: sum(e["step"] == s for e in logged)
            for s in per_step} == {s: min(n, 8) for s, n in per_step.items()}
    what = "reward rewards_for_tests:odd_fails on sample colors-train-"
    assert all(what in e["message"] and "raised ValueError: odd length" in e["message"] for e in logged)
    assert said.count("reward failed: " + what) == min(len(logged), 5)
    assert "Reward failures" in (res.run_dir / "report.html").read_text()
    summary = run_eval(small(tiny_model_dir, tmp_path, "name=rf", fails), None, "eval", 4, 2, None)
    assert (summary["reward_failures"] > 0
            and summary["reward_errors"][0].startswith(what.replace("train", "eval")))
    assert "odd length" in (Path(summary["out_dir"]) / "report.html").read_text()


def test_empty_dataset_and_malformed_line_are_refused(tiny_model_dir, tmp_path):
    from vlrl.errors import UserError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match=r"empty.jsonl.*holds no rows"):
        train(cfg_for(tiny_model_dir, tmp_path, empty, "name=e"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a", "answer": "b"}\n{"question": "a", "answer": \n')
    with pytest.raises(UserError, match=r"broken.jsonl:2"):
        train(cfg_for(tiny_model_dir, tmp_path, broken, "name=b"))


# --- checkpoints under faults -------------------------------------------------------------------------------

def _write_then_die(run_dir: str) -> None:
    def save_model(d: Path) -> None:
        (d / "model.safetensors").write_bytes(b"half a model")
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the write

    save_checkpoint(Path(run_dir), 99, save_model, {"step": 99}, keep_last=5)


def small(tiny_model_dir, tmp_path, *extra):
    return tiny_config(tiny_model_dir, tmp_path, *extra)


def test_kill_9_during_a_checkpoint_leaves_the_previous_one_loadable(tiny_model_dir, tmp_path):
    first = train(small(tiny_model_dir, tmp_path, "name=k", "train.steps=2", "checkpoint.every=2"))
    proc = multiprocessing.get_context("spawn").Process(target=_write_then_die, args=(str(first.run_dir),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert (first.run_dir / ".step-99.tmp").is_dir()  # the half-written one stays hidden
    ckpt = latest_checkpoint(first.run_dir)
    assert ckpt.name == "step-2" and load_trainer_state(ckpt)["step"] == 2
    again = train(small(tiny_model_dir, tmp_path, "name=k", "train.steps=3"), resume=True)
    assert again.step == 3 and latest_checkpoint(first.run_dir).name == "step-3"


def test_full_disk_at_checkpoint_time_is_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    first = train(small(tiny_model_dir, tmp_path, "name=d", "train.steps=1"))
    from vlrl.adapters.qwen3_vl import Qwen3VLAdapter

    def no_space(self, model, out_dir, state_dict=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Qwen3VLAdapter, "save_pretrained", no_space)
    with pytest.raises(CheckpointError,
                       match=r"step-2 \(No space left on device\); the previous checkpoint is intact"):
        train(small(tiny_model_dir, tmp_path, "name=d", "train.steps=2"), resume=True)
    monkeypatch.undo()
    assert latest_checkpoint(first.run_dir).name == "step-1"
    assert not list(first.run_dir.glob(".step-*"))  # the partial one was cleaned up
    assert train(small(tiny_model_dir, tmp_path, "name=d", "train.steps=2"), resume=True).step == 2


def test_ctrl_c_during_a_checkpoint_write_finishes_it_then_stops(tiny_model_dir, tmp_path, monkeypatch):
    from vlrl.adapters.qwen3_vl import Qwen3VLAdapter

    real = Qwen3VLAdapter.save_pretrained

    def interrupted(self, model, out_dir, state_dict=None):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives while the weights are being written
        real(self, model, out_dir, state_dict)

    monkeypatch.setattr(Qwen3VLAdapter, "save_pretrained", interrupted)
    res = train(small(tiny_model_dir, tmp_path, "name=c", "train.steps=10", "checkpoint.every=1"))
    assert res.stopped and res.step == 1
    ckpt = latest_checkpoint(res.run_dir)
    assert ckpt.name == "step-1" and load_trainer_state(ckpt)["step"] == 1
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(ckpt, use_safetensors=True)


# --- security -----------------------------------------------------------------------------------------------

def test_weights_load_from_safetensors_only(tiny_model_dir, tmp_path, adapter):
    import shutil

    from transformers import AutoModelForImageTextToText

    pickled = tmp_path / "pickled"  # the same model, its weights as a pickle (pytorch_model.bin)
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict(), pickled
               / "pytorch_model.bin")
    from vlrl.adapters.qwen3_vl import ModelError

    with pytest.raises(ModelError, match="cannot load the model"):
        adapter.load_model(torch.float32, weights_from=str(pickled))


def test_trainer_state_is_loaded_without_running_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    torch.save({"step": 1, "x": Evil()}, ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="not a plain trainer state"):
        load_trainer_state(ckpt)
    assert not Path("pwned").exists()


def test_remote_code_is_off_unless_the_config_says_so(tiny_model_dir, monkeypatch):
    from vlrl.adapters.qwen3_vl import Qwen3VLAdapter
    from vlrl.config import ModelConfig

    seen = []
    import transformers

    real = transformers.AutoProcessor.from_pretrained

    def spy(*a, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", spy)
    Qwen3VLAdapter.from_config(ModelConfig(path=str(tiny_model_dir)))
    Qwen3VLAdapter.from_config(ModelConfig(path=str(tiny_model_dir), trust_remote_code=True))
    assert seen == [False, True] and ModelConfig().trust_remote_code is False


def test_no_config_value_reaches_a_shell():
    """Processes are started from argument lists (never a shell), and nothing evaluates strings as code."""
    import re

    pattern = re.compile(r"shell=True|os\.system\(|os\.popen\(|subprocess\.getoutput|(?<![\w.])(eval|exec)\(")
    for path in (ROOT / "vlrl").rglob("*.py"):
        m = pattern.search(path.read_text())
        assert m is None, f"{path}: {m.group(0) if m else ''}"
