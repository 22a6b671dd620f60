"""Pushing the trainer's updated weights to the vLLM server after each optimizer step.

- `DiskWeightSync` (default; one node, no set-up): write the policy as an HF safetensors directory, then
  `reload_weights` through the server's collective-RPC route and reset its caches (prefix, multi-modal,
  encoder), with generation paused across the swap so no rollout mixes two policies.
- `NCCLWeightSync` (GPU clusters): vLLM's own NCCL weight-transfer engine (trainer rank 0 broadcasts every
  tensor to the server's workers, which joined the group through `/init_weight_transfer_engine`). Needs vLLM
  importable in the trainer and a server started with `vlrl serve --weight-sync nccl`.
Both send the weights under their Hugging Face checkpoint names, LoRA merged in (`export_state`).

Tied embeddings (Qwen3-VL-2B and 4B): a checkpoint holds the shared matrix once, as `embed_tokens`, and
vLLM 0.32's in-place reload then loads no weight into the output head. Its layer is put back as it was,
and on the CPU backend that keeps the head's pre-packed GEMM weights (oneDNN / sgl kernels pack the matrix at
load time), so the server samples from the new body with the old head: measured mismatch KL 0.19 after one
changed sync with the tiny tied model, against 1e-13 untied. The disk sync therefore also writes
`lm_head.weight` (a copy of the tied matrix, in a file of its own): during a reload vLLM does not see the
two names as aliases (its layers are on the meta device then), loads the head like any layer and rebuilds its
kernel state. On a fresh start from the same directory vLLM sees the tie and skips the copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TIED_HEAD_FILE = "lm_head.safetensors"


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


def write_tied_head(model, out_dir: Path, state: dict | None = None) -> None:
    """For a tied model, write `lm_head.weight` beside the checkpoint (and into its shard index, if any), so
    vLLM's in-place reload refreshes the output head too (see the module docstring)."""
    if not ties_embeddings(model.config):
        return
    from safetensors.torch import save_file

    head = (state or {}).get("lm_head.weight")
    if head is None:
        head = model.get_output_embeddings().weight
    save_file({"lm_head.weight": head.detach().to("cpu").contiguous().clone()}, str(out_dir / TIED_HEAD_FILE))
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():  # vLLM reads only the files a shard index names
        data = json.loads(index.read_text())
        data["weight_map"]["lm_head.weight"] = TIED_HEAD_FILE
        index.write_text(json.dumps(data, indent=2))


class DiskWeightSync:
    def __init__(self, client, adapter, sync_dir: Path):
        self.client = client
        self.adapter = adapter
        self.sync_dir = Path(sync_dir)

    def push(self, model, state: dict | None = None) -> None:
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        self.adapter.save_pretrained(model, self.sync_dir, state)
        write_tied_head(model, self.sync_dir, state)
        self.client.pause()
        try:
            self.client.reload_weights(str(self.sync_dir.resolve()))
            self.client.reset_caches()
        finally:
            self.client.resume()


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
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(self.init_info, client=client, source=self.source)

    def push(self, model, state: dict | None = None) -> None:
        self.source.module, self.source.state = model, state
        self.client.pause()
        try:
            self.engine.send_weights()
            self.client.reset_caches()
        finally:
            self.client.resume()
