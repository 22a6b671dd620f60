"""`vlrl eval`: pass@k by hand, the summary of the tiny model on the colors task, determinism, checkpoints,
and the errors a user can cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_report import Dom, pixels_near, render

from vlrl.checkpoint import latest_checkpoint
from vlrl.errors import UserError
from vlrl.evaluate import check_checkpoint, evaluate, pass_at_k, pass_ks, run_eval, summarize
from vlrl.report import write_run_report
from vlrl.train import train

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
RED = (220, 30, 30)
# parity (odd completion length) varies within a group, so accuracy and pass@k are not all zero
REWARDS = 'env.rewards=[{fn="rewards_for_tests:parity"}, {fn="choice"}]'


def cfg_of(tiny_model_dir, tmp_path, *extra):
    return tiny_config(tiny_model_dir, tmp_path, REWARDS, *extra, step=())


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def quiet() -> Console:
    return Console(quiet=True)


# --- the numbers -----------------------------------------------------------------------------------------
def test_pass_at_k_by_hand():
    assert [pass_at_k(4, 1, k) for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]  # 1 - C(3,k)/C(4,k)
    assert [pass_at_k(4, 0, k) for k in (1, 2, 4)] == [0.0, 0.0, 0.0]
    assert [pass_at_k(4, 4, k) for k in (1, 2, 4)] == [1.0, 1.0, 1.0]
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4] and pass_ks(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def record(sid, first, second=0.0, length=3, finish="stop"):
    reward = None if first is None else first + second
    return {"sample_id": sid, "reward": reward, "rewards": {"a": first, "b": second},
            "correct": first is not None and first >= 1.0, "length": length, "finish_reason": finish}


def test_summary_by_hand():
    # prompt p: 1 of 4 right; prompt q: none right (one completion scores only on the second function, one
    # failed), so accuracy is 1/8 and pass@k averages p's (1/4, 1/2, 1) with q's 0
    recs = [record("p", 1.0), record("p", 0.0), record("p", 0.0), record("p", 0.0, length=5, finish="length"),
            record("q", 0.0, 1.0), record("q", 0.0), record("q", None), record("q", 0.0)]
    s = summarize(recs, ["a", "b"], 4)
    assert s["accuracy"] == 1 / 8
    assert (s["pass@1"], s["pass@2"], s["pass@4"]) == (0.125, 0.25, 0.5)
    assert s["reward/mean"] == 2 / 7 and s["reward_failures"] == 1  # the failed one is left out
    assert s["reward/a/mean"] == 1 / 7 and s["reward/b/mean"] == 1 / 8
    assert s["response_length/mean"] == 26 / 8 and s["truncated_fraction"] == 1 / 8


# --- on the tiny model -----------------------------------------------------------------------------------
def test_eval_of_the_base_model_is_complete_and_deterministic(tiny_model_dir, tmp_path):
    cfg = cfg_of(tiny_model_dir, tmp_path)
    summary = run_eval(cfg, None, "eval", 4, 4, quiet())
    out = tmp_path / "tiny-cpu" / "eval-base-eval"
    assert summary["out_dir"] == str(out)
    assert {"reward/mean", "reward/rewards_for_tests:parity/mean", "reward/choice/mean", "accuracy", "pass@1",
            "pass@2", "pass@4", "response_length/mean"} <= set(summary) and "pass@8" not in summary
    assert (summary["prompts"], summary["samples_per_prompt"], summary["samples"]) == (4, 4, 16)
    assert json.loads((out
                       / "summary.json").read_text()) == {k: v for k, v in summary.items() if k != "out_dir"}
    recs = lines(out / "samples.jsonl")
    assert [r["sample_id"] for r in recs] == [f"colors-eval-{i}" for i in range(4) for _ in range(4)]
    assert [(r["prompt"], r["index"]) for r in recs] == [(i, j) for i in range(4) for j in range(4)]
    assert all((out / p).is_file() for r in recs for p in r["images"])
    assert len(list((out / "images").iterdir())) == 4  # one file per prompt, not per completion
    # the summary agrees with the samples it was computed from
    assert summary["accuracy"] == sum(r["correct"] for r in recs) / 16
    assert all(r["correct"] == (len(r["completion"]) % 2 == 1) for r in recs)
    assert summary["pass@2"] == pytest.approx(
        sum(pass_at_k(4, sum(r["correct"] for r in recs[i : i + 4]), 2) for i in range(0, 16, 4)) / 4)
    assert 0 < summary["accuracy"] < 1  # parity varies, so the check above is not trivially 0 == 0
    assert summary["response_length/mean"] == sum(r["length"] for r in recs) / 16 <= 4
    # the same seed gives the same completions, from another process through the command line
    first = (out / "samples.jsonl").read_text()
    res = subprocess.run(
        [sys.executable, "-m", "vlrl", "eval", "configs/tiny-cpu.toml", "--limit", "4", "--n", "4",
         *[f"--set={o}" for o in (f"model.path={tiny_model_dir}", f"output_dir={tmp_path}",
                                   "rollout.max_new_tokens=4", "logging.progress=false", REWARDS)]],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )
    assert res.returncode == 0, res.stderr
    assert "pass@4" in res.stdout and f"report.html:{out / 'report.html'}" in "".join(res.stdout.split())
    assert (out / "samples.jsonl").read_text() == first
    other = run_eval(cfg_of(tiny_model_dir, tmp_path, "rollout.seed=1"), None, "eval", 4, 4, quiet())
    assert (Path(other["out_dir"]) / "samples.jsonl").read_text() != first  # the seed matters


def test_a_reward_function_listed_twice_is_scored_under_two_keys(tiny_model_dir, tmp_path):
    fn = "rewards_for_tests:parity"
    twice = f'env.rewards=[{{fn="{fn}"}}, {{fn="{fn}", weight=0.5}}]'
    summary = run_eval(cfg_of(tiny_model_dir, tmp_path, twice), None, "eval", 4, 2, quiet())
    assert summary["rewards"] == [fn, f"{fn}#2"]
    assert summary[f"reward/{fn}/mean"] == summary[f"reward/{fn}#2/mean"] > 0
    assert summary["reward/mean"] == pytest.approx(1.5 * summary[f"reward/{fn}/mean"])
    recs = lines(Path(summary["out_dir"]) / "samples.jsonl")
    assert all(set(r["rewards"]) == {fn, f"{fn}#2"} for r in recs)


def test_evaluate_reports_progress_per_batch_and_leaves_the_model_and_rng_alone(adapter, tiny_model, tmp_path,
                                                                                tiny_model_dir):
    from vlrl.data.sources import load_samples
    from vlrl.rollout.embedded import EmbeddedSampler
    from vlrl.rollout.groups import RolloutGroups

    cfg = cfg_of(tiny_model_dir, tmp_path, "rollout.prompts_per_step=2")
    sampler = EmbeddedSampler(tiny_model, adapter, cfg.rollout)
    samples = load_samples(cfg.env, "eval")[:3]
    calls = []
    tiny_model.train()
    rng = torch.get_rng_state()
    summary = evaluate(cfg, RolloutGroups(cfg, adapter, sampler), samples, 2, 7, tmp_path / "ev",
                       progress=lambda done, total: calls.append((done, total)), info={"step": 5})
    assert calls == [(0, 3), (2, 3), (3, 3)]  # batches of prompts_per_step prompts
    assert summary["step"] == 5 and summary["seed"] == 7 and summary["samples"] == 6
    assert tiny_model.training and torch.equal(torch.get_rng_state(), rng)
    tiny_model.eval()
    assert {p.name
            for p in (tmp_path / "ev").iterdir()} == {"summary.json", "samples.jsonl",
                                                      "report.html", "images"}


def test_eval_of_a_multi_turn_environment_reports_its_episodes_and_keeps_prompt_positions(adapter, tmp_path,
                                                                                         tiny_model_dir):
    """Sample 1 cannot start an episode (skipped): the others keep their positions in the split (prompt 2 was
    logged as prompt 1). The summary holds the environment's reward, turns, tool calls and finish reasons
    (it held none of them), and lengths count sampled tokens only (they counted the tool replies too)."""
    from test_environments import Scripted

    from vlrl.data.sources import load_samples
    from vlrl.rollout.groups import RolloutGroups

    cfg = cfg_of(tiny_model_dir, tmp_path, "env.environment=envs_for_tests:SkipsOneAndRewards",
                 "env.max_turns=2",
                 "rollout.prompts_per_step=4")
    summary = evaluate(cfg, RolloutGroups(cfg, adapter, Scripted(adapter, ["look"])),
                       load_samples(cfg.env, "eval")[:3], 2, 0, tmp_path / "ev")
    recs = lines(tmp_path / "ev" / "samples.jsonl")
    assert [(r["sample_id"],
             r["prompt"]) for r in recs] == [("colors-eval-0", 0)] * 2 + [("colors-eval-2", 2)] * 2
    said = len(adapter.tokenizer.encode("look", add_special_tokens=False)) + 1  # and <|im_end|>
    assert summary["bad_samples"] == 1 and summary["samples"] == 4
    assert summary["reward/env/mean"] == 0.5  # 0.25 a turn, two turns
    assert (summary["turns/mean"], summary["turns/max"], summary["tool_calls"]) == (2, 2, 0)
    assert summary["finish/max_turns"] == 4 and summary["response_length/mean"] == 2 * said
    assert all(r["rewards"]["env"] == 0.5 and r["turns"] == 2 and r["tool_errors"] == {} for r in recs)


def test_eval_of_a_checkpoint_and_its_report_in_a_browser(tiny_model_dir, tmp_path):
    base = run_eval(cfg_of(tiny_model_dir, tmp_path), None, "eval", 4, 4, quiet())
    run = train(cfg_of(tiny_model_dir, tmp_path, "name=ck", "train.steps=1", "rollout.prompts_per_step=2",
                       "rollout.group_size=4", "train.micro_batch_size=4"))
    ckpt = latest_checkpoint(run.run_dir)
    summary = run_eval(cfg_of(tiny_model_dir, tmp_path, "name=ck"), ckpt, "eval", 4, 4, quiet())
    out = ckpt / "eval-eval"
    assert summary["out_dir"] == str(out) and summary["checkpoint"] == str(ckpt)
    assert (out / "summary.json").is_file() and len(lines(out / "samples.jsonl")) == 16
    # the checkpoint's weights were used: one RL step at lr 1e-3 changes what the tiny model samples
    assert (out / "samples.jsonl").read_text() != (Path(base["out_dir"]) / "samples.jsonl").read_text()
    # the eval report shows each prompt's image; one of the first four eval prompts is a red shape
    assert "red" in [r["answer"] for r in lines(out / "samples.jsonl")]
    dom_text, shot = render(out / "report.html", tmp_path)
    dom = Dom(dom_text)
    assert sum(img["src"].startswith("data:image/png;base64,") for img in dom.imgs) == 4 + 1  # + pass@k chart
    assert f"{summary['accuracy']:.4g}" in dom.text
    assert pixels_near(shot, RED) > 1000
    # and the run's report lists this eval
    assert 'href="step-1/eval-eval/report.html"' in write_run_report(run.run_dir).read_text()


# --- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, message", [
    ("missing", "missing: no such directory"),
    ("empty", "empty: no config.json in it, so it is not a model checkpoint"),
])
def test_a_bad_checkpoint_is_one_clear_error(tiny_model_dir, tmp_path, where, message):
    (tmp_path / "empty").mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "vlrl", "eval", "configs/tiny-cpu.toml", "--checkpoint", str(tmp_path / where),
         "--set", f"model.path={tiny_model_dir}"],
        capture_output=True, text=True, cwd=ROOT,
    )
    err = " ".join(res.stderr.split())  # rich wraps long lines
    assert res.returncode == 2, res.stderr
    assert f"--checkpoint {tmp_path}/{message}" in err and "Traceback" not in err


def test_a_run_directory_as_checkpoint_names_its_newest_checkpoint(tmp_path, tiny_model_dir):
    for step in (2, 4):
        (tmp_path / f"step-{step}").mkdir()
        (tmp_path / f"step-{step}" / "COMPLETE").write_text(f"{step}\n")
    with pytest.raises(UserError, match=r"its newest checkpoint is .*step-4\)"):
        check_checkpoint(tmp_path)
    with pytest.raises(UserError, match="--split 'test': expected 'train' or 'eval'"):
        run_eval(cfg_of(tiny_model_dir, tmp_path), None, "test", None, None, quiet())
