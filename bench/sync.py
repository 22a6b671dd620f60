"""Weight sync to the vLLM server: what the learner waits for per sync, today's path against the new one.

    python bench/sync.py            # on a GPU: Qwen3-VL-8B architecture, random bf16, the trainer side
    python bench/sync.py --tiny     # on the CPU: the tiny model end to end with a real vLLM server

GPU (the trainer side; vLLM cannot run on that machine): today's path, `export_state` + `save_pretrained` into
/dev/shm (what `DiskWeightSync.push` did, the learner waiting throughout), then the new one (`DiskWeightSync`
with no server): the learner's copy to pinned host buffers and the parallel write of the files, into /dev/shm
and into a directory on the local disk, the vision tower frozen (the default: written at the first push only).
Each sync after the first is timed (`--repeat`); the first (buffers allocated and pinned, the frozen tower
written) apart. Then the fraction of bf16 weights one optimizer step at lr 1e-6 changes (for whether a delta
format would pay).

CPU (`--tiny`): `vlrl serve` on the tiny model; per step the language model moves (as a step moves it), then
today's push (save_pretrained + reload, all of it blocking) and the new one (copy; then in the background the
files, the tag, the reload; the first request after waits for it), the first request's seconds, and the
mismatch KL of the rollouts against the trainer's weights (float32 noise when the server samples from exactly
them).

Last line: `sync: trainer-blocking X.XX s (was Y.YY s), total Z.ZZ s` (medians; total: the new push whole, on
the GPU the copy plus the files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlrl.rollout.weight_sync import DiskWeightSync, export_plan  # noqa: E402


def qwen3_vl_8b_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(  # (bench/update_step.py's; the weights' names and shapes are what matter here)
        text_config=dict(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
            patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


class NoServer:
    """The control routes, answered at once: the GPU bench times the trainer side only."""

    def pause(self):
        pass

    def resume(self):
        pass

    def reload_weights(self, path):
        pass


def fs_type(path: Path) -> str:
    """The file system `path` is on (the longest mount point above it in /proc/mounts)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, fs = line.split()[:3]
        if str(path.resolve()).startswith(point) and len(point) > len(best):
            best, kind = point, fs
    return f"{kind} ({best})"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def gpu(args) -> str:
    from transformers import Qwen3VLForConditionalGeneration

    t0 = time.perf_counter()
    if args.smoke:  # the script's own check, on the CPU: the tiny model's architecture
        from transformers import AutoConfig

        config, device = AutoConfig.from_pretrained(os.environ["VLRL_TINY_MODEL"]), "cpu"
    else:
        config, device = qwen3_vl_8b_config(), "cuda"
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.model.visual.requires_grad_(False)  # model.freeze_vision = true (the default)
    if device == "cuda":
        torch.cuda.synchronize()
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    plan = export_plan(model)
    changing = sum(state[n].numel() * state[n].element_size() for n, c in plan.items() if c)
    print(f"model: {sum(t.numel() for t in state.values()) / 1e9:.2f}B parameters, {gib(total)} bf16 "
          f"(built in {time.perf_counter() - t0:.1f} s); changed by a step (vision frozen): {gib(changing)}; "
          f"{os.cpu_count()} CPU cores; /dev/shm free {gib(shutil.disk_usage('/dev/shm').free)}", flush=True)
    rows = []

    old_dir = Path("/dev/shm/vlrl-bench-old")
    old = []
    for _ in range(args.old_repeat):
        shutil.rmtree(old_dir, ignore_errors=True)
        t = time.perf_counter()
        model.save_pretrained(old_dir, state_dict=dict(model.state_dict()), safe_serialization=True)
        old.append(time.perf_counter() - t)
        print(f"today's path (export_state + save_pretrained) to /dev/shm: {old[-1]:.2f} s", flush=True)
    shutil.rmtree(old_dir, ignore_errors=True)
    rows.append(("today: export_state + save_pretrained -> /dev/shm", statistics.median(old), 0.0, total))

    new_dir = Path("/dev/shm/vlrl-bench-new")
    shutil.rmtree(new_dir, ignore_errors=True)
    sync = DiskWeightSync(NoServer(), None, new_dir)
    t = time.perf_counter()
    sync.copy(model)
    first_copy = time.perf_counter() - t
    t = time.perf_counter()
    first_bytes = sync.write()
    first_write = time.perf_counter() - t
    print(f"new, first sync (buffers allocated, pinned={sync.trained.pinned}; frozen tower written): copy "
          f"{first_copy:.2f} s, write {first_write:.2f} s ({gib(first_bytes)})", flush=True)
    copies, writes = [], []
    for _ in range(args.repeat):
        with torch.no_grad():
            model.model.language_model.layers[0].mlp.up_proj.weight.add_(1e-3)  # (a step moved the weights)
        t = time.perf_counter()
        sync.copy(model)
        copies.append(time.perf_counter() - t)
        t = time.perf_counter()
        written = sync.write()
        writes.append(time.perf_counter() - t)
        print(f"new, sync: copy {copies[-1]:.3f} s ({changing / copies[-1] / 1e9:.1f} GB/s), write "
              f"{writes[-1]:.2f} s ({gib(written)}, {written / writes[-1] / 1e9:.1f} GB/s)", flush=True)
    rows.append(("new: copy to pinned buffers (learner waits)", statistics.median(copies), 0.0, changing))
    rows.append(("new: parallel write -> /dev/shm (background)", 0.0, statistics.median(writes), written))
    # the files load back as the weights
    from safetensors import safe_open

    name = "model.language_model.layers.0.mlp.up_proj.weight"
    file = next(s.file for s in sync.trained.shards if name in s.names)
    with safe_open(str(new_dir / file), "pt") as f:
        assert torch.equal(f.get_tensor(name), model.state_dict()[name].cpu()), "the written tensor differs"

    disk_dir = Path(args.disk_dir)
    disk_dir.mkdir(parents=True, exist_ok=True)
    print(f"local disk: {disk_dir} on {fs_type(disk_dir)}", flush=True)
    disk = []
    for _ in range(2):
        t = time.perf_counter()
        sync.trained.write(disk_dir)
        disk.append(time.perf_counter() - t)
        print(f"new, write to the local disk ({disk_dir}): {disk[-1]:.2f} s", flush=True)
    rows.append(("new: parallel write -> local disk (page cache)", 0.0, statistics.median(disk[1:]), written))
    sync.close()
    shutil.rmtree(new_dir, ignore_errors=True)
    shutil.rmtree(disk_dir, ignore_errors=True)

    # one AdamW-like step at lr 1e-6 (every element moved by 1e-6: Adam's first step), in bf16
    changed = n = 0
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            moved = p - 1e-6 * torch.sign(torch.randn_like(p))
            changed += int((moved != p).sum())
            n += p.numel()
    print(f"bf16 elements changed by one step of 1e-6 per element: {changed / n:.2%} of "
          f"{n / 1e9:.2f}B", flush=True)

    print("\n| path | learner waits (s) | background (s) | bytes |\n|---|---|---|---|")
    for label, blocking, background, nbytes in rows:
        print(f"| {label} | {blocking:.2f} | {background:.2f} | {gib(nbytes)} |")
    block = statistics.median(copies)
    return (f"sync: trainer-blocking {block:.2f} s (was {statistics.median(old):.2f} s), total "
            f"{block + statistics.median(writes):.2f} s")


