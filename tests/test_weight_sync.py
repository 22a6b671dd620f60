"""The disk weight sync's write path without a server: host buffers allocated once and copied as a snapshot,
safetensors files written in parallel that load back exactly, only what changes written after the first push
(a frozen vision tower once), whole layers for LoRA, the version-tagged background push, and where the files
go. The real server's side is in test_vllm.py (`test_train_with_the_server_as_sampler`)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

from vlrl.config import RolloutConfig
from vlrl.rollout import weight_files, weight_sync
from vlrl.rollout.vllm_client import ServerError, VLLMSampler
from vlrl.rollout.weight_files import HostShards
from vlrl.rollout.weight_sync import DiskWeightSync, default_sync_dir, export_plan


def read_dir(directory) -> dict[str, torch.Tensor]:
    """What a reload of `directory` reads: the files its index names, and in them the tensors it maps."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in set(index.values()):
        with safe_open(str(directory / file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if index.get(k) == file})
    return out


def test_host_shards_are_safetensors_files_written_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(weight_files, "SHARD_BYTES", 1000)  # several shards
    monkeypatch.setattr(weight_files, "CHUNK_BYTES", 96)  # several writes per shard, by several threads
    tensors = {"a.w": torch.randn(7, 13), "a.b": torch.randn(13).to(torch.bfloat16), "n": torch.tensor(3),
               "b.w": torch.randn(300), "c.ids": torch.arange(5, dtype=torch.int64), "s": torch.randn(())}
    shards = HostShards({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, "trained", pin=False)
    assert len(shards.shards) == 3 and shards.nbytes == sum(v.numel() * v.element_size()
                                                            for v in tensors.values())
    buffer = shards.buffer.data_ptr()
    shards.copy_from(tensors.items())
    assert shards.write(tmp_path, threads=3) == sum(os.path.getsize(tmp_path / f) for f in shards.files)
    for file in shards.files:
        with safe_open(str(tmp_path / file), "pt") as f:
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), tensors[k]) and f.get_tensor(k).dtype == tensors[k].dtype
    inodes = [os.stat(tmp_path / f).st_ino for f in shards.files]
    new = {k: v + 1 if v.is_floating_point() else v * 2 for k, v in tensors.items()}
    shards.copy_from(new.items())
    shards.write(tmp_path)
    assert shards.buffer.data_ptr() == buffer  # the host buffer is allocated once
    assert [os.stat(tmp_path / f).st_ino for f in shards.files] == inodes  # overwritten in place
    for file in shards.files:
        with safe_open(str(tmp_path / file), "pt") as f:
            assert all(torch.equal(f.get_tensor(k), new[k]) for k in f.keys())


class FakeClient:
    """The control routes a disk push calls, recorded; `restart()` makes the server forget our weights."""

    base_url = "http://fake"

    def __init__(self):
        self.version, self.calls, self.reloads = "default", [], []

    def model_name(self):
        return "m"

    def weight_version(self):
        return self.version

    def set_weight_version(self, version, retry=True):
        self.calls.append("tag")
        self.version = version

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")

    def reload_weights(self, path):
        self.calls.append("reload")
        self.reloads.append(read_dir(__import__("pathlib").Path(path)))

    def reset_caches(self):
        self.calls.append("reset")

    def restart(self):
        self.version = "default"


@pytest.fixture
def frozen_vision(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.model.visual.requires_grad_(False)  # what model.freeze_vision = true does
    return model


def sampler_with(client, sync, adapter) -> VLLMSampler:
    return VLLMSampler(adapter, RolloutConfig(server_url="http://fake", max_retries=1), weight_sync=sync,
                       client=client)


def test_frozen_vision_is_written_once_and_reloaded_only_by_a_server_that_lost_it(
    frozen_vision, adapter, tmp_path):
    model = frozen_vision
    client = FakeClient()
    sync = DiskWeightSync(client, adapter, tmp_path / "w")
    sampler = sampler_with(client, sync, adapter)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    vision = {k for k in state if k.startswith("model.visual.")}
    trained_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if k not in vision)

    sampler.sync_weights(model)
    sampler.wait_for_push()
    assert client.calls == ["tag", "pause", "reload", "reset", "resume"]
    first = client.reloads[-1]
    assert set(first) == set(state) and all(torch.equal(first[k], state[k]) for k in state)  # all of it, once
    frozen_files = {f: os.stat(tmp_path / "w" / f).st_mtime_ns for f in os.listdir(tmp_path / "w")
                    if f.startswith("frozen")}
    assert frozen_files

    with torch.no_grad():  # a step: the language model moves
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    sampler.sync_weights(model)
    assert sync.trained.views  # ... and the buffers hold a snapshot: the step after may change the weights
    sampler.wait_for_push()
    assert sync.bytes_written < trained_bytes + 4096 and sync.bytes_written >= trained_bytes  # (headers)
    second = client.reloads[-1]
    assert set(second) == set(state) - vision  # only what changed is reloaded ...
    assert all(torch.equal(second[k], v.detach()) for k, v in model.state_dict().items() if k in second)
    # ... or written
    assert {f: os.stat(tmp_path / "w" / f).st_mtime_ns for f in frozen_files} == frozen_files

    # a server back with the base weights: every tensor again, the frozen ones from their files
    client.restart()
    sampler.sync_weights(model)
    sampler.sample([], 1)  # (waits for the push and checks its version)
    assert set(client.reloads[-1]) == set(state)
    assert all(torch.equal(client.reloads[-1][k], state[k]) for k in vision)
    assert {f: os.stat(tmp_path / "w" / f).st_mtime_ns for f in frozen_files} == frozen_files
    assert sampler.weights_version == client.version != "default"
    sampler.close()
    assert (tmp_path / "w").is_dir()  # a directory the user named is kept


