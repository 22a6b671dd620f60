"""Pushing the trainer's updated weights to the vLLM server after each optimizer step.

- `DiskWeightSync` (default; one node, no set-up): safetensors files the server reloads in place
  (`reload_weights` through its collective-RPC route, generation paused across the swap, then its prefix,
  multi-modal and encoder caches reset). In three parts, so the learner waits only for the first
  (`VLLMSampler.sync_weights` runs the others in the background; the next sampling waits for them): `copy`
  (GPU -> pinned host buffers allocated once, `weight_files.py`), `write` (the files, in parallel) and `load`
  (the server's reload). Only tensors an optimizer step can change are copied, written and reloaded each time
  (`export_plan`): a frozen vision tower and a LoRA model's base weights are written once, and reloaded only
  by a server that lost our last push (restarted). The files go to shared memory (`/dev/shm`) when the server
  is on this machine and it has room (`default_sync_dir`).
- `NCCLWeightSync` (GPU clusters): vLLM's own NCCL weight-transfer engine (trainer rank 0 broadcasts every
  tensor to the server's workers, which joined the group through `/init_weight_transfer_engine`). Needs vLLM
  importable in the trainer and a server started with `vlrl serve --weight-sync nccl`. Synchronous, as before;
  not runnable on the machines this project is measured on (vLLM cannot be installed beside the GPU's torch).
Both send the weights under their Hugging Face checkpoint names, LoRA merged in.

Tied embeddings (Qwen3-VL-2B and 4B): a checkpoint holds the shared matrix once, as `embed_tokens`, and
vLLM 0.32's in-place reload then loads no weight into the output head. Its layer is put back as it was,
and on the CPU backend that keeps the head's pre-packed GEMM weights (oneDNN / sgl kernels pack the matrix at
load time), so the server samples from the new body with the old head: measured mismatch KL 0.19 after one
changed sync with the tiny tied model, against 1e-13 untied. The disk sync therefore also writes
`lm_head.weight` (a copy of the tied matrix): during a reload vLLM does not see the two names as aliases (its
layers are on the meta device then), loads the head like any layer and rebuilds its kernel state.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

SHM = "/dev/shm"


def export_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names, LoRA deltas merged (what vLLM loads)."""
    from ..adapters.lora import has_lora, merged_state

    if has_lora(model):
        return merged_state(model)
    return dict(model.state_dict())


def ties_embeddings(config) -> bool:
    """Whether the model's output head shares its input embedding (Qwen3-VL-2B/4B: yes; 8B/32B: no)."""
    text = getattr(config, "text_config", None)
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def export_plan(model, state: dict | None = None) -> dict[str, bool]:
    """Every tensor the server loads, by checkpoint name (model order), and whether an optimizer step can
    change it.

    A tensor changes when it is trained or is a LoRA-merged weight (W + B @ A), and when a sibling does (the
    tensors of one parent module, `self_attn.q_proj/k_proj/v_proj`): vLLM fuses siblings into one layer
    (`qkv_proj`, `gate_up_proj`), and its in-place reload (vLLM 0.32 `model_loader/reload/layerwise.py`)
    builds a layer it was given part of from that part alone, the rest left uninitialised; a layer given
    nothing is put back as it was. So a partial reload hands over whole layers. `state`: weights gathered from
    FSDP shards."""
    from ..adapters.lora import lora_layers

    # parameters themselves: requires_grad readable; tied names both there
    own = model.state_dict(keep_vars=True)
    names = list(state) if state is not None else [k.replace(".base_layer", "") for k in own
                                                   if "lora_" not in k]
    trained = {k.replace(".base_layer", "") for k, v in own.items()
               if "lora_" not in k and getattr(v, "requires_grad", False)}
    trained |= {n for n, layer in lora_layers(model).items()
                if any(p.requires_grad for p in layer.parameters())}
    if ties_embeddings(model.config) and "lm_head.weight" not in names:
        names.append("lm_head.weight")  # (see the module docstring)
        if _embed_name(model) in trained:
            trained.add("lm_head.weight")
    parents = {_parent(n) for n in names if n in trained}
    return {n: n in trained or _parent(n) in parents for n in names}