def tiny(args) -> str:
    import copy

    sys.path.insert(0, str(ROOT / "tests"))
    from vlrl.adapters.qwen3_vl import Qwen3VLAdapter
    from vlrl.config import ModelConfig
    from vlrl.rollout.vllm_client import VLLMClient, VLLMSampler

    from vllm_server import Server, prompts, rollout_cfg, trainer_logprobs  # tests/vllm_server.py

    model_dir = Path(os.environ.get("VLRL_TINY_MODEL", ROOT / ".cache/tiny-qwen3-vl"))
    adapter = Qwen3VLAdapter.from_config(ModelConfig(path=str(model_dir), dtype="float32", min_pixels=4096,
                                                     max_pixels=16384, max_model_len=1024))
    model = adapter.load_model(torch.float32).eval()
    base = copy.deepcopy(model)
    model.model.visual.requires_grad_(False)
    work = Path(tempfile.mkdtemp(prefix="vlrl-bench-sync-"))
    server = Server(model_dir, work / "serve.log").start()
    rows = []
    try:
        cfg = rollout_cfg(server)
        client = VLLMClient(server.url, cfg)
        old_sync = DiskWeightSync(client, adapter, work / "old")
        sync = DiskWeightSync(client, adapter, Path("/dev/shm") / f"vlrl-bench-{os.getpid()}",
                              remove_at_close=True)
        sampler = VLLMSampler(adapter, cfg, weight_sync=sync, client=client)
        ps = prompts(adapter)
        sampler.sync_weights(model, background=False)  # the first push: every tensor
        for step in range(1, args.steps + 1):
            with torch.no_grad():  # a step moves the language model
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        p.add_(0.02 * torch.randn_like(p))
            # today's path: save_pretrained, then the reload, the learner waiting for all of it
            t = time.perf_counter()
            (work / "old").mkdir(exist_ok=True)
            adapter.save_pretrained(model, work / "old")
            client.pause()
            try:
                client.reload_weights(str((work / "old").resolve()))
            finally:
                client.resume()
            old = time.perf_counter() - t
            # the new one: the learner waits for the copy; the first request after waits for the rest
            t = time.perf_counter()
            sampler.sync_weights(model)
            blocking = time.perf_counter() - t
            t = time.perf_counter()
            rollouts = sampler.sample(ps, n=4)
            first = time.perf_counter() - t
            stats = trainer_logprobs(adapter, model, rollouts)
            moved = trainer_logprobs(adapter, base, rollouts)["max_abs_diff"]
            rows.append((step, old, blocking, sync.seconds["write"], sync.seconds["load"], sampler.push_s,
                         first,
                         sampler.push_wait_s, stats["mismatch_kl"], stats["max_abs_diff"], moved,
                         sync.bytes_written))
            sampler.push_wait_s = 0.0
            print(f"step {step}: mismatch KL {stats['mismatch_kl']:.2e}", flush=True)
        sampler.sync_weights(base, background=False)  # leave the server as it started
        sampler.close()
        old_sync.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\n| step | today: blocking (s) | new: blocking (s) | write (s) | reload (s) | push total (s) | "
          "first "
          "request (s) | of which waited for the push (s) | mismatch KL | max abs diff | vs base weights | "
          "bytes written |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | "
              f"{r[7]:.3f} | {r[8]:.1e} | {r[9]:.1e} | {r[10]:.1e} | {r[11]} |")
    assert all(r[8] < 1e-6 for r in rows), "the server sampled from weights other than the pushed ones"
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return f"sync: trainer-blocking {med(2):.2f} s (was {med(1):.2f} s), total {med(5):.2f} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the CPU end-to-end run with a real vLLM server")
    ap.add_argument("--repeat", type=int, default=4, help="timed syncs after the first (GPU)")
    ap.add_argument("--old-repeat", type=int, default=1, help="timed runs of today's path (GPU; ~17 s each)")
    ap.add_argument("--disk-dir", default=str(ROOT / "runs/bench-sync-disk"),
                    help="a directory on the local disk (GPU)")
    # the GPU part on the CPU, tiny model
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=4, help="synced steps (--tiny)")
    args = ap.parse_args()
    line = tiny(args) if args.tiny or not (torch.cuda.is_available() or args.smoke) else gpu(args)
    print(json.dumps({"argv": sys.argv[1:]}))
    print(line)


if __name__ == "__main__":
    main()
