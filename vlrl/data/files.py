"""Samples from data files: `.jsonl`, `.parquet`, `datasets.save_to_disk` directories and `hf:NAME`.

Every form is first opened as a `_Table` (a row count and a way to fetch rows by index), so the split rules,
the field mapping and the error messages are written once. Parquet and `datasets` tables stay Arrow tables
until the rows of the wanted split are taken, and Hugging Face Image columns are read in their stored form
(`{"bytes", "path"}`) instead of being decoded: images are decoded later, once, by the adapter.

`datasets` and `pyarrow` are optional (`pip install 'vlrl[data]'`) and imported only when a file needs them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import EnvConfig
from ..errors import UserError
from ..sample import Sample


class DatasetError(UserError):
    """A dataset the user supplied cannot be used; the message names the file, row or field and what to do."""


@dataclass
class _Table:
    """One opened split of a data source: its rows are fetched by index only when needed."""

    where: str
    """Printable name of the source for messages (the path, or `hf:NAME[split]`)."""
    num_rows: int
    columns: set[str]
    take: Callable[[list[int]], list[dict]]
    base_dir: Path | None
    """Directory relative image paths resolve against."""
    has_splits: bool
    """The source itself is split by name (hf: or a DatasetDict), so nothing is held out of it."""
    row_name: Callable[[int], str]
    """`file:line` for JSONL, `file row N` otherwise."""


def _require(module: str, where: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DatasetError(
            f"reading {where} needs the optional package `{module}`; install it with pip install 'vlrl[data]'"
        ) from None


def _read_jsonl(path: Path) -> _Table:
    rows: list[dict] = []
    lines: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e}); save the JSONL file as UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        lines.append(lineno)
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    return _Table(
        where=str(path),
        num_rows=len(rows),
        columns=columns,
        take=lambda idx: [rows[i] for i in idx],
        base_dir=path.parent,
        has_splits=False,
        row_name=lambda i: f"{path}:{lines[i]}",
    )


def _arrow_table(table: Any, where: str, base_dir: Path | None, has_splits: bool) -> _Table:
    """Rows of a pyarrow Table as plain Python values (Image features stay `{"bytes", "path"}` dicts)."""
    return _Table(
        where=where,
        num_rows=table.num_rows,
        columns=set(table.column_names),
        take=lambda idx: table.take(idx).to_pylist() if idx else [],
        base_dir=base_dir,
        has_splits=has_splits,
        row_name=lambda i: f"{where} row {i}",
    )


def _read_parquet(path: Path) -> _Table:
    _require("pyarrow", str(path))
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
    return _arrow_table(table, str(path), path.parent, has_splits=False)


def _dataset_to_table(ds: Any, where: str, base_dir: Path | None, has_splits: bool) -> _Table:
    # The arrow view honours an indices mapping (select/shuffle) and skips Image decoding.
    return _arrow_table(ds.with_format("arrow")[:], where, base_dir, has_splits)


def _pick_split(dd: Any, split_name: str, where: str, key: str) -> Any:
    if split_name not in dd:
        raise DatasetError(
            f"{where} has no split {split_name!r} (it has: {', '.join(sorted(dd))}); set {key} to one of them"
        )
    return dd[split_name]


def _read_saved_dir(path: Path, split_name: str, split_key: str) -> _Table:
    datasets = _require("datasets", str(path))
    try:
        obj = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DatasetError(
            f"{path}: not a directory written by datasets.save_to_disk ({e}); point to such a directory, "
            f"a .jsonl or a .parquet file"
        ) from None
    if isinstance(obj, datasets.DatasetDict):
        ds = _pick_split(obj, split_name, str(path), split_key)
        return _dataset_to_table(ds, f"{path}[{split_name}]", path, has_splits=True)
    return _dataset_to_table(obj, str(path), path, has_splits=False)


def _read_hub(name: str, split_name: str, split_key: str) -> _Table:
    datasets = _require("datasets", f"hf:{name}")
    where = f"hf:{name}[{split_name}]"
    try:
        ds = datasets.load_dataset(name, split=split_name)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DatasetError(f"{where}: {e}; set {split_key} to one of the dataset's splits") from None
        raise DatasetError(f"{where} could not be loaded ({e})") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise DatasetError(
            f"{where} could not be loaded ({type(e).__name__}: {e}); check the name and your hub access"
        ) from None
    return _dataset_to_table(ds, where, None, has_splits=True)


def open_source(spec: str, split_name: str, key: str, split_key: str) -> _Table:
    """Open `spec` (a file, a saved directory or `hf:NAME`); `split_name` picks a split of split sources.

    `key` (env.dataset / env.eval_dataset) and `split_key` (env.train_split / env.eval_split) name the
    settings that errors tell the user to change.
    """
    if spec.startswith("hf:"):
        table = _read_hub(spec.removeprefix("hf:"), split_name, split_key)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            table = _read_saved_dir(path, split_name, split_key)
        elif not path.exists():
            raise DatasetError(
                f"{key} = {spec!r}: no such file or directory; give a .jsonl or .parquet file, a directory "
                f"written by datasets.save_to_disk, hf:NAME, or builtin:NAME"
            )
        elif path.suffix.lower() == ".jsonl":
            table = _read_jsonl(path)
        elif path.suffix.lower() == ".parquet":
            table = _read_parquet(path)
        else:
            raise DatasetError(
                f"{key} = {spec!r}: unsupported file type {path.suffix or '(no suffix)'!r}; use .jsonl, "
                f".parquet, a directory written by datasets.save_to_disk, or hf:NAME"
            )
    if table.num_rows == 0:
        raise DatasetError(f"{table.where} ({key}) holds no rows; it must hold at least one sample")
    return table


def _image_source(value: Any, where: str, kind: str = "image") -> Any:
    """One image cell -> a source the adapter loads: strings, bytes and PIL images pass through; an HF Image
    value `{"bytes", "path"}` becomes its bytes when present, else its path. (A video file's cell, `kind`
    "video", takes the same forms.)"""
    article = "an" if kind == "image" else "a"
    if isinstance(value, (str, bytes, bytearray, Image.Image, Path)):
        if isinstance(value, (str, bytes, bytearray)) and not value:
            raise DatasetError(f"{where}: {article} {kind} entry is empty; remove it or give a path, URL or "
                               "data URI")
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return value["path"]
        raise DatasetError(f"{where}: {article} {kind} entry has neither bytes nor a path")
    raise DatasetError(
        f"{where}: {article} {kind} entry is a {type(value).__name__}; use a path, URL, data URI, base64 "
        "string, "
        + ("or a Hugging Face Image value" if kind == "image"
           else 'a list of frame images or {"frames": [...], "fps": F}')
    )


def _image_sources(cell: Any, where: str) -> list[Any]:
    """An image column cell: None, "" or [] is a text-only sample; a list holds several images."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return []
    cells = list(cell) if isinstance(cell, (list, tuple)) else [cell]
    return [_image_source(c, where) for c in cells]


