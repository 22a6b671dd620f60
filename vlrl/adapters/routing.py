"""The routers of a mixture-of-experts language model: routing replay, routing capture, router logits.

A token's MoE layer output depends on which top-k experts its router picks; a float difference of 1e-7
between the sampler's and the trainer's hidden states flips a near-tie and the token goes to another expert,
so an MoE policy's trainer/sampler logprobs drift far more than a dense one's. Routing replay (R3,
arXiv:2510.11370) gives the trainer the sampler's choice: each token of the [N] tokens a router sees takes
the experts the sampler took (`forced` [N, k]; rows of -1: the router's own top-k), weighted by the trainer
router's own probabilities of those experts, renormalised over them (as Qwen3-MoE renormalises its top-k),
so the router still trains through the weights.

How the sampler's experts reach each router: `routing_requests` holds, for the duration of a policy forward,
the [N, layers, k] experts of the whole (padded [B, L] or packed [1, T]) input, flattened as the routers
flatten their input; a pre-hook of the language model hands them to every decoder layer as a keyword
(`KEYWORD`), and a pre-hook of each decoder layer takes its layer's [N, k] slice off the keywords and gives it
to its router. Riding on the decoder layer's arguments, they are there again when a checkpointed layer is
recomputed in the backward pass (as the packing boundaries are: packing.py).

Capture (the embedded sampler): while `capture` is set, each router appends its chosen experts [N, k] of
every call (the prompt's prefill, then one decode step at a time) to a list. Router logits (the load-balancing
loss) are collected in the first forward only, never in a recomputation.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

KEYWORD = "vlrl_routed_experts"


def moe_layers(language_model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, its router) of every sparse layer."""
    out = []
    for i, layer in enumerate(language_model.layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            out.append((i, gate))
    return out


def patch_routers(language_model: nn.Module) -> None:
    """Give every router of `language_model` replay, capture and logit collection (idempotent)."""
    if getattr(language_model, "_vlrl_routing", None) is not None:
        return
    state = {"request": None, "capture": None, "logits": None}
    language_model._vlrl_routing = state
    language_model.register_forward_pre_hook(_add_routing_kwargs, with_kwargs=True)
    for i, gate in moe_layers(language_model):
        gate._vlrl_state = state
        gate._vlrl_forced = None
        gate._vlrl_layer = i
        gate.forward = _routed_forward.__get__(gate)
        layer = language_model.layers[i]
        layer._vlrl_layer_index = i
        layer.register_forward_pre_hook(_take_layer_routing, with_kwargs=True)


@contextmanager
def routing_requests(language_model: nn.Module, experts: torch.Tensor | None, collect_logits: bool = False):
    """Within the block, the language model's routers take `experts` ([..., layers, k] over the input's
    tokens, -1 where a token has none: the router's own choice), and, with `collect_logits`, append their
    logits [N, E] to the list this yields."""
    state = language_model._vlrl_routing
    logits: list[torch.Tensor] = []
    state["request"] = None if experts is None else experts.reshape(-1, *experts.shape[-2:])
    state["logits"] = logits if collect_logits else None
    try:
        yield logits
    finally:
        state["request"] = None
        state["logits"] = None


@contextmanager
def capture_routing(language_model: nn.Module):
    """Within the block, each router appends the experts it chose ([N, k] int64 per call) to its list in
    the dict this yields ({decoder layer index: [calls...]})."""
    state = language_model._vlrl_routing
    calls: dict[int, list[torch.Tensor]] = {i: [] for i, _ in moe_layers(language_model)}
    state["capture"] = calls
    try:
        yield calls
    finally:
        state["capture"] = None


def _add_routing_kwargs(module, args, kwargs):
    request = module._vlrl_routing["request"]
    if request is None:
        return None
    return args, {**kwargs, KEYWORD: request}


def _take_layer_routing(layer, args, kwargs):
    experts = kwargs.pop(KEYWORD, None)
    layer.mlp.gate._vlrl_forced = None if experts is None else experts[:, layer._vlrl_layer_index]
    return args, kwargs


def _routed_forward(self, hidden_states: torch.Tensor):
    """Qwen3-VL-MoE's top-k router (transformers' `Qwen3VLMoeTextTopKRouter.forward`, the same operations),
    with replay, capture and logit collection. Returns (logits [N, E], weights [N, k], experts [N, k])."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)  # [N, H]
    router_logits = F.linear(hidden_states, self.weight)  # [N, E]
    probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
    top_value, top_index = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
    forced, self._vlrl_forced = self._vlrl_forced, None  # (set again by the layer's pre-hook on recompute)
    if forced is not None:
        forced = forced.to(device=top_index.device, dtype=top_index.dtype)
        if forced.shape != top_index.shape:
            raise ValueError(f"routing replay: {tuple(forced.shape)} sampler experts for a router over "
                             f"{tuple(top_index.shape)} token choices")
        top_index = torch.where(forced[:, :1] >= 0, forced, top_index)
        top_value = probs.gather(-1, top_index)
    top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    state = self._vlrl_state
    if state["capture"] is not None:
        state["capture"][self._vlrl_layer].append(top_index.detach())
    if state["logits"] is not None:
        state["logits"].append(router_logits)
    return router_logits, top_value.to(router_logits.dtype), top_index

