"""Shared fixtures: the tiny Qwen3-VL (built once per session, or taken from $VLRL_TINY_MODEL), and the
overrides of a small training run of it (`from conftest import tiny_config`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "configs/tiny-cpu.toml"
PARITY = 'env.rewards=[{fn="rewards_for_tests:parity"}]'  # varies within a group: every group carries signal
SMALL_STEP = ("rollout.prompts_per_step=2", "rollout.group_size=4")


def tiny_overrides(tiny_model_dir, out_dir, *extra: str, step: tuple[str, ...] = SMALL_STEP) -> list[str]:
    """`--set` overrides of configs/tiny-cpu.toml for a small run of the tiny model: outputs under `out_dir`,
    `step` (2 prompts x 4 rollouts), 4 new tokens, no progress bar, the parity reward, a constant learning
    rate (the demo's cosine schedule depends on `train.steps`, which the resume tests change between the
    runs they compare); then `extra`, which may override any of them (later overrides win)."""
    return [f"model.path={tiny_model_dir}", f"output_dir={out_dir}", *step, "rollout.max_new_tokens=4",
            "logging.progress=false", PARITY, 'train.lr_schedule="constant"', *extra]


def tiny_config(tiny_model_dir, out_dir, *extra: str, step: tuple[str, ...] = SMALL_STEP):
    """configs/tiny-cpu.toml with `tiny_overrides`."""
    from vlrl.config import load_config

    return load_config(TINY_CPU, tiny_overrides(tiny_model_dir, out_dir, *extra, step=step))


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


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory) -> Path:
    """The tiny Qwen3-VL with Qwen's real vocabulary, warm-started to call the built-in tools (`make tiny`
    builds it into .cache/tiny-qwen3-vl-qwen; $VLRL_TINY_QWEN_MODEL names it)."""
    env = os.environ.get("VLRL_TINY_QWEN_MODEL")
    if env and (Path(env) / "config.json").is_file():
        return Path(env).resolve()
    from vlrl.tiny_model import build_tiny_qwen3_vl
    from vlrl.tiny_warm_start import warm_start_tools

    out = build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny") / "tiny-qwen3-vl-qwen", vocab="qwen")
    warm_start_tools(out)
    return out


@pytest.fixture(scope="session")
def qadapter(qwen_model_dir):
    from vlrl.adapters.qwen3_vl import Qwen3VLAdapter
    from vlrl.config import ModelConfig

    return Qwen3VLAdapter.from_config(ModelConfig(path=str(qwen_model_dir), dtype="float32", min_pixels=4096,
                                                  max_pixels=16384, max_model_len=2048))


@pytest.fixture(scope="session")
def qwen_model(qadapter):
    import torch

    return qadapter.load_model(torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """One real vLLM server of the tiny model for every test module that samples from it (a CPU server takes
    about a minute to start here). Tests that change its weights put the base weights back. Ctrl-C stops it
    cleanly at the end: `vlrl serve` exits 0 and the port is released."""
    import httpx

    from vllm_server import Server

    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "serve.log").start()
    yield srv
    assert srv.stop() == 0, srv.out.read_text()[-2000:]
    assert "vLLM server stopped" in srv.out.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{srv.url}/health", timeout=2)


@pytest.fixture(scope="session")
def tiny_qwen3_5_dir(tmp_path_factory) -> Path:
    """The tiny Qwen3.5 (3 Gated DeltaNet layers + 1 full attention, vision tower, Qwen3.5's template), built
    once per session (~10 s), or taken from $VLRL_TINY_QWEN3_5_MODEL."""
    env = os.environ.get("VLRL_TINY_QWEN3_5_MODEL")
    if env and (Path(env) / "config.json").is_file():
        return Path(env).resolve()
    from vlrl.tiny_qwen3_5 import build_tiny_qwen3_5

    return build_tiny_qwen3_5(tmp_path_factory.mktemp("tiny") / "tiny-qwen3.5")
