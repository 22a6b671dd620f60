"""LoRA on the language model (peft), injected in place so the model keeps its own class and forward.

Checkpoints hold the merged weights (W + B @ A * scale, computed without touching the trained tensors), so
vLLM serves them as a plain model, plus the adapter's own tensors for resuming.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

ADAPTER_FILE = "adapter_model.safetensors"


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("model.lora_rank > 0 needs peft: pip install 'vlrl[lora]'") from None
    return peft


ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model, model_cfg, adapter_dir: Path | None = None,
             default_targets: list[str] | None = None) -> None:
    """Inject LoRA layers; only they train. `adapter_dir` (a checkpoint's) restores their weights. Targets:
    `model.lora_target_modules`, else `default_targets` (the family's), else attention and MLP projections."""
    peft = _peft()
    lora = peft.LoraConfig(
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha,
        target_modules=model_cfg.lora_target_modules or default_targets or ATTENTION_AND_MLP,
        lora_dropout=0.0,
        bias="none",
    )
    peft.inject_adapter_in_model(lora, model, adapter_name="default")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if adapter_dir is not None:
        from safetensors.torch import load_file

        state = load_file(str(Path(adapter_dir) / ADAPTER_FILE))
        peft.set_peft_model_state_dict(model, state, adapter_name="default")


def has_lora(model) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def lora_layers(model) -> dict:
    """Checkpoint name of each LoRA-adapted weight -> its LoRA layer ({} without LoRA)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_weight(layer):
    """W + B @ A * scale of one LoRA layer, a new tensor (the trained ones untouched)."""
    import torch

    with torch.no_grad():
        base = layer.get_base_layer().weight
        return base + layer.get_delta_weight("default").to(base.dtype)


def merged_state(model) -> dict:
    """Plain checkpoint names -> tensors, each LoRA layer's W + B @ A * scale (trained tensors untouched)."""
    import torch

    with torch.no_grad():
        state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        for name, layer in lora_layers(model).items():
            state[name] = merged_weight(layer)
    return state


def save_merged(model, out_dir: Path) -> None:
    """Merged HF weights in `out_dir`, the adapter's tensors in `out_dir/adapter`."""

    model.save_pretrained(out_dir, state_dict=merged_state(model), safe_serialization=True)
    save_adapter(model, out_dir)


def save_adapter(model, out_dir: Path) -> None:
    """The adapter's own tensors in `out_dir/adapter` (what a resumed run loads)."""
    from safetensors.torch import save_file

    peft = _peft()
    adapter = Path(out_dir) / "adapter"
    adapter.mkdir(exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
    save_file(tensors, str(adapter / ADAPTER_FILE))