def _parent(name: str) -> str:
    """`a.b.layers.3.self_attn.q_proj.weight` -> `a.b.layers.3.self_attn` (the module above the tensor's
    own)."""
    return name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""


def _embed_name(model) -> str | None:
    embed = model.get_input_embeddings().weight
    return next((k for k, p in model.named_parameters() if p is embed), None)


def export_tensors(model, state: dict | None, names):
    """`(name, tensor)` for `names`, lazily: a LoRA-merged weight exists only while it is copied."""
    from ..adapters.checkpoint_layout import checkpoint_transposes, to_checkpoint
    from ..adapters.lora import lora_layers, merged_weight

    layers = lora_layers(model) if state is None else {}
    own = state if state is not None else model.state_dict(keep_vars=True)
    transposes = checkpoint_transposes(model)  # (in the checkpoint's layout: MoE experts are transposed)
    for name in names:
        if name in layers:
            yield name, to_checkpoint(name, merged_weight(layers[name]), transposes)
        elif name in own:
            yield name, to_checkpoint(name, own[name], transposes)
        elif name == "lm_head.weight":  # a tied head the state holds once, as the embedding
            yield name, own[_embed_name(model)] if state is not None else model.get_output_embeddings().weight
        else:
            raise KeyError(f"{name}: not among the model's weights")


def default_sync_dir(run_dir: Path, server_url: str | None, nbytes: int) -> Path:
    """`rollout.sync_dir` unset: shared memory (`/dev/shm/vlrl-sync-<run>`) when the server is on this machine
    and /dev/shm has room for the weights plus a quarter, else `<run dir>/weights` (a server elsewhere reads
    it there)."""
    import hashlib
    import shutil
    from urllib.parse import urlparse

    shm = Path(SHM)
    host = (urlparse(server_url or "").hostname or "").lower()
    local = host in ("127.0.0.1", "localhost", "::1", "0.0.0.0") or host == socket_hostname()
    if local and shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 1.25 * nbytes:
        tag = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
        return shm / f"vlrl-sync-{Path(run_dir).name}-{tag}"
    return Path(run_dir) / "weights"


def socket_hostname() -> str:
    import socket

    return socket.gethostname().lower()


