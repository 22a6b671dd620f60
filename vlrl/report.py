"""Self-contained HTML reports of a run (`runs/NAME/report.html`) and of an eval
(`.../eval-SPLIT/report.html`).

One file that opens from disk with no server and no network: the curves are PNGs drawn by matplotlib (Agg,
no display) and the sample images are read from the files `samples.jsonl` references, both embedded as
base64 data URIs (a video shows as a filmstrip of its sampled frames). A Content-Security-Policy forbids the
page any fetch; image URLs are links, never loaded. Every text from a log is escaped, since completions are
model output. matplotlib is optional: without it the page says so and shows everything but the curves.
"""

from __future__ import annotations

import base64
import html
import io
import json
import mimetypes
import re
from pathlib import Path

from .atomic import write_atomic
from .errors import UserError
from .summary import read_jsonl

MAX_STEPS = 20  # training steps shown in the gallery (the latest ones)
MAX_PROMPTS = 20  # eval prompts shown in the gallery
MAX_ERRORS = 10  # reward-failure messages shown
INLINE_BYTES = 96 * 1024  # image files up to this size are embedded as they are; larger ones are shrunk
THUMB = 384  # longest side of a shrunk image (shown at 192 px: sharp on a high-density screen)
MAIN_METRICS = [
    "reward/mean", "reward/std", "accuracy", "loss", "response_length/mean", "truncated_fraction",
    "clip_fraction",
    "ratio_masked_fraction", "mismatch_kl", "kl", "entropy", "grad_norm", "lr", "samples", "samples_trained",
    "groups_dropped", "reward_failures", "tokens_per_s", "time/step",
]
SCORES = ("reward/", "accuracy", "pass@", "response_length", "truncated", "reward_failures")
NO_MATPLOTLIB = "Curves are not drawn: matplotlib is not installed (pip install matplotlib)."
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px} h3{font-size:15px;margin:18px 0 6px}
.sub{color:#666} .note{color:#8a5a00;background:#fff6e0;padding:6px 10px;border-radius:4px}
.charts img{width:520px;max-width:100%;margin:0 12px 12px 0;background:#fff;border:1px solid #ddd}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #ddd;padding:3px 10px}
td.num{text-align:right;font-variant-numeric:tabular-nums} th{background:#f0f0f0;text-align:left}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-left:5px solid #bbb;border-radius:4px;padding:10px}
.card.best{border-left-color:#2a9d3a} .card.worst{border-left-color:#c0392b}
.card img{width:192px;max-height:256px;object-fit:contain;border:1px solid #ccc;margin:0 6px 6px 0}
.card img.pix{image-rendering:pixelated} .tag{font-weight:bold;text-transform:uppercase;font-size:11px}
.card .film img{width:100%;max-height:none;margin:0 0 6px;image-rendering:pixelated}
.label{color:#666;font-size:12px;margin-right:6px} .noimg{color:#999;font-style:italic}
pre{white-space:pre-wrap;word-break:break-word;background:#f4f4f4;padding:6px;margin:6px 0 0;max-height:300px;
overflow:auto}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return esc(value)


# --- images -----------------------------------------------------------------------------------------------
class ImageEmbedder:
    """Image references of samples.jsonl -> HTML: files become data URIs (once each), URLs become links."""

    def __init__(self, base_dir: Path):
        self.base_dir = Path(base_dir)
        self.cache: dict[str, tuple[str, int] | None] = {}

    def _data_uri(self, path: Path) -> tuple[str, int] | None:
        """(data URI, longest side in pixels), or None when the file is not a readable image."""
        from PIL import Image

        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                side = max(img.size)
                mime = mimetypes.guess_type(path.name)[0]
                if len(data) > INLINE_BYTES or mime not in ("image/png", "image/jpeg",
                                                            "image/gif", "image/webp"):
                    alpha = "A" in img.getbands()
                    small = img.convert("RGBA" if alpha else "RGB")
                    small.thumbnail((THUMB, THUMB))
                    buf = io.BytesIO()
                    small.save(buf, "PNG" if alpha else "JPEG", quality=85)  # photos: JPEG is 5-10x smaller
                    data, mime, side = buf.getvalue(), "image/png" if alpha else "image/jpeg", max(small.size)
        except OSError:
            return None
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", side

    def html(self, ref: str) -> str:
        ref = str(ref)
        if ref.startswith(("http://", "https://")):
            return f'<a href="{esc(ref)}" rel="noreferrer">{esc(ref)}</a>'
        if ref.startswith("<image"):
            return f'<span class="noimg">{esc(ref)} (in memory, not saved)</span>'
        if ref not in self.cache:
            # relative to the run (images the run wrote), else to the working directory (a data file given by
            # a relative path: its images are logged as the sampler found them)
            from .adapters.images import resolve_source

            path = next((Path(c) for c in (resolve_source(ref, self.base_dir), ref)
                         if Path(c).is_file()), None)
            self.cache[ref] = None if path is None else self._data_uri(path)
        got = self.cache[ref]
        if got is None:
            return f'<span class="noimg">image missing or unreadable: {esc(ref)}</span>'
        uri, side = got
        pix = ' class="pix"' if side < 192 else ""
        return f'<img{pix} src="{uri}" alt="{esc(ref)}" title="{esc(ref)}">'


# --- curves -----------------------------------------------------------------------------------------------
def line_chart(
    title: str, lines: list[tuple[str, list, list]], ylabel: str, xlabel: str = "step",
    fraction: bool = False,
    xticks: list | None = None,
) -> str:
    """An <img> of a line chart (one line per (label, xs, ys)); raises ImportError without matplotlib.
    `fraction`: the y axis spans [0, 1], so small changes are not blown up to the full height."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.0), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot state
    ax = fig.add_subplot()
    for label, xs, ys in lines:
        style = {"marker": "o"} if label.startswith("eval") or len(xs) < 3 else {}
        ax.plot(xs, ys, label=label, **style)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if fraction:
        ax.set_ylim(-0.02, 1.02)
    if xticks:
        ax.set_xticks(xticks)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="{esc(title)}">'


def _series(metrics: list[dict], key: str) -> tuple[list, list]:
    pts = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and "step" in m]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves(metrics: list[dict]) -> str:
    """The reward and accuracy charts of a run (training and, when logged, `eval/` metrics)."""
    keys = sorted({k for m in metrics for k in m})
    per_fn = [k for k in keys if k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean"]
    reward_keys = ["reward/mean"] + (per_fn if len(per_fn) > 1 else [])
    charts = [
        ("reward", reward_keys + [k for k in ("eval/reward/mean",) if k in keys], "mean reward", False),
        ("accuracy", ["accuracy"] + [k for k in keys if k == "eval/accuracy" or k.startswith("eval/pass@")],
         "fraction", True),
    ]
    try:
        imgs = []
        for title, chart_keys, ylabel, fraction in charts:
            lines = [(k, *_series(metrics, k)) for k in chart_keys]
            lines = [line for line in lines if line[1]]
            if lines:
                imgs.append(line_chart(title, lines, ylabel, fraction=fraction))
    except ImportError:
        return f'<p class="note">{NO_MATPLOTLIB}</p>'
    return f'<div class="charts">{"".join(imgs)}</div>' if imgs else '<p class="sub">no steps logged yet</p>'


# --- tables and cards -------------------------------------------------------------------------------------
def metrics_table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f'<tr><td>{esc(k)}</td><td class="num">{fmt(v)}</td></tr>' for k, v in rows)
    return f"<table><tr><th>metric</th><th>value</th></tr>{body}</table>"


def last_step_rows(metrics: list[dict]) -> list[tuple[str, object]]:
    """The last step's main metrics, its per-function rewards, then the newest eval/ metrics with their step.

    Eval metrics may share a step's line or have lines of their own; the training row is the newest line
    with a training reward."""
    last = next((m for m in reversed(metrics) if "reward/mean" in m), metrics[-1])
    rows = [(k, last[k]) for k in MAIN_METRICS if k in last]
    rows += [(k, v) for k, v in last.items() if k.startswith("reward/") and k.endswith("/mean")
             and k != "reward/mean"]
    with_eval = [m for m in metrics if any(k.startswith("eval/") for k in m)]
    if with_eval:
        m = with_eval[-1]
        rows += [(f"{k} (step {m.get('step')})", v) for k, v in m.items()
                 if k.startswith("eval/") and isinstance(v, (int, float))]
    return rows


def media_html(s: dict, images: ImageEmbedder) -> str:
    """A sample's images, then a filmstrip of each of its videos' sampled frames (in order, left to right)."""
    imgs = "".join(images.html(ref) for ref in s.get("images") or [])
    imgs += "".join(f'<div class="film"><span class="label">video {k + 1}: sampled '
                    f'frames</span>{images.html(ref)}</div>'
                    for k, ref in enumerate(s.get("videos") or []))
    return imgs or '<span class="noimg">no image</span>'


def tool_images(s: dict, images: ImageEmbedder) -> str:
    """A multi-turn sample's environment images (tool results), in the order the model saw them."""
    refs = s.get("env_images") or []
    if not refs and not s.get("turns"):
        return ""
    shown = "".join(images.html(ref) for ref in refs) or '<span class="noimg">none</span>'
    return (f'<div><span class="label">{s.get("turns")} turns, {s.get("tool_calls", 0)} tool calls; tool '
            f"images</span>{shown}</div>")


def card(s: dict, images: ImageEmbedder, tag: str = "") -> str:
    """One sample: its images and video filmstrips, question, answer, completion (a multi-turn trajectory
    whole, with the images its environment returned) and scores."""
    imgs = media_html(s, images)
    meta = [f'<span class="tag">{esc(tag)}</span>'] if tag else []
    meta.append(f"reward <b>{fmt(s.get('reward'))}</b>")
    if s.get("advantage") is not None:
        meta.append(f"advantage {fmt(s['advantage'])}")
    if "correct" in s:
        meta.append("correct" if s["correct"] else "wrong")
    for key in ("finish_reason", "sample_id"):
        if s.get(key) is not None:
            meta.append(f'<span class="label">{esc(key)}</span>{esc(s[key])}')
    return (
        f'<div class="card {esc(tag)}"><div>{imgs}</div><div>{" · ".join(meta)}</div>'
        f'<div><span class="label">question</span>{esc(s.get("question", ""))}</div>'
        f'<div><span class="label">answer</span>{esc(s.get("answer"))}</div>'
        f'{tool_images(s, images)}<pre>{esc(s.get("completion", ""))}</pre></div>'
    )


def ranked_cards(group: list[dict], images: ImageEmbedder) -> str:
    """Samples by reward, best first, the first tagged best and the last worst (when rewards differ)."""
    group = sorted(group, key=lambda s: (s.get("reward") is None, -(s.get("reward") or 0.0)))
    rewards = {s.get("reward") for s in group}
    tags = (["best"] + [""] * (len(group) - 2) + ["worst"] if len(group) > 1 and len(rewards) > 1
            else [""] * len(group))
    return '<div class="cards">' + "".join(card(s, images, t) for s, t in zip(group, tags)) + "</div>"


def prompt_card(group: list[dict], images: ImageEmbedder) -> str:
    """One eval prompt: its images (and video filmstrips), question and answer once, then its best and worst
    completion."""
    first = group[0]
    imgs = media_html(first, images)
    ranked = sorted(group, key=lambda s: (s.get("reward") is None, -(s.get("reward") or 0.0)))
    shown = [("best", ranked[0])] + ([("worst", ranked[-1])] if len(ranked) > 1 else [])
    right = sum(bool(s.get("correct")) for s in group)
    parts = [
        f'<div class="card"><div>{imgs}</div>',
        f'<div><span class="label">sample_id</span>{esc(first.get("sample_id"))} · '
        f"{right} of {len(group)} correct</div>",
        f'<div><span class="label">question</span>{esc(first.get("question", ""))}</div>',
        f'<div><span class="label">answer</span>{esc(first.get("answer"))}</div>',
    ]
    for tag, s in shown:
        parts.append(
            f'<div class="{tag}"><span class="tag">{tag}</span> reward <b>{fmt(s.get("reward"))}</b> · '
            f'{"correct" if s.get("correct") else "wrong"} · {esc(s.get("finish_reason"))}'
            f'{tool_images(s, images)}<pre>{esc(s.get("completion", ""))}</pre></div>'
        )
    return "".join(parts) + "</div>"


def error_list(messages: list[str]) -> str:
    """The first reward-failure messages (function, sample, what it did), so a failing reward is seen at
    once."""
    return "<ul>" + "".join(f"<li><code>{esc(m)}</code></li>" for m in messages) + "</ul>"


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><div class=\"sub\">{esc(subtitle)}</div>"
        + "".join(sections) + "</body></html>\n"
    )


# --- the two reports ---------------------------------------------------------------------------------------
def eval_summaries(run_dir: Path) -> list[tuple[str, dict]]:
    """(path relative to the run, summary) of every eval written under the run or its checkpoints."""
    def natural(p: Path) -> list:  # step-2 before step-10
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]

    paths = sorted(run_dir.glob("eval-*/summary.json"), key=natural)
    paths += sorted(run_dir.glob("step-*/eval-*/summary.json"), key=natural)
    out = []
    for p in paths:
        try:
            summary = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(summary, dict):
            out.append((str(p.parent.relative_to(run_dir)), summary))
    return out


def evals_table(evals: list[tuple[str, dict]], run_dir: Path) -> str:
    cols = ["split", "prompts", "samples_per_prompt", "reward/mean", "accuracy"]
    ks = {int(k[5:]) for _, s in evals for k in s if k.startswith("pass@") and k[5:].isdigit()}
    cols += [f"pass@{k}" for k in sorted(ks)]
    head = "".join(f"<th>{esc(c)}</th>" for c in ["eval", *cols])
    rows = []
    for rel, s in evals:
        name = esc(rel)
        if (run_dir / rel / "report.html").is_file():
            name = f'<a href="{esc(rel)}/report.html">{name}</a>'
        cells = "".join(f'<td class="num">{fmt(s.get(c, ""))}</td>' for c in cols)
        rows.append(f"<tr><td>{name}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def write_run_report(run_dir) -> Path:
    """Write `run_dir/report.html` from metrics.jsonl, samples.jsonl and any eval summaries; return its
    path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl in it; pass a run directory written by `vlrl train` "
                        "(runs/NAME)")
    metrics = [m for m in read_jsonl(run_dir / "metrics.jsonl") if isinstance(m, dict)]
    samples = [s for s in read_jsonl(run_dir / "samples.jsonl") if isinstance(s, dict)]
    images = ImageEmbedder(run_dir)
    sections = ["<h2>Curves</h2>", curves(metrics)]
    trained = [m for m in metrics if "reward/mean" in m]
    if metrics:
        last = (trained or metrics)[-1].get("step")
        sections += [f"<h2>Last step ({esc(last)})</h2>", metrics_table(last_step_rows(metrics))]
    evals = eval_summaries(run_dir)
    if evals:
        sections += ["<h2>Evals</h2>", evals_table(evals, run_dir)]
    errors = read_jsonl(run_dir / "reward_errors.jsonl")
    if errors:
        total = sum(m.get("reward_failures", 0) for m in trained)
        sections += [f"<h2>Reward failures ({total} in all)</h2>",
                     error_list([f"step {e.get('step')}: {e.get('message')}" for e in errors[:MAX_ERRORS]])]
    by_step: dict = {}
    for s in samples:
        by_step.setdefault(s.get("step"), []).append(s)
    steps = sorted(by_step, key=lambda k: k if isinstance(k, (int, float)) else -1, reverse=True)
    shown = steps[:MAX_STEPS]
    note = f" (the latest {len(shown)} of {len(steps)} steps)" if len(steps) > len(shown) else ""
    sections.append(f"<h2>Samples{note}</h2>")
    if not shown:
        sections.append('<p class="sub">no samples logged (logging.samples_per_step = 0, or no step yet)</p>')
    for step in shown:
        sections += [f"<h3>step {esc(step)}</h3>", ranked_cards(by_step[step], images)]
    last = trained[-1].get("step") if trained else "-"
    subtitle = f"{run_dir.resolve()} · {len(trained)} steps logged · last step {last}"
    return write_atomic(run_dir / "report.html", page(f"vlrl run: {run_dir.name}", subtitle, sections))


def write_eval_report(out_dir, summary: dict, samples: list[dict]) -> Path:
    """Write `out_dir/report.html` for one eval: its numbers, pass@k, and the best and worst completion of
    each prompt (image paths in `samples` are relative to `out_dir`, or absolute). Returns its path."""
    out_dir = Path(out_dir)
    images = ImageEmbedder(out_dir)
    rows = [(k, v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    rows.sort(key=lambda kv: not kv[0].startswith(SCORES))  # scores first, counts and times after (stable)
    sections = ["<h2>Summary</h2>", metrics_table(rows)]
    if summary.get("reward_errors"):
        sections += [f"<h2>Reward failures ({summary.get('reward_failures', 0)} in all)</h2>",
                     error_list(summary["reward_errors"][:MAX_ERRORS])]
    ks = sorted((int(k[5:]), v) for k, v in summary.items() if k.startswith("pass@") and k[5:].isdigit())
    if len(ks) > 1:
        try:
            xs = [k for k, _ in ks]
            chart = line_chart("pass@k", [("pass@k", xs, [v for _, v in ks])], "pass@k", "k", True, xs)
            sections.append(f'<div class="charts">{chart}</div>')
        except ImportError:
            sections.append(f'<p class="note">{NO_MATPLOTLIB}</p>')
    by_prompt: dict = {}
    for s in samples:
        by_prompt.setdefault(s.get("prompt", s.get("sample_id")), []).append(s)
    shown = list(by_prompt)[:MAX_PROMPTS]
    note = f" (the first {len(shown)} of {len(by_prompt)} prompts)" if len(by_prompt) > len(shown) else ""
    sections.append(f"<h2>Samples: best and worst completion per prompt{note}</h2>")
    sections.append('<div class="cards">'
                    + "".join(prompt_card(by_prompt[sid], images) for sid in shown) + "</div>")
    who = summary.get("checkpoint") or summary.get("model") or "policy"
    subtitle = (f"{who} · split {summary.get('split', '?')} · {summary.get('prompts')} prompts x "
                f"{summary.get('samples_per_prompt')} samples · seed {summary.get('seed')}")
    return write_atomic(out_dir / "report.html", page(f"vlrl eval: {out_dir.name}", subtitle, sections))


def write_report(path) -> Path:
    """`vlrl report`: a run directory gets its run report; an eval directory (summary.json) its eval
    report."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory; pass a run directory (runs/NAME) or an eval directory")
    if not (path / "metrics.jsonl").is_file() and (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path / 'summary.json'} is not valid JSON ({e}); re-run `vlrl eval`") from None
        samples = [s for s in read_jsonl(path / "samples.jsonl") if isinstance(s, dict)]
        return write_eval_report(path, summary, samples)
    return write_run_report(path)
