"""HTML reports, checked in a real headless browser (Debian's chromium): the numbers, the curves and the
sample images must show on the rendered page, opened from disk with no server and no network."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlrl.errors import UserError
from vlrl.report import MAX_STEPS, NO_MATPLOTLIB, write_eval_report, write_report, write_run_report

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE, GREY = (220, 30, 30), (30, 60, 220), (200, 200, 200)
MPL_BLUE = (31, 119, 180)  # matplotlib's first line colour (C0)


# --- the browser ------------------------------------------------------------------------------------------
def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no headless browser: install Debian's chromium (`apt-get install -y chromium`) to run the "
                "report tests", pytrace=False)


def render(page: Path, tmp_path: Path) -> tuple[str, np.ndarray]:
    """(rendered DOM, screenshot as an [H, W, 3] uint8 array) of a page opened from disk."""
    common = [
        browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,3000",
    ]
    url = Path(page).resolve().as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "<html" in dom.stdout, dom.stderr[-3000:]
    shot = tmp_path / "screenshot.png"
    res = subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-3000:]
    return dom.stdout[dom.stdout.index("<html"):], np.asarray(Image.open(shot).convert("RGB"))


class Dom(HTMLParser):
    """The images, links and visible text of a rendered page."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs: list[dict] = []
        self.links: list[str] = []
        self.chunks: list[str] = []
        self.feed(text)
        self.text = " ".join(self.chunks)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "a":
            self.links.append(dict(attrs).get("href"))

    def handle_data(self, data):
        self.chunks.append(data)


def decode(src: str) -> Image.Image:
    assert src.startswith("data:image/") and ";base64," in src
    data = base64.b64decode(src.split(",", 1)[1])
    assert len(data) > 0
    return Image.open(io.BytesIO(data)).convert("RGB")


def pixels_near(shot: np.ndarray, rgb, tol: int = 6) -> int:
    return int((np.abs(shot.astype(int) - np.array(rgb)).max(-1) <= tol).sum())