def state_bytes(model) -> int:
    """Bytes of the model's weights at their own dtype (FSDP shards counted whole)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class DiskWeightSync:
    """Weights through files the server reads (`reload_weights`), in three parts the sampler runs apart:
    `copy` (the learner waits: GPU -> pinned host buffers), `write` (files, in parallel) and `load` (the
    server's reload, paused, then its caches reset). Only tensors a step can change are copied and
    written each time (`export_plan`); the others (a frozen vision tower, a LoRA model's base) are written
    once, and a reload reads them again only when `load(full=True)` (a server that does not hold our last
    push)."""

    def __init__(self, client, adapter, sync_dir: Path, remove_at_close: bool = False):
        self.client = client
        self.adapter = adapter
        self.sync_dir = Path(sync_dir)
        self.remove_at_close = remove_at_close
        self.trained = None  # HostShards of the tensors that change (allocated at the first push, kept)
        self.frozen = None  # HostShards of those that do not, until written
        self.frozen_files: dict[str, str] = {}  # name -> file of every tensor written once
        self.layout = None
        self.bytes_written = 0  # by the last `write`
        self.wrote = False  # this instance wrote into sync_dir (only then does `close` remove it)
        self.seconds = {"copy": 0.0, "write": 0.0, "load": 0.0}  # of the last push's parts

    def copy(self, model, state: dict | None = None) -> None:
        """The learner's part: the changing tensors to host buffers (and, the first time, the others)."""
        from .weight_files import HostShards

        t0 = time.perf_counter()
        plan = export_plan(model, state)
        layout = (id(model), tuple(plan.items()))
        first = layout != self.layout
        if first:
            self.close_buffers()
            specs = {n: (t.dtype, tuple(t.shape)) for n, t in export_tensors(model, state, list(plan))}
            changing = {n: specs[n] for n in plan if plan[n]}
            still = {n: specs[n] for n in plan if not plan[n]}
            self.trained = HostShards(changing, "trained", pin=True)
            self.frozen = HostShards(still, "frozen", pin=False) if still else None
            self.frozen_files = {}
            self.layout = layout
        self.trained.copy_from(export_tensors(model, state, list(self.trained.specs)))
        if first and self.frozen is not None:
            self.frozen.copy_from(export_tensors(model, state, list(self.frozen.specs)))
        self.seconds["copy"] = time.perf_counter() - t0

    def write(self) -> int:
        """The files of the last `copy` (the frozen ones only once); returns the bytes written."""
        t0 = time.perf_counter()
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        self.wrote = True
        written = self.trained.write(self.sync_dir)
        if self.frozen is not None:
            written += self.frozen.write(self.sync_dir)
            self.frozen_files = {n: s.file for s in self.frozen.shards for n in s.names}
            self.frozen = None  # its buffer goes; its files stay
        self.bytes_written = written
        self.seconds["write"] = time.perf_counter() - t0
        return written

    def load(self, full: bool) -> None:
        """The server reloads the changing tensors (`full`: every tensor), paused so no request mixes two
        policies."""
        from .weight_files import write_index

        t0 = time.perf_counter()
        weight_map = {n: s.file for s in self.trained.shards for n in s.names}
        if full:
            weight_map.update(self.frozen_files)
        write_index(self.sync_dir, weight_map)
        self.client.pause()
        try:
            self.client.reload_weights(str(self.sync_dir.resolve()))
            self.client.reset_caches()
        finally:
            self.client.resume()
        self.seconds["load"] = time.perf_counter() - t0

    def push(self, model, state: dict | None = None) -> None:
        """All three at once, every tensor loaded."""
        self.copy(model, state)
        self.write()
        self.load(full=True)

    def close_buffers(self) -> None:
        for shards in (self.trained, self.frozen):
            if shards is not None:
                shards.close()
        self.trained = self.frozen = None
        self.layout = None

    def close(self) -> None:
        """Free the host buffers; remove a default shared-memory sync dir (it holds the model in RAM)."""
        import shutil

        self.close_buffers()
        if self.remove_at_close and self.wrote and self.sync_dir.is_dir():
            shutil.rmtree(self.sync_dir, ignore_errors=True)


class NCCLWeightSync:
    """vLLM's trainer-side NCCL engine, fed from `export_state` (rank 0 sends; other ranks only join)."""

    def __init__(self, client, cfg, model, rank: int = 0):
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        class StateSource(WeightSource):
            def __init__(self, module):
                self.module, self.state = module, None

            def tensors(self):
                return self.state if self.state is not None else export_state(self.module)

            def metadata(self):
                return [ParamMeta(k, v.dtype, tuple(v.shape)) for k, v in self.tensors().items()]

            def __iter__(self):
                for k, v in self.tensors().items():  # gathered (FSDP) weights wait on the CPU: one at a time
                    yield k, v.cuda(non_blocking=True) if torch.cuda.is_available() and not v.is_cuda else v

        self.client = client
        self.source = StateSource(model)
        self.init_info = NCCLTrainerInitInfo(
            master_address=cfg.nccl_master_address,
            master_port=cfg.nccl_master_port,
            world_size=1 + client.world_size(),  # trainer rank 0 + every server worker
            rank=rank,
        )
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            self.init_info, client=client, source=self.source)

    def push(self, model, state: dict | None = None) -> None:
        self.source.module, self.source.state = model, state
        self.client.pause()
        try:
            self.engine.send_weights()
            self.client.reset_caches()
        finally:
            self.client.resume()
