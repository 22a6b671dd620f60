"""The geometry3k recipe (configs/qwen3-vl-8b-geo3k.toml) end to end on its data path, without the hub: a
local parquet file with hf:hiyouga/geometry3k's schema (a list of HF Image values, `problem` with its
`<image>` marker, `answer`, `id`, `choices`, `ground_truth`) is loaded, encoded with the adapter and scored by
the recipe's rewards."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vlrl.config import load_config
from vlrl.data.encode import encode_samples
from vlrl.data.sources import load_samples
from vlrl.rewards.reward_set import RewardSet

ROOT = Path(__file__).resolve().parents[1]


def diagram(label: str) -> bytes:
    img = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(img)
    draw.polygon([(8, 56), (88, 56), (48, 8)], outline="black")
    draw.text((40, 40), label, fill="black")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def geo3k_parquet(tmp_path) -> Path:
    """Four rows as the hub serves them: Image features stored as {"bytes", "path"} structs."""
    import datasets

    rows = [
        ("<image>Find x. Round to the nearest tenth, if necessary.", "2\\sqrt{3}",
         ["2\\sqrt{3}", "4", "6", "8"], "A"),
        ("<image>Find $m \\angle 2$.", "63", ["27", "63", "117", "153"], "B"),
        # marker mid-text
        ("In the figure <image> find the area.", "\\frac{3}{2}", ["1", "1.5", "2", "3"], "B"),
        ("<image><image>Compare the two figures.", "1", ["1", "2", "3", "4"], "A"),  # two markers, one image
    ]
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
        "answer": datasets.Value("string"), "id": datasets.Value("int64"),
        "choices": datasets.Sequence(datasets.Value("string")), "ground_truth": datasets.Value("string"),
    })
    ds = datasets.Dataset.from_dict({
        "images": [[{"bytes": diagram(str(i)), "path": None}] for i in range(len(rows))],
        "problem": [r[0] for r in rows], "answer": [r[1] for r in rows],
        "id": [100 + i for i in range(len(rows))],
        "choices": [r[2] for r in rows], "ground_truth": [r[3] for r in rows],
    }, features=features)
    path = tmp_path / "geo3k-train.parquet"
    ds.to_parquet(str(path))
    return path


def test_geo3k_recipe_loads_encodes_and_scores(geo3k_parquet, adapter):
    cfg = load_config(ROOT / "configs/qwen3-vl-8b-geo3k.toml",
                      [f"env.dataset={geo3k_parquet}", f"env.eval_dataset={geo3k_parquet}"])
    samples = load_samples(cfg.env, "train", cfg.train.seed)
    assert [s.id for s in samples] == ["100", "101", "102", "103"]
    assert samples[0].question.startswith("<image>Find x.") and samples[0].answer == "2\\sqrt{3}"
    assert isinstance(samples[0].images[0], bytes) and samples[0].meta["ground_truth"] == "A"

    prompts, kept, bad = encode_samples(adapter, samples, cfg.env)
    assert [s.id for s in kept] == ["100", "101", "102"]
    assert bad == [(samples[3],
                    "sample 103: the question holds 2 <image> image marker(s) but the sample has 1 "
                                "image(s); fix the row, or set env.image_marker = \"\" to keep markers as "
                                "text")]
    user = [m for m in prompts[0].messages if m["role"] == "user"][0]["content"]
    assert user == [{"type": "image"},
                    {"type": "text", "text": "Find x. Round to the nearest tenth, if necessary."}]
    assert (prompts[0].messages[0]["role"] == "system"
            and "\\boxed{ANSWER}" in prompts[0].messages[0]["content"][0]["text"])
    text = adapter.tokenizer.decode(prompts[0].input_ids)
    assert "<image>" not in text and text.count("<|vision_start|>") == 1
    assert sum(t == adapter.image_token_id for t in prompts[0].input_ids) > 0
    mid = [m for m in prompts[2].messages if m["role"] == "user"][0]["content"]
    assert mid == [{"type": "text", "text": "In the figure "}, {"type": "image"},
                   {"type": "text", "text": " find the area."}]
    decoded = adapter.tokenizer.decode(prompts[2].input_ids)
    assert decoded.index("In the figure") < decoded.index("<|vision_start|>") < decoded.index("find the area")

    rewards = RewardSet(cfg.env.rewards, cfg.env.reward_timeout_s)
    completions = [
        # right, formatted
        "<think>The altitude splits the side: x = \\sqrt{12}.</think> \\boxed{\\sqrt{12}}",
        "<think>180 - 117 = 63</think> \\boxed{62}",  # wrong, formatted
        "The area is \\boxed{1.5}",  # right, no <think>
    ]
    res = rewards.score(completions, kept)
    rewards.close()
    assert res.per_fn == {"math": [1.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0]}
    assert res.total == pytest.approx([1.1, 0.1, 1.0]) and res.errors == []


def test_markers_are_text_when_switched_off(geo3k_parquet, adapter):
    cfg = load_config(ROOT / "configs/qwen3-vl-8b-geo3k.toml",
                      [f"env.dataset={geo3k_parquet}", f"env.eval_dataset={geo3k_parquet}",
                       'env.image_marker=""'])
    prompts, kept, bad = encode_samples(adapter, load_samples(cfg.env, "train"), cfg.env)
    assert len(kept) == 4 and not bad
    assert [m for m in prompts[0].messages
            if m["role"] == "user"][0]["content"][1]["text"].startswith("<image>Find x.")
