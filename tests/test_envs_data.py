"""Samples: the built-in tasks (answer only in the pixels, deterministic by seed) and every data-file form."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlrl.config import EnvConfig
from vlrl.data.builtin import BACKGROUND, COLORS, TASKS, builtin_split
from vlrl.data.encode import encode_sample
from vlrl.data.files import DatasetError, held_out_indices, load_file_split
from vlrl.data.sources import load_samples
from vlrl.errors import UserError

# --- pixel inspection -----------------------------------------------------------------------------------


def fg_mask(img: Image.Image) -> list[list[bool]]:
    w, h = img.size
    px = img.load()
    return [[px[x, y] != BACKGROUND for x in range(w)] for y in range(h)]


def blobs(img: Image.Image) -> list[list[tuple[int, int]]]:
    """4-connected components of the non-background pixels."""
    mask = fg_mask(img)
    h, w = len(mask), len(mask[0])
    seen, out = set(), []
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0][x0] or (x0, y0) in seen:
                continue
            stack, blob = [(x0, y0)], []
            seen.add((x0, y0))
            while stack:
                x, y = stack.pop()
                blob.append((x, y))
                for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if 0 <= nx < w and 0 <= ny < h and mask[ny][nx] and (nx, ny) not in seen:
                        seen.add((nx, ny))
                        stack.append((nx, ny))
            out.append(blob)
    return out


def fill_ratio(img: Image.Image) -> float:
    """Shape pixels over the area of their bounding box: square 1, circle pi/4, triangle 1/2."""
    (blob,) = blobs(img)
    xs, ys = [p[0] for p in blob], [p[1] for p in blob]
    return len(blob) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))


def shape_from_pixels(img: Image.Image) -> str:
    r = fill_ratio(img)
    return "square" if r > 0.95 else "circle" if r > 0.68 else "triangle"


def fingerprint(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.id}|{s.question}|{s.answer}|".encode())
        h.update(s.images[0].tobytes())
    return h.hexdigest()


# --- built-in tasks -------------------------------------------------------------------------------------


def test_colors_is_unchanged():
    """Pinned: earlier runs and the tiny-model tests depend on these exact answers and pixels."""
    s = builtin_split("colors", "train", 4, 64, 0)
    assert [x.answer for x in s] == ["yellow", "blue", "yellow", "yellow"]
    digest = hashlib.sha256(b"".join(x.images[0].tobytes() for x in s)).hexdigest()
    assert digest[:16] == "5a3b4297bacf4fc9"
    assert s[0].question == "What color is the shape? Answer with one word: blue, green, red or yellow."


@pytest.mark.parametrize("task", ["colors", "shapes", "count", "position"])
def test_tasks_are_deterministic_by_seed_and_split(task):
    a = builtin_split(task, "train", 20, 48, seed=5)
    assert fingerprint(a) == fingerprint(builtin_split(task, "train", 20, 48, seed=5))
    assert fingerprint(a) != fingerprint(builtin_split(task, "train", 20, 48, seed=6))
    ev = builtin_split(task, "eval", 20, 48, seed=5)
    assert fingerprint(a) != fingerprint(ev)
    assert len({x.id for x in a} | {x.id for x in ev}) == 40  # ids name the split
    # A prefix of a longer split is the same samples (each sample has its own RNG).
    assert fingerprint(builtin_split(task, "train", 30, 48, seed=5)[:20]) == fingerprint(a)
    for s in a:
        assert s.images[0].size == (48, 48) and s.images[0].mode == "RGB"


@pytest.mark.parametrize(
    "task, options",
    [
        ("shapes", ["circle", "square", "triangle"]),
        ("count", ["one", "two", "three", "four"]),
        ("position", ["left", "right"]),
    ],
)
def test_answers_are_balanced_and_listed_in_the_question(task, options):
    samples = builtin_split(task, "train", 400, 32, seed=0)
    counts = Counter(s.answer for s in samples)
    assert set(counts) == set(options)
    for o in options:
        assert counts[o] > 0.6 * 400 / len(options), counts
    q = samples[0].question
    assert "Answer with one word: " + ", ".join(options[:-1]) + " or " + options[-1] + "." in q


@pytest.mark.parametrize("size", [32, 64, 97])
def test_shapes_answer_is_in_the_pixels(size):
    for s in builtin_split("shapes", "eval", 60, size, seed=1):
        assert shape_from_pixels(s.images[0]) == s.answer, s.id


@pytest.mark.parametrize("size", [32, 64, 97])
def test_count_answer_is_the_number_of_separate_shapes(size):
    words = ["one", "two", "three", "four"]
    for s in builtin_split("count", "train", 60, size, seed=2):
        found = blobs(s.images[0])
        assert words[len(found) - 1] == s.answer, s.id
        assert len({len(b) for b in found}) == 1  # identical shapes, same pixel count


@pytest.mark.parametrize("size", [32, 64, 97])
def test_position_answer_is_the_half_holding_the_shape(size):
    for s in builtin_split("position", "train", 60, size, seed=3):
        (blob,) = blobs(s.images[0])
        xs = [p[0] for p in blob]
        side = "left" if max(xs) < size / 2 else "right" if min(xs) >= size / 2 else "both"
        assert side == s.answer, s.id


def test_colors_answer_is_in_the_pixels():
    for s in builtin_split("colors", "train", 30, 32, seed=4):
        colours = Counter(s.images[0].getdata())
        del colours[BACKGROUND]
        assert set(colours) == {COLORS[s.answer]}


def test_builtin_dispatch_and_unknown_task():
    cfg = EnvConfig(dataset="builtin:count", train_size=7, eval_size=3, image_size=40)
    train, ev = load_samples(cfg, "train", 0), load_samples(cfg, "eval", 0)
    assert (len(train), len(ev)) == (7, 3)
    assert train[0].id == "count-train-0" and train[0].images[0].size == (40, 40)
    # (and calculator, text only)
    assert set(TASKS) == {"colors", "shapes", "count", "position", "zoom", "motion"}
    with pytest.raises(
        UserError,
        match="unknown built-in task 'nope'; choose one of calculator, colors, count, motion, position, "
                         "shapes, zoom"
    ):
        load_samples(EnvConfig(dataset="builtin:nope"), "train")


# --- data files -----------------------------------------------------------------------------------------


def png_bytes(rgb, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "PNG")
    return buf.getvalue()


def write_png(path: Path, rgb) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(rgb))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def image_tokens(adapter, sample) -> int:
    prompt = encode_sample(adapter, sample, None, "{question}")
    return sum(1 for t in prompt.input_ids if t == adapter.image_token_id)


def all_rows(path, **kw) -> list:
    """Every row of `path` as train samples (an eval file is set, so nothing is held out)."""
    return load_file_split(EnvConfig(dataset=str(path), eval_dataset=str(path), **kw), "train", 0)


def test_jsonl_relative_paths_multi_image_and_text_only(tmp_path, adapter):
    data = tmp_path / "data"
    write_png(data / "imgs" / "red.png", (255, 0, 0))
    write_png(data / "imgs" / "blue.png", (0, 0, 255))
    path = write_jsonl(
        data / "train.jsonl",
        [
            {"id": "a", "question": "Color?", "answer": "red", "images": "imgs/red.png"},
            "",  # blank lines are skipped
            {"question": "Same?", "answer": "no", "images": ["imgs/red.png", "imgs/blue.png"], "level": 3},
            {"question": "2+2?", "answer": 4},
            {"question": "Text only?", "answer": "yes", "images": None},
            {"question": "Empty list?", "answer": "yes", "images": []},
        ],
    )
    samples = all_rows(path)
    assert [s.id for s in samples] == ["a", "1", "2", "3", "4"]  # row index when the id column is absent
    assert [s.answer for s in samples] == ["red", "no", 4, "yes", "yes"]
    assert samples[0].images == ["imgs/red.png"] and samples[1].images == ["imgs/red.png", "imgs/blue.png"]
    assert all(s.images == [] for s in samples[2:])
    assert all(s.base_dir == data for s in samples)
    assert samples[1].meta == {"level": 3}
    # Relative paths resolve against the file's directory, wherever the run starts.
    one = image_tokens(adapter, samples[0])
    assert one > 0
    assert image_tokens(adapter, samples[1]) == 2 * one  # two same-size images
    assert image_tokens(adapter, samples[2]) == 0
    assert image_tokens(adapter, samples[3]) == 0


def test_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"uid": 7, "prompt": "Q?", "label": "B", "pics": "x.png"}])
    (s,) = all_rows(path, question_field="prompt", answer_field="label", image_field="pics", id_field="uid")
    assert (s.id, s.question, s.answer, s.images, s.meta) == ("7", "Q?", "B", ["x.png"], {})


def test_jsonl_data_uri_and_bare_base64(tmp_path, adapter):
    b64 = base64.b64encode(png_bytes((0, 200, 0))).decode()
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"question": "Q1", "answer": "green", "images": f"data:image/png;base64,{b64}"},
            {"question": "Q2", "answer": "green", "images": [b64]},
            {"question": "Q3", "answer": "green", "images": {"bytes": None, "path": "g.png"}},
        ],
    )
    write_png(tmp_path / "g.png", (0, 200, 0))
    samples = all_rows(path)
    assert samples[0].images == [f"data:image/png;base64,{b64}"] and samples[1].images == [b64]
    assert samples[2].images == ["g.png"]  # an HF Image value without bytes falls back to its path
    for s in samples:
        prompt = encode_sample(adapter, s, None, "{question}")
        assert prompt.images[0].getpixel((5, 5)) == (0, 200, 0)
        assert sum(1 for t in prompt.input_ids if t == adapter.image_token_id) > 0


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": 1}, '{"question": "oops",'])
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: not valid JSON"):
        all_rows(path)
    path = write_jsonl(tmp_path / "list.jsonl", [{"question": "ok", "answer": 1}, "", "[1, 2]"])
    with pytest.raises(DatasetError, match=r"list\.jsonl:3: expected a JSON object, got list"):
        all_rows(path)


def test_empty_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DatasetError, match=r"empty\.jsonl \(env\.dataset\) holds no rows"):
        load_file_split(EnvConfig(dataset=str(path)), "train", 0)


def test_missing_question_names_file_row_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"question": "a", "answer": 1}, "", {"prompt": "b", "answer": 2}]
    )
    with pytest.raises(
        DatasetError,
        match=r"d\.jsonl:3: no value in the question field 'question' \(the row has: "
        r"answer, prompt\); fill it in or set env\.question_field",
    ):
        all_rows(path)
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "answer": 1}])
    with pytest.raises(DatasetError, match=r"e\.jsonl:1: no field 'question' .*set env\.question_field"):
        all_rows(path)
    with pytest.raises(DatasetError, match=r"e\.jsonl:1: no field 'label' .*set env\.answer_field"):
        all_rows(path, question_field="prompt", answer_field="label")


def test_bad_image_entries_name_the_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": 1, "images": [12]}])
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: an image entry is a int"):
        all_rows(path)
    path = write_jsonl(
        tmp_path / "e.jsonl", [{"question": "a", "answer": 1, "images": {"bytes": None, "path": None}}]
    )
    with pytest.raises(DatasetError, match=r"e\.jsonl:1: an image entry has neither bytes nor a path"):
        all_rows(path)


def test_missing_and_unsupported_paths_name_env_dataset(tmp_path):
    with pytest.raises(DatasetError, match=r"env\.dataset = '.*nope\.jsonl': no such file or directory"):
        load_samples(EnvConfig(dataset=str(tmp_path / "nope.jsonl")), "train")
    (tmp_path / "d.csv").write_text("question,answer\n")
    with pytest.raises(DatasetError, match=r"env\.dataset = '.*d\.csv': unsupported file type '\.csv'"):
        load_samples(EnvConfig(dataset=str(tmp_path / "d.csv")), "train")
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"question": "a", "answer": 1}] * 3)
    with pytest.raises(DatasetError, match=r"env\.eval_dataset = '.*missing\.parquet': no such file"):
        load_samples(EnvConfig(dataset=str(ok), eval_dataset=str(tmp_path / "missing.parquet")), "eval")


def test_parquet_with_hf_image_dicts(tmp_path, adapter):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_png(tmp_path / "side.png", (9, 9, 9))
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "question": ["q0", "q1", "q2", "q3"],
            "answer": ["red", "blue", "none", "dark"],
            "image": pa.array(
                [
                    {"bytes": png_bytes((255, 0, 0)), "path": None},
                    {"bytes": png_bytes((0, 0, 255)), "path": "ignored-when-bytes.png"},
                    None,
                    {"bytes": None, "path": "side.png"},
                ],
                type=img_type,
            ),
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    samples = all_rows(tmp_path / "d.parquet", image_field="image")
    assert [s.id for s in samples] == ["0", "1", "2", "3"]
    assert samples[0].images == [png_bytes((255, 0, 0))] and samples[1].images == [png_bytes((0, 0, 255))]
    assert samples[2].images == [] and samples[3].images == ["side.png"]
    assert samples[3].base_dir == tmp_path
    expect = [(255, 0, 0), (0, 0, 255), None, (9, 9, 9)]
    for s, rgb in zip(samples, expect):
        prompt = encode_sample(adapter, s, None, "{question}")
        n = sum(1 for t in prompt.input_ids if t == adapter.image_token_id)
        assert (n > 0) == (rgb is not None)
        if rgb is not None:
            assert prompt.images[0].getpixel((3, 3)) == rgb


def test_parquet_missing_column_names_file_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"q": ["a"], "answer": [1]}), tmp_path / "d.parquet")
    with pytest.raises(
        DatasetError, match=r"d\.parquet row 0: no field 'question' \(the rows have: answer, q\)"
    ):
        all_rows(tmp_path / "d.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"junk\.parquet: not a readable Parquet file"):
        all_rows(tmp_path / "junk.parquet")


def pil_rows(n):
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    return {
        "question": [f"q{i}" for i in range(n)],
        "answer": [str(i) for i in range(n)],
        "images": [
            [Image.new("RGB", (32, 32), palette[i % 3])] * (1 + i % 2) if i % 4 != 3 else [] for i in range(n)
        ],
    }


def test_save_to_disk_dataset_dir_with_holdout(tmp_path, adapter):
    import datasets

    ds = datasets.Dataset.from_dict(pil_rows(10))
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = EnvConfig(dataset=str(tmp_path / "ds"), eval_size=3)
    train, ev = load_file_split(cfg, "train", 1), load_file_split(cfg, "eval", 1)
    assert (len(train), len(ev)) == (7, 3)
    assert sorted(int(s.id) for s in train + ev) == list(range(10))
    for s in train + ev:
        i = int(s.id)
        assert s.question == f"q{i}" and s.answer == str(i)
        assert len(s.images) == (0 if i % 4 == 3 else 1 + i % 2)
        assert all(isinstance(src, bytes) for src in s.images)  # stored form, not decoded here
        n = image_tokens(adapter, s)
        assert (n > 0) == bool(s.images)


def test_dataset_dict_dir_uses_split_names(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"question": ["a", "b", "c"], "answer": [1, 2, 3]}),
            "validation": datasets.Dataset.from_dict({"question": ["v"], "answer": [9]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = EnvConfig(dataset=str(tmp_path / "dd"), eval_split="validation", eval_size=64)
    train, ev = load_file_split(cfg, "train", 0), load_file_split(cfg, "eval", 0)
    assert [s.question for s in train] == ["a", "b", "c"]  # nothing held out of a split source
    assert [(s.id, s.question, s.answer) for s in ev] == [("0", "v", 9)]
    with pytest.raises(
        DatasetError, match=r"dd has no split 'test' \(it has: train, validation\); set env\.eval_split"
    ):
        load_file_split(EnvConfig(dataset=str(tmp_path / "dd")), "eval", 0)


def test_held_out_eval_is_disjoint_and_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": i} for i in range(50)])
    cfg = EnvConfig(dataset=str(path), eval_size=8)
    train, ev = load_file_split(cfg, "train", 0), load_file_split(cfg, "eval", 0)
    train_ids, eval_ids = [s.id for s in train], [s.id for s in ev]
    assert len(eval_ids) == 8 and len(train_ids) == 42
    assert not set(train_ids) & set(eval_ids)
    assert sorted(map(int, train_ids + eval_ids)) == list(range(50))
    assert train_ids == sorted(train_ids, key=int)  # file order is kept
    assert [s.id for s in load_file_split(cfg, "eval", 0)] == eval_ids
    assert [s.id for s in load_file_split(cfg, "eval", 1)] != eval_ids
    assert eval_ids == [str(i) for i in held_out_indices(50, 8, 0)]


def test_eval_dataset_file_keeps_all_train_rows(tmp_path):
    train_path = write_jsonl(tmp_path / "t.jsonl", [{"question": f"q{i}", "answer": i} for i in range(5)])
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"question": "e0", "answer": 0}])
    cfg = EnvConfig(dataset=str(train_path), eval_dataset=str(eval_path), eval_size=64)
    assert [s.question for s in load_samples(cfg, "train", 0)] == ["q0", "q1", "q2", "q3", "q4"]
    assert [s.question for s in load_samples(cfg, "eval", 0)] == ["e0"]


def test_too_small_to_hold_out(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": 1}] * 4)
    with pytest.raises(
        DatasetError,
        match=r"d\.jsonl has 4 rows, too few to hold out env\.eval_size = 4 .*"
        r"set env\.eval_dataset or lower env\.eval_size",
    ):
        load_file_split(EnvConfig(dataset=str(path), eval_size=4), "train", 0)
    assert len(load_file_split(EnvConfig(dataset=str(path), eval_size=3), "train", 0)) == 1


def test_missing_optional_dependency_says_what_to_install(tmp_path, monkeypatch):
    import datasets

    datasets.Dataset.from_dict({"question": ["a"], "answer": [1]}).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(
        DatasetError, match=r"needs the optional package `datasets`; .*pip install 'vlrl\[data\]'"
    ):
        load_file_split(EnvConfig(dataset=str(tmp_path / "ds")), "train", 0)
    with pytest.raises(DatasetError, match=r"hf:some/name needs the optional package `datasets`"):
        load_file_split(EnvConfig(dataset="hf:some/name"), "train", 0)