def _video_sources(cell: Any, where: str) -> list[Any]:
    """A video column cell: None, "" or [] is a sample without video; a list holds several videos, each a
    video file (as an image cell's forms), a list of frame images, or `{"frames": [...], "fps": F}`."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return []
    cells = list(cell) if isinstance(cell, (list, tuple)) else [cell]
    out = []
    for c in cells:
        if isinstance(c, dict) and "frames" in c:
            out.append({"frames": [_image_source(f, where) for f in c["frames"] or []], "fps": c.get("fps")})
        elif isinstance(c, (list, tuple)):
            out.append([_image_source(f, where) for f in c])
        else:
            out.append(_image_source(c, where, "video"))
    return out


def _to_sample(row: dict, index: int, table: _Table, cfg: EnvConfig) -> Sample:
    where = table.row_name(index)
    question = row.get(cfg.question_field)
    if question is None:
        raise DatasetError(
            f"{where}: no value in the question field {cfg.question_field!r} (the row has: "
            f"{', '.join(sorted(row)) or 'nothing'}); fill it in or set env.question_field"
        )
    ident = row.get(cfg.id_field)
    used = {cfg.question_field, cfg.answer_field, cfg.image_field, cfg.video_field, cfg.id_field}
    return Sample(
        id=str(index) if ident is None else str(ident),
        question=str(question),
        answer=row.get(cfg.answer_field),
        images=_image_sources(row.get(cfg.image_field), where),
        videos=_video_sources(row.get(cfg.video_field), where),
        base_dir=table.base_dir,
        meta={k: v for k, v in row.items() if k not in used},
    )


def table_samples(table: _Table, indices: list[int], cfg: EnvConfig) -> list[Sample]:
    """The rows at `indices` as Samples (ids default to the row's index in its source)."""
    required = ((cfg.question_field, "env.question_field"), (cfg.answer_field, "env.answer_field"))
    for field_name, key in required:
        if field_name not in table.columns:
            raise DatasetError(
                f"{table.row_name(0)}: no field {field_name!r} (the rows have: "
                f"{', '.join(sorted(table.columns))}); set {key} to the right column"
            )
    return [_to_sample(row, i, table, cfg) for i, row in zip(indices, table.take(indices))]


def held_out_indices(num_rows: int, eval_size: int, seed: int) -> list[int]:
    """The rows held out for eval: a seeded choice, so runs with the same seed evaluate the same rows."""
    perm = list(range(num_rows))
    random.Random(f"holdout/{seed}").shuffle(perm)
    return sorted(perm[:eval_size])


def load_file_split(cfg: EnvConfig, split: str, seed: int) -> list[Sample]:
    """The "train" or "eval" samples of a file/directory/hub dataset.

    Split sources (hf:, DatasetDict directories) give env.train_split / env.eval_split. A plain file gives all
    its rows to train when env.eval_dataset is set, else env.eval_size rows chosen by `seed` go to eval only.
    """
    if split not in ("train", "eval"):
        raise DatasetError(f"unknown split {split!r}; expected 'train' or 'eval'")
    if split == "train":
        split_name, split_key = cfg.train_split, "env.train_split"
    else:
        split_name, split_key = cfg.eval_split, "env.eval_split"
    if split == "eval" and cfg.eval_dataset:
        table = open_source(cfg.eval_dataset, split_name, "env.eval_dataset", split_key)
        return table_samples(table, list(range(table.num_rows)), cfg)
    table = open_source(cfg.dataset, split_name, "env.dataset", split_key)
    if table.has_splits or cfg.eval_dataset:
        return table_samples(table, list(range(table.num_rows)), cfg)
    if table.num_rows <= cfg.eval_size:
        raise DatasetError(
            f"{table.where} has {table.num_rows} rows, too few to hold out env.eval_size = {cfg.eval_size} "
            f"for eval and keep some for training; set env.eval_dataset or lower env.eval_size"
        )
    held = held_out_indices(table.num_rows, cfg.eval_size, seed)
    if split == "eval":
        return table_samples(table, held, cfg)
    held_set = set(held)
    return table_samples(table, [i for i in range(table.num_rows) if i not in held_set], cfg)
