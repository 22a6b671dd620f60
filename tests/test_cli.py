import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VLRL = [sys.executable, "-m", "vlrl"]


def run(*args, **kw):
    return subprocess.run([*VLRL, *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_help_lists_the_commands_and_imports_nothing_heavy():
    t0 = time.perf_counter()
    res = run("--help")
    assert res.returncode == 0
    assert "check-batch" in res.stdout and "build-tiny-model" in res.stdout
    code = ("import sys, vlrl.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    assert time.perf_counter() - t0 < 10  # generous: a loaded CI box; the import check above is the real test


def test_check_batch_json_ok(tiny_model_dir):
    auto = ("train.gradient_checkpointing=true", 'train.checkpoint_fraction="auto"', "train.micro_batch_tokens=2048")
    res = run("check-batch", "configs/tiny-cpu.toml", "--json", "--set", f"model.path={tiny_model_dir}",
              *(x for kv in auto for x in ("--set", kv)))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True
    packing = next(c["detail"] for c in report["checks"] if c["name"] == "packing")
    assert "within train.micro_batch_tokens = 2048; on a GPU" in packing  # (auto may halve it: said)
    names = {c["name"]: c["ok"] for c in report["checks"]}
    assert set(names) >= {"shapes", "image tokens vs grid", "token budget", "loss mask", "M-RoPE positions",
                          "trainer vs sampler logprobs"}
    assert all(names.values())
    assert report["stats"]["mismatch_kl"] < 1e-6
    assert report["shapes"]["pixel_values"][1] == 1536
    assert "[[" in report["sample"]["text"]  # trained tokens are marked in the rendering


def test_check_batch_fails_when_the_token_budget_is_exceeded(tiny_model_dir, adapter):
    # a prompt of P tokens fits max_model_len P + 2, but not with max_new_tokens (16) more
    prompt = len(adapter.encode_prompt(adapter.build_messages(
        "What color is the shape? Answer with one word: blue, green, red or yellow.", 1),
        [Image.new("RGB", (64, 64))]
    ).input_ids)
    res = run("check-batch", "configs/tiny-cpu.toml", "--json", "--set", f"model.path={tiny_model_dir}",
              "--set", f"model.max_model_len={prompt + 2}")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["ok"] is False
    assert [c["ok"] for c in report["checks"] if c["name"] == "token budget"] == [False]


def test_check_batch_warns_when_most_samples_are_cut_by_max_new_tokens(tiny_model_dir):
    """A warning, not a failure: the batch is sound, but its rewards score unfinished answers."""
    res = run("check-batch", "configs/tiny-cpu.toml", "--json", "--set", f"model.path={tiny_model_dir}",
              "--set", "rollout.max_new_tokens=1")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    warned = [c for c in report["checks"] if c["warning"]]
    assert report["ok"] and [c["name"] for c in warned] == ["truncation"], report["checks"]
    assert ("raise rollout.max_new_tokens" in warned[0]["detail"]
            and report["stats"]["truncated_fraction"] > 0.5)


def test_check_batch_human_output(tiny_model_dir):
    res = run("check-batch", "configs/tiny-cpu.toml", "--set", f"model.path={tiny_model_dir}", env=None)
    assert res.returncode == 0, res.stderr
    assert "batch OK" in res.stdout and "trainer vs sampler logprobs" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["check-batch", "configs/tiny-cpu.toml", "--set", "rollout.group_sise=3"],
         "rollout.group_sise: unknown key"),
        (["check-batch", "missing.toml"], "config file missing.toml does not exist"),
        (["check-batch", "configs/tiny-cpu.toml", "--set", "model.path=/no/such/model"],
         "model.path '/no/such/model'"),
    ],
)
def test_user_errors_are_one_clear_message(args, message):
    res = run(*args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
