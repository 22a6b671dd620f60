"""Activation checkpointing per decoder layer: `full`, `selective` or `none`, as any mix over the layers.

- `full`: the layer keeps only its input and recomputes its whole forward in the backward pass
  (transformers' `GradientCheckpointingLayer`, non-reentrant; with compiled layers the recompute calls the
  compiled graph).
- `selective`: the layer keeps the outputs of its matrix products and of attention and recomputes the rest
  (the norms, rotary embedding, activation function, residual adds): torch's selective activation
  checkpointing (`torch.utils.checkpoint.create_selective_checkpoint_contexts`), the policy torchtitan uses.
  Recomputing elementwise ops costs memory bandwidth, not matrix work: a few percent of a layer's time, where
  `full` costs a third of it (one more forward). It is exact: the recomputed ops are the same ops on the same
  inputs.
  The checkpoint is taken inside the layer's `forward`, so a compiled layer traces it and hands the policy to
  the partitioner (which then saves exactly the tensors the policy names), rather than wrapping the compiled
  graph from outside, where the policy would see one opaque call.
- `none`: the layer keeps every activation its backward needs.

Where each kind goes (`PLACEMENT`): `"stacked"` (the default) puts the layers recomputed whole at the bottom,
the selective ones above them and those keeping everything at the top. The backward runs from the top down, so
the layers that hold the most are freed first: a full layer's recompute (one layer's whole activations, for a
moment) then comes when little is left above it, where among spread layers the first one sat near the top,
over every kept activation; and the optimizer offload's moments (`optimizer_offload.py`) come back into the
memory the top layers free. `"spread"`: each kind spread evenly over the depth (`spread`), as before. Either
way a compiled model holds one graph per kind, shared by its layers.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten


def _saved_ops() -> set:
    """Ops whose outputs a selective layer keeps: matrix products and attention (costly to recompute)."""
    ops = {_aten.mm.default, _aten.bmm.default, _aten.addmm.default, _aten._scaled_mm.default,
           _aten._scaled_dot_product_flash_attention.default,
           _aten._scaled_dot_product_efficient_attention.default,
           _aten._flash_attention_forward.default, _aten._efficient_attention_forward.default}
    for name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_cudnn_attention_forward", "_grouped_mm"):  # (_grouped_mm: a mixture of experts' GEMMs)
        op = getattr(_aten, name, None)
        if op is not None:
            ops.add(op.default)
    varlen = getattr(torch.ops, "torch_attn", None)  # torch.nn.attention.varlen's custom op (torch >= 2.10)
    if varlen is not None:
        try:
            ops.add(varlen._varlen_attn.default)
        except AttributeError:  # (the namespace exists once varlen.py is imported)
            pass
    return ops


SAVED = None  # filled at first use: torch.nn.attention.varlen registers its op when imported


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matrix products and attention, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(selective_policy)


PLACEMENT = "stacked"  # or "spread" (module docstring)


def spread(n: int, count: int, among: list[int] | None = None) -> list[int]:
    """`count` of the positions `among` (default: range(n)) spread evenly: the i-th taken when
    (i + 1) * count // len > i * count // len (whole layers; k / n fractions are exact)."""
    among = list(range(n)) if among is None else among
    m = len(among)
    return [j for i, j in enumerate(among) if (i + 1) * count // max(m, 1) > i * count // max(m, 1)]


def set_layer_checkpointing(layers: nn.ModuleList, full: int, selective: int) -> None:
    """`full` layers recomputed whole, `selective` of the others selectively, the rest keep everything,
    placed as `PLACEMENT` says. The layers must be transformers' `GradientCheckpointingLayer`s with
    checkpointing enabled on the model."""
    global SAVED
    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn::_varlen_attn)
    except ImportError:  # (torch < 2.10: no varlen route to keep)
        pass
    if SAVED is None:
        SAVED = _saved_ops()
    n = len(layers)
    if PLACEMENT == "spread":
        whole = set(spread(n, full))
        part = set(spread(n, selective, [i for i in range(n) if i not in whole]))
    else:  # bottom to top: full, selective, keep
        whole, part = set(range(full)), set(range(full, min(full + selective, n)))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in whole
        if "forward" not in layer.__dict__:
            _install(layer)
        layer._vlrl_selective = i in part


def layer_modes(layers: nn.ModuleList) -> list[str]:
    """Each layer's kind: 'full', 'selective' or 'none' (for tests and messages)."""
    return ["full" if layer.gradient_checkpointing
            else "selective" if getattr(layer, "_vlrl_selective", False)
            else "none" for layer in layers]


def _install(layer: nn.Module) -> None:
    """Route the layer's forward through a selective checkpoint when `layer._vlrl_selective` (read at each
    call, so a compiled layer holds one graph per kind, guarded on it). A bound method: a deep copy of the
    layer gets its own."""
    layer._vlrl_selective = False
    layer.forward = types.MethodType(_forward, layer)


def _forward(self, *args, **kwargs):
    original = functools.partial(type(self).forward, self)
    if self._vlrl_selective and self.training and torch.is_grad_enabled():
        return checkpoint(original, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
    return original(*args, **kwargs)
