"""Shared fixtures: the tiny Qwen3-VL (built once per session, or taken from $VLRL_TINY_MODEL)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    env = os.environ.get("VLRL_TINY_MODEL")
    if env and (Path(env) / "config.json").is_file():
        return Path(env).resolve()
    from vlrl.tiny_model import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny") / "tiny-qwen3-vl")


@pytest.fixture(scope="session")
def model_cfg(tiny_model_dir):
    from vlrl.config import ModelConfig

    return ModelConfig(path=str(tiny_model_dir), dtype="float32", min_pixels=64 * 64, max_pixels=128 * 128,
                       max_model_len=1024)


@pytest.fixture(scope="session")
def adapter(model_cfg):
    from vlrl.adapters.qwen3_vl import Qwen3VLAdapter

    return Qwen3VLAdapter.from_config(model_cfg)


@pytest.fixture(scope="session")
def tiny_model(adapter):
    import torch

    return adapter.load_model(torch.float32).eval()
