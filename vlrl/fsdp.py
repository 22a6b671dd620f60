"""What FSDP2 changes for a run: no rank holds the whole model, so whole-model operations gather first.

Under `accelerate launch --config_file configs/accelerate/fsdp2-*.yaml` every decoder layer and vision block
is its own FSDP2 unit (parameters sharded over the ranks, all-gathered for their forward and backward).
Whole weights are needed in three places, each gathered one tensor at a time so no GPU ever holds two copies:

- checkpoints and the disk weight sync: the full state on rank 0's CPU (`full_state`);
- the in-process sampler: each rank samples with an unsharded replica refreshed after every optimizer step
  (`copy_full_weights`), so ranks generate independently (no lockstep `generate`);
- the optimizer state: gathered to rank 0's CPU for the checkpoint, broadcast back and re-sharded on resume.
Checkpoints therefore have the same layout under FSDP2, DDP and one process.
"""

from __future__ import annotations

import torch
from torch import nn

PREFIX = "model."  # the policy wraps the HF model as `.model`; checkpoints use the HF model's own names


def _hf_name(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def is_fsdp(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type.name == "FSDP"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights under HF names, on rank 0's CPU ({} on other ranks). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(policy, options=_options(cpu_offload=True))
    return {_hf_name(k): v for k, v in state.items()}


@torch.no_grad()
def copy_full_weights(policy: nn.Module, replica: nn.Module) -> None:
    """Copy the sharded policy's weights into `replica` (an unsharded HF model on this rank), one
    all-gathered tensor at a time (cast to the replica's dtype). Every rank calls it."""
    targets = dict(replica.named_parameters())
    for name, param in policy.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        targets[_hf_name(name)].copy_(full)
        del full


def optimizer_state(policy: nn.Module, optimizer) -> dict:
    """The full optimizer state (keyed by parameter name) on rank 0's CPU. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(policy, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(policy: nn.Module, optimizer, state: dict) -> None:
    """Load a state from `optimizer_state`. With several ranks, rank 0's copy is broadcast and every rank
    keeps its own shard (the others' copies are not read: a memory-mapped checkpoint costs them nothing)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        state = {}
    set_optimizer_state_dict(policy, optimizer, state, options=_options(broadcast_from_rank0=distributed))


def fsdp2_plugin(units: tuple[str, ...]):
    """The FSDP2 plugin the fsdp2-*.yaml configs describe, sharding `units` (the adapter's `fsdp_units`)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True,
                                          transformer_cls_names_to_wrap=list(units))


def prepare_on_cpu(accelerator, policy: nn.Module, units: tuple[str, ...]) -> nn.Module:
    """Accelerate's own FSDP2 preparation, as the fsdp2-*.yaml configs ask for it, applied to CPU processes
    (Accelerate runs FSDP on GPUs only): for the gloo tests and `bench/fsdp_update.py --tiny`."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator.state.fsdp_plugin = fsdp2_plugin(units)
    return fsdp2_prepare_model(accelerator, policy)