# --- a run written by hand --------------------------------------------------------------------------------
def shape_png(path: Path, rgb) -> Path:
    img = Image.new("RGB", (64, 64), GREY)
    ImageDraw.Draw(img).rectangle((12, 12, 51, 51), fill=rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def sample(step, sid, images, reward, completion, advantage=0.0):
    return {"step": step, "sample_id": sid, "group": 0, "question": "What color is the shape?",
            "answer": "red",
            "images": images, "completion": completion, "reward": reward, "advantage": advantage,
            "finish_reason": "stop"}


def fake_run(tmp_path: Path) -> Path:
    """Three steps; step 2 also logs eval metrics; a checkpoint eval; a red (best) and a blue (worst) sample
    in the last step (the blue one by absolute path), a URL image and an unsaved one in step 2."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 1, "reward/mean": 0.125, "accuracy": 0.1, "loss": 0.5, "lr": 0.001},
        {"step": 2, "reward/mean": 0.25, "accuracy": 0.2, "loss": 0.4, "lr": 0.001, "eval/reward/mean": 0.333,
         "eval/accuracy": 0.3125},
        {"step": 3, "reward/mean": 0.789, "accuracy": 0.625, "loss": 0.3, "lr": 0.001},
    ]
    # live
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')
    shape_png(run / "images" / "red.png", RED)
    blue = shape_png(tmp_path / "elsewhere" / "blue.png", BLUE)
    samples = [
        sample(3, "s-red", ["images/red.png"], 1.0, "<b>red</b> & more", advantage=0.87),
        sample(3, "s-blue", [str(blue)], 0.0, "blue", advantage=-0.87),
        sample(2, "s-url", ["https://example.com/cat.png", "<image 1>"], 0.5, "green"),
    ]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    ev = run / "step-3" / "eval-eval"
    ev.mkdir(parents=True)
    (ev / "summary.json").write_text(json.dumps({"split": "eval", "prompts": 4, "samples_per_prompt": 4,
                                                 "reward/mean": 0.5, "accuracy": 0.4375, "pass@1": 0.4375,
                                                 "pass@4": 0.75}))
    (ev / "report.html").write_text("<p>eval report</p>")
    return run


def test_run_report_in_a_browser_shows_numbers_curves_and_sample_images(tmp_path):
    run = fake_run(tmp_path)
    page = write_run_report(run)
    assert page == run / "report.html"
    source = page.read_text()
    assert "<script" not in source and "<link" not in source  # nothing to fetch
    dom_text, shot = render(page, tmp_path)
    dom = Dom(dom_text)
    for shown in ("0.789", "0.625", "eval/accuracy (step 2)", "0.3125", "0.4375", "0.87", "step 3", "step 2"):
        assert shown in dom.text, shown
    assert dom.text.index("step 3") < dom.text.index("step 2")  # latest step first
    assert dom.text.index("s-red") < dom.text.index("s-blue")  # best before worst
    assert "<b>red</b> & more" in dom.text and "<b>red</b>" not in dom_text  # escaped, shown as text
    assert "https://example.com/cat.png" in dom.links and "step-3/eval-eval/report.html" in dom.links
    assert "<image 1> (in memory, not saved)" in dom.text
    assert all(img["src"].startswith("data:") for img in dom.imgs)  # nothing loaded from disk or network
    charts = [img for img in dom.imgs if img.get("alt") in ("reward", "accuracy")]
    samples = [img for img in dom.imgs if img not in charts]
    assert len(charts) == 2 and len(samples) == 2
    assert all(decode(img["src"]).size[0] > 100 for img in charts)
    decoded = {img["alt"]: decode(img["src"]) for img in samples}
    assert decoded["images/red.png"].getpixel((32, 32)) == RED
    assert decoded[str(tmp_path / "elsewhere" / "blue.png")].getpixel((32, 32)) == BLUE
    # the screenshot: both sample images and the curves are on screen (shown 3x, so >= 1000 pixels each)
    assert pixels_near(shot, RED) > 1000 and pixels_near(shot, BLUE) > 1000
    assert pixels_near(shot, MPL_BLUE, tol=10) > 50


def test_eval_report_in_a_browser(tmp_path):
    out = tmp_path / "eval-eval"
    shape_png(out / "images" / "p0-0.png", RED)
    recs = [{"sample_id": "p0", "index": i, "question": "q?", "answer": "red", "images": ["images/p0-0.png"],
             "completion": c, "reward": r, "rewards": {"choice": r}, "correct": r >= 1, "length": 3,
             "finish_reason": "stop"}
             for i, (c, r) in enumerate([("red", 1.0), ("blue", 0.0), ("red!", 1.0)])]
    summary = {"split": "eval", "prompts": 1, "samples_per_prompt": 3, "reward/mean": 2 / 3,
               "accuracy": 2 / 3, "pass@1": 2 / 3, "pass@2": 1.0}
    page = write_eval_report(out, summary, recs)
    dom_text, shot = render(page, tmp_path)
    dom = Dom(dom_text)
    assert "0.6667" in dom.text and "2 of 3 correct" in dom.text
    assert [img.get("alt") for img in dom.imgs] == ["pass@k", "images/p0-0.png"]  # the prompt's image once
    assert "best" in dom.text.lower() and "worst" in dom.text.lower()
    assert pixels_near(shot, RED) > 1000


def test_without_matplotlib_the_report_renders_and_says_why(tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import` now raises ImportError
    run = fake_run(tmp_path)
    dom = Dom(write_run_report(run).read_text())
    assert NO_MATPLOTLIB in dom.text
    assert [img["alt"] for img in dom.imgs] == ["images/red.png", str(tmp_path / "elsewhere" / "blue.png")]
    assert "0.789" in dom.text


def test_gallery_shows_the_latest_steps_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward/mean": 0.0, "accuracy": 0.0}) + "\n" for s in range(1, 26)))
    (run / "samples.jsonl").write_text("".join(json.dumps(sample(s, f"id{s}", [], 0.0, "x")) + "\n"
                                               for s in range(1, 26)))
    text = Dom(write_run_report(run).read_text()).text
    assert MAX_STEPS == 20 and "the latest 20 of 25 steps" in text
    assert "step 25" in text and "step 6" in text and "step 5" not in text
    assert "id6" in text and "id5" not in text
    assert text.index("step 25") < text.index("step 6")


def test_report_command_and_its_errors(tmp_path):
    run = fake_run(tmp_path)
    res = subprocess.run([sys.executable, "-m", "vlrl", "report", str(run)], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(run / "report.html") and (run / "report.html").is_file()
    res = subprocess.run([sys.executable, "-m", "vlrl", "report", str(tmp_path / "nope")],
                         capture_output=True,
                         text=True, cwd=ROOT)
    err = " ".join(res.stderr.split())  # rich wraps long lines
    assert res.returncode == 2 and f"{tmp_path / 'nope'}: no such directory" in err and "Traceback" not in err
    with pytest.raises(UserError, match="no metrics.jsonl"):
        write_report(tmp_path / "elsewhere")