def test_the_copy_is_a_snapshot_the_learner_may_overwrite(frozen_vision, adapter, tmp_path):
    model = frozen_vision
    client = FakeClient()
    sync = DiskWeightSync(client, adapter, tmp_path / "w")
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    before = dict(model.named_parameters())[name].detach().clone()
    sync.copy(model)
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)  # the next step, while the files are being written
    sync.write()
    sync.load(full=True)
    assert torch.equal(client.reloads[-1][name], before)


def test_a_failed_background_push_is_raised_by_the_next_sample(frozen_vision, adapter, tmp_path):
    class Failing(FakeClient):
        def reload_weights(self, path):
            raise ServerError("reload refused")

    client = Failing()
    sampler = sampler_with(client, DiskWeightSync(client, adapter, tmp_path / "w"), adapter)
    sampler.sync_weights(frozen_vision)  # returns: the reload runs in the background
    with pytest.raises(ServerError, match="reload refused"):
        sampler.sample([], 1)
    assert sampler.weights_version is None


def test_lora_hands_over_whole_layers(adapter, tmp_path):
    from vlrl.adapters.lora import add_lora, merged_state
    from vlrl.config import ModelConfig

    model = adapter.load_model(torch.float32)
    model.model.visual.requires_grad_(False)
    add_lora(model, ModelConfig(path="x", lora_rank=4, lora_target_modules=["q_proj", "v_proj", "down_proj"]))
    plan = export_plan(model)
    changed = {n for n, c in plan.items() if c}
    layer = "model.language_model.layers.0."
    # q and v are adapted; k is fused with them on the server (qkv_proj), so it goes too; the MLP's three
    # (gate_up_proj fused) because down_proj is adapted; not the layer norms, embeddings, head or vision tower
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        assert f"{layer}self_attn.{leaf}.weight" in changed
    for leaf in ("gate_proj", "up_proj", "down_proj"):
        assert f"{layer}mlp.{leaf}.weight" in changed
    assert f"{layer}input_layernorm.weight" not in changed
    assert not any(n.startswith("model.visual.") or "embed_tokens" in n or n == "lm_head.weight"
                   for n in changed)
    assert set(plan) == set(merged_state(model))
    with torch.no_grad():  # a trained adapter: the merged weights differ from the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    client = FakeClient()
    sync = DiskWeightSync(client, adapter, tmp_path / "w")
    sync.push(model)
    merged = merged_state(model)
    assert all(torch.equal(client.reloads[-1][k], merged[k]) for k in merged)


def test_sync_dir_defaults_to_shared_memory_when_the_server_is_local_and_it_has_room(tmp_path, monkeypatch):
    import shutil

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(weight_sync, "SHM", str(shm))
    run = tmp_path / "runs" / "r1"
    free = shutil.disk_usage(shm).free
    local = default_sync_dir(run, "http://127.0.0.1:8000", free // 2)
    assert local.parent == shm and local.name.startswith("vlrl-sync-r1-")
    assert default_sync_dir(run, "http://localhost:8000", free // 2) == local  # one directory per run
    assert default_sync_dir(tmp_path / "runs" / "r2", "http://127.0.0.1:8000", free // 2) != local
    # no room for it + a quarter
    assert default_sync_dir(run, "http://127.0.0.1:8000", free) == run / "weights"
    assert default_sync_dir(run, "http://gpu-node-7:8000", 1) == run / "weights"  # a server elsewhere
