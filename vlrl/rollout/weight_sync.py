"""Pushing the trainer's updated weights to the vLLM server after each optimizer step.

- `DiskWeightSync` (default; one node, no set-up): write the policy as an HF safetensors directory, then
  `reload_weights` through the server's collective-RPC route and reset its prefix cache, with generation
  paused across the swap so no rollout mixes two policies.
- `NCCLWeightSync` (GPU clusters): vLLM's own NCCL weight-transfer engine (trainer rank 0 broadcasts every
  tensor to the server's workers, which joined the group through `/init_weight_transfer_engine`). Needs vLLM
  importable in the trainer and a server started with `vlrl serve --weight-sync nccl`.
Both send the weights under their Hugging Face checkpoint names, LoRA merged in (`export_state`).
"""

from __future__ import annotations

from pathlib import Path

import torch


def export_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names, LoRA deltas merged (what vLLM loads)."""
    from ..adapters.lora import has_lora, merged_state

    if has_lora(model):
        return merged_state(model)
    return dict(model.state_dict())


class DiskWeightSync:
    def __init__(self, client, adapter, sync_dir: Path):
        self.client = client
        self.adapter = adapter
        self.sync_dir = Path(sync_dir)

    def push(self, model, state: dict | None = None) -> None:
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        self.adapter.save_pretrained(model, self.sync_dir, state)
        self.client.pause()
        try:
            self.client.reload_weights(str(self.sync_dir.resolve()))
        finally:
            self.client.resume()


class NCCLWeightSync:
    """vLLM's trainer-side NCCL engine, fed from `export_state` (rank 0 sends; other ranks only join)."""

    def __init__(self, client, cfg, model, rank: int = 0):
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

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
            self.client.reset_prefix_cache()
        finally:
            self.client.resume()
